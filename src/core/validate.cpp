// Validation of an attention call: every rule of DESIGN.md "Errors", each failure naming the
// argument, its value and the rule. On success, resolves the call into a core::Problem.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <type_traits>

#include "core/convert.h"
#include "core/device.h"
#include "core/problem.h"

namespace attnkit::core {
namespace {

// The device of the call (q's): every tensor argument must live there.
struct CallDevice {
  Device device = Device::kCPU;
  int index = 0;
};
thread_local CallDevice t_call_device;

std::string device_str(Device d, int index) {
  return d == Device::kCPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

// Message text without iostreams: a toolchain that links parts of libstdc++ statically into an
// extension module (seen with the GPU machine's g++ 13) can leave their locale uninitialized.
void append(std::string& s, const std::string& x) { s += x; }
void append(std::string& s, const char* x) { s += x; }
template <class T>
requires std::is_integral_v<T>
void append(std::string& s, T x) { s += std::to_string(x); }
template <class T>
requires std::is_floating_point_v<T>
void append(std::string& s, T x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(x));
  s += buf;
}

template <class... A>
Status fail(StatusCode code, const A&... parts) {
  std::string msg;
  (append(msg, parts), ...);
  return Status(code, std::move(msg));
}
#define ATTNKIT_RETURN_IF_ERROR(expr) \
  do {                                \
    Status s_ = (expr);               \
    if (!s_.ok()) return s_;          \
  } while (0)

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

bool is_float(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16 || t == DType::kF64;
}

// Common checks of any tensor argument: present, on the call's device, sizes positive, unit
// inner stride.
Status check_tensor(const TensorView& t, const char* name, bool inner_unit = true) {
  if (t.ndim < 1 || t.ndim > kMaxTensorDims)
    return fail(StatusCode::kInvalidArgument, name, ".ndim = ", t.ndim, ": must be 1 to ",
                kMaxTensorDims);
  if (t.device == Device::kCUDA && !cuda_backend_built())
    return fail(StatusCode::kTypeError, name,
                " is on a CUDA device: this build has only the CPU "
                "backend, so every tensor must be on the CPU");
  const CallDevice& call = t_call_device;
  if (t.device != call.device || (t.device == Device::kCUDA && t.device_index != call.index))
    return fail(StatusCode::kTypeError, name, " is on ", device_str(t.device, t.device_index),
                " but q is on ", device_str(call.device, call.index),
                ": every tensor of a call must be on q's device");
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 1)
      return fail(StatusCode::kInvalidArgument, name, ".shape[", i, "] = ", t.shape[i],
                  ": sizes must be at least 1");
    if (__builtin_mul_overflow(n, t.shape[i], &n))
      return fail(StatusCode::kInvalidArgument, name, ".shape = ", shape_str(t),
                  ": the element count overflows 64 bits");
    if (t.strides[i] < 0)
      return fail(StatusCode::kInvalidArgument, name, ".strides[", i, "] = ", t.strides[i],
                  ": strides must not be negative");
  }
  if (inner_unit && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    return fail(StatusCode::kInvalidArgument, name, ".strides[", t.ndim - 1,
                "] = ", t.strides[t.ndim - 1], ": the innermost dimension needs unit stride");
  if (t.data == nullptr)
    return fail(StatusCode::kInvalidArgument, name, ".data is null for a tensor of shape ",
                shape_str(t));
  const int es = dtype_size(t.dtype);
  if (reinterpret_cast<uintptr_t>(t.data) % es != 0)
    return fail(StatusCode::kInvalidArgument, name, ".data is not ", es,
                "-byte aligned: a tensor's elements must be aligned to their size (",
                dtype_name(t.dtype), ")");
  // The largest element offset must fit in 63 bits.
  int64_t off = 0;
  for (int i = 0; i < t.ndim; ++i) {
    int64_t term;
    if (__builtin_mul_overflow(t.shape[i] - 1, t.strides[i], &term) ||
        __builtin_add_overflow(off, term, &off))
      return fail(StatusCode::kInvalidArgument, name, ".strides overflow 64-bit offsets");
  }
  return {};
}

// An output is written element by element: no two of its elements may share memory. Checked as
// strides that nest (each dim's stride past the reach of the dims of smaller stride, as in any
// permutation or slice of a contiguous tensor); t has passed check_tensor.
Status check_no_overlap(const TensorView& t, const char* name) {
  int order[kMaxTensorDims];
  int n = 0;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) order[n++] = i;
  std::sort(order, order + n, [&](int a, int b) { return t.strides[a] < t.strides[b]; });
  int64_t reach = 0;  // the largest offset of the dims so far
  for (int x = 0; x < n; ++x) {
    const int i = order[x];
    if (t.strides[i] <= reach)
      return fail(StatusCode::kInvalidArgument, name, ".strides[", i, "] = ", t.strides[i],
                  " (shape ", shape_str(t), "): an output's elements must not overlap (its ",
                  "strides must nest, as a permutation or slice of a contiguous tensor's do)");
    reach += (t.shape[i] - 1) * t.strides[i];
  }
  return {};
}

Status check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> want,
                   const char* what) {
  bool ok = t.ndim == static_cast<int>(want.size());
  int i = 0;
  for (int64_t w : want) {
    if (ok && w >= 0 && t.shape[i] != w) ok = false;
    ++i;
  }
  if (ok) return {};
  std::string rule = "[";
  i = 0;
  for (int64_t w : want) {
    rule += i++ ? ", " : "";
    rule += w < 0 ? std::string("*") : std::to_string(w);
  }
  rule += "]";
  return fail(StatusCode::kInvalidArgument, name, ".shape = ", shape_str(t), ": must be ", rule,
              " (", what, ")");
}

Status check_dtype(const TensorView& t, const char* name, DType want) {
  if (t.dtype == want) return {};
  return fail(StatusCode::kTypeError, name, ".dtype = ", dtype_name(t.dtype), ": must be ",
              dtype_name(want));
}

// A learnable parameter tensor (slopes, tables, factors, sinks, gain): fp32, or fp64 when the
// inputs are fp64 (the oracle, for gradient checks).
Status check_param_dtype(const TensorView& t, const char* name, DType in) {
  if (t.dtype == DType::kF32 || (t.dtype == DType::kF64 && in == DType::kF64)) return {};
  return fail(StatusCode::kTypeError, name, ".dtype = ", dtype_name(t.dtype),
              ": must be float32 (float64 when q is float64)");
}

