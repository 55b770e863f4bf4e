#pragma once
// The CUDA combo-loss kernels, templated on the logits type L. Each L is instantiated in its own
// translation unit (combo_loss_cuda_<type>.cu), so the 240 kernel variants compile in parallel;
// combo_loss_cuda.cu holds the entry points, the finalize kernel and the dispatch.
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/dispatch.h"
#include "common/half.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss::cuda_detail {

inline constexpr int kThreads = 256;
inline constexpr int kVec = 4;                  // elements per vector access (16 bytes of float32 logits)
inline constexpr int kSums = kSumMismatch + 1;  // state columns 0..kSumMismatch

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

struct Sums {
  double v[kSums];
};
struct SumsOp {
  __device__ __forceinline__ Sums operator()(const Sums& a, const Sums& b) const {
    Sums r;
#pragma unroll
    for (int i = 0; i < kSums; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
};

template <typename C>
struct Accumulator {
  C bce = C(0), focal = C(0), pt = C(0), p = C(0), t = C(0), mismatch = C(0);
  int bad = 0;
};

template <typename L, typename T, int kMode, typename C>
__device__ __forceinline__ void accumulate(L xl, T tl, C wc, double gamma, Accumulator<C>& a) {
  const C xv = FloatIO<L>::load(xl);
  const C tv = load_as<T, C>(tl);
  const PixelForward<C> r = pixel_forward<C, kMode>(xv, tv, wc, gamma);
  a.bce += r.bce;
  a.focal += r.focal;
  a.pt += r.p * tv;
  a.p += r.p;
  a.t += tv;
  a.mismatch += r.mismatch;
  a.bad += !(tv >= C(0) && tv <= C(1));
}

// grid = (blocks per image, images). With kVectorised every image starts 16-byte aligned and holds
// a whole number of vectors; two vectors per thread per iteration keep loads in flight.
template <typename L, typename T, int kMode, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    forward_partials_kernel(const L* __restrict__ logits, const T* __restrict__ target, int64_t pixels, double w,
                            double gamma, double* __restrict__ partials) {
  using C = typename FloatIO<L>::compute;
  const int64_t image = blockIdx.y;
  const L* x = logits + image * pixels;
  const T* t = target + image * pixels;
  const C wc = static_cast<C>(w);
  Accumulator<C> acc;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if constexpr (kVectorised) {
    const auto* xv = reinterpret_cast<const Vec<L>*>(x);
    const auto* tv = reinterpret_cast<const Vec<T>*>(t);
    const int64_t vectors = pixels / kVec;
    for (; i + stride < vectors; i += 2 * stride) {
      const Vec<L> a0 = xv[i], a1 = xv[i + stride];
      const Vec<T> b0 = tv[i], b1 = tv[i + stride];
#pragma unroll
      for (int k = 0; k < kVec; ++k) accumulate<L, T, kMode>(a0.v[k], b0.v[k], wc, gamma, acc);
#pragma unroll
      for (int k = 0; k < kVec; ++k) accumulate<L, T, kMode>(a1.v[k], b1.v[k], wc, gamma, acc);
    }
    for (; i < vectors; i += stride) {
      const Vec<L> a0 = xv[i];
      const Vec<T> b0 = tv[i];
#pragma unroll
      for (int k = 0; k < kVec; ++k) accumulate<L, T, kMode>(a0.v[k], b0.v[k], wc, gamma, acc);
    }
  } else {
    for (; i < pixels; i += stride) accumulate<L, T, kMode>(x[i], t[i], wc, gamma, acc);
  }
  Sums mine;
  mine.v[kSumBce] = static_cast<double>(acc.bce);
  mine.v[kSumFocal] = static_cast<double>(acc.focal);
  mine.v[kSumPT] = static_cast<double>(acc.pt);
  mine.v[kSumP] = static_cast<double>(acc.p);
  mine.v[kSumT] = static_cast<double>(acc.t);
  mine.v[kBadTargets] = acc.bad;
  mine.v[kSumMismatch] = static_cast<double>(acc.mismatch);
  using Reduce = cub::BlockReduce<Sums, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const Sums total = Reduce(temp).Reduce(mine, SumsOp());
  if (threadIdx.x == 0) {
    double* out = partials + (image * gridDim.x + blockIdx.x) * kSums;
#pragma unroll
    for (int c = 0; c < kSums; ++c) out[c] = total.v[c];
  }
}

template <typename C>
struct Coefficients {
  C bce, focal, dice_t, dice_c;
};

template <typename L, typename T, int kMode, typename C>
__device__ __forceinline__ L gradient(L xl, T tl, C wc, double gamma, const Coefficients<C>& k) {
  const C v = pixel_gradient<C, kMode>(FloatIO<L>::load(xl), load_as<T, C>(tl), wc, gamma, k.bce, k.focal,
                                       k.dice_t, k.dice_c);
  return FloatIO<L>::store(v);
}

// grid = (blocks per image, images), as the forward pass.
template <typename L, typename T, int kMode, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const void* grad_loss, bool grad_is_double, const L* __restrict__ logits,
                    const T* __restrict__ target, const double* __restrict__ state, int64_t pixels, double w,
                    double gamma, L* __restrict__ grad) {
  using C = typename FloatIO<L>::compute;
  const int64_t image = blockIdx.y;
  const double g = grad_is_double ? *static_cast<const double*>(grad_loss) : *static_cast<const float*>(grad_loss);
  const double* coef = state + image * kStateCols;
  const Coefficients<C> k{static_cast<C>(g * coef[kCoefBce]), static_cast<C>(g * coef[kCoefFocal]),
                          static_cast<C>(g * coef[kCoefDiceT]), static_cast<C>(g * coef[kCoefDiceC])};
  const C wc = static_cast<C>(w);
  const L* x = logits + image * pixels;
  const T* t = target + image * pixels;
  L* out = grad + image * pixels;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if constexpr (kVectorised) {
    const auto* xv = reinterpret_cast<const Vec<L>*>(x);
    const auto* tv = reinterpret_cast<const Vec<T>*>(t);
    auto* ov = reinterpret_cast<Vec<L>*>(out);
    const int64_t vectors = pixels / kVec;
    for (; i + stride < vectors; i += 2 * stride) {
      const Vec<L> a0 = xv[i], a1 = xv[i + stride];
      const Vec<T> b0 = tv[i], b1 = tv[i + stride];
      Vec<L> r0, r1;
#pragma unroll
      for (int e = 0; e < kVec; ++e) r0.v[e] = gradient<L, T, kMode>(a0.v[e], b0.v[e], wc, gamma, k);
#pragma unroll
      for (int e = 0; e < kVec; ++e) r1.v[e] = gradient<L, T, kMode>(a1.v[e], b1.v[e], wc, gamma, k);
      ov[i] = r0;
      ov[i + stride] = r1;
    }
    for (; i < vectors; i += stride) {
      const Vec<L> a0 = xv[i];
      const Vec<T> b0 = tv[i];
      Vec<L> r0;
#pragma unroll
      for (int e = 0; e < kVec; ++e) r0.v[e] = gradient<L, T, kMode>(a0.v[e], b0.v[e], wc, gamma, k);
      ov[i] = r0;
    }
  } else {
    for (; i < pixels; i += stride) out[i] = gradient<L, T, kMode>(x[i], t[i], wc, gamma, k);
  }
}

inline bool vectorisable(const TensorView& logits, const TensorView& target, const TensorView* grad, int64_t pixels) {
  auto aligned = [](const TensorView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % (dtype_size(v.dtype) * kVec) == 0;
  };
  return pixels % kVec == 0 && aligned(logits) && aligned(target) && (grad == nullptr || aligned(*grad));
}

template <typename F>
inline void with_vectorised(bool vectorised, F&& f) {
  if (vectorised) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

template <typename L>
void launch_forward(const TensorView& logits, const TensorView& target, const ComboParams& p, int blocks,
                    double* partials, cudaStream_t stream) {
  const int64_t N = logits.shape[0], P = logits.shape[1];
  PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
    with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
      with_vectorised(vectorisable(logits, target, nullptr, P), [&](auto vec) {
        forward_partials_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>
            <<<dim3(blocks, N), kThreads, 0, stream>>>(static_cast<const L*>(logits.data),
                                                       static_cast<const target_t*>(target.data), P, p.pos_weight,
                                                       p.focal_gamma, partials);
        PNEUMOSEG_CHECK_LAUNCH("forward_partials_kernel");
      });
    });
  });
}

