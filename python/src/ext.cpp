// attnkit._ext: the C++ API for Python (nanobind). Tensors arrive through DLPack (NumPy arrays,
// PyTorch tensors) and are viewed in place, never copied; the Python package
// (python/attnkit) builds the spec as a plain dict and allocates the outputs. A Status that is
// not ok becomes ValueError, TypeError or NotImplementedError with the C++ message.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "attnkit/attention.h"
#include "attnkit/registry.h"

namespace nb = nanobind;

namespace attnkit::python {
namespace {

using Array = nb::ndarray<>;

// Keeps the DLPack imports of one call alive until it returns.
struct Call {
  std::vector<Array> arrays;
  MaskCache* mask_cache = nullptr;  // the spec's "mask_cache" (MaskCache.handle), or none

  TensorView view(nb::handle h, const char* name) {
    if (h.is_none()) return {};
    if (nb::isinstance<nb::tuple>(h)) return raw_view(nb::borrow<nb::tuple>(h), name);
    Array a;
    if (!nb::try_cast(h, a))
      throw nb::type_error((std::string(name) + ": expected an array or tensor (DLPack)").c_str());
    if (a.ndim() < 1 || a.ndim() > kMaxTensorDims)
      throw nb::value_error(
          (std::string(name) + ".ndim = " + std::to_string(a.ndim()) + ": must be 1 to 4").c_str());
    TensorView t;
    t.data = a.data();
    const nb::dlpack::dtype dt = a.dtype();
    if (dt == nb::dtype<float>())
      t.dtype = DType::kF32;
    else if (dt == nb::dtype<double>())
      t.dtype = DType::kF64;
    else if (dt == nb::dtype<int32_t>())
      t.dtype = DType::kI32;
    else if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16)
      t.dtype = DType::kBF16;
    else if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16)
      t.dtype = DType::kF16;
    else
      throw nb::type_error(
          (std::string(name) + ": dtype not supported (float32, bfloat16, float16, float64, int32)")
              .c_str());
    if (a.device_type() == nb::device::cpu::value) {
      t.device = Device::kCPU;
    } else if (a.device_type() == nb::device::cuda::value) {
      t.device = Device::kCUDA;
      t.device_index = a.device_id();
    } else {
      throw nb::type_error(
          (std::string(name) + ": tensors must live on the CPU or a CUDA device").c_str());
    }
    t.ndim = static_cast<int>(a.ndim());
    for (int i = 0; i < t.ndim; ++i) {
      t.shape[i] = static_cast<int64_t>(a.shape(i));
      t.strides[i] = a.stride(i);
    }
    arrays.push_back(std::move(a));
    return t;
  }