// Resolves a [B, H, N, D] operand (or [total, H, D] under varlen) to row addressing.
RowOperand rows_of(const TensorView& t, bool varlen, Layout layout) {
  RowOperand r;
  r.data = static_cast<char*>(t.data);
  r.dtype = t.dtype;
  if (varlen) {
    r.sb = 0;
    r.sn = t.strides[0];
    r.sh = t.strides[1];
  } else if (layout == Layout::kBHND) {
    r.sb = t.strides[0];
    r.sh = t.strides[1];
    r.sn = t.strides[2];
  } else {
    r.sb = t.strides[0];
    r.sn = t.strides[1];
    r.sh = t.strides[2];
  }
  return r;
}

// Dims of an operand in the vocabulary: batch, heads, seqlen, dim (varlen: batch = 1, total).
struct Dims {
  int64_t b, h, n, d;
};
Dims dims_of(const TensorView& t, bool varlen, Layout layout) {
  if (varlen) return {1, t.shape[1], t.shape[0], t.shape[2]};
  if (layout == Layout::kBHND) return {t.shape[0], t.shape[1], t.shape[2], t.shape[3]};
  return {t.shape[0], t.shape[2], t.shape[1], t.shape[3]};
}

StatOperand stat_of(const TensorView& t, bool varlen) {
  StatOperand s;
  s.data = static_cast<float*>(t.data);
  if (varlen) {
    s.sh = t.strides[0];
    s.sn = t.strides[1];
  } else {
    s.sb = t.strides[0];
    s.sh = t.strides[1];
    s.sn = t.strides[2];
  }
  return s;
}

Status check_cu_seqlens(const TensorView& cu, const char* name, int64_t total, int64_t batch_hint,
                        std::vector<int64_t>* starts) {
  ATTNKIT_RETURN_IF_ERROR(check_tensor(cu, name));
  ATTNKIT_RETURN_IF_ERROR(check_dtype(cu, name, DType::kI32));
  if (cu.ndim != 1 || cu.shape[0] < 2)
    return fail(StatusCode::kInvalidArgument, name, ".shape = ", shape_str(cu),
                ": must be [batch + 1] with batch >= 1");
  if (batch_hint >= 0 && cu.shape[0] != batch_hint + 1)
    return fail(
        StatusCode::kInvalidArgument, name, ".shape[0] = ", cu.shape[0],
        ": cu_seqlens_q and cu_seqlens_kv need the same length (batch + 1 = ", batch_hint + 1, ")");
  std::vector<int32_t> c;
  ATTNKIT_RETURN_IF_ERROR(read_int32(cu, &c));
  starts->resize(cu.shape[0]);
  for (int64_t i = 0; i < cu.shape[0]; ++i) {
    const int64_t x = c[i];
    (*starts)[i] = x;
    if (i == 0 && x != 0)
      return fail(StatusCode::kInvalidArgument, name, "[0] = ", x, ": must be 0");
    if (i > 0 && x < (*starts)[i - 1])
      return fail(StatusCode::kInvalidArgument, name, "[", i, "] = ", x, " < ", name, "[", i - 1,
                  "] = ", (*starts)[i - 1], ": cu_seqlens must be non-decreasing");
    if (x > total)
      return fail(StatusCode::kInvalidArgument, name, "[", i, "] = ", x,
                  ": exceeds the number of packed rows (", total, ")");
  }
  return {};
}

// Every enum of the spec holds one of its values (a cast from an integer may hold any).
Status check_enums(const AttentionSpec& spec) {
  const std::tuple<const char*, int, int> enums[] = {
      {"layout", static_cast<int>(spec.layout), static_cast<int>(Layout::kBNHD)},
      {"alignment", static_cast<int>(spec.alignment), static_cast<int>(Alignment::kTopLeft)},
      {"mods.alibi", static_cast<int>(spec.mods.alibi), static_cast<int>(AlibiMode::kSymmetric)},
      {"mods.relative", static_cast<int>(spec.mods.relative),
       static_cast<int>(RelativeBucketKind::kClipped)},
      {"normalizer.kind", static_cast<int>(spec.normalizer.kind),
       static_cast<int>(NormalizerKind::kReLA)},
      {"normalizer.feature", static_cast<int>(spec.normalizer.feature),
       static_cast<int>(KernelFeature::kReLU)},
      {"gate_kind", static_cast<int>(spec.gate_kind), static_cast<int>(GateKind::kPerHead)}};
  for (const auto& [name, value, last] : enums)
    if (value < 0 || value > last)
      return fail(StatusCode::kInvalidArgument, name, " = ", value, ": not one of its ", last + 1,
                  " values");
  return {};
}

