// attnkit::Status: the result of every public entry point.
// A code plus a message that names the argument, its value and the rule it broke.
#pragma once
#include <string>
#include <utility>

namespace attnkit {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a value breaks a rule (shape, range, monotonicity); Python: ValueError
  kTypeError,        // a dtype or device is wrong; Python: TypeError
  kNotImplemented,   // a valid request this backend does not support; Python: NotImplementedError
  kInternal,         // a bug in attnkit
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status ok_status() { return {}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // Marks a Status as deliberately ignored (tests and tools only).
  void ignore() const {}

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

const char* status_code_name(StatusCode code);

}  // namespace attnkit
