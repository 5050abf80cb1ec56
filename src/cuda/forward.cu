// The CUDA forward pass: checks what the kernels support, resolves the problem into FwdParams and
// launches the instantiation for (dtype, head_dim, head_dim_v) listed in the generated table.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

#include "cuda/forward.h"
#include "cuda/fwd_kernel.cuh"
#include "cuda/setup.h"

namespace attnkit::cuda {

// The kernels are instantiated in the generated fwd_*.cu files, not here.
#define ATK_FWD(T, DT, D, DV)                                                                 \
  extern template cudaError_t launch_fwd<T, D, DV, false>(const FwdParams&, const TmaMaps&,     \
                                                          cudaStream_t);                        \
  extern template cudaError_t launch_fwd<T, D, DV, true>(const FwdParams&, const TmaMaps&,      \
                                                         cudaStream_t);
#include "fwd_table.inc"
#undef ATK_FWD

namespace {

using LaunchFn = cudaError_t (*)(const FwdParams&, const TmaMaps&, cudaStream_t);
struct Instance {
  DType dtype;
  int d, dv;
  LaunchFn fast, general;
};

#define ATK_FWD(T, DT, D, DV) {DT, D, DV, &launch_fwd<T, D, DV, false>, &launch_fwd<T, D, DV, true>},
constexpr Instance kInstances[] = {
#include "fwd_table.inc"
};
#undef ATK_FWD

const Instance* find_instance(DType t, int64_t d, int64_t dv) {
  for (const Instance& x : kInstances)
    if (x.dtype == t && x.d == d && x.dv == dv) return &x;
  return nullptr;
}

}  // namespace

std::vector<std::pair<int, int>> built_head_dims() {
  std::vector<std::pair<int, int>> v;
  for (const Instance& x : kInstances)
    if (x.dtype == DType::kBF16) v.emplace_back(x.d, x.dv);
  return v;
}
std::vector<std::string> built_dtypes() {
  std::vector<std::string> v;
  for (const Instance& x : kInstances) {
    const std::string n = x.dtype == DType::kBF16 ? "bf16" : "fp16";
    bool seen = false;
    for (const std::string& s : v) seen = seen || s == n;
    if (!seen) v.push_back(n);
  }
  return v;
}

Status forward_supports(const core::Problem& p) {
  Status s = check_common(p);
  if (!s.ok()) return s;
  if (!find_instance(p.q.dtype, p.d, p.dv)) {
    std::string built;
    for (const auto& [d, dv] : built_head_dims())
      built += (built.empty() ? "" : ", ") + (d == dv ? str(d) : str(d) + "/" + str(dv));
    return fail(StatusCode::kNotImplemented, "head_dim = ", str(p.d), ", head_dim_v = ", str(p.dv),
                " is not built for ", dtype_name(p.q.dtype), " (built: ", built,
                "; CMake option ATTNKIT_HEAD_DIMS adds more)");
  }
  return {};
}

Status forward(const core::Problem& p, bool dry_run) {
  if (Status st = forward_supports(p); !st.ok()) return st;
  const AttentionSpec& spec = *p.spec;
  const Instance& inst = *find_instance(p.q.dtype, p.d, p.dv);
  FwdParams f;
  fill_params(p, 128, &f);
  int64_t left = 0, right = 0;
  const bool band = band_of(spec.mask, &left, &right);

  // The fast kernel folds the scale into the exponent and takes row maxima of raw dot
  // products: that needs scale > 0 (and not tiny: kMinFastScale).
  const int dp = (inst.d + 63) / 64 * 64, dvp = (inst.dv + 63) / 64 * 64;
  const int kn = dp <= 128 && dvp <= 128 ? 128 : 64;
  DeviceScope device(p.device_index);  // before the tensor maps: the encoder needs a context
  TmaMaps maps;
  auto encode = [&](int q_tile, int k_tile) -> Status {
    const char* bad = encode_maps(p, &maps, q_tile, k_tile);
    if (!bad) return {};
    return fail(StatusCode::kInvalidArgument, bad, ": the copy engine (TMA) cannot address it ",
                "(strides must be multiples of 16 bytes below 2^40 bytes, rows below 2^31)");
  };
  if (Status st = encode(128, kn); !st.ok()) return st;
  // Plain softmax under a band runs the fast kernel alone; under any other mask, the fast kernel
  // with the block table when every partial tile gets its bits.
  // ALiBi alone is one FMA a score on the fast kernel.
  // So is a dense 16-bit bias alone: its tiles load with K's (encode_bias).
  // A softcap, alone or after either, is one tanh a score (in instances where fast_softcap).
  const FastMods fm = fast_mods(spec.mods);
  const bool cap_ok = !fm.capped || fast_softcap(inst.d);
  const bool alibi = cap_ok && fm.alibi;
  const bool bias = cap_ok && fm.bias && encode_bias(p, &maps, 128);
  const bool cap_only = cap_ok && fm.cap_only;
  const bool plain = (!f.has_mods || alibi || bias || cap_only) && p.softmax_family() &&
                     spec.gate_kind == GateKind::kNone && p.scale >= kMinFastScale;
  // A 2-D neighborhood without mods runs on grid tiles (8 x 16 query patches, key boxes of the
  // windows' reach): no block table.
  // ATTNKIT_CUDA_GRID=0 sends it through the block table instead, =force takes grid tiles even
  // where a grid narrower than a patch leaves them mostly empty (both for measurements).
  const EnvChoice grid_env = env_choice("ATTNKIT_CUDA_GRID");
  const bool grid_force = grid_env == EnvChoice::kForce;
  const bool grid = plain && !f.has_mods && kn == kGridRows * kGridCols && !band &&
                    grid_env != EnvChoice::kOff && grid_tiles(p, grid_force, &f, &maps);
  const bool fast = grid || (plain && (band || GeneralTables::covers(p, 128, kn)));
  // Every flavor but the fast kernel under a band and the grid tiles builds a block table.
  const bool tabled = !(grid || (fast && band));
  // Query tiles of 192 rows, three consumer warpgroups (FwdParams::rows192), where d = dv = 64
  // under no mask or a band, no mods but ALiBi. Runs 162-167 (H100, d64 bf16, b = 16384 / N,
  // against 128 rows, alternating rounds): without a mask +4% at N 1024, +9% at 2048, +11% at
  // 3072, +7% at 4096, +12% at 8192; a 1024-key sliding window -13% (N 8192). Causal, with the
  // tiles aligned to the sequence's end (align_end below; runs 184 and 186, H100): +1.6% at N
  // 1024 (noise), -9% at 1280, +9% at 1536, -1% at 2048, +8% at 3072, +6% at 4096; ALiBi causal
  // +7% at 1536, +11% at 4096, +7% at 8192. Runs 176-180 (H200, with a trim since dropped):
  // causal -18 to -20% at N 256 and 512; ALiBi without a mask +11% at 1024, +18% at 4096. With
  // two heads' middles a pair (pair_item; runs 220-221, H100, d64 causal): +2.8% at N 768,
  // +7.6% at 896, +2.3% at 1024, +6.0% at 1152, +3.6% at 1280, but -16% at 256, 0% at 384, -6%
  // at 512, -5% at 640. So they run without a mask, and causal from 768 query rows on, ALiBi
  // or not (ALiBi causal not timed below 1536); other bands keep 128 rows.
  // ATTNKIT_CUDA_FWD_ROWS192=0: never, =1: wherever they can run, =force: that, and an error
  // where they cannot (for tests and measurements).
  const int64_t whole = p.max_nq + p.max_nk;
  const bool unmasked = band && left >= whole && right >= whole;
  const bool causal = band && left >= whole && right == 0;
  const bool rows192_can =
      fast && band && !grid && (!f.has_mods || alibi) && inst.d == 64 && inst.dv == 64;
  const EnvChoice rows192_set = env_choice("ATTNKIT_CUDA_FWD_ROWS192");
  if (!rows192_can && rows192_set == EnvChoice::kForce)
    return fail(StatusCode::kInvalidArgument, "ATTNKIT_CUDA_FWD_ROWS192=force: this call does ",
                "not take 192-row tiles (d = dv = 64, softmax without a gate or mods but ALiBi, ",
                "no mask or a band)");
  const bool rows192_pays = unmasked || (causal && p.max_nq >= 768);
  if (rows192_can && rows192_set != EnvChoice::kOff &&
      (rows192_pays || rows192_set != EnvChoice::kRule)) {
    f = FwdParams{};
    fill_params(p, 192, &f);
    f.rows192 = true;
    if (Status st = encode(192, kn); !st.ok()) return st;
  }
  // Key tiles of 176 (FwdParams::keys176) where d = dv = 128 without a mask or score mods. Runs
  // 191-193 (H200, bf16, b = 16384 / N, against 128 keys, alternating rounds): -1% at N 1024,
  // +0.3% at 2048, +0.5 and +1.2% at 4096, +1.5 and +1.7% at 8192, +2.3, +1.7 and +2.8% at 16384
  // (16 of its 17 rounds above 1). So they run from 8192 keys on. ATTNKIT_CUDA_FWD_KEYS176=0:
  // never, =1: wherever they can run, =force: that, and an error where they cannot.
  const bool keys176_can =
      fast && unmasked && !grid && !f.has_mods && inst.d == 128 && inst.dv == 128;
  const EnvChoice keys176_set = env_choice("ATTNKIT_CUDA_FWD_KEYS176");
  if (!keys176_can && keys176_set == EnvChoice::kForce)
    return fail(StatusCode::kInvalidArgument, "ATTNKIT_CUDA_FWD_KEYS176=force: this call does ",
                "not take 176-key tiles (d = dv = 128, softmax without a gate or mods, no mask)");
  if (keys176_can && keys176_set != EnvChoice::kOff &&
      (p.max_nk >= 8192 || keys176_set != EnvChoice::kRule)) {
    f.keys176 = true;
    if (Status st = encode(128, kWideKeys); !st.ok()) return st;
  }
  // A band with an upper bound runs its query tiles from the sequence's end (FwdParams::
  // align_end; ATTNKIT_CUDA_FWD_ALIGN_END=0: from row 0, kept for measurements). Never with a
  // block table or the grid tiles: their tables count tiles from row 0 (fast && band: !tabled).
  f.align_end =
      fast && band && !grid && right < whole && env_switch("ATTNKIT_CUDA_FWD_ALIGN_END", true);
  if (tabled) {
    const Status fit = GeneralTables::fits(p, kn);
    if (!fit.ok()) return fit;
  }
  // ATTNKIT_CUDA_PINGPONG=0 turns the consumer warpgroups' turn-taking off (for measurements).
  f.pingpong = env_switch("ATTNKIT_CUDA_PINGPONG", true);
  // The turns run on across items (FwdParams::turns_run_on; runs 120, 122, H100: +1-2% at N 1024
  // not causal, within noise elsewhere; ATTNKIT_CUDA_FWD_TURNS=0: once an item, for measurements).
  f.turns_run_on = f.pingpong && env_switch("ATTNKIT_CUDA_FWD_TURNS", true);
  // O by the copy engine where the fast instance has room (d_v = 64; ATTNKIT_CUDA_TMA_OUT=0: off).
  f.tma_out = fast && !grid && env_switch("ATTNKIT_CUDA_TMA_OUT", true) && encode_out(p, &maps, 64);
  // Work items: query tiles of every (b, h), walked by one CTA a multiprocessor (epilogues and
  // the next item's loads overlap). ATTNKIT_CUDA_PERSISTENT_FWD=0 launches one CTA an item, =n
  // n CTAs (for measurements and tests).
  const int64_t items = int64_t{f.num_q_tiles} * p.hq * f.batch;
  if (items > std::numeric_limits<int>::max())
    return fail(StatusCode::kInvalidArgument,
                "batch * heads * query tiles (of 128 or 192 rows, or grid patches) = ", str(items),
                " query tiles: the CUDA forward takes at most 2^31 - 1");
  // can_run: every rule checked, nothing launched.
  if (Status st = tensor_maps_ready(dry_run); !st.ok() || dry_run) return st;
  f.num_items = static_cast<int>(items);
  const cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  cudaError_t e = cudaSuccess;
  const char* pf = std::getenv("ATTNKIT_CUDA_PERSISTENT_FWD");
  int sms = 0;
  if (pf && *pf) {
    char* end = nullptr;
    const long n = std::strtol(pf, &end, 10);
    sms = *end == '\0' && n > 0 && n < (1 << 20) ? static_cast<int>(n) : 0;
  } else if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p.device_index) != 0) {
    (void)cudaGetLastError();  // one CTA an item, and no error left for the launch to report
    sms = 0;
  }
  // Items of one length (the fast kernel with no mask, no varlen) are dealt round-robin: CTA c
  // walks c, c + sms, ... with no counter to zero (its memset cost short calls 2-3 us); items of
  // unequal lengths come from a zeroed counter, so that a CTA done early takes the next one.
  // A band's items (causal, sliding) are dealt in pairs of a long row and a short one instead
  // where the CTAs are fewer than the items, again without a counter (pair_first; runs 120, 122,
  // H100: causal +1.5-3%, d64 N 1024 +0.3%, the rest unchanged; ATTNKIT_CUDA_FWD_PAIRS=0 takes
  // the counter, for measurements), on at most as many CTAs as there are pairs.
  const bool even = fast && unmasked && !p.varlen;
  const bool pairs = !even && fast && band && !p.varlen && sms > 0 && sms < f.num_items &&
                     env_switch("ATTNKIT_CUDA_FWD_PAIRS", true);
  if (pairs) sms = static_cast<int>(std::min<int64_t>(sms, pair_count(int64_t{p.hq} * f.batch,
                                                                      f.num_q_tiles)));
  if (sms > 0 && sms < f.num_items) {
    f.pairs = pairs;
    if (!even && !pairs) {
      e = cudaMallocAsync(reinterpret_cast<void**>(&f.sched), sizeof(int), stream);
      if (e == cudaSuccess) e = cudaMemsetAsync(f.sched, 0, sizeof(int), stream);
      if (e != cudaSuccess) {
        if (f.sched) (void)cudaFreeAsync(f.sched, stream);
        return fail(StatusCode::kInternal, "scratch allocation failed: ", cudaGetErrorString(e));
      }
    }
    f.persistent = sms;
  }
  f.fast_alibi = fast && alibi;
  f.fast_bias = fast && bias;
  f.bias_raw = f.fast_bias ? 1.f / p.scale : 0.f;
  if (fast && fm.capped) set_fast_softcap(&f, spec.mods.softcap, p.scale);
  // The statistics pass reads the forward's LSE (the column mass's weights): into a scratch
  // where the caller asked for none.
  const bool stats = p.row_max.defined() || p.entropy.defined() || p.col_mass.defined();
  float* lse_scratch = nullptr;
  if (stats && !f.row_stat) {
    const RowExtent x = row_extent(p);
    const int64_t rows = std::max<int64_t>(x.rows_q, 1);
    e = cudaMallocAsync(reinterpret_cast<void**>(&lse_scratch), x.batch * p.hq * rows * 4, stream);
    if (e != cudaSuccess) {
      if (f.sched) (void)cudaFreeAsync(f.sched, stream);
      return fail(StatusCode::kInternal, "scratch allocation failed: ", cudaGetErrorString(e));
    }
    f.row_stat = lse_scratch;
    f.st_sn = 1, f.st_sh = rows, f.st_sb = p.varlen ? 0 : p.hq * rows;
  }
  GeneralTables tables;
  if (!tabled) {
    e = inst.fast(f, maps, stream);
  } else {
    e = tables.build(p, 128, kn, fast ? kMaxBitSlots : kGeneralBitSlots, stream, &f);
    // Each row's walk over its span of key tiles, not its leading and trailing empties one
    // table load at a time (run 104, H100: document-causal's forward 434 -> 456 TFLOP/s, causal
    // tabled 553 -> 562, both within the run's noise, no loss; gpu.md part 27;
    // ATTNKIT_CUDA_FWD_ROW_SPAN=0 walks every tile).
    if (!env_switch("ATTNKIT_CUDA_FWD_ROW_SPAN", true)) f.tile_span = nullptr;
    if (e == cudaSuccess) e = fast ? inst.fast(f, maps, stream) : inst.general(f, maps, stream);
  }
  // The statistics read the tables' relative buckets and forget-gate sums (through f): they run
  // before the tables are released.
  if (e == cudaSuccess && stats)
    e = launch_stats(p, f, f.row_stat, f.st_sb, f.st_sh, f.st_sn, stream);
  const cudaError_t e_tables = tables.release(stream);
  if (e == cudaSuccess) e = e_tables;
  for (void* scratch : {static_cast<void*>(lse_scratch), static_cast<void*>(f.sched)}) {
    if (!scratch) continue;
    const cudaError_t e2 = cudaFreeAsync(scratch, stream);
    if (e == cudaSuccess) e = e2;
  }
  if (e != cudaSuccess)
    return fail(StatusCode::kInternal, "kernel launch failed: ", cudaGetErrorString(e));
  return {};
}

}  // namespace attnkit::cuda