template <typename L>
void launch_backward(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                     const TensorView& state, const ComboParams& p, const TensorView& grad_logits, int blocks,
                     cudaStream_t stream) {
  const int64_t N = logits.shape[0], P = logits.shape[1];
  PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
    with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
      with_vectorised(vectorisable(logits, target, &grad_logits, P), [&](auto vec) {
        backward_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>
            <<<dim3(blocks, N), kThreads, 0, stream>>>(
                grad_loss.data, grad_loss.dtype == DType::Float64, static_cast<const L*>(logits.data),
                static_cast<const target_t*>(target.data), static_cast<const double*>(state.data), P, p.pos_weight,
                p.focal_gamma, static_cast<L*>(grad_logits.data));
        PNEUMOSEG_CHECK_LAUNCH("backward_kernel");
      });
    });
  });
}

#define PNEUMOSEG_COMBO_LOSS_INSTANTIATE(EXTERN, L)                                                             \
  EXTERN template void launch_forward<L>(const TensorView&, const TensorView&, const ComboParams&, int, double*, \
                                         cudaStream_t);                                                         \
  EXTERN template void launch_backward<L>(const TensorView&, const TensorView&, const TensorView&,              \
                                          const TensorView&, const ComboParams&, const TensorView&, int,        \
                                          cudaStream_t);

PNEUMOSEG_COMBO_LOSS_INSTANTIATE(extern, ::pneumoseg::Half16)
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(extern, ::pneumoseg::BFloat16Raw)
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(extern, float)
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(extern, double)

}  // namespace pneumoseg::loss::cuda_detail
