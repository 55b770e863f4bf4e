#pragma once
// The CUDA combo-loss kernels, templated on the logits type L. Each L is instantiated in its own
// translation unit (combo_loss_cuda_<type>.cu), so the 240 kernel variants compile in parallel;
// combo_loss_cuda.cu holds the entry points, the finalize kernel and the dispatch.
// Float compute runs the device formulas of combo_loss_device_math.h; double the shared ones.
// benchmarks/sass_loss_report.py counts the SASS instructions per pixel of the hot loops.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/dispatch.h"
#include "common/half.h"
#include "common/warp.cuh"
#include "loss/combo_loss.h"
#include "loss/combo_loss_device_math.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss::cuda_detail {

inline constexpr int kThreads = 256;
inline constexpr int kSums = kSumMismatch + 1;  // state columns 0..kSumMismatch

// Elements per vector access: 16 bytes of 2-byte logits (8), otherwise 4 (16 bytes of float32); the
// kernels' compile-time width and the launches' run-time one come from this one rule.
inline constexpr int vector_width(int64_t logit_bytes) { return logit_bytes == 2 ? 8 : 4; }
inline int vector_width(DType logits) { return vector_width(dtype_size(logits)); }
template <typename L>
inline constexpr int kVec = vector_width(static_cast<int64_t>(sizeof(L)));

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads and stores in the compute type. The half types use the hardware conversions (sm_80+):
// common/half.h's portable bit-twiddling takes 5-20 instructions a value, branches included, for
// the same results (NaN payloads aside: cvt writes the canonical NaN).
template <typename C, typename T>
__device__ __forceinline__ C to_compute(T v) {
  return load_as<T, C>(v);
}
template <>
__device__ __forceinline__ float to_compute<float, Half16>(Half16 v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.bits));
  return r;
#else  // the CPU build of these kernels (tests/cuda_emu/loss_emu.cpp): the same value
  return half_to_float(v.bits);
#endif
}

template <typename C, typename T, int N>
__device__ __forceinline__ void to_compute(const Vec<T, N>& in, C (&out)[N]) {
  if constexpr (std::is_same_v<T, BFloat16Raw> && std::is_same_v<C, float> && N % 2 == 0) {
    uint32_t w[N / 2];  // two bfloat16 a word: one shift or mask each
    memcpy(w, in.v, sizeof(w));
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      out[2 * k] = __uint_as_float(w[k] << 16);
      out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_compute<C>(in.v[k]);
  }
}

template <typename L, typename C>
__device__ __forceinline__ L from_compute(C v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<L, BFloat16Raw>) {
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return BFloat16Raw{h};
  } else if constexpr (std::is_same_v<L, Half16>) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return Half16{h};
  } else
#endif
  {
    return FloatIO<L>::store(v);
  }
}

template <typename L, typename C, int N>
__device__ __forceinline__ Vec<L, N> from_compute(const C (&in)[N]) {
  Vec<L, N> out;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr ((std::is_same_v<L, BFloat16Raw> || std::is_same_v<L, Half16>) && N % 2 == 0) {
    uint32_t w[N / 2];  // cvt.rn.{bf16,f16}x2 packs two values in one instruction: a high, b low
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      if constexpr (std::is_same_v<L, BFloat16Raw>) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(in[2 * k + 1]), "f"(in[2 * k]));
      } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(in[2 * k + 1]), "f"(in[2 * k]));
      }
    }
    memcpy(out.v, w, sizeof(w));
  } else
#endif
  {
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = from_compute<L>(in[k]);
  }
  return out;
}

// v, computed once: without this the compiler re-derives an image's offset from the kernel
// arguments in every loop iteration (uniform IMAD, shifts and adds, then MOVs).
__device__ __forceinline__ int64_t opaque(int64_t v) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(v));
#endif
  return v;
}

