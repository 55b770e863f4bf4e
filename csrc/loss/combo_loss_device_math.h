#pragma once
// The per-pixel loss math for float compute on the GPU: the formulas of combo_loss_math.h (see its
// header comment) without the IEEE divisions, whose FCHK / range-test slow paths and branches cost
// more than the math itself, and with a shorter exp and log1p. The CPU keeps the portable code bit
// for bit; float64 logits keep the library path on both.
//
// The divisions become rcp.approx.ftz.f32 plus one Newton (or quotient-correction) step. The PTX ISA
// (9.1, section 9.7.3.13) documents rcp.approx.f32's "maximum ulp error is 1 across the full range
// of inputs"; the divisors here are 1 + e and 2 + e in [1, 3], so no subnormal, huge or zero divisor
// (what the slow path is for) can occur, and the step brings the quotient to about half an ulp.
// exp stays FMA-only: ex2.approx.f32 would save 5 instructions a call, but with its documented error
// ("2 ulp from correctly rounded result", 9.7.3.21) the focal term, which carries e three times
// (p^2 and log1p(e)), reaches 1.1e-6 relative error, past the 1e-6 the CUDA tests allow; the
// polynomial keeps e within ~1 ulp, better than the portable version.
//
// tests/test_loss_device_math.py mirrors these functions line by line in NumPy float32, with
// rcp.approx pushed to its documented worst case, and checks the loss terms and gradients against
// float64 over the whole input range; it also compiles this header for the CPU and requires the
// model to match it bit for bit. Change both together.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/half.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss::device_math {

// Outside device code (tests/cuda_emu/loss_device_math_host.cpp compiles these formulas for the
// CPU) the reciprocal is correctly rounded.
__device__ __forceinline__ float rcp_approx(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return static_cast<float>(1.0 / static_cast<double>(v));
#endif
}

// max(a, b) that returns NaN when a is NaN (fmaxf would drop it): one FMNMX.NAN on sm_80+.
__device__ __forceinline__ float max_keep_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a < b ? b : a;
#endif
}

// exp(x) for x <= 0 (NaN stays NaN), within ~1 ulp. As the portable version, x is clamped at -87,
// so the result is never below 2^-126 (never subnormal). The portable version rounds through an
// int conversion and back and evaluates a degree-7 Taylor polynomial; here a shifter rounds, the
// reduction stays in base 2, and a degree-6 minimax polynomial follows.
__device__ __forceinline__ float exp_nonpositive(float x) {
  const float xc = max_keep_nan(x, -87.0f);
  // k = round(x log2e) with the 1.5 * 2^23 shifter: the sum's low mantissa bits hold k.
  const float shifted = fmaf(xc, 1.44269502f, 12582912.0f);
  const float k = shifted - 12582912.0f;
  // r = x log2e - k, |r| <= 0.5 + 2e-6, with log2e split in two (hi + lo) so the reduction is good
  // to ~2^-25: one rounded x * log2e would be off by up to |x| 2^-24.
  const float r = fmaf(xc, 1.92596299e-8f, fmaf(xc, 1.44269502f, -k));
  // 2^r on [-0.5, 0.5]: degree-6 minimax for relative error (1.6e-8 with these float coefficients,
  // 7.6e-8 evaluated in float), Horner.
  float poly = fmaf(r, 1.53533515e-4f, 1.33988738e-3f);
  poly = fmaf(r, poly, 9.61843785e-3f);
  poly = fmaf(r, poly, 5.55033237e-2f);
  poly = fmaf(r, poly, 2.40226477e-1f);
  poly = fmaf(r, poly, 6.93147182e-1f);
  poly = fmaf(r, poly, 1.0f);
  // 2^k for k in [-126, 0]: (bits of shifted) << 23 is k << 23, as 0x4b400000 << 23 wraps to 0.
  const float scale = bits_float((float_bits(shifted) << 23) + 0x3f800000u);
  return poly * scale;
}

// 1 / a for a in [1, 3]: rcp.approx and one Newton step.
__device__ __forceinline__ float reciprocal_1_to_3(float a) {
  const float r = rcp_approx(a);
  return fmaf(r, fmaf(-a, r, 1.0f), r);
}

