#pragma once
// Warp collectives shared by the kernels (and by their CPU emulation, tests/cuda_emu/cuda_emu.h).

namespace pneumoseg {

// The sum of v over the 32 lanes of a full warp, in lane 0 (the other lanes hold partial sums): a
// shuffle tree, so the order of the additions, and a floating-point result, is fixed.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace pneumoseg