// Grid-stride walk over an image's vectors, two per thread per iteration (loads in flight
// together), with 32-bit indices: one IMAD.WIDE an address instead of 64-bit shifts and adds.
// f(i, logits vector, target vector) handles vector i.
template <typename L, typename T, int N, typename F>
__device__ __forceinline__ void for_each_vector(const Vec<L, N>* __restrict__ x, const Vec<T, N>* __restrict__ t,
                                                int64_t first, int64_t stride, int64_t vectors, F&& f) {
  if (vectors + 2 * stride <= INT32_MAX) {
    int32_t i = static_cast<int32_t>(first);
    const int32_t s = static_cast<int32_t>(stride), n = static_cast<int32_t>(vectors);
    for (; i + s < n; i += 2 * s) {
      const Vec<L, N> a0 = x[i], a1 = x[i + s];
      const Vec<T, N> b0 = t[i], b1 = t[i + s];
      f(i, a0, b0);
      f(i + s, a1, b1);
    }
    for (; i < n; i += s) {  // at most once
      const Vec<L, N> a = x[i];  // copies: one vector load each (a reference would be read bytewise)
      const Vec<T, N> b = t[i];
      f(i, a, b);
    }
  } else {  // an image of 2^31 vectors or more: 64-bit indices, one vector at a time
    for (int64_t i = first; i < vectors; i += stride) {
      const Vec<L, N> a = x[i];
      const Vec<T, N> b = t[i];
      f(i, a, b);
    }
  }
}

template <typename C>
struct Accumulator {
  C bce = C(0), focal = C(0), pt = C(0), p = C(0), t = C(0), mismatch = C(0);
  C t_lo = C(1), t_hi = C(0);  // the targets' range; a NaN target shows as a NaN sum t
  __device__ __forceinline__ bool bad() const { return !(t_lo >= C(0) && t_hi <= C(1) && t == t); }
};

template <int kMode, typename C>
__device__ __forceinline__ void accumulate(C xv, C tv, C w, C w_minus_1, double gamma, Accumulator<C>& a) {
  PixelForward<C> r;
  if constexpr (std::is_same_v<C, float>) {
    r = device_math::pixel_forward<kMode>(xv, tv, w_minus_1, gamma);
  } else {
    r = pixel_forward<C, kMode>(xv, tv, w, gamma);
  }
  a.bce += r.bce;
  a.focal += r.focal;
  a.pt += r.p * tv;
  a.p += r.p;
  a.t += tv;
  a.mismatch += r.mismatch;
  a.t_lo = fmin(a.t_lo, tv);  // one FMNMX each; a NaN is dropped here but not from a.t
  a.t_hi = fmax(a.t_hi, tv);
}

// How many of this thread's targets lie outside [0, 1] or are NaN: the pixels of the vectors (of kPer
// pixels; 1 on the scalar path) first, first + stride, ..., as forward_partials_kernel's loops visit
// them. Not inlined, and it finds its image, first vector and stride itself, so that nothing this
// rare pass needs is kept live across the hot loops (inlined, it cost them 2-3 instructions an
// iteration in benchmarks/sass_loss_report.py's counts).
template <typename C, int kPer, typename T>
__device__ __noinline__ long long count_bad_targets(const T* __restrict__ target, int64_t pixels) {
  const T* t = target + int64_t(blockIdx.y) * pixels;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  long long bad = 0;
  for (int64_t v = blockIdx.x * int64_t(kThreads) + threadIdx.x; v < pixels / kPer; v += stride) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const C tv = to_compute<C>(t[v * kPer + k]);
      bad += !(tv >= C(0) && tv <= C(1));
    }
  }
  return bad;
}

