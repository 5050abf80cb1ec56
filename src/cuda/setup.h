// Host-side pieces the CUDA forward and backward passes share: the checks of what the kernels
// support, FwdParams from a validated problem, the tensor maps, and the general kernels' device
// tables (block table with element-mask bits, forget-gate prefix sums, relative buckets).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "core/problem.h"
#include "cuda/fwd_common.cuh"
#include "cuda/fwd_params.h"

namespace attnkit::cuda {

template <class... A>
Status fail(StatusCode code, const A&... parts) {
  std::string msg = "cuda backend: ";
  ((msg += parts), ...);
  return Status(code, std::move(msg));
}
inline std::string str(int64_t x) { return std::to_string(x); }

// The checks both passes share (dtype, alignment, mask limits, varlen, grid limits); the head
// dims are checked against each pass's instantiations.
Status check_common(const core::Problem& p);

// Row operand alignment for the copy engine and the kernels' wide accesses: `elems`-element
// aligned base and batch, head and row strides (rows_aligned), or the error naming the rule.
bool rows_aligned(const core::RowOperand& r, int elems);
Status check_rows(const core::RowOperand& r, const char* name, int elems);

// The band [i' - left, i' + right] of masks the fast kernels handle, or false.
bool band_of(const Mask& m, int64_t* left, int64_t* right);

// FwdParams of a validated problem; num_q_tiles counts query tiles of q_tile rows.
void fill_params(const core::Problem& p, int q_tile, FwdParams* f);

// The row extents of q and k as the kernels address them: rows per batch element, or the packed
// rows of a varlen batch (whose batch extent is then 1).
struct RowExtent {
  int64_t rows_q = 0, rows_k = 0, batch = 0;
};
RowExtent row_extent(const core::Problem& p);

// Attention statistics (p.row_max, p.entropy, p.col_mass) from the forward's LSE, lse[b * lse_sb
// + h * lse_sh + row * lse_sn] (stats.cu); launched on `stream` after the forward.
cudaError_t launch_stats(const core::Problem& p, const FwdParams& f, const float* lse,
                         int64_t lse_sb, int64_t lse_sh, int64_t lse_sn, cudaStream_t stream);

// A tensor map of a row operand as (column, row, head, batch) with boxes of 64 columns x
// box_rows rows (false where the copy engine cannot address it).
bool encode_rows(CUtensorMap* map, int* hm, int* bm, const core::RowOperand& r, int64_t cols,
                 int64_t rows, int64_t heads, int64_t batch, int box_rows);
// The maps of q, k, v with boxes of q_box query rows and k_box key rows: the name of the operand
// the copy engine cannot address, or null.
const char* encode_maps(const core::Problem& p, TmaMaps* maps, int q_box, int k_box);
// Whether the driver's tensor-map encoder is here: without it (no driver, so no device) the
// encoders check the copy engine's rules and leave the maps empty.
bool tensor_maps_available();
// Whether a call (dry_run: can_run's) may go on past its tensor maps: with the encoder, or as a
// dry run where no driver is installed (CI: the maps' rules were checked, nothing launches);
// else the refusal that names the missing encoder (a driver older than CUDA 12 has none).
Status tensor_maps_ready(bool dry_run);
// A switch read from the environment at each call (for measurements): `name` set to "0" turns
// a default-on switch off, set to "1" turns a default-off one on.
bool env_switch(const char* name, bool on_by_default);
// A choice read from the environment at each call (for measurements and tests): `name` set to
// "0" is kOff (never), "1" kOn (wherever it can run), "force" kForce (that, and an error where it
// cannot); unset or any other value, kRule (the library's own rule decides).
enum class EnvChoice { kRule, kOff, kOn, kForce };
EnvChoice env_choice(const char* name);

// A 2-D neighborhood (dilation 1, self-attention over the whole grid, no varlen) on the fast
// kernel's grid tiles: sets f->grid and f->num_q_tiles (the query patches, those at the last
// rows and columns partly past the grid) and makes q's, k's and v's maps
// 5-D (query patches, key boxes of grid_key_width, or ATTNKIT_CUDA_GRID_KEY_W=16 or 32 for
// measurements). False where it does not apply, where the grid's patches are less than a quarter
// full (grid_tiles_worth_it) unless `force`, or in a build without ATTNKIT_CUDA_GRID_TILES.
bool grid_tiles(const core::Problem& p, bool force, FwdParams* f, TmaMaps* maps);

// The kernels' device tables, for tiles of km query rows x kn keys, stream-ordered: build()
// fills f's table, bits (for up to max_slots partial tiles per query tile), forget and bucket
// fields; release() frees what build took. covers() says whether build(.., kMaxBitSlots) gives
// every partial tile its bits (as the fast kernels need for a mask that is not a band).
struct GeneralTables {
  void* table = nullptr;
  void* forget = nullptr;
  void* buckets = nullptr;
  static bool covers(const core::Problem& p, int km, int kn);
  // Whether the tables fit the classification kernel (a byte a key tile of a row in shared
  // memory), a named error otherwise: checked where a call takes a flavor that builds them,
  // before it writes anything.
  static Status fits(const core::Problem& p, int kn);
  cudaError_t build(const core::Problem& p, int km, int kn, int max_slots, cudaStream_t stream,
                    FwdParams* f);
  cudaError_t release(cudaStream_t stream);
};

// Makes the problem's device current for the scope, with a context: the driver's tensor-map
// encoder needs a current context, which a thread that has made no runtime call yet lacks even
// where the device is its current one. A context of that device already current (the primary
// one or the caller's own) is left as it is; otherwise the device's primary context is made
// current (cudaSetDevice) and the thread's context before it (or none) is put back at the end
// (a thread that had none keeps `device` as the runtime's device for its next call). Without a
// driver (CI's dry runs) nothing changes. (A MaskCache entry keys on the device, not the
// context: one built under a caller's own context is for calls under that context.)
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  CUcontext saved_ = nullptr;
  bool changed_ = false;
};

