#pragma once
// Per-pixel terms of the combo loss and their derivatives, shared by the CPU and CUDA kernels.
//
// With e = exp(-|x|), p = sigmoid(x) and q = 1 - p are both formed from e without cancellation, and
//   bce   = max(x, 0) - x t + log1p(e) + (w - 1) t (log1p(e) + max(-x, 0))      (w = pos_weight)
//   dbce  = (1 - t) p - w t q
//   m     = 1 - p_t = q t + p (1 - t),   focal = m^gamma bce
//   dfoc  = gamma m^(gamma-1) (1 - 2t) p q bce + m^gamma dbce
// float math uses the polynomial exp/log1p below (vectorisable on the CPU, identical on the GPU);
// double uses the C library.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/half.h"
#include "common/macros.h"

namespace pneumoseg::loss {

// The per-pixel math is written once for a value type V: a scalar float or double (CUDA, CPU
// tails, float64) or, on the CPU, an 8-lane GNU vector of floats, so that vectorisation never
// depends on the optimiser's if-conversion heuristics.
template <typename V>
struct Lanes {  // scalars
  static constexpr int kWidth = 1;
  static PNEUMOSEG_HD V splat(double v) { return static_cast<V>(v); }
};

#if !defined(__CUDACC__)
// 4 lanes for SSE2 builds, 8 for AVX2 builds: each translation unit uses its native width.
typedef float float4v __attribute__((vector_size(16)));
typedef int32_t int4v __attribute__((vector_size(16)));
typedef uint32_t uint4v __attribute__((vector_size(16)));
typedef float float8v __attribute__((vector_size(32)));
typedef int32_t int8v __attribute__((vector_size(32)));
typedef uint32_t uint8v __attribute__((vector_size(32)));
template <typename F, typename I, typename U, int W>
struct VectorLanes {
  static constexpr int kWidth = W;
  using Int = I;
  using UInt = U;
  static inline __attribute__((always_inline)) F splat(double v) { return F{} + static_cast<float>(v); }
};
template <>
struct Lanes<float4v> : VectorLanes<float4v, int4v, uint4v, 4> {};
template <>
struct Lanes<float8v> : VectorLanes<float8v, int8v, uint8v, 8> {};
#endif

template <typename V, typename M>
PNEUMOSEG_HD V select(M mask, V a, V b) {
  return mask ? a : b;  // a GNU vector conditional when M is a vector mask
}

// exp(x) for x <= 0 in float, relative error ~1e-7: Cody-Waite reduction and a degree-7 Taylor
// polynomial on |r| <= ln2/2 (Estrin's scheme, short dependency chains); below -87 it returns
// about 1.6e-38 instead of a subnormal.
template <typename V>
PNEUMOSEG_HD V exp_nonpositive_f(V x) {
  using L = Lanes<V>;
  const V xc = select(x < L::splat(-87.0), L::splat(-87.0), x);
  V k;
  V scale;
#if !defined(__CUDACC__)
  if constexpr (L::kWidth > 1) {
    // x <= 0: rounding to nearest is truncation of (x log2e - 0.5).
    using I = typename L::Int;
    const I ki = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, I);
    k = __builtin_convertvector(ki, V);
    scale = __builtin_bit_cast(V, (typename L::UInt)((ki + 127) << 23));
  } else
#endif
  {
    const int ki = static_cast<int>(xc * 1.44269504088896341f - 0.5f);
    k = static_cast<float>(ki);
    scale = bits_float(static_cast<uint32_t>(ki + 127) << 23);  // ki in [-126, 0]: a normal float
  }
  const V r = (xc - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
  const V r2 = r * r;
  const V r4 = r2 * r2;
  const V p01 = 1.0f + r;
  const V p23 = 0.5f + r * (1.0f / 6.0f);
  const V p45 = (1.0f / 24.0f) + r * (1.0f / 120.0f);
  const V p67 = (1.0f / 720.0f) + r * (1.0f / 5040.0f);
  return (p01 + r2 * p23 + r4 * (p45 + r2 * p67)) * scale;
}

// log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series in s (Estrin);
// accurate in relative terms even for tiny e.
template <typename V>
PNEUMOSEG_HD V log1p_unit_f(V e) {
  const V s = e / (2.0f + e);
  const V z = s * s;
  const V z2 = z * z;
  const V z4 = z2 * z2;
  const V a = (1.0f + z * (1.0f / 3.0f)) + z2 * ((1.0f / 5.0f) + z * (1.0f / 7.0f));
  const V b = ((1.0f / 9.0f) + z * (1.0f / 11.0f)) + z2 * ((1.0f / 13.0f) + z * (1.0f / 15.0f));
  return 2.0f * s * (a + z4 * b);
}

PNEUMOSEG_HD float exp_nonpositive(float x) { return exp_nonpositive_f(x); }
PNEUMOSEG_HD float log1p_unit(float e) { return log1p_unit_f(e); }
PNEUMOSEG_HD double exp_nonpositive(double x) { return exp(x); }
PNEUMOSEG_HD double log1p_unit(double e) { return log1p(e); }
#if !defined(__CUDACC__)
inline __attribute__((always_inline)) float4v exp_nonpositive(float4v x) { return exp_nonpositive_f(x); }
inline __attribute__((always_inline)) float4v log1p_unit(float4v e) { return log1p_unit_f(e); }
inline __attribute__((always_inline)) float8v exp_nonpositive(float8v x) { return exp_nonpositive_f(x); }
inline __attribute__((always_inline)) float8v log1p_unit(float8v e) { return log1p_unit_f(e); }
#endif

// How the focal term is computed: none, gamma == 2 (the usual choice, a square), or any gamma.
enum FocalMode : int { kNoFocal = 0, kFocalSquare = 1, kFocalPow = 2 };

inline int focal_mode(double focal_weight, double focal_gamma) {
  if (focal_weight == 0.0) return kNoFocal;
  return focal_gamma == 2.0 ? kFocalSquare : kFocalPow;
}

// Runtime focal mode -> a compile-time constant for the kernels' template parameter.
template <typename F>
void with_focal_mode(int mode, F&& f) {
  switch (mode) {
    case kNoFocal: f(std::integral_constant<int, kNoFocal>()); break;
    case kFocalSquare: f(std::integral_constant<int, kFocalSquare>()); break;
    default: f(std::integral_constant<int, kFocalPow>()); break;
  }
}

template <typename V>
PNEUMOSEG_HD V pow_lanes(V m, double gamma) {
#if !defined(__CUDACC__)
  if constexpr (Lanes<V>::kWidth > 1) {
    V out;
    for (int l = 0; l < Lanes<V>::kWidth; ++l) out[l] = m[l] > 0.0f ? std::pow(m[l], static_cast<float>(gamma)) : 0.0f;
    return out;
  } else
#endif
  {
    return m > V(0) ? static_cast<V>(pow(m, static_cast<V>(gamma))) : V(0);
  }
}

// m^gamma and its slope d m^gamma / d m.
template <int kMode, typename V>
PNEUMOSEG_HD V focal_modulator(V m, double gamma) {
  if (kMode == kFocalSquare) return m * m;
  if (gamma == 0.0) return Lanes<V>::splat(1.0);
  return pow_lanes(m, gamma);
}

template <int kMode, typename V>
PNEUMOSEG_HD V focal_modulator_slope(V m, double gamma) {
  if (kMode == kFocalSquare) return 2.0f * m;
  if (gamma == 0.0) return Lanes<V>::splat(0.0);
  if (gamma == 1.0) return Lanes<V>::splat(1.0);
  return static_cast<float>(gamma) * pow_lanes(m, gamma - 1.0);
}

template <typename V>
struct PixelForward {
  V bce, focal, p, mismatch;  // mismatch = p (1 - t) + (1 - p) t, Dice's numerator term
};

// p = sigmoid(x) and q = 1 - p from e = exp(-|x|), both without cancellation.
template <typename V>
struct Sigmoid {
  V e, p, q;
};
template <typename V>
PNEUMOSEG_HD Sigmoid<V> sigmoid_parts(V x) {
  using L = Lanes<V>;
  const V zero = L::splat(0.0);
  const V e = exp_nonpositive(select(x < zero, x, -x));
  const V inv = 1.0f / (1.0f + e);
  const auto nonneg = x >= zero;
  return Sigmoid<V>{e, select(nonneg, inv, e * inv), select(nonneg, e * inv, inv)};
}

template <typename V>
PNEUMOSEG_HD V bce_pixel(V x, V t, V w, V lp) {
  const V zero = Lanes<V>::splat(0.0);
  const V pos = select(x > zero, x, zero);
  const V neg = select(x < zero, -x, zero);
  return pos - x * t + lp + (w - 1.0f) * t * (lp + neg);
}

template <typename V, int kMode>
PNEUMOSEG_HD PixelForward<V> pixel_forward(V x, V t, V w, double gamma) {
  const Sigmoid<V> s = sigmoid_parts(x);
  PixelForward<V> out;
  out.bce = bce_pixel(x, t, w, log1p_unit(s.e));
  out.p = s.p;
  out.mismatch = s.p * (1.0f - t) + s.q * t;
  out.focal = Lanes<V>::splat(0.0);
  if (kMode != kNoFocal) out.focal = focal_modulator<kMode>(s.q * t + s.p * (1.0f - t), gamma) * out.bce;
  return out;
}

// d loss / d x for one pixel, given the per-image coefficients.
template <typename V, int kMode>
PNEUMOSEG_HD V pixel_gradient(V x, V t, V w, double gamma, V coef_bce, V coef_focal, V dice_t, V dice_c) {
  const Sigmoid<V> s = sigmoid_parts(x);
  const V pq = s.p * s.q;
  const V dbce = (1.0f - t) * s.p - w * t * s.q;
  V g = coef_bce * dbce + (dice_t * t + dice_c) * pq;
  if (kMode != kNoFocal) {
    const V bce = bce_pixel(x, t, w, log1p_unit(s.e));
    const V m = s.q * t + s.p * (1.0f - t);
    g += coef_focal * (focal_modulator_slope<kMode>(m, gamma) * (1.0f - 2.0f * t) * pq * bce +
                       focal_modulator<kMode>(m, gamma) * dbce);
  }
  return g;
}

// The loss and the gradient coefficients from the per-image sums (state rows), in double.
// `sums(n, col)` reads the state; `set(n, col, v)` writes coefficients.
template <typename Get, typename Set>
PNEUMOSEG_HD double finalize(int64_t n_images, int64_t pixels_per_image, double bce_w, double dice_w, double focal_w,
                             double smooth, bool per_image, Get&& sums, Set&& set) {
  // Dice = 1 - (2I + s) / (P + T + s) = M / (P + T + s) with M = sum of per-pixel mismatches: the
  // second form has no cancellation when predictions are good.
  const double total_pixels = static_cast<double>(n_images) * static_cast<double>(pixels_per_image);
  double bce = 0, focal = 0, pt = 0, ps = 0, ts = 0, bad = 0, mismatch = 0, dice_mean = 0;
  for (int64_t n = 0; n < n_images; ++n) {
    bce += sums(n, 0);
    focal += sums(n, 1);
    pt += sums(n, 2);
    ps += sums(n, 3);
    ts += sums(n, 4);
    bad += sums(n, 5);
    mismatch += sums(n, 6);
    if (per_image) {
      const double den = sums(n, 3) + sums(n, 4) + smooth;
      dice_mean += sums(n, 6) / den;
      set(n, 9, dice_w / n_images * (-2.0 / den));
      set(n, 10, dice_w / n_images * (2.0 * sums(n, 2) + smooth) / (den * den));
    }
  }
  double dice;
  if (per_image) {
    dice = dice_mean / n_images;
  } else {
    const double den = ps + ts + smooth;
    dice = mismatch / den;
    for (int64_t n = 0; n < n_images; ++n) {
      set(n, 9, dice_w * (-2.0 / den));
      set(n, 10, dice_w * (2.0 * pt + smooth) / (den * den));
    }
  }
  for (int64_t n = 0; n < n_images; ++n) {
    set(n, 7, bce_w / total_pixels);
    set(n, 8, focal_w / total_pixels);
  }
  const double loss = bce_w * bce / total_pixels + focal_w * focal / total_pixels + dice_w * dice;
  return bad > 0 ? NAN : loss;  // invalid targets never give a plausible number
}

}  // namespace pneumoseg::loss