Status check_mask(const AttentionSpec& spec, const Problem& p) {
  const Mask& m = spec.mask;
  if (m.nodes.empty()) return fail(StatusCode::kInvalidArgument, "mask has no nodes");
  for (size_t id = 0; id < m.nodes.size(); ++id) {
    const MaskNode& n = m.nodes[id];
    const char* kind = mask_kind_name(n.kind);
    auto bad_child = [&](int32_t c) { return c < 0 || c >= static_cast<int32_t>(m.nodes.size()); };
    switch (n.kind) {
      case MaskKind::kSlidingWindow:
      case MaskKind::kGlobalWindow:
        if (n.a < 0 || n.b < 0)
          return fail(StatusCode::kInvalidArgument, kind, " window (left, right) = (", n.a, ", ",
                      n.b, "): window sizes must be >= 0");
        if (n.a > Mask::kUnboundedWindow || n.b > Mask::kUnboundedWindow)
          return fail(StatusCode::kInvalidArgument, kind, " window (left, right) = (", n.a, ", ",
                      n.b, "): a side above Mask::kUnboundedWindow (INT64_MAX / 4) overflows; ",
                      "Mask::", kind, "() stores larger sides (unbounded) as it");
        if (n.kind == MaskKind::kGlobalWindow &&
            (n.globals_begin < 0 || n.globals_count < 0 ||
             int64_t{n.globals_begin} + n.globals_count > static_cast<int64_t>(m.globals.size())))
          return fail(StatusCode::kInvalidArgument, "global_window mask node ", id,
                      " has global tokens [", n.globals_begin, ", ",
                      int64_t{n.globals_begin} + n.globals_count, ") of Mask::globals, which has ",
                      m.globals.size());
        if (n.kind == MaskKind::kGlobalWindow)
          for (int32_t g = 0; g < n.globals_count; ++g)
            if (m.globals[n.globals_begin + g] < 0 || m.globals[n.globals_begin + g] >= p.max_nk)
              return fail(StatusCode::kInvalidArgument, "global token ",
                          m.globals[n.globals_begin + g], ": must be a key position in [0, ",
                          p.max_nk, ")");
        break;
      case MaskKind::kChunked:
        if (n.a < 1)
          return fail(StatusCode::kInvalidArgument, "chunked mask chunk = ", n.a, ": must be >= 1");
        break;
      case MaskKind::kPrefixLM:
        if (n.a < 0)
          return fail(StatusCode::kInvalidArgument, "prefix_lm prefix = ", n.a, ": must be >= 0");
        break;
      case MaskKind::kDocument:
      case MaskKind::kBlockAttention: {
        if (p.varlen)
          return fail(StatusCode::kNotImplemented, kind,
                      " mask with cu_seqlens: use either packed sequences or segment ids");
        const int64_t lens[2] = {p.max_nq, p.max_nk};
        const int32_t idx[2] = {n.seg_q, n.seg_k};
        const char* names[2] = {"segments_q", "segments_k"};
        for (int s = 0; s < 2; ++s) {
          if (idx[s] < 0 || idx[s] >= static_cast<int32_t>(m.segments.size()))
            return fail(StatusCode::kInvalidArgument, kind, " mask has no ", names[s]);
          const TensorView& t = m.segments[idx[s]];
          ATTNKIT_RETURN_IF_ERROR(check_tensor(t, names[s], false));
          ATTNKIT_RETURN_IF_ERROR(check_dtype(t, names[s], DType::kI32));
          const bool ok = (t.ndim == 1 && t.shape[0] == lens[s]) ||
                          (t.ndim == 2 && t.shape[0] == p.batch && t.shape[1] == lens[s]);
          if (!ok)
            return fail(StatusCode::kInvalidArgument, names[s], ".shape = ", shape_str(t),
                        ": must be [", lens[s], "] or [", p.batch, ", ", lens[s], "]");
        }
        break;
      }
      case MaskKind::kNeighborhood: {
        if (n.ndim < 1 || n.ndim > kMaxGridDims)
          return fail(StatusCode::kInvalidArgument, "neighborhood shape has ", n.ndim,
                      " dims: must have 1 to 3");
        if (n.b != 0)
          return fail(StatusCode::kInvalidArgument,
                      "neighborhood kernel, dilation and causal need one entry per grid dim (",
                      n.ndim, ")");
        int64_t tokens = 1;
        for (int d = 0; d < n.ndim; ++d) {
          if (n.shape[d] < 1)
            return fail(StatusCode::kInvalidArgument, "neighborhood shape[", d, "] = ", n.shape[d],
                        ": must be >= 1");
          if (n.kernel[d] < 1)
            return fail(StatusCode::kInvalidArgument, "neighborhood kernel[", d,
                        "] = ", n.kernel[d], ": must be >= 1");
          if (!n.dim_causal[d] && n.kernel[d] % 2 == 0)
            return fail(StatusCode::kInvalidArgument, "neighborhood kernel[", d,
                        "] = ", n.kernel[d], ": must be odd for a non-causal dim");
          if (n.dilation[d] < 1)
            return fail(StatusCode::kInvalidArgument, "neighborhood dilation[", d,
                        "] = ", n.dilation[d], ": must be >= 1");
          if (n.kernel[d] * n.dilation[d] > n.shape[d])
            return fail(StatusCode::kInvalidArgument, "neighborhood kernel[", d, "] * dilation[", d,
                        "] = ", n.kernel[d] * n.dilation[d], " > shape[", d, "] = ", n.shape[d],
                        ": kernel * dilation must not exceed the extent");
          tokens *= n.shape[d];
        }
        for (const Sequence& s : p.seqs)
          if (s.nq != tokens || s.nk != tokens)
            return fail(StatusCode::kInvalidArgument, "neighborhood grid has ", tokens,
                        " tokens but seqlen_q = ", s.nq, " and seqlen_kv = ", s.nk,
                        ": both must equal the grid size");
        break;
      }
      case MaskKind::kMaxvitBlock:
      case MaskKind::kMaxvitGrid: {
        if (n.ndim != 2)
          return fail(StatusCode::kInvalidArgument, kind, " grid has ", n.ndim,
                      " dims: MaxViT grids have 2 (height, width)");
        if (n.shape[0] < 1 || n.shape[1] < 1 || n.a < 1)
          return fail(StatusCode::kInvalidArgument, kind, " grid ", n.shape[0], " x ", n.shape[1],
                      " with ", n.a, ": sizes must be >= 1");
        if (n.kind == MaskKind::kMaxvitGrid && (n.shape[0] % n.a || n.shape[1] % n.a))
          return fail(StatusCode::kInvalidArgument, "maxvit_grid G = ", n.a, ": must divide the ",
                      n.shape[0], " x ", n.shape[1], " grid");
        for (const Sequence& s : p.seqs)
          if (s.nq != n.shape[0] * n.shape[1] || s.nk != s.nq)
            return fail(StatusCode::kInvalidArgument, kind, " grid has ", n.shape[0] * n.shape[1],
                        " tokens but seqlen_q = ", s.nq, " and seqlen_kv = ", s.nk,
                        ": both must equal the grid size");
        break;
      }
      case MaskKind::kBlockMap: {
        if (n.a < 1 || n.b < 1)
          return fail(StatusCode::kInvalidArgument, "block_map block sizes (", n.a, ", ", n.b,
                      "): must be >= 1");
        if (n.map < 0 || n.map >= static_cast<int32_t>(m.block_maps.size()))
          return fail(StatusCode::kInvalidArgument, "block_map mask node ", id,
                      " has no map tensor");
        if (p.varlen)
          return fail(StatusCode::kNotImplemented,
                      "block_map with cu_seqlens is not supported (give one map per batch "
                      "element of a padded batch)");
        const TensorView& t = m.block_maps[n.map];
        ATTNKIT_RETURN_IF_ERROR(check_tensor(t, "block_map", false));
        ATTNKIT_RETURN_IF_ERROR(check_dtype(t, "block_map", DType::kI32));
        const int64_t rows = (p.max_nq + n.a - 1) / n.a, cols = (p.max_nk + n.b - 1) / n.b;
        if (t.ndim != 4 || (t.shape[0] != 1 && t.shape[0] != p.batch) ||
            (t.shape[1] != 1 && t.shape[1] != p.hq) || t.shape[2] != rows || t.shape[3] != cols)
          return fail(StatusCode::kInvalidArgument, "block_map.shape = ", shape_str(t),
                      ": must be [B or 1, Hq or 1, ", rows, ", ", cols,
                      "] (ceil(Nq / block_q), ceil(Nk / block_k))");
        break;
      }
      case MaskKind::kAnd:
      case MaskKind::kOr:
        if (bad_child(n.child0) || bad_child(n.child1) || n.child0 <= static_cast<int32_t>(id) ||
            n.child1 <= static_cast<int32_t>(id))
          return fail(StatusCode::kInvalidArgument, kind, " mask node ", id,
                      " has invalid children");
        break;
      case MaskKind::kNot:
        if (bad_child(n.child0) || n.child0 <= static_cast<int32_t>(id))
          return fail(StatusCode::kInvalidArgument, "not mask node ", id, " has an invalid child");
        break;
      case MaskKind::kNone:
      case MaskKind::kCausal:
        break;
      default:
        return fail(StatusCode::kInvalidArgument, "mask node ", id, " has kind ",
                    static_cast<int>(n.kind), ": not a MaskKind");
    }
  }
  return {};
}

