#pragma once
#ifdef PNEUMOSEG_WITH_CUDA
// Scratch memory for kernels that need it, independent of torch or CuPy: a private stream-ordered
// pool per device (allocations follow the caller's stream, no device-wide sync) and one cached
// pinned host buffer for device-to-host results.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>

namespace pneumoseg::cuda {

// Makes `device` current for the scope of the call, restoring the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Stream-ordered allocation from pneumoseg's pool on the current device; freed on the same stream.
void* alloc_async(size_t bytes, cudaStream_t stream);
void free_async(void* ptr, cudaStream_t stream);

// Bytes the pools of all devices hold (in use or cached for reuse), and giving back to the driver
// every cached byte (after synchronising each device with a pool); returns the bytes given back.
// The pool keeps freed scratch up to a threshold (cuda_memory.cu says which and why).
uint64_t reserved_bytes();
uint64_t release_cached();

// RAII for alloc_async.
class ScratchBuffer {
 public:
  ScratchBuffer(size_t bytes, cudaStream_t stream) : stream_(stream), ptr_(alloc_async(bytes, stream)) {}
  ~ScratchBuffer() { free_async(ptr_, stream_); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  template <typename T>
  T* as(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }

 private:
  cudaStream_t stream_;
  void* ptr_;
};

// A grow-only pinned host buffer; hold the lock while using it.
struct PinnedBuffer {
  std::mutex lock;
  void* data = nullptr;
  size_t bytes = 0;
  void* reserve(size_t needed);  // call with the lock held
};
PinnedBuffer& pinned_staging();

}  // namespace pneumoseg::cuda
#endif
