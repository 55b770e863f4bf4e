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
    // Keep up to 256 MiB cached across synchronisations so repeated batches allocate for free.
    uint64_t keep = uint64_t(256) << 20;
    PNEUMOSEG_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    pools[device] = pool;
  }
  return pools[device];
}
}  // namespace

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