Status check_mods(const AttentionSpec& spec, const Problem& p, DType in) {
  const ScoreMods& m = spec.mods;
  if (!std::isfinite(m.softcap) || m.softcap < 0)
    return fail(StatusCode::kInvalidArgument, "softcap = ", m.softcap,
                ": must be > 0 (or 0 for none)");
  if (m.alibi_slopes.defined()) {
    if (m.alibi == AlibiMode::kOff)
      return fail(StatusCode::kInvalidArgument, "alibi_slopes given but alibi is off");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.alibi_slopes, "alibi_slopes", false));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(m.alibi_slopes, "alibi_slopes", in));
    ATTNKIT_RETURN_IF_ERROR(
        check_shape(m.alibi_slopes, "alibi_slopes", {p.hq}, "one per query head"));
  }
  const bool tensor_mods = m.bias.defined() || m.low_rank_u.defined() || m.forget_log_f.defined();
  if (p.varlen && tensor_mods)
    return fail(StatusCode::kNotImplemented,
                "bias, low-rank bias and forget gate with cu_seqlens are not supported");
  if (m.bias.defined()) {
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.bias, "bias"));
    if (m.bias.dtype != DType::kF32 && m.bias.dtype != in)
      return fail(StatusCode::kTypeError, "bias.dtype = ", dtype_name(m.bias.dtype),
                  ": must be fp32 or q's dtype (", dtype_name(in), ")");
    const TensorView& b = m.bias;
    if (b.ndim != 4 || (b.shape[0] != 1 && b.shape[0] != p.batch) ||
        (b.shape[1] != 1 && b.shape[1] != p.hq) || b.shape[2] != p.max_nq || b.shape[3] != p.max_nk)
      return fail(StatusCode::kInvalidArgument, "bias.shape = ", shape_str(b), ": must be [",
                  p.batch, " or 1, ", p.hq, " or 1, ", p.max_nq, ", ", p.max_nk,
                  "] (broadcast over batch and heads only)");
  }
  if (m.low_rank_u.defined() != m.low_rank_w.defined())
    return fail(StatusCode::kInvalidArgument, "low-rank bias needs both low_rank_u and low_rank_w");
  if (m.low_rank_u.defined()) {
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.low_rank_u, "low_rank_u"));
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.low_rank_w, "low_rank_w"));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(m.low_rank_u, "low_rank_u", in));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(m.low_rank_w, "low_rank_w", in));
    const int64_t r = m.low_rank_u.shape[m.low_rank_u.ndim - 1];
    ATTNKIT_RETURN_IF_ERROR(
        check_shape(m.low_rank_u, "low_rank_u", {p.batch, p.hq, p.max_nq, -1}, "[B, Hq, Nq, r]"));
    ATTNKIT_RETURN_IF_ERROR(
        check_shape(m.low_rank_w, "low_rank_w", {p.batch, p.hq, p.max_nk, r}, "[B, Hq, Nk, r]"));
    if (p.d + r > kMaxHeadDim)
      return fail(StatusCode::kInvalidArgument, "low-rank bias rank r = ", r,
                  " with head_dim = ", p.d, ": head_dim + r must be <= ", kMaxHeadDim);
  }
  if (m.relative != RelativeBucketKind::kOff) {
    int64_t buckets = 0;
    if (m.relative == RelativeBucketKind::kT5) {
      const int64_t half = m.bidirectional ? m.num_buckets / 2 : m.num_buckets;
      if (half < 2)
        return fail(StatusCode::kInvalidArgument, "num_buckets = ", m.num_buckets,
                    ": T5 buckets need at least 2 (4 when bidirectional)");
      if (m.max_distance <= half / 2)
        return fail(StatusCode::kInvalidArgument, "max_distance = ", m.max_distance,
                    ": must exceed num_buckets / ", m.bidirectional ? 4 : 2);
      buckets = m.num_buckets;
    } else {
      if (m.clip < 0)
        return fail(StatusCode::kInvalidArgument, "relative clip = ", m.clip, ": must be >= 0");
      buckets = 2 * m.clip + 1;
    }
    if (!m.relative_table.defined())
      return fail(StatusCode::kInvalidArgument, "relative buckets need relative_table");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.relative_table, "relative_table"));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(m.relative_table, "relative_table", in));
    ATTNKIT_RETURN_IF_ERROR(
        check_shape(m.relative_table, "relative_table", {p.hq, buckets}, "[Hq, buckets]"));
  }
  if (m.forget_log_f.defined()) {
    ATTNKIT_RETURN_IF_ERROR(check_tensor(m.forget_log_f, "forget_log_f"));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(m.forget_log_f, "forget_log_f", in));
    ATTNKIT_RETURN_IF_ERROR(
        check_shape(m.forget_log_f, "forget_log_f", {p.batch, p.hq, p.max_nk}, "[B, Hq, Nk]"));
    if (p.max_nq > p.max_nk)
      return fail(StatusCode::kInvalidArgument, "forget gate with seqlen_q = ", p.max_nq,
                  " > seqlen_kv = ", p.max_nk, ": aligned query positions must be key positions");
    // log f finite (f = 0, log f = -inf, gave NaN differences of the prefix sums, read as masked
    // scores; a finite log f > 0, f > 1, outside the gate's (0, 1], still has the defined sum,
    // and a gradient check's step may cross 0). Host tensors are read here; device ones are the
    // caller's promise.
    const TensorView& f = m.forget_log_f;
    if (f.device == Device::kCPU)
      for (int64_t b = 0; b < f.shape[0]; ++b)
        for (int64_t h = 0; h < f.shape[1]; ++h)
          for (int64_t j = 0; j < f.shape[2]; ++j) {
            const double x = load_as_double(f.data, f.dtype,
                                            b * f.strides[0] + h * f.strides[1] + j * f.strides[2]);
            if (!std::isfinite(x))
              return fail(StatusCode::kInvalidArgument, "forget_log_f[", b, ", ", h, ", ", j,
                          "] = ", x, ": log f must be finite (f in (0, 1])");
          }
  }
  return {};
}

