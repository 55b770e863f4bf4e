#pragma once
// Functions marked PNEUMOSEG_HD compile for both the host and the device, so the CPU tests exercise
// the very arithmetic the CUDA kernels run.
#if defined(__CUDACC__)
#define PNEUMOSEG_HD __host__ __device__ __forceinline__
#else
#define PNEUMOSEG_HD inline
#endif