  // A tensor described by the caller (PyTorch's fast path, python/attnkit/_torch.py): (data
  // pointer, dtype "f32" | "bf16" | "f16" | "f64" | "i32", device 1 = CPU | 2 = CUDA, device
  // index, shape, strides in elements). The caller keeps the tensor alive during the call.
  TensorView raw_view(const nb::tuple& t, const char* name) {
    if (t.size() != 6)
      throw nb::type_error((std::string(name) + ": expected an array or tensor").c_str());
    TensorView v;
    v.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(t[0]));
    const std::string dt = nb::cast<std::string>(t[1]);
    if (dt == "f32")
      v.dtype = DType::kF32;
    else if (dt == "bf16")
      v.dtype = DType::kBF16;
    else if (dt == "f16")
      v.dtype = DType::kF16;
    else if (dt == "f64")
      v.dtype = DType::kF64;
    else if (dt == "i32")
      v.dtype = DType::kI32;
    else
      throw nb::type_error((std::string(name) + ": dtype " + dt +
                            " not supported (float32, bfloat16, float16, float64, int32)")
                               .c_str());
    v.device = nb::cast<int>(t[2]) == 2 ? Device::kCUDA : Device::kCPU;
    v.device_index = nb::cast<int>(t[3]);
    const nb::sequence shape = nb::borrow<nb::sequence>(t[4]);
    const nb::sequence strides = nb::borrow<nb::sequence>(t[5]);
    const size_t ndim = nb::len(shape);
    if (ndim < 1 || ndim > static_cast<size_t>(kMaxTensorDims) || nb::len(strides) != ndim)
      throw nb::value_error(
          (std::string(name) + ".ndim = " + std::to_string(ndim) + ": must be 1 to 4").c_str());
    v.ndim = static_cast<int>(ndim);
    for (size_t i = 0; i < ndim; ++i) {
      v.shape[i] = nb::cast<int64_t>(shape[i]);
      v.strides[i] = nb::cast<int64_t>(strides[i]);
    }
    return v;
  }

  Mask mask(nb::handle node) {
    if (node.is_none()) return Mask::none();
    const nb::tuple n = nb::cast<nb::tuple>(node);
    const std::string kind = nb::cast<std::string>(n[0]);
    auto i64 = [&](size_t i) { return nb::cast<int64_t>(n[i]); };
    auto ints = [&](size_t i) { return nb::cast<std::vector<int64_t>>(n[i]); };
    if (kind == "none") return Mask::none();
    if (kind == "causal") return Mask::causal();
    if (kind == "sliding_window") return Mask::sliding_window(i64(1), i64(2));
    if (kind == "global_window") return Mask::global_window(i64(1), i64(2), ints(3));
    if (kind == "chunked") return Mask::chunked(i64(1), nb::cast<bool>(n[2]));
    if (kind == "document")
      return Mask::document(view(n[1], "segments_q"), view(n[2], "segments_kv"),
                            nb::cast<bool>(n[3]));
    if (kind == "block_attention") return Mask::block_attention(view(n[1], "segments"));
    if (kind == "prefix_lm") return Mask::prefix_lm(i64(1));
    if (kind == "neighborhood")
      return Mask::neighborhood(ints(1), ints(2), ints(3), nb::cast<std::vector<bool>>(n[4]));
    if (kind == "maxvit_block") return Mask::maxvit_block(i64(1), i64(2), i64(3));
    if (kind == "maxvit_grid") return Mask::maxvit_grid(i64(1), i64(2), i64(3));
    if (kind == "block_map") return Mask::block_map(view(n[1], "block_map"), i64(2), i64(3));
    if (kind == "and") return mask(n[1]) & mask(n[2]);
    if (kind == "or") return mask(n[1]) | mask(n[2]);
    if (kind == "not") return !mask(n[1]);
    throw nb::value_error(("unknown mask kind '" + kind + "'").c_str());
  }

  // The spec dict of python/attnkit/_spec.py: only the keys that differ from the defaults are
  // present, so one pass over its items builds the spec.
  AttentionSpec spec(const nb::dict& d) {
    AttentionSpec s;
    ScoreMods& m = s.mods;
    Normalizer& n = s.normalizer;
    for (auto [key_obj, value] : d) {
      if (value.is_none()) continue;
      const char* key = nb::cast<const char*>(key_obj);
      auto is = [&](const char* name) { return std::strcmp(key, name) == 0; };
      auto str = [&]() { return nb::cast<std::string>(value); };
      auto f32 = [&]() { return static_cast<float>(nb::cast<double>(value)); };
      auto i64 = [&]() { return nb::cast<int64_t>(value); };
      if (is("mask")) {
        s.mask = mask(value);
      } else if (is("alignment")) {
        s.alignment = str() == "top_left" ? Alignment::kTopLeft : Alignment::kBottomRight;
      } else if (is("scale")) {
        s.scale = f32();
      } else if (is("layout")) {
        s.layout = str() == "bnhd" ? Layout::kBNHD : Layout::kBHND;
      } else if (is("softcap")) {
        m.softcap = f32();
      } else if (is("alibi")) {
        const std::string a = str();
        m.alibi = a == "causal"      ? AlibiMode::kCausal
                  : a == "symmetric" ? AlibiMode::kSymmetric
                                     : AlibiMode::kOff;
      } else if (is("alibi_slopes")) {
        m.alibi_slopes = view(value, "alibi_slopes");
      } else if (is("bias")) {
        m.bias = view(value, "bias");
      } else if (is("low_rank_u")) {
        m.low_rank_u = view(value, "low_rank_u");
      } else if (is("low_rank_w")) {
        m.low_rank_w = view(value, "low_rank_w");
      } else if (is("relative")) {
        const std::string r = str();
        m.relative = r == "t5"        ? RelativeBucketKind::kT5
                     : r == "clipped" ? RelativeBucketKind::kClipped
                                      : RelativeBucketKind::kOff;
      } else if (is("bidirectional")) {
        m.bidirectional = nb::cast<bool>(value);
      } else if (is("num_buckets")) {
        m.num_buckets = i64();
      } else if (is("max_distance")) {
        m.max_distance = i64();
      } else if (is("clip")) {
        m.clip = i64();
      } else if (is("relative_table")) {
        m.relative_table = view(value, "relative_table");
      } else if (is("forget_log_f")) {
        m.forget_log_f = view(value, "forget_log_f");
      } else if (is("normalizer")) {
        const std::string norm = str();
        if (norm == "softmax")
          n.kind = NormalizerKind::kSoftmax;
        else if (norm == "sink")
          n.kind = NormalizerKind::kSoftmaxSink;
        else if (norm == "sigmoid")
          n.kind = NormalizerKind::kSigmoid;
        else if (norm == "kernel")
          n.kind = NormalizerKind::kKernel;
        else if (norm == "rela")
          n.kind = NormalizerKind::kReLA;
        else
          throw nb::value_error(
              ("normalizer = '" + norm + "': must be softmax, sink, sigmoid, kernel or rela")
                  .c_str());
      } else if (is("sinks")) {
        n.sinks = view(value, "sinks");
      } else if (is("beta")) {
        n.beta = nb::cast<double>(value);
      } else if (is("feature")) {
        n.feature = str() == "relu" ? KernelFeature::kReLU : KernelFeature::kSoftplus;
      } else if (is("power")) {
        n.power = f32();
      } else if (is("length_scale")) {
        n.length_scale = nb::cast<bool>(value);
      } else if (is("rela_gain")) {
        n.rela_gain = view(value, "rela_gain");
      } else if (is("rela_eps")) {
        n.rela_eps = f32();
      } else if (is("gate_kind")) {
        const std::string g = str();
        s.gate_kind = g == "elementwise" ? GateKind::kElementwise
                      : g == "per_head"  ? GateKind::kPerHead
                                         : GateKind::kNone;
      } else if (is("gate")) {
        s.gate = view(value, "gate");
      } else if (is("cu_seqlens_q")) {
        s.cu_seqlens_q = view(value, "cu_seqlens_q");
      } else if (is("cu_seqlens_kv")) {
        s.cu_seqlens_kv = view(value, "cu_seqlens_kv");
      } else if (is("mask_cache")) {  // the cache itself (eager calls) or its handle (compiled)
        MaskCache* c = nullptr;
        mask_cache = nb::try_cast(value, c) ? c
                                            : reinterpret_cast<MaskCache*>(
                                                  static_cast<uintptr_t>(i64()));
      } else {
        throw nb::value_error((std::string("unknown spec key '") + key + "'").c_str());
      }
    }
    return s;
  }
};