Status check_normalizer(const AttentionSpec& spec, const Problem& p, DType in) {
  const Normalizer& n = spec.normalizer;
  if (n.kind == NormalizerKind::kSoftmaxSink) {
    if (!n.sinks.defined())
      return fail(StatusCode::kInvalidArgument, "normalizer sink needs sinks (fp32 [Hq])");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(n.sinks, "sinks", false));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(n.sinks, "sinks", in));
    ATTNKIT_RETURN_IF_ERROR(check_shape(n.sinks, "sinks", {p.hq}, "one per query head"));
  } else if (n.sinks.defined()) {
    return fail(StatusCode::kInvalidArgument, "sinks given with normalizer ",
                normalizer_name(n.kind), ": sinks select the sink normalizer");
  }
  if (n.beta && (n.kind != NormalizerKind::kSigmoid || !std::isfinite(*n.beta)))
    return fail(StatusCode::kInvalidArgument, "beta = ", *n.beta,
                ": a finite beta applies only to the sigmoid normalizer");
  if (n.kind == NormalizerKind::kKernel && (!std::isfinite(n.power) || n.power <= 0))
    return fail(StatusCode::kInvalidArgument, "kernel power = ", n.power, ": must be > 0");
  if (n.kind == NormalizerKind::kReLA) {
    if (!n.rela_gain.defined())
      return fail(StatusCode::kInvalidArgument, "normalizer rela needs rela_gain (fp32 [dv])");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(n.rela_gain, "rela_gain", false));
    ATTNKIT_RETURN_IF_ERROR(check_param_dtype(n.rela_gain, "rela_gain", in));
    ATTNKIT_RETURN_IF_ERROR(check_shape(n.rela_gain, "rela_gain", {p.dv}, "one per value dim"));
    if (!(n.rela_eps > 0))
      return fail(StatusCode::kInvalidArgument, "rela_eps = ", n.rela_eps, ": must be > 0");
  }
  return {};
}

// A per-row fp32 output: [B, Hq, Nq] (varlen [Hq, total_q]).
Status check_row_output(const TensorView& t, const char* name, const Problem& p, int64_t total_q) {
  ATTNKIT_RETURN_IF_ERROR(check_tensor(t, name, false));
  ATTNKIT_RETURN_IF_ERROR(check_no_overlap(t, name));
  ATTNKIT_RETURN_IF_ERROR(check_dtype(t, name, DType::kF32));
  if (p.varlen) return check_shape(t, name, {p.hq, total_q}, "[Hq, total_q] under varlen");
  return check_shape(t, name, {p.batch, p.hq, p.max_nq}, "[B, Hq, Nq]");
}

}  // namespace

