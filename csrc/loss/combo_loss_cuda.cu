// CUDA combo loss: forward = one reduction pass over (image, block) tiles writing per-block partials
// (deterministic), then a one-block finalize that reduces them per image (one warp per image) and
// writes the state and the loss; backward = one elementwise pass with the image's coefficients held
// in registers. Both passes read 16-byte-aligned vectors where the layout allows. Everything runs on
// the caller's stream and reads the incoming gradient from device memory: no host synchronisation.
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"
#include "common/dispatch.h"
#include "common/half.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;                  // elements per vector access (16 bytes of float32 logits)
constexpr int kSums = kSumMismatch + 1;  // state columns 0..kSumMismatch

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

// One block: each warp reduces the partials of its images in a fixed order (lane-strided sums, then
// a shuffle tree), so the result is deterministic; then one thread computes the loss and the
// gradient coefficients.
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ partials, int64_t images, int blocks_per_image, int64_t pixels,
                    ComboParams p, double* state, void* loss, bool loss_is_double) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = warp; n < images; n += kThreads / 32) {
#pragma unroll
    for (int c = 0; c < kSums; ++c) {
      double s = 0.0;
      for (int b = lane; b < blocks_per_image; b += 32) s += partials[(n * blocks_per_image + b) * kSums + c];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
      if (lane == 0) state[n * kStateCols + c] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const double value = finalize(
        images, pixels, p.bce_weight, p.dice_weight, p.focal_weight, p.smooth, p.per_image,
        [&](int64_t n, int col) { return state[n * kStateCols + col]; },
        [&](int64_t n, int col, double v) { state[n * kStateCols + col] = v; });
    if (loss_is_double) {
      *static_cast<double*>(loss) = value;
    } else {
      *static_cast<float*>(loss) = static_cast<float>(value);
    }
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

// Blocks per image: enough for about 8 resident blocks per multiprocessor over the whole batch, and
// no more than one vector per thread.
int blocks_per_image(int64_t images, int64_t pixels, int device) {
  static std::atomic<int> cached_sms[64];
  int sms = device >= 0 && device < 64 ? cached_sms[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    PNEUMOSEG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) cached_sms[device].store(sms, std::memory_order_relaxed);
  }
  const int64_t wanted = (int64_t(sms) * 8 + images - 1) / images;
  const int64_t useful = (pixels + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, useful, 65535})));
}

bool vectorisable(const TensorView& logits, const TensorView& target, const TensorView* grad, int64_t pixels) {
  auto aligned = [](const TensorView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % (dtype_size(v.dtype) * kVec) == 0;
  };
  return pixels % kVec == 0 && aligned(logits) && aligned(target) && (grad == nullptr || aligned(*grad));
}

template <typename F>
void with_vectorised(bool vectorised, F&& f) {
  if (vectorised) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

}  // namespace

void forward_cuda(const TensorView& logits, const TensorView& target, const ComboParams& p, const TensorView& state,
                  const TensorView& loss, void* stream_ptr) {
  check_forward_args(logits, target, p, state, loss, Device::CUDA);
  cuda::DeviceGuard device(logits.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  if (N > 65535) fail_value("logits: at most 65535 images per call on CUDA");
  const int blocks = blocks_per_image(N, P, logits.device_index);
  cuda::ScratchBuffer partials(sizeof(double) * kSums * N * blocks, stream);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
        with_vectorised(vectorisable(logits, target, nullptr, P), [&](auto vec) {
          forward_partials_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>
              <<<dim3(blocks, N), kThreads, 0, stream>>>(static_cast<const L*>(logits.data),
                                                         static_cast<const target_t*>(target.data), P, p.pos_weight,
                                                         p.focal_gamma, partials.as<double>());
          PNEUMOSEG_CHECK_LAUNCH("forward_partials_kernel");
        });
      });
    });
  });
  finalize_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), N, blocks, P, p, static_cast<double*>(state.data),
                                              loss.data, loss.dtype == DType::Float64);
  PNEUMOSEG_CHECK_LAUNCH("finalize_kernel");
}

void backward_cuda(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                   const TensorView& state, const ComboParams& p, const TensorView& grad_logits, void* stream_ptr) {
  check_backward_args(grad_loss, logits, target, state, grad_logits, Device::CUDA);
  cuda::DeviceGuard device(logits.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  if (N > 65535) fail_value("logits: at most 65535 images per call on CUDA");
  const int blocks = blocks_per_image(N, P, logits.device_index);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
        with_vectorised(vectorisable(logits, target, &grad_logits, P), [&](auto vec) {
          backward_kernel<L, target_t, decltype(mode)::value, decltype(vec)::value>
              <<<dim3(blocks, N), kThreads, 0, stream>>>(
                  grad_loss.data, grad_loss.dtype == DType::Float64, static_cast<const L*>(logits.data),
                  static_cast<const target_t*>(target.data), static_cast<const double*>(state.data), P,
                  p.pos_weight, p.focal_gamma, static_cast<L*>(grad_logits.data));
          PNEUMOSEG_CHECK_LAUNCH("backward_kernel");
        });
      });
    });
  });
}

}  // namespace pneumoseg::loss