// log1p(e) for e in [0, 1] as 2 atanh(s), s = e / (2 + e) in [0, 1/3], accurate in relative terms
// for tiny e as log1p must be: the quotient from rcp.approx and one correction step, then
// 2 atanh(s) / s as a degree-4 polynomial in z = s^2 (minimax for relative error on [0, 1/9]:
// 5.5e-9 with these float coefficients), where the portable code sums 8 terms of the series.
__device__ __forceinline__ float log1p_unit(float e) {
  const float b = 2.0f + e;
  const float r = rcp_approx(b);
  const float s0 = e * r;
  const float s = fmaf(r, fmaf(-b, s0, e), s0);
  const float z = s * s;
  float poly = fmaf(z, 0.28011897f, 0.2800182f);
  poly = fmaf(z, poly, 0.40021527f);
  poly = fmaf(z, poly, 0.6666642f);
  poly = fmaf(z, poly, 2.0f);
  return s * poly;
}

// e = exp(-|x|), p = sigmoid(x), q = 1 - p, both from e without cancellation (sigmoid_parts).
__device__ __forceinline__ Sigmoid<float> sigmoid_parts(float x) {
  const float e = exp_nonpositive(-fabsf(x));
  const float inv = reciprocal_1_to_3(1.0f + e);
  const float small = e * inv;  // the smaller of p and q
  const bool nonneg = x >= 0.0f;
  return Sigmoid<float>{e, nonneg ? inv : small, nonneg ? small : inv};
}

// bce_pixel, with w - 1 hoisted by the caller and max(-x, 0) as max(x, 0) - x (exact).
__device__ __forceinline__ float bce_pixel(float x, float t, float w_minus_1, float lp) {
  const float pos = fmaxf(x, 0.0f);
  const float neg = pos - x;
  return (pos - x * t) + lp + w_minus_1 * t * (lp + neg);
}

template <int kMode>
__device__ __forceinline__ PixelForward<float> pixel_forward(float x, float t, float w_minus_1, double gamma) {
  const Sigmoid<float> s = sigmoid_parts(x);
  PixelForward<float> out;
  out.bce = bce_pixel(x, t, w_minus_1, log1p_unit(s.e));
  out.p = s.p;
  out.mismatch = s.p * (1.0f - t) + s.q * t;  // also m = 1 - p_t, the focal modulator's base
  out.focal = 0.0f;
  if constexpr (kMode != kNoFocal) out.focal = focal_modulator<kMode>(out.mismatch, gamma) * out.bce;
  return out;
}

// d loss / d x coefficients for one image (see finalize), with the focal ones pre-scaled for the
// regrouped gradient below.
struct GradientCoefficients {
  float bce, focal, focal_2, focal_minus_4, dice_t, dice_c;  // focal_2 = 2 focal, focal_minus_4 = -4 focal
};

// pixel_gradient's value, regrouped so that each product is formed once:
//   g = coef_bce dbce + (dice_t t + dice_c) pq + coef_focal (d(m^g)/dm (1 - 2t) pq bce + m^g dbce)
//     = dbce (coef_bce + coef_focal m^g) + pq (dice_t t + dice_c + coef_focal d(m^g)/dm (1 - 2t) bce)
// where for g = 2, coef_focal d(m^2)/dm (1 - 2t) = m (2 coef_focal - 4 coef_focal t).
template <int kMode>
__device__ __forceinline__ float pixel_gradient(float x, float t, float w, float w_minus_1, double gamma,
                                                const GradientCoefficients& c) {
  const Sigmoid<float> s = sigmoid_parts(x);
  const float pq = s.p * s.q;
  const float u = 1.0f - t;
  const float dbce = u * s.p - w * t * s.q;
  const float dice = c.dice_t * t + c.dice_c;
  if constexpr (kMode == kNoFocal) {
    return c.bce * dbce + dice * pq;
  } else {
    const float bce = bce_pixel(x, t, w_minus_1, log1p_unit(s.e));
    const float m = s.p * u + s.q * t;
    float modulated, slope;  // coef_bce + coef_focal m^g, and coef_focal d(m^g)/dm (1 - 2t)
    if constexpr (kMode == kFocalSquare) {
      modulated = c.focal * (m * m) + c.bce;
      slope = m * (c.focal_minus_4 * t + c.focal_2);
    } else {
      modulated = c.focal * focal_modulator<kMode>(m, gamma) + c.bce;
      slope = c.focal * focal_modulator_slope<kMode>(m, gamma) * (1.0f - 2.0f * t);
    }
    return dbce * modulated + pq * (slope * bce + dice);
  }
}

}  // namespace pneumoseg::loss::device_math
