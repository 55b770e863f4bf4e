#pragma once
#include <stdexcept>
#include <string>

namespace pneumoseg {

// Bad input from the caller: becomes the Python exception named by `kind` (see bindings.cpp).
class InputError : public std::invalid_argument {
 public:
  enum class Kind { Value, Rle };
  InputError(Kind kind, const std::string& what) : std::invalid_argument(what), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// Something failed inside CUDA or the runtime: not the caller's fault, becomes RuntimeError.
class NativeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail_value(const std::string& what) {
  throw InputError(InputError::Kind::Value, what);
}
[[noreturn]] inline void fail_rle(const std::string& what) { throw InputError(InputError::Kind::Rle, what); }

}  // namespace pneumoseg
