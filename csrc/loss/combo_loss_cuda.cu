// CUDA combo loss: forward = one reduction pass (per-block partials, deterministic) + a one-block
// finalize that writes the state and the loss; backward = one elementwise pass. Everything runs on
// the caller's stream and reads the incoming gradient from device memory: no host synchronisation.
#include <cub/block/block_reduce.cuh>

#include <algorithm>
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
constexpr int kItemsPerThread = 32;  // elements each thread sums before the block reduction
constexpr int kSums = kSumMismatch + 1;  // state columns 0..kSumMismatch

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

template <typename L, typename T, int kMode>
__global__ void forward_partials_kernel(const L* logits, const T* target, int64_t pixels, double w, double gamma,
                                        double* partials) {
  using C = typename FloatIO<L>::compute;
  const int64_t image = blockIdx.y;
  const L* x = logits + image * pixels;
  const T* t = target + image * pixels;
  const C wc = static_cast<C>(w);
  C acc[5] = {C(0), C(0), C(0), C(0), C(0)};
  C mismatch = C(0);
  int bad = 0;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < pixels; i += int64_t(gridDim.x) * kThreads) {
    const C xv = FloatIO<L>::load(x[i]);
    const C tv = load_as<T, C>(t[i]);
    const PixelForward<C> r = pixel_forward<C, kMode>(xv, tv, wc, gamma);
    acc[0] += r.bce;
    acc[1] += r.focal;
    acc[2] += r.p * tv;
    acc[3] += r.p;
    acc[4] += tv;
    mismatch += r.mismatch;
    bad += !(tv >= C(0) && tv <= C(1));
  }
  Sums mine;
#pragma unroll
  for (int c = 0; c < 5; ++c) mine.v[c] = static_cast<double>(acc[c]);
  mine.v[kBadTargets] = bad;
  mine.v[kSumMismatch] = static_cast<double>(mismatch);
  using Reduce = cub::BlockReduce<Sums, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const Sums total = Reduce(temp).Reduce(mine, SumsOp());
  if (threadIdx.x == 0) {
    double* out = partials + (image * gridDim.x + blockIdx.x) * kSums;
#pragma unroll
    for (int c = 0; c < kSums; ++c) out[c] = total.v[c];
  }
}

// One block: partials -> state sums in a fixed order, then the loss and the gradient coefficients.
__global__ void finalize_kernel(const double* partials, int64_t images, int blocks_per_image, int64_t pixels,
                                ComboParams p, double* state, void* loss, bool loss_is_double) {
  using Reduce = cub::BlockReduce<Sums, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t n = 0; n < images; ++n) {
    Sums mine;
#pragma unroll
    for (int c = 0; c < kSums; ++c) mine.v[c] = 0.0;
    for (int b = threadIdx.x; b < blocks_per_image; b += kThreads) {
      const double* part = partials + (n * blocks_per_image + b) * kSums;
#pragma unroll
      for (int c = 0; c < kSums; ++c) mine.v[c] += part[c];
    }
    const Sums total = Reduce(temp).Reduce(mine, SumsOp());
    if (threadIdx.x == 0) {
#pragma unroll
      for (int c = 0; c < kSums; ++c) state[n * kStateCols + c] = total.v[c];
    }
    __syncthreads();  // temp storage is reused by the next image
  }
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

template <typename L, typename T, int kMode>
__global__ void backward_kernel(const void* grad_loss, bool grad_is_double, const L* logits, const T* target,
                                const double* state, int64_t images, int64_t pixels, double w, double gamma, L* grad) {
  using C = typename FloatIO<L>::compute;
  const double g = grad_is_double ? *static_cast<const double*>(grad_loss) : *static_cast<const float*>(grad_loss);
  const C wc = static_cast<C>(w);
  const int64_t total = images * pixels;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const double* coef = state + (i / pixels) * kStateCols + kCoefBce;
    const C xv = FloatIO<L>::load(logits[i]);
    const C tv = load_as<T, C>(target[i]);
    const C v = pixel_gradient<C, kMode>(xv, tv, wc, gamma, static_cast<C>(g * coef[0]), static_cast<C>(g * coef[1]),
                                         static_cast<C>(g * coef[2]), static_cast<C>(g * coef[3]));
    grad[i] = FloatIO<L>::store(v);
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
  const int blocks = static_cast<int>(std::min<int64_t>(1024, (P + kThreads * kItemsPerThread - 1) /
                                                                  (kThreads * kItemsPerThread)));
  cuda::ScratchBuffer partials(sizeof(double) * kSums * N * blocks, stream);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
        forward_partials_kernel<L, target_t, decltype(mode)::value><<<dim3(blocks, N), kThreads, 0, stream>>>(
            static_cast<const L*>(logits.data), static_cast<const target_t*>(target.data), P, p.pos_weight,
            p.focal_gamma, partials.as<double>());
        PNEUMOSEG_CHECK_LAUNCH("forward_partials_kernel");
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
  const int64_t total = N * P;
  const int grid = static_cast<int>(std::min<int64_t>((total + kThreads * 4 - 1) / (kThreads * 4), 65535 * 16));
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p.focal_weight, p.focal_gamma), [&](auto mode) {
        backward_kernel<L, target_t, decltype(mode)::value><<<std::max(grid, 1), kThreads, 0, stream>>>(
            grad_loss.data, grad_loss.dtype == DType::Float64, static_cast<const L*>(logits.data),
            static_cast<const target_t*>(target.data), static_cast<const double*>(state.data), N, P, p.pos_weight,
            p.focal_gamma, static_cast<L*>(grad_logits.data));
        PNEUMOSEG_CHECK_LAUNCH("backward_kernel");
      });
    });
  });
}

}  // namespace pneumoseg::loss