Status validate_and_resolve(const TensorView& q, const TensorView& k, const TensorView& v,
                            const AttentionSpec& spec, const TensorView& out,
                            const TensorView& row_stat, const AttentionStats& stats,
                            const Options& options, bool allow_f64, Problem* p) {
  const bool varlen = spec.cu_seqlens_q.defined() || spec.cu_seqlens_kv.defined();
  t_call_device = {q.device, q.device_index};
  ATTNKIT_RETURN_IF_ERROR(check_enums(spec));
  if (spec.cu_seqlens_q.defined() != spec.cu_seqlens_kv.defined())
    return fail(StatusCode::kInvalidArgument,
                "cu_seqlens_q and cu_seqlens_kv must be given together");
  const int want_ndim = varlen ? 3 : 4;
  const char* layout_name = varlen                         ? "[total, H, D] (varlen)"
                            : spec.layout == Layout::kBHND ? "[B, H, N, D] (BHND)"
                                                           : "[B, N, H, D] (BNHD)";
  const TensorView* ops[4] = {&q, &k, &v, &out};
  const char* names[4] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i) {
    if (!ops[i]->defined()) return fail(StatusCode::kInvalidArgument, names[i], " is missing");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(*ops[i], names[i]));
    if (ops[i]->ndim != want_ndim)
      return fail(StatusCode::kInvalidArgument, names[i], ".ndim = ", ops[i]->ndim, ": must be ",
                  want_ndim, " for layout ", layout_name);
  }
  if (!is_float(q.dtype) || (q.dtype == DType::kF64 && !allow_f64))
    return fail(StatusCode::kTypeError, "q.dtype = ", dtype_name(q.dtype),
                allow_f64 ? ": must be fp32, bf16, fp16 or fp64" : ": must be fp32, bf16 or fp16");
  for (int i = 1; i < 3; ++i)
    if (ops[i]->dtype != q.dtype)
      return fail(StatusCode::kTypeError, names[i], ".dtype = ", dtype_name(ops[i]->dtype),
                  " but q.dtype = ", dtype_name(q.dtype), ": q, k and v need the same dtype");
  ATTNKIT_RETURN_IF_ERROR(check_no_overlap(out, "out"));
  if (out.dtype != q.dtype && out.dtype != DType::kF32 && !(allow_f64 && out.dtype == DType::kF64))
    return fail(StatusCode::kTypeError, "out.dtype = ", dtype_name(out.dtype),
                ": must be q's dtype (", dtype_name(q.dtype), ") or fp32");

  const Dims dq = dims_of(q, varlen, spec.layout), dk = dims_of(k, varlen, spec.layout);
  const Dims dvv = dims_of(v, varlen, spec.layout), dout = dims_of(out, varlen, spec.layout);
  if (dk.b != dq.b || dvv.b != dq.b || dout.b != dq.b)
    return fail(StatusCode::kInvalidArgument, "batch sizes differ: q ", dq.b, ", k ", dk.b, ", v ",
                dvv.b, ", out ", dout.b, ": q, k, v and out need the same batch");
  if (dvv.h != dk.h)
    return fail(StatusCode::kInvalidArgument, "v has ", dvv.h, " heads but k has ", dk.h,
                ": keys and values need the same number of heads");
  if (dq.h % dk.h != 0)
    return fail(StatusCode::kInvalidArgument, "num_heads_q = ", dq.h, ", num_heads_kv = ", dk.h,
                ": num_heads_q must be a multiple of num_heads_kv (GQA ratio must be an integer)");
  if (dout.h != dq.h)
    return fail(StatusCode::kInvalidArgument, "out has ", dout.h, " heads but q has ", dq.h,
                ": out needs num_heads_q heads");
  if (dvv.n != dk.n)
    return fail(StatusCode::kInvalidArgument, "k.seqlen = ", dk.n, " but v.seqlen = ", dvv.n,
                ": keys and values need the same length");
  if (dout.n != dq.n)
    return fail(StatusCode::kInvalidArgument, "out.seqlen = ", dout.n, " but q.seqlen = ", dq.n,
                ": out needs seqlen_q rows");
  if (dk.d != dq.d)
    return fail(StatusCode::kInvalidArgument, "k.head_dim = ", dk.d, " but q.head_dim = ", dq.d,
                ": queries and keys need the same head_dim");
  if (dq.d > kMaxHeadDim)
    return fail(StatusCode::kInvalidArgument, "head_dim = ", dq.d, ": must be <= ", kMaxHeadDim);
  if (dvv.d > kMaxHeadDim)
    return fail(StatusCode::kInvalidArgument, "head_dim_v = ", dvv.d, ": must be <= ", kMaxHeadDim);
  if (dout.d != dvv.d)
    return fail(StatusCode::kInvalidArgument, "out.head_dim = ", dout.d,
                " but v.head_dim = ", dvv.d, ": out needs head_dim_v columns");
  if (dq.n > INT32_MAX || dk.n > INT32_MAX)
    return fail(StatusCode::kInvalidArgument, "seqlen = ", dq.n > dk.n ? dq.n : dk.n,
                ": sequences longer than 2^31 - 1 tokens are not supported");
  if (options.num_threads < 0)
    return fail(StatusCode::kInvalidArgument, "num_threads = ", options.num_threads,
                ": must be >= 0 (0 uses every thread)");
  if (spec.scale && (!std::isfinite(*spec.scale)))
    return fail(StatusCode::kInvalidArgument, "scale = ", *spec.scale, ": must be finite");

  Problem& r = *p;
  r = Problem{};
  r.spec = &spec;
  r.varlen = varlen;
  r.hq = dq.h;
  r.hk = dk.h;
  r.group = dq.h / dk.h;
  r.d = dq.d;
  r.dv = dvv.d;
  r.scale64 =
      spec.scale ? static_cast<double>(*spec.scale) : 1.0 / std::sqrt(static_cast<double>(dq.d));
  r.scale = static_cast<float>(r.scale64);
  if (varlen) {
    std::vector<int64_t> cq, ck;
    ATTNKIT_RETURN_IF_ERROR(check_cu_seqlens(spec.cu_seqlens_q, "cu_seqlens_q", dq.n, -1, &cq));
    ATTNKIT_RETURN_IF_ERROR(check_cu_seqlens(spec.cu_seqlens_kv, "cu_seqlens_kv", dk.n,
                                             static_cast<int64_t>(cq.size()) - 1, &ck));
    r.batch = static_cast<int64_t>(cq.size()) - 1;
    for (int64_t b = 0; b < r.batch; ++b) {
      Sequence s{cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b], 0};
      r.seqs.push_back(s);
    }
  } else {
    r.batch = dq.b;
    r.seqs.assign(r.batch, Sequence{0, dq.n, 0, dk.n, 0});
  }
  for (Sequence& s : r.seqs) {
    s.offset = spec.alignment == Alignment::kBottomRight ? s.nk - s.nq : 0;
    r.max_nq = s.nq > r.max_nq ? s.nq : r.max_nq;
    r.max_nk = s.nk > r.max_nk ? s.nk : r.max_nk;
  }
  r.q = rows_of(q, varlen, spec.layout);
  r.k = rows_of(k, varlen, spec.layout);
  r.v = rows_of(v, varlen, spec.layout);
  r.out = rows_of(out, varlen, spec.layout);

  ATTNKIT_RETURN_IF_ERROR(check_mask(spec, r));
  ATTNKIT_RETURN_IF_ERROR(check_mods(spec, r, q.dtype));
  ATTNKIT_RETURN_IF_ERROR(check_normalizer(spec, r, q.dtype));

  switch (spec.gate_kind) {
    case GateKind::kNone:
      if (spec.gate.defined())
        return fail(StatusCode::kInvalidArgument, "gate given but gate_kind is none");
      break;
    case GateKind::kElementwise: {
      if (!spec.gate.defined())
        return fail(StatusCode::kInvalidArgument, "gate_kind elementwise needs a gate tensor");
      ATTNKIT_RETURN_IF_ERROR(check_tensor(spec.gate, "gate"));
      if (spec.gate.dtype != q.dtype && spec.gate.dtype != DType::kF32)
        return fail(StatusCode::kTypeError, "gate.dtype = ", dtype_name(spec.gate.dtype),
                    ": must be fp32 or q's dtype");
      bool same = spec.gate.ndim == out.ndim;
      for (int i = 0; same && i < out.ndim; ++i) same = spec.gate.shape[i] == out.shape[i];
      if (!same)
        return fail(StatusCode::kInvalidArgument, "gate.shape = ", shape_str(spec.gate),
                    ": an elementwise gate must have out's shape ", shape_str(out));
      r.gate = rows_of(spec.gate, varlen, spec.layout);
      break;
    }
    case GateKind::kPerHead:
      if (!spec.gate.defined())
        return fail(StatusCode::kInvalidArgument, "gate_kind per_head needs a gate tensor");
      ATTNKIT_RETURN_IF_ERROR(check_tensor(spec.gate, "gate", false));
      if (spec.gate.dtype != q.dtype && spec.gate.dtype != DType::kF32)
        return fail(StatusCode::kTypeError, "gate.dtype = ", dtype_name(spec.gate.dtype),
                    ": must be fp32 or q's dtype");
      if (varlen)
        ATTNKIT_RETURN_IF_ERROR(
            check_shape(spec.gate, "gate", {r.hq, dq.n}, "[Hq, total_q] under varlen"));
      else
        ATTNKIT_RETURN_IF_ERROR(
            check_shape(spec.gate, "gate", {r.batch, r.hq, r.max_nq}, "[B, Hq, Nq]"));
      // One element per row: row(b, h, n) points at it.
      r.gate.data = static_cast<char*>(spec.gate.data);
      r.gate.dtype = spec.gate.dtype;
      r.gate.sb = varlen ? 0 : spec.gate.strides[0];
      r.gate.sh = spec.gate.strides[varlen ? 0 : 1];
      r.gate.sn = spec.gate.strides[varlen ? 1 : 2];
      break;
  }

  if (row_stat.defined()) {
    if (spec.normalizer.kind == NormalizerKind::kSigmoid)
      return fail(StatusCode::kInvalidArgument,
                  "row_stat requested with normalizer sigmoid: sigmoid attention has no per-row "
                  "statistic (LSE is for the softmax family)");
    ATTNKIT_RETURN_IF_ERROR(check_row_output(row_stat, "row_stat", r, dq.n));
    r.row_stat = stat_of(row_stat, varlen);
  }
  if (stats.any()) {
    if (!r.softmax_family())
      return fail(StatusCode::kInvalidArgument, "attention statistics with normalizer ",
                  normalizer_name(spec.normalizer.kind),
                  ": statistics are defined for the "
                  "softmax family only");
    if (stats.row_max.defined()) {
      ATTNKIT_RETURN_IF_ERROR(check_row_output(stats.row_max, "row_max", r, dq.n));
      r.row_max = stat_of(stats.row_max, varlen);
    }
    if (stats.entropy.defined()) {
      ATTNKIT_RETURN_IF_ERROR(check_row_output(stats.entropy, "entropy", r, dq.n));
      r.entropy = stat_of(stats.entropy, varlen);
    }
    if (stats.col_mass.defined()) {
      if (varlen)
        return fail(StatusCode::kNotImplemented, "col_mass with cu_seqlens is not supported");
      const TensorView& c = stats.col_mass;
      ATTNKIT_RETURN_IF_ERROR(check_tensor(c, "col_mass", false));
      ATTNKIT_RETURN_IF_ERROR(check_no_overlap(c, "col_mass"));
      ATTNKIT_RETURN_IF_ERROR(check_dtype(c, "col_mass", DType::kF32));
      const int64_t heads = stats.col_mass_group_sum ? r.hk : r.hq;
      ATTNKIT_RETURN_IF_ERROR(
          check_shape(c, "col_mass", {r.batch, heads, r.max_nk},
                      stats.col_mass_group_sum ? "[B, Hk, Nk] (group sum)" : "[B, Hq, Nk]"));
      const int64_t end = stats.col_mass_q_end < 0 ? r.max_nq : stats.col_mass_q_end;
      if (stats.col_mass_q_begin < 0 || stats.col_mass_q_begin > end || end > r.max_nq)
        return fail(StatusCode::kInvalidArgument, "col_mass query range [", stats.col_mass_q_begin,
                    ", ", end, "): must lie within [0, ", r.max_nq, "]");
      r.col_mass.data = static_cast<float*>(c.data);
      r.col_mass.sb = c.strides[0];
      r.col_mass.sh = c.strides[1];
      r.col_mass.sn = c.strides[2];
      r.col_q_begin = stats.col_mass_q_begin;
      r.col_q_end = end;
      r.col_group_sum = stats.col_mass_group_sum;
    }
  }

  // Mask data per batch element.
  const Mask& m = spec.mask;
  if (!m.segments.empty()) {
    r.segment_ids.assign(r.batch * m.segments.size(), SegmentIds{});
    for (const MaskNode& n : m.nodes) {
      if (!reads_segments(n.kind)) continue;  // (their indices are checked above)
      const TensorView& tq = m.segments[n.seg_q];
      const TensorView& tk = m.segments[n.seg_k];
      r.mask_per_batch = r.mask_per_batch || tq.ndim == 2 || tk.ndim == 2;
      // The highest query segment id of each batch element (block attention's last segment):
      // read only where needed (on a GPU the read waits for the stream).
      const bool block = n.kind == MaskKind::kBlockAttention;
      std::vector<int32_t> ids;
      if (block) ATTNKIT_RETURN_IF_ERROR(read_int32(tq, &ids));
      for (int64_t b = 0; b < r.batch; ++b) {
        SegmentIds& s = r.segment_ids[b * m.segments.size() + n.seg_q];
        s.q_stride = tq.strides[tq.ndim - 1];
        s.k_stride = tk.strides[tk.ndim - 1];
        s.q_batch_stride = tq.ndim == 2 ? tq.strides[0] : 0;
        s.k_batch_stride = tk.ndim == 2 ? tk.strides[0] : 0;
        s.q = static_cast<const int32_t*>(tq.data) + b * s.q_batch_stride;
        s.k = static_cast<const int32_t*>(tk.data) + b * s.k_batch_stride;
        s.last = INT32_MIN;
        if (!block) continue;
        const int32_t* row = ids.data() + (tq.ndim == 2 ? b * r.max_nq : 0);
        for (int64_t i = 0; i < r.max_nq; ++i) s.last = row[i] > s.last ? row[i] : s.last;
      }
    }
  }
  if (!m.block_maps.empty()) {
    const size_t maps = m.block_maps.size();
    r.block_maps.assign(r.batch * r.hq * maps, BlockMapView{});
    for (size_t x = 0; x < maps; ++x) {
      const TensorView& t = m.block_maps[x];
      r.mask_per_batch = r.mask_per_batch || t.shape[0] > 1;
      r.mask_per_head = r.mask_per_head || t.shape[1] > 1;
      for (int64_t b = 0; b < r.batch; ++b)
        for (int64_t h = 0; h < r.hq; ++h) {
          BlockMapView& v = r.block_maps[(b * r.hq + h) * maps + x];
          v.data = static_cast<const int32_t*>(t.data) + (t.shape[0] > 1 ? b * t.strides[0] : 0) +
                   (t.shape[1] > 1 ? h * t.strides[1] : 0);
          v.sr = t.strides[2];
          v.sc = t.strides[3];
        }
    }
  }
  r.num_threads = options.num_threads;
  r.device = q.device;
  r.device_index = q.device_index;
  r.stream = options.stream;
  r.mask_cache = options.mask_cache;
  return {};
}

