// Status: the error type that every fallible call of the runtime returns.
#pragma once

#include <string>
#include <utility>

namespace dgms_rt {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument = 1,  // a malformed layer description or tensor shape
  kUnsupported = 2,      // a valid request this build or CPU cannot serve
  kOutOfMemory = 3,
};

// Result of a call: a code and, when the code is not kOk, a message that
// names the invalid value and what the caller should change.
class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace dgms_rt
