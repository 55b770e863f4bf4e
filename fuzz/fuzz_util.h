#pragma once
// Shared helpers of the libFuzzer harnesses: the one place that decides what counts as a finding.
//
// The core's contract (common/errors.h): bad input throws InputError, which becomes RLEError or
// InvalidInputError in Python. Anything else is a finding: a sanitizer report, a NativeError (an
// internal check that fired, i.e. the core's own bookkeeping went wrong), any other exception, or a
// result that disagrees with the harness's reference.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/tensor_view.h"

namespace fuzz {

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "\nFUZZ FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();  // libFuzzer saves the input as crash-*
}

#define FUZZ_CHECK(cond, msg)                                                                      \
  do {                                                                                             \
    if (!(cond)) ::fuzz::finding(std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " +     \
                                 "check '" #cond "' failed: " + (msg));                            \
  } while (0)

// Runs f; true if it threw the core's InputError (bad input, a clear error), false if it returned.
// Every other exception is a finding.
template <typename F>
bool rejects(const char* what, F&& f) {
  try {
    f();
    return false;
  } catch (const pneumoseg::InputError&) {
    return true;
  } catch (const pneumoseg::NativeError& e) {
    finding(std::string(what) + ": NativeError (an internal check fired) on fuzzed input: " + e.what());
  } catch (const std::exception& e) {
    finding(std::string(what) + ": unexpected exception type: " + e.what());
  } catch (...) {
    finding(std::string(what) + ": unexpected non-std exception");
  }
}

// A strided (N, H, W) array in a buffer of exactly the bytes its elements span, so ASan reports any
// access outside it. Layouts are those NumPy and torch hand over: C order, one image column-major
// (a transposed view), padded rows (a crop), rows or columns reversed (negative strides), one row
// broadcast down the image (stride 0).
struct Layout {
  int64_t stride[3];
  int64_t origin;  // element index of [0, 0, 0] in the buffer
  int64_t extent;  // elements in the buffer
};

inline Layout make_layout(int64_t N, int64_t H, int64_t W, int code, int64_t pad) {
  Layout l{};
  switch (code) {
    case 1:  // column-major images
      l.stride[0] = H * W, l.stride[1] = 1, l.stride[2] = H;
      break;
    case 2:  // padded rows
      l.stride[0] = H * (W + pad), l.stride[1] = W + pad, l.stride[2] = 1;
      break;
    case 3:  // rows reversed
      l.stride[0] = H * W, l.stride[1] = -W, l.stride[2] = 1;
      break;
    case 4:  // columns reversed, non-unit column stride
      l.stride[0] = H * W * 2, l.stride[1] = W * 2, l.stride[2] = -2;
      break;
    case 5:  // every row the same (a broadcast): a read-only input layout
      l.stride[0] = W, l.stride[1] = 0, l.stride[2] = 1;
      break;
    default:  // C order
      l.stride[0] = H * W, l.stride[1] = W, l.stride[2] = 1;
  }
  if (N == 0 || H == 0 || W == 0) {
    l.origin = 0, l.extent = 0;
    return l;
  }
  int64_t lo = 0, hi = 0;
  const int64_t size[3] = {N, H, W};
  for (int d = 0; d < 3; ++d) {
    const int64_t span = (size[d] - 1) * l.stride[d];
    if (span < 0) lo += span; else hi += span;
  }
  l.origin = -lo;
  l.extent = hi - lo + 1;
  return l;
}

inline int64_t offset(const Layout& l, int64_t n, int64_t r, int64_t c) {
  return l.origin + n * l.stride[0] + r * l.stride[1] + c * l.stride[2];
}

inline pneumoseg::TensorView view3(void* buffer_origin, pneumoseg::DType dtype, int64_t N, int64_t H, int64_t W,
                                   const Layout& l) {
  pneumoseg::TensorView v;
  v.data = buffer_origin;
  v.dtype = dtype;
  v.device = pneumoseg::Device::CPU;
  v.ndim = 3;
  v.shape[0] = N, v.shape[1] = H, v.shape[2] = W;
  for (int d = 0; d < 3; ++d) v.strides[d] = l.stride[d];
  return v;
}

// Bytes of a heap block of exactly n bytes (never a zero-size vector's null pointer: ASan then also
// reports a read of an empty array's "first" element).
struct Block {
  explicit Block(size_t n) : size(n), data(new uint8_t[n]) {}
  ~Block() { delete[] data; }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  size_t size;
  uint8_t* data;
};

// float16 / bfloat16 bits -> double, written from the IEEE definitions (not the core's half.h).
inline double half_value(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  double v;
  if (exp == 0) v = std::ldexp(man, -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(1024 + man, exp - 25);
  return sign ? -v : v;
}
inline double bf16_value(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The value of element i of a buffer of dtype t, as double (integers exactly up to 2^53).
inline double element_value(const uint8_t* base, pneumoseg::DType t, int64_t i) {
  using pneumoseg::DType;
  const int64_t size = pneumoseg::dtype_size(t);
  const uint8_t* p = base + i * size;
  auto get = [&](auto v) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  };
  switch (t) {
    case DType::Bool:
    case DType::UInt8: return get(uint8_t{});
    case DType::Int8: return get(int8_t{});
    case DType::Int16: return get(int16_t{});
    case DType::UInt16: return get(uint16_t{});
    case DType::Int32: return get(int32_t{});
    case DType::UInt32: return get(uint32_t{});
    case DType::Int64: return static_cast<double>(get(int64_t{}));
    case DType::UInt64: return static_cast<double>(get(uint64_t{}));
    case DType::Float16: return half_value(get(uint16_t{}));
    case DType::BFloat16: return bf16_value(get(uint16_t{}));
    case DType::Float32: return get(float{});
    case DType::Float64: return get(double{});
  }
  return 0;
}

// "Nonzero" as the spec says: any bit pattern other than +0 / -0 (NaN is nonzero). Integers are
// tested on their bits, not through double (an int64 of 1 must not vanish, nor 2^63 round).
inline bool element_nonzero(const uint8_t* base, pneumoseg::DType t, int64_t i) {
  using pneumoseg::DType;
  const int64_t size = pneumoseg::dtype_size(t);
  const uint8_t* p = base + i * size;
  if (t == DType::Float16 || t == DType::BFloat16 || t == DType::Float32 || t == DType::Float64) {
    return !(element_value(base, t, i) == 0.0);
  }
  for (int64_t b = 0; b < size; ++b)
    if (p[b]) return true;
  return false;
}

// Interesting doubles for thresholds, weights and values: the fuzzer picks one by index or gives
// raw bits.
inline double special_double(uint8_t pick, uint64_t raw_bits) {
  static const double kTable[] = {0.0, -0.0, 0.5, 1.0, -1.0, NAN, INFINITY, -INFINITY, 1e300, -1e300,
                                  65504.0, 3.4028234663852886e38, 3.4028235677973366e38, 4.9e-324,
                                  1.17549435e-38, 0.49999997, 0.75, 2.0, 255.0, 254.5, 1e-7, 100.0};
  constexpr size_t kCount = sizeof(kTable) / sizeof(kTable[0]);
  if (pick < kCount) return kTable[pick];
  double d;
  std::memcpy(&d, &raw_bits, 8);
  return d;
}

}  // namespace fuzz
