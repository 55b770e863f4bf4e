#pragma once
// The combo loss's finalize kernel, kept apart from combo_loss_cuda.cu's host code so that
// tests/cuda_emu/loss_emu.cpp runs this very source on the CPU. Only combo_loss_cuda.cu includes it.
#include <cstdint>

#include "common/warp.cuh"
#include "loss/combo_loss.h"
#include "loss/combo_loss_cuda_kernels.cuh"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss::cuda_detail {

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
      s = warp_sum(s);
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

}  // namespace pneumoseg::loss::cuda_detail
