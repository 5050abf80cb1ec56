// The CUDA passes' shared host-side setup (cuda/setup.h), and a strided fill they share.
#include "cuda/setup.h"

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/mask_cache.h"
#include "cuda/fwd_mask.cuh"

namespace attnkit::cuda {

namespace {

// The forget gate's prefix sums c_j = sum_{t <= j} log f_t of one (b, h) per block (blockIdx.x =
// b * hq + h), accumulated in float64 as on the CPU: each thread sums a contiguous chunk, the
// chunk totals are scanned, then each thread writes its chunk's prefix sums.
__global__ void forget_prefix_kernel(const float* log_f, int64_t sb, int64_t sh, int64_t sn,
                                     int hq, int nk, double* out, int64_t out_stride) {
  __shared__ double totals[256];
  const int b = blockIdx.x / hq, h = blockIdx.x % hq;
  const float* f = log_f + b * sb + h * sh;
  double* c = out + static_cast<int64_t>(blockIdx.x) * out_stride;
  const int chunk = (nk + blockDim.x - 1) / blockDim.x;
  const int lo = threadIdx.x * chunk, hi = min(nk, lo + chunk);
  double sum = 0;
  for (int j = lo; j < hi; ++j) sum += f[j * sn];
  totals[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int x = 1; x < blockDim.x; ++x) totals[x] += totals[x - 1];
  __syncthreads();
  double run = threadIdx.x > 0 ? totals[threadIdx.x - 1] : 0.0;
  for (int j = lo; j < hi; ++j) {
    run += f[j * sn];
    c[j] = run;
  }
}

// The relative-position bucket of every rel in [-origin, origin] (ScoreModEval::bucket, whose
// T5 form takes double logarithms: computed once here rather than per score in the kernel).
__global__ void relative_bucket_kernel(ScoreModEval<float> mods, int64_t origin, int32_t* out) {
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x <= 2 * origin;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[x] = static_cast<int32_t>(mods.bucket(x - origin));
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

__global__ void fill_view_kernel(void* base, DType t, const float* src, int64_t n0, int64_t n1,
                                 int64_t n2, int64_t n3, int64_t s0, int64_t s1, int64_t s2,
                                 int64_t s3) {
  const int64_t total = n0 * n1 * n2 * n3;
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < total;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = x;
    const int64_t i3 = r % n3;
    r /= n3;
    const int64_t i2 = r % n2;
    r /= n2;
    const int64_t i1 = r % n1;
    const int64_t o = (r / n1) * s0 + i1 * s1 + i2 * s2 + i3 * s3;
    const float v = src ? src[x] : 0.f;
    if (t == DType::kBF16)
      static_cast<__nv_bfloat16*>(base)[o] = __float2bfloat16(v);
    else if (t == DType::kF16)
      static_cast<__half*>(base)[o] = __float2half(v);
    else if (t == DType::kF64)
      static_cast<double*>(base)[o] = v;
    else
      static_cast<float*>(base)[o] = v;
  }
}

}  // namespace

bool rows_aligned(const core::RowOperand& r, int elems) {
  return aligned(r.data, elems * dtype_size(r.dtype)) && r.sb % elems == 0 && r.sh % elems == 0 &&
         r.sn % elems == 0;
}

// q, k, v rows are copied 16 bytes at a time: 16-byte aligned base and row strides.
Status check_rows(const core::RowOperand& r, const char* name, int elems) {
  const int es = dtype_size(r.dtype);
  if (!rows_aligned(r, elems))
    return fail(StatusCode::kInvalidArgument, name, ": the CUDA kernels need a ",
                str(elems * es), "-byte aligned pointer and batch, head and row strides that are ",
                "multiples of ", str(elems), " elements (sb ", str(r.sb), ", sh ", str(r.sh),
                ", sn ", str(r.sn), ")");
  return {};
}

// The band [i' - left, i' + right] of masks the fast kernel handles, or false.
bool band_of(const Mask& m, int64_t* left, int64_t* right) {
  constexpr int64_t kInf = int64_t{1} << 40;
  *left = *right = kInf;  // not a band: every key tile is in range (the block table decides)
  if (m.nodes.size() != 1) return false;
  const MaskNode& n = m.nodes[0];
  switch (n.kind) {
    case MaskKind::kNone:
      return true;
    case MaskKind::kCausal:
      *right = 0;
      return true;
    case MaskKind::kSlidingWindow:  // an unbounded side (Mask::kUnboundedWindow) as kInf
      *left = std::min(n.a, kInf);
      *right = std::min(n.b, kInf);
      return true;
    default:
      return false;
  }
}

namespace {

// A driver function looked up through the runtime (no link to libcuda), or null without a
// driver.
template <class Fn>
Fn driver_function(const char* name) {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult q{};
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<Fn>(f) : nullptr;
}

// The driver's tensor-map encoder, looked up once.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto fn =
      driver_function<PFN_cuTensorMapEncodeTiled_v12000>("cuTensorMapEncodeTiled");
  return fn;
}

PFN_cuCtxGetCurrent_v4000 context_getter() {
  static const auto fn = driver_function<PFN_cuCtxGetCurrent_v4000>("cuCtxGetCurrent");
  return fn;
}
PFN_cuCtxSetCurrent_v4000 context_setter() {
  static const auto fn = driver_function<PFN_cuCtxSetCurrent_v4000>("cuCtxSetCurrent");
  return fn;
}

// A tensor map of a 16-bit operand in the 128-byte swizzle: `rank` dims (the first of unit
// stride), the byte strides of the others (checked against the copy engine's rules), the box;
// reads past the extents fill zeros. Without the driver's encoder (no driver: a dry run in CI)
// the rules are checked and the map left empty; a call checks tensor_maps_available() before it
// launches anything.
bool encode_swizzled(CUtensorMap* map, const core::RowOperand& r, int rank,
                     const cuuint64_t* dims, const int64_t* strides, const cuuint32_t* box) {
  if (!aligned(r.data, 16)) return false;  // the copy engine's base address rule
  cuuint64_t gstrides[4];
  for (int x = 0; x + 1 < rank; ++x) {
    if (strides[x] <= 0 || strides[x] % 16 || strides[x] >= (int64_t{1} << 40)) return false;
    gstrides[x] = static_cast<cuuint64_t>(strides[x]);
  }
  const auto encode = tensor_map_encoder();
  if (!encode) {
    *map = CUtensorMap{};
    return true;
  }
  const cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  const CUtensorMapDataType type = r.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, rank, r.data, dims, gstrides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

bool tensor_maps_available() { return tensor_map_encoder() != nullptr; }

DeviceScope::DeviceScope(int device) {
  const auto get = context_getter();
  if (get && get(&saved_) != CUDA_SUCCESS) saved_ = nullptr;
  int current = -1;
  if (saved_ && cudaGetDevice(&current) == cudaSuccess && current == device) return;
  if (cudaSetDevice(device) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver, or no such device: the call's checks say which
    return;
  }
  changed_ = true;
}

DeviceScope::~DeviceScope() {
  const auto set = context_setter();
  if (changed_ && set) (void)set(saved_);
}

Status tensor_maps_ready(bool dry_run) {
  if (tensor_maps_available()) return {};
  int driver = 0;  // cudaDriverGetVersion gives 0 without a driver
  if (dry_run && (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)) return {};
  return fail(StatusCode::kNotImplemented, "the CUDA driver offers no tensor-map encoder ",
              "(cuTensorMapEncodeTiled): no driver here, or one older than CUDA 12");
}

bool env_switch(const char* name, bool on_by_default) {
  const char* v = std::getenv(name);
  if (!v) return on_by_default;
  return on_by_default ? v[0] != '0' : v[0] == '1';
}

EnvChoice env_choice(const char* name) {
  const char* v = std::getenv(name);
  const std::string_view s = v ? v : "";
  return s == "0" ? EnvChoice::kOff
         : s == "1" ? EnvChoice::kOn
         : s == "force" ? EnvChoice::kForce
                        : EnvChoice::kRule;
}

// A tensor map of a row operand as (column, row, head, batch) with boxes of 64 columns x
// box_rows rows in the 128-byte swizzle; reads past `rows` or `cols` fill zeros. A broadcast head
// or batch (stride 0) becomes an extent-1 dimension whose coordinate multiplier (*hm, *bm) is 0.
// False where the copy engine cannot address the operand.
bool encode_rows(CUtensorMap* map, int* hm, int* bm, const core::RowOperand& r, int64_t cols,
                 int64_t rows, int64_t heads, int64_t batch, int box_rows) {
  const int64_t es = dtype_size(r.dtype);
  *hm = r.sh == 0 ? 0 : 1;
  *bm = r.sb == 0 ? 0 : 1;
  if (r.sh == 0) heads = 1;
  if (r.sb == 0) batch = 1;
  // The stride of an extent-1 dimension is never used; any valid value stands in.
  auto stride = [&](int64_t s, int64_t extent) { return extent == 1 ? 16 : s * es; };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const int64_t strides[3] = {stride(r.sn, rows), stride(r.sh, heads), stride(r.sb, batch)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  return encode_swizzled(map, r, 4, dims, strides, box);
}

bool grid_tiles(const core::Problem& p, bool force, FwdParams* f, TmaMaps* maps) {
#ifndef ATTNKIT_CUDA_GRID_TILES
  return false;
#else
  const Mask& m = p.spec->mask;
  if (m.nodes.size() != 1 || p.varlen || p.max_nq != p.max_nk) return false;
  const MaskNode& n = m.nodes[0];
  if (n.kind != MaskKind::kNeighborhood || n.ndim != 2 || n.dilation[0] != 1 ||
      n.dilation[1] != 1 || n.shape[0] * n.shape[1] != p.max_nq || n.shape[0] > (1 << 20) ||
      n.shape[1] > (1 << 20))
    return false;
  GridShape g;
  g.h = static_cast<int>(n.shape[0]);
  g.w = static_cast<int>(n.shape[1]);
  for (int x = 0; x < 2; ++x) {
    g.kernel[x] = static_cast<int>(n.kernel[x]);
    g.causal[x] = n.dim_causal[x];
  }
  if (!force && !grid_tiles_worth_it(g)) return false;
  // ATTNKIT_CUDA_GRID_KEY_W=16 or 32 forces a width (for measurements; anything else: none)
  const char* kw = std::getenv("ATTNKIT_CUDA_GRID_KEY_W");
  const int forced = kw && (std::string(kw) == "16" || std::string(kw) == "32") ? std::stoi(kw) : 0;
  g = g.with_key_w(grid_key_width(g, forced));
  // Tensor maps of (column, grid column, grid row, head, batch), boxes of 64 columns x one
  // query patch (q) or key box (k, v).
  auto map = [&](CUtensorMap* out, int* hm, int* bm, const core::RowOperand& r, int64_t cols,
                 int64_t heads, int box_w, int box_h) {
    const int64_t es = dtype_size(r.dtype);
    *hm = r.sh == 0 ? 0 : 1;
    *bm = r.sb == 0 ? 0 : 1;
    const int64_t hs = r.sh == 0 ? 1 : heads, bs = r.sb == 0 ? 1 : p.batch;
    const cuuint64_t dims[5] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(g.w),
                                static_cast<cuuint64_t>(g.h), static_cast<cuuint64_t>(hs),
                                static_cast<cuuint64_t>(bs)};
    const int64_t strides[4] = {r.sn * es, r.sn * g.w * es, hs == 1 ? 16 : r.sh * es,
                                bs == 1 ? 16 : r.sb * es};
    const cuuint32_t box[5] = {64, static_cast<cuuint32_t>(box_w), static_cast<cuuint32_t>(box_h),
                               1, 1};
    return encode_swizzled(out, r, 5, dims, strides, box);
  };
  TmaMaps m2 = *maps;
  if (!map(&m2.q, &m2.q_hm, &m2.q_bm, p.q, p.d, p.hq, kGridCols, kGridRows) ||
      !map(&m2.k, &m2.k_hm, &m2.k_bm, p.k, p.d, p.hk, g.key_w, g.key_h) ||
      !map(&m2.v, &m2.v_hm, &m2.v_bm, p.v, p.dv, p.hk, g.key_w, g.key_h))
    return false;
  *maps = m2;
  f->grid = g;
  // Every query tile a patch, those at the last rows and columns partly past the grid.
  f->num_q_tiles = ((g.h + kGridRows - 1) / kGridRows) * ((g.w + kGridCols - 1) / kGridCols);
  return true;
#endif
}

RowExtent row_extent(const core::Problem& p) {
  RowExtent x{p.max_nq, p.max_nk, p.batch};
  if (p.varlen) {
    x.rows_q = x.rows_k = 0;
    for (const core::Sequence& s : p.seqs) {
      x.rows_q = std::max(x.rows_q, s.q_start + s.nq);
      x.rows_k = std::max(x.rows_k, s.k_start + s.nk);
    }
    x.batch = 1;
  }
  return x;
}

const char* encode_maps(const core::Problem& p, TmaMaps* maps, int q_box, int k_box) {
  const RowExtent x = row_extent(p);
  const int64_t batch = x.batch;
  // Empty operands are never read; a one-row extent keeps their maps valid.
  const int64_t rows_q = std::max<int64_t>(x.rows_q, 1);
  const int64_t rows_k = std::max<int64_t>(x.rows_k, 1);
  if (rows_q >= (int64_t{1} << 31)) return "q";
  if (rows_k >= (int64_t{1} << 31)) return "k";
  if (!encode_rows(&maps->q, &maps->q_hm, &maps->q_bm, p.q, p.d, rows_q, p.hq, batch, q_box))
    return "q";
  if (!encode_rows(&maps->k, &maps->k_hm, &maps->k_bm, p.k, p.d, rows_k, p.hk, batch, k_box))
    return "k";
  if (!encode_rows(&maps->v, &maps->v_hm, &maps->v_bm, p.v, p.dv, rows_k, p.hk, batch, k_box))
    return "v";
  return nullptr;
}

Status check_common(const core::Problem& p) {
  const AttentionSpec& spec = *p.spec;
  if (p.q.dtype != DType::kBF16 && p.q.dtype != DType::kF16)
    return fail(StatusCode::kTypeError, "q.dtype = ", dtype_name(p.q.dtype),
                ": the CUDA kernels take bf16 or fp16 (fp32 and fp64 run on the CPU)");
  const std::pair<const core::RowOperand*, const char*> rows[] = {
      {&p.q, "q"}, {&p.k, "k"}, {&p.v, "v"}, {&p.out, "out"}};
  for (const auto& [r, name] : rows) {
    Status s = check_rows(*r, name, r == &p.out ? 2 : 8);
    if (!s.ok()) return s;
  }
  const Mask& m = spec.mask;
  if (m.nodes.size() > kMaxMaskNodes || m.globals.size() > kMaxMaskGlobals ||
      m.segments.size() > kMaxMaskSegments || m.block_maps.size() > kMaxBlockMaps)
    return fail(StatusCode::kNotImplemented, "the mask has ", str(m.nodes.size()), " nodes, ",
                str(m.globals.size()), " global tokens, ", str(m.segments.size()),
                " segment tensors and ", str(m.block_maps.size()),
                " block maps: the CUDA kernels take at most ", str(kMaxMaskNodes), ", ",
                str(kMaxMaskGlobals), ", ", str(kMaxMaskSegments), " and ", str(kMaxBlockMaps));
  for (size_t id = 0; id < m.nodes.size(); ++id) {
    const MaskNode& n = m.nodes[id];
    const bool combinator =
        n.kind == MaskKind::kAnd || n.kind == MaskKind::kOr || n.kind == MaskKind::kNot;
    if (combinator && (n.child0 <= static_cast<int32_t>(id) ||
                       (n.kind != MaskKind::kNot && n.child1 <= static_cast<int32_t>(id))))
      return fail(StatusCode::kInvalidArgument, "mask node ", str(id),
                  " has a child at a smaller index: the CUDA kernels evaluate the tree from the "
                  "last node to the root (the Mask builders order nodes so)");
  }
  for (const MaskNode& n : m.nodes)
    if (n.kind == MaskKind::kBlockAttention && p.batch > 8)
      return fail(StatusCode::kNotImplemented, "block attention with batch = ", str(p.batch),
                  ": the CUDA kernels take at most 8 batch elements");
  if (p.varlen)
    for (const TensorView* t : {&spec.cu_seqlens_q, &spec.cu_seqlens_kv})
      if (t->strides[0] != 1)
        return fail(StatusCode::kInvalidArgument,
                    "cu_seqlens must be contiguous (stride 1) for the CUDA kernels");
  if (p.batch > 65535 || p.hq > 65535)
    return fail(StatusCode::kInvalidArgument, "batch = ", str(p.batch), ", heads = ", str(p.hq),
                ": the CUDA kernels take at most 65535 of each");
  if (p.mask_cache) {
    const std::string& held = p.mask_cache->impl().mask_key;
    if (!held.empty() && held != core::mask_fingerprint(spec))
      return fail(StatusCode::kInvalidArgument,
                  "Options::mask_cache holds the tables of another mask (its nodes, parameters, "
                  "tensors or alignment differ): one cache serves one mask (clear() empties it)");
  }
  return {};
}

void fill_params(const core::Problem& p, int q_tile, FwdParams* out) {
  const AttentionSpec& spec = *p.spec;
  FwdParams& f = *out;
  f.q = p.q.data;
  f.k = p.k.data;
  f.v = p.v.data;
  f.out = p.out.data;
  f.q_sb = p.q.sb, f.q_sh = p.q.sh, f.q_sn = p.q.sn;
  f.k_sb = p.k.sb, f.k_sh = p.k.sh, f.k_sn = p.k.sn;
  f.v_sb = p.v.sb, f.v_sh = p.v.sh, f.v_sn = p.v.sn;
  f.o_sb = p.out.sb, f.o_sh = p.out.sh, f.o_sn = p.out.sn;
  f.out_dtype = p.out.dtype;
  f.out_rows16 = rows_aligned(p.out, 16 / dtype_size(p.out.dtype));
  f.row_stat = p.row_stat.data;
  f.st_sb = p.row_stat.sb, f.st_sh = p.row_stat.sh, f.st_sn = p.row_stat.sn;
  f.batch = static_cast<int>(p.batch);
  f.hq = static_cast<int>(p.hq);
  f.hk = static_cast<int>(p.hk);
  f.group = static_cast<int>(p.group);
  f.d = static_cast<int>(p.d);
  f.dv = static_cast<int>(p.dv);
  f.nq = static_cast<int>(p.seqs[0].nq);
  f.nk = static_cast<int>(p.seqs[0].nk);
  if (p.varlen) {
    f.cu_q = static_cast<const int32_t*>(spec.cu_seqlens_q.data);
    f.cu_k = static_cast<const int32_t*>(spec.cu_seqlens_kv.data);
  }
  f.bottom_right = spec.alignment == Alignment::kBottomRight;
  f.num_q_tiles = static_cast<int>((p.max_nq + q_tile - 1) / q_tile);
  f.scale = p.scale;
  f.scale_log2 = static_cast<float>(p.scale64 * kLog2e);

  // Mask.
  const Mask& m = spec.mask;
  band_of(m, &f.band_left, &f.band_right);
  f.num_nodes = static_cast<int>(m.nodes.size());
  for (size_t i = 0; i < m.nodes.size(); ++i) f.nodes[i] = m.nodes[i];
  for (size_t i = 0; i < m.globals.size(); ++i) f.globals[i] = m.globals[i];
  f.num_segments = static_cast<int>(m.segments.size());
  for (const MaskNode& n : m.nodes) {
    if (!reads_segments(n.kind)) continue;
    const size_t nseg = m.segments.size();
    const SegmentIds& s0 = p.segment_ids[n.seg_q];
    SegmentTemplate& t = f.segments[n.seg_q];
    t.q = s0.q;
    t.k = s0.k;
    t.q_sb = s0.q_batch_stride;
    t.k_sb = s0.k_batch_stride;
    t.q_s = s0.q_stride;
    t.k_s = s0.k_stride;
    for (int64_t b = 0; b < p.batch && b < 8; ++b) t.last[b] = p.segment_ids[b * nseg + n.seg_q].last;
  }
  f.num_maps = static_cast<int>(m.block_maps.size());
  for (size_t x = 0; x < m.block_maps.size(); ++x) {
    const TensorView& t = m.block_maps[x];
    f.maps[x].data = static_cast<const int32_t*>(t.data);
    f.maps[x].sb = t.shape[0] > 1 ? t.strides[0] : 0;
    f.maps[x].sh = t.shape[1] > 1 ? t.strides[1] : 0;
    f.maps[x].sr = t.strides[2];
    f.maps[x].sc = t.strides[3];
  }

  // Score mods.
  const ScoreMods& mods = spec.mods;
  f.has_mods = mods.any();
  f.softcap = mods.softcap;
  f.alibi = mods.alibi;
  if (mods.alibi_slopes.defined()) {
    f.alibi_slopes = static_cast<const float*>(mods.alibi_slopes.data);
    f.slopes_s = mods.alibi_slopes.strides[0];
  }
  if (mods.bias.defined()) {
    const TensorView& t = mods.bias;
    f.bias = t.data;
    f.bias_dtype = t.dtype;
    f.bias_sb = t.shape[0] > 1 ? t.strides[0] : 0;
    f.bias_sh = t.shape[1] > 1 ? t.strides[1] : 0;
    f.bias_si = t.strides[2];
    f.bias_sj = t.strides[3];
  }
  f.relative = mods.relative;
  if (mods.relative != RelativeBucketKind::kOff) {
    f.bidirectional = mods.bidirectional;
    f.num_buckets = mods.num_buckets;
    f.max_distance = mods.max_distance;
    f.clip = mods.clip;
    f.table = static_cast<const float*>(mods.relative_table.data);
    f.table_sh = mods.relative_table.strides[0];
  }
  if (mods.low_rank_u.defined()) {
    const TensorView &u = mods.low_rank_u, &w = mods.low_rank_w;
    f.lowrank_u = static_cast<const float*>(u.data);
    f.lowrank_w = static_cast<const float*>(w.data);
    f.rank = u.shape[3];
    f.u_sb = u.strides[0], f.u_sh = u.strides[1], f.u_sn = u.strides[2];
    f.w_sb = w.strides[0], f.w_sh = w.strides[1], f.w_sn = w.strides[2];
  }

  // Normalizer and gate.
  const Normalizer& n = spec.normalizer;
  f.norm = n.kind;
  if (n.kind == NormalizerKind::kSoftmaxSink) {
    f.sinks = static_cast<const float*>(n.sinks.data);
    f.sinks_s = n.sinks.strides[0];
  }
  f.has_beta = n.beta.has_value();
  f.beta = n.beta ? static_cast<float>(*n.beta) : 0.f;
  f.feature = n.feature;
  f.power = n.power;
  f.length_scale = n.length_scale;
  if (n.kind == NormalizerKind::kReLA) {
    f.gain = static_cast<const float*>(n.rela_gain.data);
    f.gain_s = n.rela_gain.strides[0];
  }
  f.rela_eps = n.rela_eps;
  f.raw_output = p.raw_output;
  f.gate = p.raw_output ? GateKind::kNone : spec.gate_kind;
  if (spec.gate_kind != GateKind::kNone) {
    f.gate_ptr = p.gate.data;
    f.gate_dtype = p.gate.dtype;
    f.g_sb = p.gate.sb, f.g_sh = p.gate.sh, f.g_sn = p.gate.sn;
  }
}

namespace {

// The table's extents: batch elements and heads with their own rows, query and key tiles.
struct TableExtent {
  int64_t bs = 1, hs = 1, q_tiles = 0, k_tiles = 0;
};
TableExtent table_extent(const core::Problem& p, int km, int kn) {
  TableExtent t;
  t.bs = p.mask_per_batch || p.varlen ? p.batch : 1;
  t.hs = p.mask_per_head ? p.hq : 1;
  t.q_tiles = (p.max_nq + km - 1) / km;
  t.k_tiles = (p.max_nk + kn - 1) / kn;
  return t;
}

// Bit slots per query tile: up to max_slots, within a budget of 64 MiB of bits.
int bit_slots(const TableExtent& t, int km, int kn, int max_slots) {
  const int64_t rows = t.bs * t.hs * t.q_tiles, slot_bytes = km * (kn / 32) * 4;
  return static_cast<int>(std::min<int64_t>(
      {t.k_tiles, max_slots, (int64_t{64} << 20) / std::max<int64_t>(rows * slot_bytes, 1)}));
}

}  // namespace

// The tables a MaskCache keeps at most (each tile shape and problem shape is one).
constexpr size_t kMaxMaskCacheEntries = 16;

Status GeneralTables::fits(const core::Problem& p, int kn) {
  const int64_t k_tiles = (p.max_nk + kn - 1) / kn;
  if (k_tiles <= kMaxClassifyTiles) return {};
  return fail(StatusCode::kNotImplemented, "max key length ", str(p.max_nk), ": ", str(k_tiles),
              " key tiles of ", str(kn), " in the block table's rows; the CUDA kernels take at ",
              "most ", str(kMaxClassifyTiles), " (a plain softmax under a causal mask or a ",
              "sliding window needs no table)");
}

bool GeneralTables::covers(const core::Problem& p, int km, int kn) {
  const TableExtent t = table_extent(p, km, kn);
  return bit_slots(t, km, kn, kMaxBitSlots) == t.k_tiles;
}

cudaError_t GeneralTables::build(const core::Problem& p, int km, int kn, int max_slots,
                                 cudaStream_t stream, FwdParams* f) {
  const AttentionSpec& spec = *p.spec;
  const ScoreMods& mods = spec.mods;
  cudaError_t e = cudaSuccess;
  const TableExtent ext = table_extent(p, km, kn);
  const int64_t bs = ext.bs, hs = ext.hs;
  f->tc_nkt = static_cast<int>(ext.k_tiles);
  f->tc_sh = hs > 1 ? static_cast<int64_t>(f->num_q_tiles) * f->tc_nkt : 0;
  f->tc_sb = bs > 1 ? hs * static_cast<int64_t>(f->num_q_tiles) * f->tc_nkt : 0;
  const TensorView& lf = spec.mods.forget_log_f;
  if (lf.defined()) {  // prefix sums of log f, one row per (b, h)
    f->forget_stride = p.max_nk;
    e = cudaMallocAsync(&forget, p.batch * p.hq * p.max_nk * sizeof(double), stream);
    if (e == cudaSuccess) {
      forget_prefix_kernel<<<static_cast<unsigned>(p.batch * p.hq), 256, 0, stream>>>(
          static_cast<const float*>(lf.data), lf.strides[0], lf.strides[1], lf.strides[2],
          f->hq, static_cast<int>(p.max_nk), static_cast<double*>(forget), f->forget_stride);
      e = cudaGetLastError();
      f->forget_c = static_cast<const double*>(forget);
    }
  }
  // Element-mask bits for up to max_slots partial tiles per query tile, within a budget of 64 MiB
  // (partial tiles beyond it evaluate the mask tree in the general kernels).
  const int64_t rows = bs * hs * f->num_q_tiles, slot_bytes = km * (kn / 32) * 4;
  f->tb_slots = bit_slots(ext, km, kn, max_slots);
  f->tb_sq = static_cast<int64_t>(f->tb_slots) * km * (kn / 32);
  f->tb_sh = hs > 1 ? f->num_q_tiles * f->tb_sq : 0;
  f->tb_sb = bs > 1 ? hs * f->num_q_tiles * f->tb_sq : 0;
  f->ts_sh = hs > 1 ? f->num_q_tiles : 0;
  f->ts_sb = bs > 1 ? hs * f->num_q_tiles : 0;
  const int64_t table_bytes = (rows * f->tc_nkt + 255) / 256 * 256;
  if (e == cudaSuccess && mods.relative != RelativeBucketKind::kOff) {
    // rel = j - i' over every key tile and query tile touched (rows and keys padded by a tile).
    f->bucket_origin = p.max_nq + p.max_nk + 128;
    e = cudaMallocAsync(&buckets, (2 * f->bucket_origin + 1) * sizeof(int32_t), stream);
    if (e == cudaSuccess) {
      ScoreModEval<float> rb;
      rb.relative = mods.relative;
      rb.bidirectional = mods.bidirectional;
      rb.num_buckets = mods.num_buckets;
      rb.max_distance = mods.max_distance;
      rb.clip = mods.clip;
      relative_bucket_kernel<<<256, 256, 0, stream>>>(rb, f->bucket_origin,
                                                      static_cast<int32_t*>(buckets));
      e = cudaGetLastError();
      f->bucket_of = static_cast<const int32_t*>(buckets);
    }
  }
  // The table, then each row's slot list (count and key tiles), the bits, each row's span.
  const int64_t list_bytes = (rows * (f->tb_slots + 1) * 4 + 255) / 256 * 256;
  const int64_t bits_bytes = (rows * f->tb_slots * slot_bytes + 255) / 256 * 256;
  const int64_t span_at = table_bytes + list_bytes + bits_bytes;
  // (At least 256 bytes: no query tile at all, with packed sequences all without queries.)
  const int64_t all_bytes = std::max<int64_t>(256, span_at + rows * 8);
  // With Options::mask_cache: the tables of an earlier call with this tile shape and problem
  // shape, or new ones in memory the cache keeps (built before the call goes on, so that a call
  // on another stream finds them complete).
  MaskCache::Impl* cache = p.mask_cache ? &p.mask_cache->impl() : nullptr;
  std::string key;
  void* tables = nullptr;
  if (cache) {
    int device = 0;
    if (e == cudaSuccess) e = cudaGetDevice(&device);
    const TensorView &cq = spec.cu_seqlens_q, &ck = spec.cu_seqlens_kv;
    auto put = [&](int64_t x) { key.append(std::to_string(x)).push_back(','); };
    for (int64_t x : {int64_t{km}, int64_t{kn}, int64_t{f->tb_slots}, int64_t{device}, p.batch,
                      p.hq, p.max_nq, p.max_nk, int64_t{p.varlen}, bs, hs,
                      static_cast<int64_t>(reinterpret_cast<uintptr_t>(cq.data)),
                      static_cast<int64_t>(reinterpret_cast<uintptr_t>(ck.data))})
      put(x);
    // What the host knows of the data (cu_seqlens' sequences, block attention's last segment):
    // new contents at a reused address make another entry, not a stale hit.
    for (const core::Sequence& q : p.seqs)
      for (int64_t x : {q.q_start, q.nq, q.k_start, q.nk, q.offset}) put(x);
    for (const SegmentIds& g : p.segment_ids) put(g.last);
    // A graph being captured cannot build (cudaMalloc, a synchronize); one captured on a hit
    // reads the cache's memory, which must then outlive it (attention.h).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (e == cudaSuccess) e = cudaStreamIsCapturing(stream, &capture);
    if (const MaskCache::Impl::Entry* hit = cache->find(key)) {
      uint8_t* tab = static_cast<uint8_t*>(hit->data);
      f->tile_class = tab;
      f->tile_bits = reinterpret_cast<const uint32_t*>(tab + table_bytes + list_bytes);
      f->tile_span = reinterpret_cast<const int32_t*>(tab + span_at);
      return e;
    }
    if (e == cudaSuccess && capture != cudaStreamCaptureStatusNone)
      e = cudaErrorStreamCaptureUnsupported;  // build the cache's tables before capturing
    if (e == cudaSuccess) e = cudaMalloc(&tables, all_bytes);
  } else if (e == cudaSuccess) {
    e = cudaMallocAsync(&table, all_bytes, stream);
    tables = table;
  }
  f->tc_seg_ranges =
      f->num_segments > 0 && classify_smem(f->tc_nkt, f->num_segments) <= kMaxClassifyTiles;
  const size_t cls_smem = static_cast<size_t>(
      f->tc_seg_ranges ? classify_smem(f->tc_nkt, f->num_segments) : f->tc_nkt);
  // The forward's (128 x 128; 128 x 64 above head dim 128) and the backward's (64 x 128; 64 x 64
  // above head dim 128) tiles.
  auto classify = km == 64 ? (kn == 128 ? &classify_tiles_kernel<64, 128>
                                        : &classify_tiles_kernel<64, 64>)
                           : (kn == 128 ? &classify_tiles_kernel<128, 128>
                                        : &classify_tiles_kernel<128, 64>);
  auto tile_bits = km == 64 ? (kn == 128 ? &tile_bits_kernel<64, 128> : &tile_bits_kernel<64, 64>)
                            : (kn == 128 ? &tile_bits_kernel<128, 128>
                                         : &tile_bits_kernel<128, 64>);
  // (Beyond 48 KB of shared memory, the row's bytes and the span's two static words, a launch
  // needs the kernel's limit raised.)
  if (e == cudaSuccess && cls_smem + 16 > 48 * 1024)
    e = cudaFuncSetAttribute(classify, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(cls_smem));
  if (e == cudaSuccess) {
    uint8_t* tab = static_cast<uint8_t*>(tables);
    int32_t* slots = reinterpret_cast<int32_t*>(tab + table_bytes);
    uint32_t* bits = reinterpret_cast<uint32_t*>(tab + table_bytes + list_bytes);
    int32_t* span = reinterpret_cast<int32_t*>(tab + span_at);
    f->tile_class = tab;
    f->tile_bits = bits;
    f->tile_span = span;
    const dim3 grid(static_cast<unsigned>(f->num_q_tiles), static_cast<unsigned>(hs),
                    static_cast<unsigned>(bs));
    // No query tile (packed sequences all without queries): nothing to classify.
    if (f->num_q_tiles > 0)
      classify<<<grid, kClassifyThreads, cls_smem, stream>>>(*f, tab, slots, span);
    e = cudaGetLastError();
    const int split = std::max(1, std::min(f->tb_slots, kClassifySplit));
    if (e == cudaSuccess && f->tb_slots > 0 && f->num_q_tiles > 0) {
      const dim3 grid_bits(static_cast<unsigned>(f->num_q_tiles * split * (km / kBitsRows)),
                           static_cast<unsigned>(hs), static_cast<unsigned>(bs));
      tile_bits<<<grid_bits, kClassifyThreads, 0, stream>>>(*f, slots, bits);
      e = cudaGetLastError();
    }
  }
  if (cache && tables) {
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) {
      (void)cudaFree(tables);
      return e;
    }
    if (cache->mask_key.empty()) cache->mask_key = core::mask_fingerprint(spec);
    int device = 0;
    (void)cudaGetDevice(&device);
    cache->free_entry = [](const MaskCache::Impl::Entry& x) {
      DeviceScope scope(x.device);
      (void)cudaFree(x.data);  // waits for the device: no kernel still reads it
    };
    // Problem shapes that keep changing (new cu_seqlens every call) would grow the cache without
    // end: past kMaxMaskCacheEntries the oldest entry goes.
    if (cache->entries.size() >= kMaxMaskCacheEntries) {
      cache->free_entry(cache->entries.front());
      cache->entries.erase(cache->entries.begin());
    }
    cache->entries.push_back({key, device, tables, all_bytes});
  }
  return e;
}

cudaError_t GeneralTables::release(cudaStream_t stream) {
  cudaError_t e = cudaSuccess;
  for (void** x : {&table, &forget, &buckets}) {
    if (!*x) continue;
    const cudaError_t e2 = cudaFreeAsync(*x, stream);
    if (e == cudaSuccess) e = e2;
    *x = nullptr;
  }
  return e;
}

FastMods fast_mods(const ScoreMods& m) {
  FastMods r;
  r.capped = m.softcap != 0.f;
  // Whether ALiBi and the bias are present as asked and no other mod but the softcap is.
  const auto only = [&](bool alibi, bool bias) {
    return (m.alibi != AlibiMode::kOff) == alibi && m.bias.defined() == bias &&
           !m.low_rank_u.defined() && m.relative == RelativeBucketKind::kOff &&
           !m.forget_log_f.defined();
  };
  r.alibi = only(true, false);
  r.bias = only(false, true);
  r.cap_only = r.capped && only(false, false);
  return r;
}

void set_fast_softcap(FwdParams* f, float softcap, float scale) {
  f->cap_raw = softcap / scale;
  f->inv_cap_raw = scale / softcap;
}

bool encode_bias(const core::Problem& p, TmaMaps* maps, int box_rows) {
  const TensorView& t = p.spec->mods.bias;
  if (p.varlen || t.dtype != p.q.dtype || t.ndim != 4 || t.shape[2] != p.max_nq ||
      t.shape[3] != p.max_nk || t.strides[3] != 1)
    return false;
  core::RowOperand r;
  r.data = static_cast<char*>(t.data);
  r.dtype = t.dtype;
  r.sb = t.shape[0] > 1 ? t.strides[0] : 0;
  r.sh = t.shape[1] > 1 ? t.strides[1] : 0;
  r.sn = t.strides[2];
  return encode_rows(&maps->bias, &maps->bias_hm, &maps->bias_bm, r, p.max_nk, p.max_nq, p.hq,
                     p.batch, box_rows);
}

bool encode_out(const core::Problem& p, TmaMaps* maps, int box_rows) {
  if (p.varlen || p.out.dtype != p.q.dtype || p.dv != 64) return false;
  const RowExtent x = row_extent(p);
  return x.rows_q > 0 && encode_rows(&maps->o, &maps->o_hm, &maps->o_bm, p.out, p.dv, x.rows_q,
                                     p.hq, x.batch, box_rows);
}

cudaError_t fill_4d(void* base, DType t, const float* src, const int64_t (&n)[4],
                    const int64_t (&s)[4], cudaStream_t stream) {
  fill_view_kernel<<<256, 256, 0, stream>>>(base, t, src, n[0], n[1], n[2], n[3], s[0], s[1], s[2],
                                            s[3]);
  return cudaGetLastError();
}

}  // namespace attnkit::cuda