void zero_rows_from(const TensorView& t, int dim, int64_t from) {
  if (!t.defined() || dim >= t.ndim || t.shape[dim] <= from) return;
  int64_t count = 1;
  for (int i = 0; i < t.ndim; ++i) count *= i == dim ? t.shape[i] - from : t.shape[i];
  for (int64_t x = 0; x < count; ++x) {
    int64_t r = x, at = 0;
    for (int i = t.ndim - 1; i >= 0; --i) {
      const int64_t n = i == dim ? t.shape[i] - from : t.shape[i];
      at += (r % n + (i == dim ? from : 0)) * t.strides[i];
      r /= n;
    }
    store_from_double(t.data, t.dtype, at, 0.0);
  }
}

std::vector<PaddingTail> padding_tails(const Problem& p, const AttentionGrads& grads) {
  if (!p.varlen) return {};
  const Sequence& last = p.seqs.back();
  const int64_t rows_q = last.q_start + last.nq, rows_k = last.k_start + last.nk;
  std::vector<PaddingTail> tails = {
      {&grads.dq, 0, rows_q}, {&grads.dk, 0, rows_k}, {&grads.dv, 0, rows_k}};
  // dgate: elementwise like out ([total, H, dv]); per head [Hq, total_q].
  if (grads.dgate.defined())
    tails.push_back({&grads.dgate, p.spec->gate_kind == GateKind::kPerHead ? 1 : 0, rows_q});
  return tails;
}

