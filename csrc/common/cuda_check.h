#pragma once
#ifdef PNEUMOSEG_WITH_CUDA
#include <cuda_runtime.h>

#include <string>

#include "common/errors.h"

namespace pneumoseg {
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw NativeError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}
}  // namespace pneumoseg

// Every launch is followed by this, so a bad launch is reported where it happened.
#define PNEUMOSEG_CUDA_CHECK(expr) ::pneumoseg::cuda_check((expr), #expr)
#define PNEUMOSEG_CHECK_LAUNCH(name) ::pneumoseg::cuda_check(cudaGetLastError(), name)
#endif