// A failed Status as (exception name, message) for python/attnkit/_api.py to raise (ValueError,
// TypeError, NotImplementedError, RuntimeError); None when ok. Returned rather than thrown: the
// Python side raises, so no C++ exception crosses the module for a bad argument.
nb::object status_result(const Status& s) {
  if (s.ok()) return nb::none();
  const char* type = "RuntimeError";
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
      type = "ValueError";
      break;
    case StatusCode::kTypeError:
      type = "TypeError";
      break;
    case StatusCode::kNotImplemented:
      type = "NotImplementedError";
      break;
    default:
      break;
  }
  return nb::make_tuple(type, s.message());
}

Options options_of(int threads, uintptr_t stream = 0, MaskCache* mask_cache = nullptr) {
  Options o;
  o.num_threads = threads;
  o.stream = reinterpret_cast<void*>(stream);
  o.mask_cache = mask_cache;
  return o;
}

bool any_f64(const TensorView& q) { return q.dtype == DType::kF64; }

nb::object forward(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle row_stat,
                   const nb::dict& spec_dict, int threads, uintptr_t stream) {
  Call c;
  const TensorView tq = c.view(q, "q"), tk = c.view(k, "k"), tv = c.view(v, "v");
  const TensorView to = c.view(out, "out"), ts = c.view(row_stat, "row_stat");
  const AttentionSpec spec = c.spec(spec_dict);
  Status s;
  {
    nb::gil_scoped_release release;
    // float64 runs the float64 oracle (src/reference): exact, for gradient checks.
    s = any_f64(tq) ? reference_forward(tq, tk, tv, spec, to, ts)
                    : attention_forward(tq, tk, tv, spec, to, ts, {},
                                        options_of(threads, stream, c.mask_cache));
  }
  return status_result(s);
}