void zero_padding_grads(const Problem& p, const AttentionGrads& grads) {
  for (const PaddingTail& t : padding_tails(p, grads)) zero_rows_from(*t.grad, t.dim, t.from);
}

Status validate_grads(const Problem& p, const TensorView& q, const TensorView& k,
                      const TensorView& v, const TensorView& grad_out, const AttentionGrads& g,
                      GradOperands* out) {
  const AttentionSpec& spec = *p.spec;
  auto same_shape = [](const TensorView& a, const TensorView& b) {
    if (a.ndim != b.ndim) return false;
    for (int i = 0; i < a.ndim; ++i)
      if (a.shape[i] != b.shape[i]) return false;
    return true;
  };
  // input_dtype: the gradient may also take its input's 16-bit dtype.
  auto grad_like = [&](const TensorView& grad, const char* name, const TensorView& input,
                       const char* input_name, bool required, bool input_dtype = false) -> Status {
    if (!grad.defined()) {
      if (required) return fail(StatusCode::kInvalidArgument, name, " is missing: it is required");
      return {};
    }
    if (!input.defined())
      return fail(StatusCode::kInvalidArgument, name, " given but the spec has no ", input_name);
    ATTNKIT_RETURN_IF_ERROR(check_tensor(grad, name, false));
    const bool sixteen = input_dtype && grad.dtype == input.dtype &&
                         (grad.dtype == DType::kBF16 || grad.dtype == DType::kF16);
    if (grad.dtype != DType::kF32 && grad.dtype != DType::kF64 && !sixteen)
      return fail(
          StatusCode::kTypeError, name, ".dtype = ", dtype_name(grad.dtype),
          ": gradients are fp32 or fp64 (dq, dk, dv, dbias also their inputs' 16-bit dtype)");
    if (!same_shape(grad, input))
      return fail(StatusCode::kInvalidArgument, name, ".shape = ", shape_str(grad), " but ",
                  input_name, ".shape = ", shape_str(input), ": a gradient has its input's shape");
    // A gradient is written (not summed into) element by element: its elements must not overlap.
    return check_no_overlap(grad, name);
  };
  TensorView out_like = q;  // grad_out has out's shape: q's with head_dim_v
  out_like.shape[out_like.ndim - 1] = p.dv;
  ATTNKIT_RETURN_IF_ERROR(check_tensor(grad_out, "grad_out"));
  if (!same_shape(grad_out, out_like))
    return fail(StatusCode::kInvalidArgument, "grad_out.shape = ", shape_str(grad_out),
                ": must be out's shape ", shape_str(out_like));
  if (!is_float(grad_out.dtype))
    return fail(StatusCode::kTypeError, "grad_out.dtype = ", dtype_name(grad_out.dtype),
                ": must be a floating-point dtype");
  // dq, dk, dv and dbias may also take their inputs' 16-bit dtype (the CUDA backward writes it
  // directly).
  const ScoreMods& m = spec.mods;
  for (const auto& [grad, name, input, input_name, required] :
       {std::tuple{&g.dq, "dq", &q, "q", true},
        {&g.dk, "dk", &k, "k", true},
        {&g.dv, "dv", &v, "v", true},
        {&g.dbias, "dbias", &m.bias, "bias", false}})
    ATTNKIT_RETURN_IF_ERROR(grad_like(*grad, name, *input, input_name, required, true));
  for (const TensorView* t : {&g.dq, &g.dk, &g.dv})
    if (t->strides[t->ndim - 1] != 1)
      return fail(StatusCode::kInvalidArgument, "dq, dk and dv need a unit inner stride");
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.dlow_rank_u, "dlow_rank_u", m.low_rank_u, "low_rank_u", false));
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.dlow_rank_w, "dlow_rank_w", m.low_rank_w, "low_rank_w", false));
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.drelative_table, "drelative_table", m.relative_table, "relative_table", false));
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.dforget_log_f, "dforget_log_f", m.forget_log_f, "forget_log_f", false));
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.dalibi_slopes, "dalibi_slopes", m.alibi_slopes, "alibi_slopes", false));
  ATTNKIT_RETURN_IF_ERROR(grad_like(g.dsinks, "dsinks", spec.normalizer.sinks, "sinks", false));
  ATTNKIT_RETURN_IF_ERROR(
      grad_like(g.drela_gain, "drela_gain", spec.normalizer.rela_gain, "rela_gain", false));
  ATTNKIT_RETURN_IF_ERROR(grad_like(g.dgate, "dgate", spec.gate, "gate", false));
  if (g.dbeta.defined()) {
    if (spec.normalizer.kind != NormalizerKind::kSigmoid)
      return fail(StatusCode::kInvalidArgument, "dbeta given with normalizer ",
                  normalizer_name(spec.normalizer.kind), ": beta belongs to sigmoid");
    ATTNKIT_RETURN_IF_ERROR(check_tensor(g.dbeta, "dbeta", false));
    ATTNKIT_RETURN_IF_ERROR(check_shape(g.dbeta, "dbeta", {1}, "one scalar"));
    if (g.dbeta.dtype != DType::kF32 && g.dbeta.dtype != DType::kF64)
      return fail(StatusCode::kTypeError, "dbeta.dtype = ", dtype_name(g.dbeta.dtype),
                  ": gradients are fp32 or fp64");
  }
  out->grad_out = rows_of(grad_out, p.varlen, spec.layout);
  out->dq = rows_of(g.dq, p.varlen, spec.layout);
  out->dk = rows_of(g.dk, p.varlen, spec.layout);
  out->dv = rows_of(g.dv, p.varlen, spec.layout);
  if (g.dgate.defined()) {
    if (spec.gate_kind == GateKind::kElementwise) {
      out->dgate = rows_of(g.dgate, p.varlen, spec.layout);
    } else {  // [B, Hq, Nq] (varlen [Hq, total_q]): rows of one element
      out->dgate.data = static_cast<char*>(g.dgate.data);
      out->dgate.dtype = g.dgate.dtype;
      out->dgate.sb = p.varlen ? 0 : g.dgate.strides[0];
      out->dgate.sh = g.dgate.strides[p.varlen ? 0 : 1];
      out->dgate.sn = g.dgate.strides[p.varlen ? 1 : 2];
    }
  }
  return {};
}

}  // namespace attnkit::core
