#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"

namespace pneumoseg::cuda {

DeviceGuard::DeviceGuard(int device) {
  PNEUMOSEG_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) PNEUMOSEG_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
}

namespace {
std::mutex pools_lock;
std::vector<cudaMemPool_t> pools;  // index = device

// How much freed scratch the pool keeps across synchronisations (the release threshold): an eighth of
// the device's memory, at most 2 GiB. A pool only keeps what calls actually used, so this bounds the
// cache of large batches and costs nothing to batch-1 inference. It covers a batch of 64 1024x1024
// images (label_components and postprocess need 8 bytes of scratch per pixel: 512 MiB) on any card of
// 4 GiB or more, which would otherwise map ~0.5 GB of fresh device memory on every call. It stays well
// below what PyTorch's or CuPy's caching allocators keep (everything, until empty_cache() /
// free_all_blocks()), since this pool is invisible to them: memory it holds is memory they cannot use.
// release_cached() gives it all back.
uint64_t release_threshold() {
  size_t free_bytes = 0, total_bytes = 0;
  PNEUMOSEG_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return std::min<uint64_t>(total_bytes / 8, uint64_t(2) << 30);
}

cudaMemPool_t pool_for_current_device() {
  int device = 0;
  PNEUMOSEG_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> guard(pools_lock);
  if (static_cast<int>(pools.size()) <= device) pools.resize(device + 1, nullptr);
  if (!pools[device]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool;
    PNEUMOSEG_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t keep = release_threshold();  // of the current device
    PNEUMOSEG_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    pools[device] = pool;
  }
  return pools[device];
}

uint64_t pool_reserved(cudaMemPool_t pool) {
  uint64_t bytes = 0;
  PNEUMOSEG_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &bytes));
  return bytes;
}
}  // namespace

uint64_t reserved_bytes() {
  std::lock_guard<std::mutex> guard(pools_lock);
  uint64_t bytes = 0;
  for (cudaMemPool_t pool : pools) {
    if (pool) bytes += pool_reserved(pool);
  }
  return bytes;
}

uint64_t release_cached() {
  std::lock_guard<std::mutex> guard(pools_lock);
  uint64_t released = 0;
  for (int device = 0; device < static_cast<int>(pools.size()); ++device) {
    if (!pools[device]) continue;
    const uint64_t before = pool_reserved(pools[device]);
    {
      // A scratch buffer freed on a stream counts as in use until the host has seen that free.
      DeviceGuard on(device);
      PNEUMOSEG_CUDA_CHECK(cudaDeviceSynchronize());
    }
    PNEUMOSEG_CUDA_CHECK(cudaMemPoolTrimTo(pools[device], 0));
    const uint64_t after = pool_reserved(pools[device]);
    released += before > after ? before - after : 0;
  }
  return released;
}

void* alloc_async(size_t bytes, cudaStream_t stream) {
  void* ptr = nullptr;
  if (bytes == 0) bytes = 1;
  PNEUMOSEG_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr, bytes, pool_for_current_device(), stream));
  return ptr;
}

void free_async(void* ptr, cudaStream_t stream) {
  if (ptr) cudaFreeAsync(ptr, stream);  // never throws from a destructor
}

void* PinnedBuffer::reserve(size_t needed) {
  if (needed <= bytes) return data;
  if (data) PNEUMOSEG_CUDA_CHECK(cudaFreeHost(data));
  data = nullptr;
  bytes = 0;
  size_t grow = needed + needed / 2;
  PNEUMOSEG_CUDA_CHECK(cudaHostAlloc(&data, grow, cudaHostAllocPortable));
  bytes = grow;
  return data;
}

PinnedBuffer& pinned_staging() {
  static PinnedBuffer* buffer = new PinnedBuffer();  // never destroyed: no CUDA calls at exit
  return *buffer;
}

}  // namespace pneumoseg::cuda
