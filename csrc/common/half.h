#pragma once
// float16 / bfloat16 <-> float by bit manipulation, identical on host and device, so kernels read
// and write half data without cuda_fp16.h types in the shared code.
#include <cstdint>
#include <cstring>

#include "common/dispatch.h"
#include "common/macros.h"

namespace pneumoseg {

PNEUMOSEG_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);  // unlike memcpy, keeps loops vectorisable with -mavx2
#endif
}

PNEUMOSEG_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}

PNEUMOSEG_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, with overflow to inf and subnormals handled.
PNEUMOSEG_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    const float v = bits_float(abs) * 16777216.0f;  // scale by 2^24, then round to an integer
    const uint32_t m = static_cast<uint32_t>(v);
    const float frac = v - static_cast<float>(m);
    uint32_t r = m + ((frac > 0.5f || (frac == 0.5f && (m & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t e = ((abs >> 23) - 112u) << 10;
  const uint32_t m = (abs >> 13) & 0x3ffu;
  const uint32_t rest = abs & 0x1fffu;
  uint32_t h = e | m;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return static_cast<uint16_t>(sign | h);
}

PNEUMOSEG_HD float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN. Branch-free, so store loops vectorise.
PNEUMOSEG_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// Uniform load/store of any floating storage type as float (or double for double).
template <typename T> struct FloatIO;
template <> struct FloatIO<float> {
  using compute = float;
  static PNEUMOSEG_HD float load(float v) { return v; }
  static PNEUMOSEG_HD float store(float v) { return v; }
};
template <> struct FloatIO<double> {
  using compute = double;
  static PNEUMOSEG_HD double load(double v) { return v; }
  static PNEUMOSEG_HD double store(double v) { return v; }
};
template <> struct FloatIO<Half16> {
  using compute = float;
  static PNEUMOSEG_HD float load(Half16 v) { return half_to_float(v.bits); }
  static PNEUMOSEG_HD Half16 store(float v) { return Half16{float_to_half(v)}; }
};
template <> struct FloatIO<BFloat16Raw> {
  using compute = float;
  static PNEUMOSEG_HD float load(BFloat16Raw v) { return bf16_to_float(v.bits); }
  static PNEUMOSEG_HD BFloat16Raw store(float v) { return BFloat16Raw{float_to_bf16(v)}; }
};

// Targets: any float type as its value, integers and bool as their value (0/1 expected).
template <typename T, typename C>
PNEUMOSEG_HD C load_as(T v) { return static_cast<C>(v); }
template <> PNEUMOSEG_HD float load_as<Half16, float>(Half16 v) { return half_to_float(v.bits); }
template <> PNEUMOSEG_HD double load_as<Half16, double>(Half16 v) { return half_to_float(v.bits); }
template <> PNEUMOSEG_HD float load_as<BFloat16Raw, float>(BFloat16Raw v) { return bf16_to_float(v.bits); }
template <> PNEUMOSEG_HD double load_as<BFloat16Raw, double>(BFloat16Raw v) { return bf16_to_float(v.bits); }

}  // namespace pneumoseg