// grid = (blocks per image, images). With kVectorised every image starts aligned to its vectors and
// holds a whole number of them (vectorisable).
template <typename L, typename T, int kMode, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    forward_partials_kernel(const L* __restrict__ logits, const T* __restrict__ target, int64_t pixels,
                            typename FloatIO<L>::compute wc, typename FloatIO<L>::compute w_minus_1, double gamma,
                            double* __restrict__ partials) {
  using C = typename FloatIO<L>::compute;
  const int64_t image = blockIdx.y;
  const int64_t offset = opaque(image * pixels);
  const L* x = logits + offset;
  const T* t = target + offset;
  Accumulator<C> acc;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if constexpr (kVectorised) {
    constexpr int N = kVec<L>;
    for_each_vector(reinterpret_cast<const Vec<L, N>*>(x), reinterpret_cast<const Vec<T, N>*>(t), first, stride,
                    pixels / N, [&](auto, const Vec<L, N>& a, const Vec<T, N>& b) {
                      C xs[N], ts[N];
                      to_compute(a, xs);
                      to_compute(b, ts);
#pragma unroll
                      for (int k = 0; k < N; ++k) accumulate<kMode>(xs[k], ts[k], wc, w_minus_1, gamma, acc);
                    });
  } else {
    for (int64_t i = first; i < pixels; i += stride) {
      accumulate<kMode>(to_compute<C>(x[i]), to_compute<C>(t[i]), wc, w_minus_1, gamma, acc);
    }
  }
  // Block sums in a fixed order (deterministic): a shuffle tree per warp, then one thread per column
  // adds the warps' results. Whether the block saw a bad target rides on the barrier
  // (__syncthreads_or); only then does it count them (a second pass over its targets), so the hot
  // loops keep their two FMNMX a pixel and the state still holds a count, as the CPU's does
  // (losses.py's validate=True reports it).
  const double mine[kSums] = {static_cast<double>(acc.bce), static_cast<double>(acc.focal),
                              static_cast<double>(acc.pt),  static_cast<double>(acc.p),
                              static_cast<double>(acc.t),   0.0,
                              static_cast<double>(acc.mismatch)};
  static_assert(kSumBce == 0 && kSumFocal == 1 && kSumPT == 2 && kSumP == 3 && kSumT == 4 && kBadTargets == 5 &&
                kSumMismatch == 6, "column order of `mine`");
  __shared__ double warp_sums[kThreads / 32][kSums];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < kSums; ++c) {
    if (c == kBadTargets) continue;
    const double v = warp_sum(mine[c]);
    if (lane == 0) warp_sums[warp][c] = v;
  }
  const bool bad = __syncthreads_or(acc.bad());  // also the barrier after the warp_sums writes
  if (bad) {  // the same for the whole block, so the barrier below is reached by all of it
    const long long count = warp_sum(count_bad_targets<C, kVectorised ? kVec<L> : 1>(target, pixels));
    if (lane == 0) warp_sums[warp][kBadTargets] = count;
    __syncthreads();
  }
  if (threadIdx.x < kSums) {
    const int c = threadIdx.x;
    double total = 0.0;
    if (c != kBadTargets || bad) {  // without bad targets their column was never written
#pragma unroll
      for (int k = 0; k < kThreads / 32; ++k) total += warp_sums[k][c];
    }
    partials[(image * gridDim.x + blockIdx.x) * kSums + c] = total;
  }
}

template <typename C>
struct Coefficients {
  C bce, focal, dice_t, dice_c;
};

template <int kMode, typename C, typename K>
__device__ __forceinline__ C gradient(C x, C t, C w, C w_minus_1, double gamma, const K& k) {
  if constexpr (std::is_same_v<C, float>) {
    return device_math::pixel_gradient<kMode>(x, t, w, w_minus_1, gamma, k);
  } else {
    return pixel_gradient<C, kMode>(x, t, w, gamma, k.bce, k.focal, k.dice_t, k.dice_c);
  }
}

