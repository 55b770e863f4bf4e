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

#include "common/half.h"
#include "common/macros.h"

namespace pneumoseg::loss {

// exp(x) for x <= 0 in float, relative error ~1e-7: Cody-Waite reduction and a degree-7 Taylor
// polynomial on |r| <= ln2/2; flushes to 0 below -87 (where the result would be subnormal).
PNEUMOSEG_HD float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.42860682030941723e-6f;
  const float xc = x < -87.0f ? -87.0f : x;
  // Round to nearest by truncating (x log2e - 0.5): x <= 0, and truncation vectorises with SSE2.
  const int ki = static_cast<int>(xc * kLog2e - 0.5f);
  const float k = static_cast<float>(ki);
  const float r = (xc - k * kLn2Hi) - k * kLn2Lo;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = bits_float(static_cast<uint32_t>(ki + 127) << 23);  // ki in [-126, 0]: normal
  return x < -87.0f ? 0.0f : poly * scale;
}

// log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, as an odd series in s; accurate in
// relative terms even for tiny e.
PNEUMOSEG_HD float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float z = s * s;
  float poly = 1.0f / 15.0f;
  poly = poly * z + 1.0f / 13.0f;
  poly = poly * z + 1.0f / 11.0f;
  poly = poly * z + 1.0f / 9.0f;
  poly = poly * z + 1.0f / 7.0f;
  poly = poly * z + 1.0f / 5.0f;
  poly = poly * z + 1.0f / 3.0f;
  poly = poly * z + 1.0f;
  return 2.0f * s * poly;
}

PNEUMOSEG_HD double exp_nonpositive(double x) { return exp(x); }
PNEUMOSEG_HD double log1p_unit(double e) { return log1p(e); }

template <typename C>
struct PixelForward {
  C bce, focal, p;
};

// How the focal term is computed: none, gamma == 2 (the usual choice, a square), or any gamma.
enum FocalMode : int { kNoFocal = 0, kFocalSquare = 1, kFocalPow = 2 };

template <int kMode, typename C>
PNEUMOSEG_HD C focal_modulator(C m, C gamma) {
  if (kMode == kFocalSquare) return m * m;
  if (gamma == C(0)) return C(1);
  return m > C(0) ? static_cast<C>(pow(m, gamma)) : C(0);
}

// d m^gamma / d m
template <int kMode, typename C>
PNEUMOSEG_HD C focal_modulator_slope(C m, C gamma) {
  if (kMode == kFocalSquare) return C(2) * m;
  if (gamma == C(0)) return C(0);
  if (gamma == C(1)) return C(1);
  return m > C(0) ? gamma * static_cast<C>(pow(m, gamma - C(1))) : C(0);
}

template <typename C, int kMode>
PNEUMOSEG_HD PixelForward<C> pixel_forward(C x, C t, C w, C gamma) {
  const C ax = x < C(0) ? -x : x;
  const C e = exp_nonpositive(-ax);
  const C inv = C(1) / (C(1) + e);
  const C p = x >= C(0) ? inv : e * inv;
  const C q = x >= C(0) ? e * inv : inv;
  const C lp = log1p_unit(e);
  const C pos = x > C(0) ? x : C(0);
  const C neg = x < C(0) ? -x : C(0);
  PixelForward<C> out;
  out.bce = pos - x * t + lp + (w - C(1)) * t * (lp + neg);
  out.p = p;
  out.focal = C(0);
  if (kMode != kNoFocal) out.focal = focal_modulator<kMode>(q * t + p * (C(1) - t), gamma) * out.bce;
  return out;
}

// d loss / d x for one pixel, given the per-image coefficients.
template <typename C, int kMode>
PNEUMOSEG_HD C pixel_gradient(C x, C t, C w, C gamma, C coef_bce, C coef_focal, C dice_t, C dice_c) {
  const C ax = x < C(0) ? -x : x;
  const C e = exp_nonpositive(-ax);
  const C inv = C(1) / (C(1) + e);
  const C p = x >= C(0) ? inv : e * inv;
  const C q = x >= C(0) ? e * inv : inv;
  const C pq = p * q;
  const C dbce = (C(1) - t) * p - w * t * q;
  C g = coef_bce * dbce + (dice_t * t + dice_c) * pq;
  if (kMode != kNoFocal) {
    const C lp = log1p_unit(e);
    const C pos = x > C(0) ? x : C(0);
    const C neg = x < C(0) ? -x : C(0);
    const C bce = pos - x * t + lp + (w - C(1)) * t * (lp + neg);
    const C m = q * t + p * (C(1) - t);
    const C mod = focal_modulator<kMode>(m, gamma);
    const C dmod = focal_modulator_slope<kMode>(m, gamma);
    g += coef_focal * (dmod * (C(1) - C(2) * t) * pq * bce + mod * dbce);
  }
  return g;
}

// The loss and the gradient coefficients from the per-image sums (state rows), in double.
// `sums(n, col)` reads the state; `set(n, col, v)` writes coefficients.
template <typename Get, typename Set>
PNEUMOSEG_HD double finalize(int64_t n_images, int64_t pixels_per_image, double bce_w, double dice_w, double focal_w,
                             double smooth, bool per_image, Get&& sums, Set&& set) {
  const double total_pixels = static_cast<double>(n_images) * static_cast<double>(pixels_per_image);
  double bce = 0, focal = 0, pt = 0, ps = 0, ts = 0, bad = 0, dice_mean = 0;
  for (int64_t n = 0; n < n_images; ++n) {
    bce += sums(n, 0);
    focal += sums(n, 1);
    pt += sums(n, 2);
    ps += sums(n, 3);
    ts += sums(n, 4);
    bad += sums(n, 5);
    if (per_image) {
      const double den = sums(n, 3) + sums(n, 4) + smooth;
      const double num = 2.0 * sums(n, 2) + smooth;
      dice_mean += 1.0 - num / den;
      set(n, 8, dice_w / n_images * (-2.0 / den));
      set(n, 9, dice_w / n_images * num / (den * den));
    }
  }
  double dice;
  if (per_image) {
    dice = dice_mean / n_images;
  } else {
    const double den = ps + ts + smooth;
    const double num = 2.0 * pt + smooth;
    dice = 1.0 - num / den;
    for (int64_t n = 0; n < n_images; ++n) {
      set(n, 8, dice_w * (-2.0 / den));
      set(n, 9, dice_w * num / (den * den));
    }
  }
  for (int64_t n = 0; n < n_images; ++n) {
    set(n, 6, bce_w / total_pixels);
    set(n, 7, focal_w / total_pixels);
  }
  const double loss = bce_w * bce / total_pixels + focal_w * focal / total_pixels + dice_w * dice;
  return bad > 0 ? NAN : loss;  // invalid targets never give a plausible number
}

}  // namespace pneumoseg::loss