// grads: dict name -> array ("dq", "dk", "dv", "dbias", "dsinks", ...), each written.
nb::object backward(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle row_stat,
                    nb::handle grad_out, const nb::dict& spec_dict, const nb::dict& grads,
                    int threads, uintptr_t stream) {
  Call c;
  const TensorView tq = c.view(q, "q"), tk = c.view(k, "k"), tv = c.view(v, "v");
  const TensorView to = c.view(out, "out"), ts = c.view(row_stat, "row_stat");
  const TensorView tg = c.view(grad_out, "grad_out");
  const AttentionSpec spec = c.spec(spec_dict);
  AttentionGrads g;
  const std::pair<const char*, TensorView AttentionGrads::*> names[] = {
      {"dq", &AttentionGrads::dq},
      {"dk", &AttentionGrads::dk},
      {"dv", &AttentionGrads::dv},
      {"dbias", &AttentionGrads::dbias},
      {"dlow_rank_u", &AttentionGrads::dlow_rank_u},
      {"dlow_rank_w", &AttentionGrads::dlow_rank_w},
      {"drelative_table", &AttentionGrads::drelative_table},
      {"dforget_log_f", &AttentionGrads::dforget_log_f},
      {"dalibi_slopes", &AttentionGrads::dalibi_slopes},
      {"dsinks", &AttentionGrads::dsinks},
      {"dbeta", &AttentionGrads::dbeta},
      {"drela_gain", &AttentionGrads::drela_gain},
      {"dgate", &AttentionGrads::dgate},
  };
  for (const auto& [name, member] : names)
    if (grads.contains(name)) g.*member = c.view(grads[name], name);
  Status s;
  {
    nb::gil_scoped_release release;
    s = any_f64(tq) ? reference_backward(tq, tk, tv, tg, spec, g)
                    : attention_backward(tq, tk, tv, to, ts, tg, spec, g,
                                         options_of(threads, stream, c.mask_cache));
  }
  return status_result(s);
}

// The C++ call alone, timed in C++ (median of `reps` runs, microseconds): the baseline of the
// per-call overhead benchmark (bench/python_overhead.py).
double cpp_forward_us(nb::handle q, nb::handle k, nb::handle v, nb::handle out,
                      const nb::dict& spec_dict, int threads, int reps) {
  Call c;
  const TensorView tq = c.view(q, "q"), tk = c.view(k, "k"), tv = c.view(v, "v");
  const TensorView to = c.view(out, "out");
  const AttentionSpec spec = c.spec(spec_dict);
  std::vector<double> us;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const Status s = attention_forward(tq, tk, tv, spec, to, {}, {}, options_of(threads));
    us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    if (!s.ok()) throw nb::value_error(s.message().c_str());
  }
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

std::vector<std::tuple<std::string, std::string, std::string, bool, bool, std::vector<std::string>>>
support() {
  std::vector<
      std::tuple<std::string, std::string, std::string, bool, bool, std::vector<std::string>>>
      rows;
  for (const SupportRow& r : support_matrix())
    rows.emplace_back(r.mechanism, r.category, r.backend, r.forward, r.backward, r.dtypes);
  return rows;
}

}  // namespace
}  // namespace attnkit::python

NB_MODULE(_ext, m) {
  using namespace attnkit::python;
  m.doc() = "attnkit's C++ API over DLPack tensors (use the attnkit package, not this module)";
  m.def("forward", &forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
        nb::arg("row_stat").none(), nb::arg("spec"), nb::arg("threads") = 0, nb::arg("stream") = 0);
  m.def("backward", &backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out").none(),
        nb::arg("row_stat").none(), nb::arg("grad_out"), nb::arg("spec"), nb::arg("grads"),
        nb::arg("threads") = 0, nb::arg("stream") = 0);
  using attnkit::MaskCache;
  nb::class_<MaskCache>(m, "MaskCache", "attnkit::MaskCache (use attnkit.MaskCache)")
      .def(nb::init<>())
      .def("clear", &MaskCache::clear)
      .def_prop_ro("entries", &MaskCache::entries)
      .def_prop_ro("bytes", &MaskCache::bytes)
      .def_prop_ro("handle", [](MaskCache& c) { return reinterpret_cast<uintptr_t>(&c); });
  m.def("support_matrix", &support);
  m.def("cpp_forward_us", &cpp_forward_us, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
        nb::arg("spec"), nb::arg("threads") = 1, nb::arg("reps") = 1000);
  m.def("cpu_simd_target", &attnkit::cpu_simd_target);
  m.def(
      "noop", []() {}, "an empty call, for measuring the binding's overhead");
}
