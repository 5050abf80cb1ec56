// Names of the public enums, for messages and the CLI.
#include "attnkit/attention.h"

namespace attnkit {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kInvalidArgument:
      return "invalid_argument";
    case StatusCode::kTypeError:
      return "type_error";
    case StatusCode::kNotImplemented:
      return "not_implemented";
    case StatusCode::kInternal:
      return "internal";
  }
  return "unknown";
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "fp16";
    case DType::kF64:
      return "fp64";
    case DType::kI32:
      return "int32";
  }
  return "unknown";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kF64:
      return 8;
    case DType::kI32:
      return 4;
  }
  return 1;
}

const char* mask_kind_name(MaskKind k) {
  switch (k) {
    case MaskKind::kNone:
      return "none";
    case MaskKind::kCausal:
      return "causal";
    case MaskKind::kSlidingWindow:
      return "sliding_window";
    case MaskKind::kGlobalWindow:
      return "global_window";
    case MaskKind::kChunked:
      return "chunked";
    case MaskKind::kDocument:
      return "document";
    case MaskKind::kBlockAttention:
      return "block_attention";
    case MaskKind::kPrefixLM:
      return "prefix_lm";
    case MaskKind::kNeighborhood:
      return "neighborhood";
    case MaskKind::kMaxvitBlock:
      return "maxvit_block";
    case MaskKind::kMaxvitGrid:
      return "maxvit_grid";
    case MaskKind::kBlockMap:
      return "block_map";
    case MaskKind::kAnd:
      return "and";
    case MaskKind::kOr:
      return "or";
    case MaskKind::kNot:
      return "not";
  }
  return "unknown";
}

const char* normalizer_name(NormalizerKind k) {
  switch (k) {
    case NormalizerKind::kSoftmax:
      return "softmax";
    case NormalizerKind::kSoftmaxSink:
      return "sink";
    case NormalizerKind::kSigmoid:
      return "sigmoid";
    case NormalizerKind::kKernel:
      return "kernel";
    case NormalizerKind::kReLA:
      return "rela";
  }
  return "unknown";
}

}  // namespace attnkit