// grid = (blocks per image, images), as the forward pass.
template <typename L, typename T, int kMode, bool kVectorised>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const void* grad_loss, bool grad_is_double, const L* __restrict__ logits,
                    const T* __restrict__ target, const double* __restrict__ state, int64_t pixels,
                    typename FloatIO<L>::compute wc, typename FloatIO<L>::compute w_minus_1, double gamma,
                    L* __restrict__ grad) {
  using C = typename FloatIO<L>::compute;
  const int64_t image = blockIdx.y;
  const double g = grad_is_double ? *static_cast<const double*>(grad_loss) : *static_cast<const float*>(grad_loss);
  const double* coef = state + image * kStateCols;
  const C focal = static_cast<C>(g * coef[kCoefFocal]);
  using K = std::conditional_t<std::is_same_v<C, float>, device_math::GradientCoefficients, Coefficients<C>>;
  K k;
  k.bce = static_cast<C>(g * coef[kCoefBce]);
  k.focal = focal;
  k.dice_t = static_cast<C>(g * coef[kCoefDiceT]);
  k.dice_c = static_cast<C>(g * coef[kCoefDiceC]);
  if constexpr (std::is_same_v<C, float>) {
    k.focal_2 = 2.0f * focal;  // exact scalings
    k.focal_minus_4 = -4.0f * focal;
  }
  const int64_t offset = opaque(image * pixels);
  const L* x = logits + offset;
  const T* t = target + offset;
  L* out = grad + offset;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if constexpr (kVectorised) {
    constexpr int N = kVec<L>;
    auto* ov = reinterpret_cast<Vec<L, N>*>(out);
    for_each_vector(reinterpret_cast<const Vec<L, N>*>(x), reinterpret_cast<const Vec<T, N>*>(t), first, stride,
                    pixels / N, [&](auto i, const Vec<L, N>& a, const Vec<T, N>& b) {
                      C xs[N], ts[N], gs[N];
                      to_compute(a, xs);
                      to_compute(b, ts);
#pragma unroll
                      for (int e = 0; e < N; ++e) gs[e] = gradient<kMode>(xs[e], ts[e], wc, w_minus_1, gamma, k);
                      ov[i] = from_compute<L>(gs);
                    });
  } else {
    for (int64_t i = first; i < pixels; i += stride) {
      out[i] = from_compute<L>(gradient<kMode>(to_compute<C>(x[i]), to_compute<C>(t[i]), wc, w_minus_1, gamma, k));
    }
  }
}

inline bool vectorisable(const TensorView& logits, const TensorView& target, const TensorView* grad, int64_t pixels) {
  const int width = vector_width(logits.dtype);
  auto aligned = [&](const TensorView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % (dtype_size(v.dtype) * width) == 0;
  };
  return pixels % width == 0 && aligned(logits) && aligned(target) && (grad == nullptr || aligned(*grad));
}

template <typename F>
inline void with_vectorised(bool vectorised, F&& f) {
  if (vectorised) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

// pos_weight in the compute type, as the kernels use it (w - 1 is formed from this rounded value).
template <typename L>
typename FloatIO<L>::compute weight(const ComboParams& p) {
  return static_cast<typename FloatIO<L>::compute>(p.pos_weight);
}

// The launches, for nvcc only: tests/cuda_emu/loss_emu.cpp compiles everything above for the CPU and
// runs the kernels with its own copy of this launch sequence (keep the two in step).
#if defined(__CUDACC__)
template <typename L>
void launch_forward(const TensorView& logits, const TensorView& target, const ComboParams& p, int blocks,
                    double* partials, cudaStream_t stream) {
  const int64_t N = logits.shape[0], P = logits.shape[1];
  PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
    with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
      with_vectorised(vectorisable(logits, target, nullptr, P), [&](auto vec) {
        forward_partials_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>
            <<<dim3(blocks, N), kThreads, 0, stream>>>(static_cast<const L*>(logits.data),
                                                       static_cast<const target_t*>(target.data), P, weight<L>(p),
                                                       weight<L>(p) - 1, p.focal_gamma, partials);
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
                static_cast<const target_t*>(target.data), static_cast<const double*>(state.data), P, weight<L>(p),
                weight<L>(p) - 1, p.focal_gamma, static_cast<L*>(grad_logits.data));
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
#endif  // __CUDACC__

}  // namespace pneumoseg::loss::cuda_detail
