#pragma once
// A framework-free view of an N-d array: what every kernel receives. NumPy, torch and CuPy arrays
// are all turned into this in pneumoseg/_native.py, so no kernel links against libtorch.
#include <cstdint>
#include <string>

#include "common/errors.h"

namespace pneumoseg {

enum class DType : int {
  Bool = 0, Int8, UInt8, Int16, UInt16, Int32, UInt32, Int64, UInt64, Float16, BFloat16, Float32, Float64
};

enum class Device : int { CPU = 0, CUDA = 1 };

constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::UInt8;
  Device device = Device::CPU;
  int device_index = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements, may be negative or zero

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Bool: return "bool";
    case DType::Int8: return "int8";
    case DType::UInt8: return "uint8";
    case DType::Int16: return "int16";
    case DType::UInt16: return "uint16";
    case DType::Int32: return "int32";
    case DType::UInt32: return "uint32";
    case DType::Int64: return "int64";
    case DType::UInt64: return "uint64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::Bool:
    case DType::Int8:
    case DType::UInt8: return 1;
    case DType::Int16:
    case DType::UInt16:
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Int32:
    case DType::UInt32:
    case DType::Float32: return 4;
    case DType::Int64:
    case DType::UInt64:
    case DType::Float64: return 8;
  }
  return 1;
}

// Boundary checks, named so a message always says which argument was wrong.
inline void check_ndim(const TensorView& v, int ndim, const char* name) {
  if (v.ndim != ndim) {
    fail_value(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " + std::to_string(v.ndim) +
               "-D");
  }
}

inline void check_device(const TensorView& v, Device device, const char* name) {
  if (v.device != device) {
    fail_value(std::string(name) + (device == Device::CUDA ? " must be a CUDA array" : " must be a CPU array"));
  }
}

}  // namespace pneumoseg
