#pragma once
// The CPU loss loops, compiled once per instruction set (combo_loss_cpu_baseline.cpp and
// combo_loss_cpu_avx2.cpp) and chosen at run time. Include with PNEUMOSEG_LOSS_ISA defined.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/dispatch.h"
#include "common/half.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_math.h"

#ifndef PNEUMOSEG_LOSS_ISA
#error "define PNEUMOSEG_LOSS_ISA before including combo_loss_cpu_kernels.h"
#endif

namespace pneumoseg::loss::PNEUMOSEG_LOSS_ISA {
namespace {

#if defined(__AVX2__)
using VecF = float8v;
#else
using VecF = float4v;
#endif
constexpr int kW = Lanes<VecF>::kWidth;

constexpr int kLanes = 16;  // independent float accumulators: lets the reduction vectorise
constexpr int kSumCount = kSumMismatch + 1;  // the per-pixel sums: state columns 0..kSumMismatch

// Work in blocks: convert inputs to the compute type, run the branch-free pixel math into arrays,
// then reduce with lane accumulators. Each loop is a plain elementwise loop the compiler vectorises.
constexpr int kBlock = 256;

template <typename T, typename C>
inline void load_block(const T* src, int count, C* dst) {
  for (int j = 0; j < count; ++j) dst[j] = load_as<T, C>(src[j]);
}

template <typename C>
inline void add_lanes(const C* v, int count, double* total) {
  C lanes[kLanes] = {};
  int j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += v[j + l];
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; j < count; ++j) sum += v[j];
  *total += sum;
}

template <typename V>
inline __attribute__((always_inline)) V load_lanes(const float* src) {
  V v;
  std::memcpy(&v, src, sizeof(V));
  return v;
}

template <typename V>
inline __attribute__((always_inline)) void store_lanes(float* dst, V v) {
  std::memcpy(dst, &v, sizeof(V));
}

template <typename L, typename T, int kMode>
void forward_chunk(const L* x, const T* t, int64_t count, double w, double gamma, double out[kSumCount]) {
  using C = typename FloatIO<L>::compute;
  alignas(64) C xs[kBlock], ts[kBlock], bce[kBlock], focal[kBlock], p[kBlock], pt[kBlock], bad[kBlock], mis[kBlock];
  double total[kSumCount] = {};
  for (int64_t i = 0; i < count; i += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, count - i));
    load_block(x + i, n, xs);
    load_block(t + i, n, ts);
    if constexpr (std::is_same_v<C, float>) {
      const int padded = (n + kW - 1) / kW * kW;  // pad with zeros; reductions only read the first n
      for (int j = n; j < padded; ++j) xs[j] = ts[j] = 0.0f;
      const VecF wv = Lanes<VecF>::splat(w);
      for (int j = 0; j < padded; j += kW) {
        const VecF xv = load_lanes<VecF>(xs + j), tv = load_lanes<VecF>(ts + j);
        const PixelForward<VecF> r = pixel_forward<VecF, kMode>(xv, tv, wv, gamma);
        store_lanes(bce + j, r.bce);
        store_lanes(focal + j, r.focal);
        store_lanes(p + j, r.p);
        store_lanes(pt + j, r.p * tv);
        store_lanes(mis + j, r.mismatch);
        // NaN fails both comparisons, so it counts as bad too.
        const auto ok = (tv >= 0.0f) & (tv <= 1.0f);
        store_lanes(bad + j, select(ok, Lanes<VecF>::splat(0.0), Lanes<VecF>::splat(1.0)));
      }
    } else {
      for (int j = 0; j < n; ++j) {
        const PixelForward<C> r = pixel_forward<C, kMode>(xs[j], ts[j], static_cast<C>(w), gamma);
        bce[j] = r.bce;
        focal[j] = r.focal;
        p[j] = r.p;
        pt[j] = r.p * ts[j];
        mis[j] = r.mismatch;
        bad[j] = (ts[j] >= C(0)) && (ts[j] <= C(1)) ? C(0) : C(1);
      }
    }
    add_lanes(bce, n, &total[0]);
    if (kMode != kNoFocal) add_lanes(focal, n, &total[1]);
    add_lanes(pt, n, &total[2]);
    add_lanes(p, n, &total[3]);
    add_lanes(ts, n, &total[4]);
    add_lanes(bad, n, &total[5]);
    add_lanes(mis, n, &total[6]);
  }
  for (int c = 0; c < kSumCount; ++c) out[c] = total[c];
}

template <typename L, typename T, int kMode>
void backward_chunk(const L* x, const T* t, int64_t count, double w, double gamma, const double* coef, double grad_out,
                    L* grad) {
  using C = typename FloatIO<L>::compute;
  const double cb = grad_out * coef[0], cf = grad_out * coef[1], dt = grad_out * coef[2], dc = grad_out * coef[3];
  alignas(64) C xs[kBlock], ts[kBlock], gs[kBlock];
  for (int64_t i = 0; i < count; i += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, count - i));
    load_block(x + i, n, xs);
    load_block(t + i, n, ts);
    if constexpr (std::is_same_v<C, float>) {
      const int padded = (n + kW - 1) / kW * kW;
      for (int j = n; j < padded; ++j) xs[j] = ts[j] = 0.0f;
      using LV = Lanes<VecF>;
      const VecF wv = LV::splat(w), cbv = LV::splat(cb), cfv = LV::splat(cf), dtv = LV::splat(dt), dcv = LV::splat(dc);
      for (int j = 0; j < padded; j += kW) {
        store_lanes(gs + j, pixel_gradient<VecF, kMode>(load_lanes<VecF>(xs + j), load_lanes<VecF>(ts + j), wv, gamma,
                                                        cbv, cfv, dtv, dcv));
      }
    } else {
      for (int j = 0; j < n; ++j) {
        gs[j] = pixel_gradient<C, kMode>(xs[j], ts[j], static_cast<C>(w), gamma, static_cast<C>(cb),
                                         static_cast<C>(cf), static_cast<C>(dt), static_cast<C>(dc));
      }
    }
    for (int j = 0; j < n; ++j) grad[i + j] = FloatIO<L>::store(gs[j]);
  }
}

}  // namespace

// Sums of pixels [begin, begin + count) into out[kSumCount].
void forward_pixels(DType logits_dtype, DType target_dtype, int mode, const void* logits, const void* target,
                    int64_t begin, int64_t count, double w, double gamma, double* out) {
  PNEUMOSEG_DISPATCH_FLOATING(logits_dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target_dtype, "target", [&] {
      with_focal_mode(mode, [&](auto m) {
        forward_chunk<L, target_t, decltype(m)::value>(static_cast<const L*>(logits) + begin,
                                                       static_cast<const target_t*>(target) + begin, count, w, gamma,
                                                       out);
      });
    });
  });
}

// Gradient of pixels [begin, begin + count); coef points at the image's four coefficients.
void backward_pixels(DType logits_dtype, DType target_dtype, int mode, const void* logits, const void* target,
                     int64_t begin, int64_t count, double w, double gamma, const double* coef, double grad_out,
                     void* grad) {
  PNEUMOSEG_DISPATCH_FLOATING(logits_dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target_dtype, "target", [&] {
      with_focal_mode(mode, [&](auto m) {
        backward_chunk<L, target_t, decltype(m)::value>(static_cast<const L*>(logits) + begin,
                                                        static_cast<const target_t*>(target) + begin, count, w, gamma,
                                                        coef, grad_out, static_cast<L*>(grad) + begin);
      });
    });
  });
}

}  // namespace pneumoseg::loss::PNEUMOSEG_LOSS_ISA