// Fills a 4-D strided view (base of dtype t: fp32, bf16 or fp16; extents n, strides s in
// elements) with src (contiguous fp32 of the same extents) or, without src, zeros.
cudaError_t fill_4d(void* base, DType t, const float* src, const int64_t (&n)[4],
                    const int64_t (&s)[4], cudaStream_t stream);

// The score mods the fast kernels take: ALiBi or a dense bias, each alone or followed by a
// softcap, or a softcap alone (each pass adds its own conditions: the bias's tensor map, the
// head dims with a softcap, the gradients asked for).
struct FastMods {
  bool capped = false;    // a softcap (after ALiBi or the bias, or alone)
  bool alibi = false;     // ALiBi, no other mod but the softcap
  bool bias = false;      // a bias, no other mod but the softcap
  bool cap_only = false;  // the softcap alone
};
FastMods fast_mods(const ScoreMods& mods);
// The fast flavors keep scores in units of the raw dot products: ALiBi's slopes, a softcap, a
// bias and the sinks are divided by the scale there. Below this scale (in magnitude) the
// quotients may overflow fp32 (inf, then NaN), so such calls take the general flavor.
inline constexpr float kMinFastScale = 0x1p-40f;

// The softcap of the fast kernels in the raw dot products' units (cap_raw = softcap / scale).
void set_fast_softcap(FwdParams* f, float softcap, float scale);

// The bias's tensor map for the fast kernels (a 16-bit bias of q's dtype, [B or 1, H or 1, Nq,
// Nk] with unit key stride, no varlen; boxes of 64 keys x box_rows queries); false where it does
// not qualify.
bool encode_bias(const core::Problem& p, TmaMaps* maps, int box_rows);
// maps->o for O stored by the copy engine (FwdParams::tma_out): 16-bit rows of q's dtype and 64
// columns, no varlen (a map's extent cannot end each sequence); false where it does not apply.
bool encode_out(const core::Problem& p, TmaMaps* maps, int box_rows);

}  // namespace attnkit::cuda
