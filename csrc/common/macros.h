#pragma once
// Functions marked PNEUMOSEG_HD compile for both the host and the device, so the CPU tests exercise
// the very arithmetic the CUDA kernels run.
#if defined(__CUDACC__)
#define PNEUMOSEG_HD __host__ __device__ __forceinline__
#else
// always_inline: these helpers are also compiled into the AVX2 translation units; inlining them
// everywhere keeps an AVX2 copy from being linked into the baseline code path.
#define PNEUMOSEG_HD inline __attribute__((always_inline))
#endif
