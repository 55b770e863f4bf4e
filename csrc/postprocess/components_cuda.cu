// CUDA connected components: union-find with atomicMin (Playne & Hawick, "A new algorithm for
// parallel connected-component labelling on GPUs", 2018). Every foreground pixel starts as its own
// raster index; unions keep the smaller root, so each root is its component's first pixel in raster
// order. Areas are counted at the roots with atomicAdd during the same pass over the pixels, and a
// prefix sum of root flags numbers the components 1..K in scipy's order. Nothing synchronises with
// the host except label_cuda's final copy of the per-image component counts.
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <vector>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"
#include "common/dispatch.h"
#include "postprocess/components.h"
#include "postprocess/foreground.h"

namespace pneumoseg::postprocess {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 32)));
}

struct Geometry {
  int64_t n, h, w, sn, sh, sw;
  __device__ int64_t pixels() const { return n * h * w; }
};

__device__ __forceinline__ int32_t find_root(const int32_t* parent, int32_t x) {
  int32_t p = parent[x];
  while (p != x) {
    x = p;
    p = parent[x];
  }
  return x;
}

__device__ void unite(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a == b) return;
    if (a > b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    const int32_t old = atomicMin(&parent[b], a);  // b's root becomes a, unless someone got there first
    if (old == b) return;
    b = old;
  }
}

// parent[i] = local raster index for foreground pixels, -1 for background (or gated images).
template <typename T>
__global__ void init_kernel(const T* input, Geometry g, IsForeground<T> fg, const uint8_t* keep_image,
                            const int32_t* triplet_count, int64_t triplet_min, int32_t* parent) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / hw, k = i % hw, r = k / g.w, c = k % g.w;
    bool on = fg(input[n * g.sn + r * g.sh + c * g.sw]);
    if (keep_image && !keep_image[n]) on = false;
    if (triplet_count && triplet_count[n] < triplet_min) on = false;
    parent[i] = on ? static_cast<int32_t>(k) : -1;
  }
}

// Per-image parent arrays are addressed image-locally: parent + n * hw.
__global__ void merge_kernel(Geometry g, int connectivity, int32_t* parent) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    int32_t* p = parent + (i / hw) * hw;
    const int64_t k = i % hw, r = k / g.w, c = k % g.w;
    if (p[k] < 0) continue;
    const int32_t me = static_cast<int32_t>(k);
    if (c > 0 && p[k - 1] >= 0) unite(p, me, me - 1);
    if (r > 0) {
      const int64_t up = k - g.w;
      if (p[up] >= 0) unite(p, me, static_cast<int32_t>(up));
      if (connectivity == 8) {
        if (c > 0 && p[up - 1] >= 0) unite(p, me, static_cast<int32_t>(up - 1));
        if (c + 1 < g.w && p[up + 1] >= 0) unite(p, me, static_cast<int32_t>(up + 1));
      }
    }
  }
}

// parent[k] = root; area[root] += 1; is_root[i] = (root == k).
__global__ void compress_count_kernel(Geometry g, int32_t* parent, int32_t* area, int32_t* is_root) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    int32_t* p = parent + (i / hw) * hw;
    const int64_t k = i % hw;
    int32_t root = -1;
    if (p[k] >= 0) {
      root = find_root(p, static_cast<int32_t>(k));
      // Roots no longer change after the merge pass, so pointing straight at one is always safe,
      // even while other threads are still walking through this pixel.
      p[k] = root;
      atomicAdd(&area[(i / hw) * hw + root], 1);
    }
    if (is_root) is_root[i] = (root == static_cast<int32_t>(k)) ? 1 : 0;
  }
}

// The roots are final once every compress thread is done, so read them again here.
__global__ void write_labels_kernel(Geometry g, const int32_t* parent, const int32_t* rank, int32_t* labels) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = (i / hw) * hw;
    const int32_t root = parent[i];
    // rank is the exclusive scan of root flags over the whole batch: subtract the image's start.
    labels[i] = root < 0 ? 0 : rank[base + root] - rank[base] + 1;
  }
}

__global__ void compact_areas_kernel(Geometry g, const int32_t* is_root, const int32_t* rank, const int32_t* area,
                                     int64_t* areas_out, int32_t* per_image) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    if (is_root[i]) areas_out[rank[i]] = area[i];
    if (i % hw == hw - 1) {  // the last pixel of an image knows its image's component count
      const int64_t base = i - (hw - 1);
      per_image[i / hw] = rank[i] + is_root[i] - rank[base];
    }
  }
}

template <typename T>
__global__ void count_above_kernel(const T* input, Geometry g, IsForeground<T> above, int32_t* count) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / hw, k = i % hw, r = k / g.w, c = k % g.w;
    // A warp-aggregated atomic would be cheaper; one atomic per pixel above `top` is rare enough.
    if (above(input[n * g.sn + r * g.sh + c * g.sw])) atomicAdd(&count[n], 1);
  }
}

__global__ void write_mask_kernel(Geometry g, const int32_t* parent, const int32_t* area, int64_t min_area,
                                  uint8_t* out) {
  const int64_t hw = g.h * g.w;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.n * hw; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t root = parent[i];
    out[i] = root >= 0 && (min_area <= 0 || area[(i / hw) * hw + root] >= min_area) ? 1 : 0;
  }
}

void check_args(const TensorView& input, int connectivity, const TensorView& out, DType out_dtype) {
  check_ndim(input, 3, "mask");
  check_device(input, Device::CUDA, "mask");
  check_ndim(out, 3, "out");
  check_device(out, Device::CUDA, "out");
  if (connectivity != 4 && connectivity != 8) fail_value("connectivity must be 4 or 8");
  if (out.dtype != out_dtype) fail_value("out has the wrong dtype");
  for (int i = 0; i < 3; ++i) {
    if (out.shape[i] != input.shape[i]) fail_value("out has the wrong shape");
  }
  if (out.numel() > 0 &&
      (out.strides[2] != 1 || out.strides[1] != out.shape[2] || out.strides[0] != out.shape[1] * out.shape[2])) {
    fail_value("out must be contiguous");
  }
  if (input.shape[1] * input.shape[2] >= (int64_t(1) << 31)) fail_value("images of 2^31 pixels or more");
  if (input.numel() >= (int64_t(1) << 31)) fail_value("batches of 2^31 pixels or more: split the batch");
}

Geometry geometry(const TensorView& v) {
  return Geometry{v.shape[0], v.shape[1], v.shape[2], v.strides[0], v.strides[1], v.strides[2]};
}

}  // namespace

void label_cuda(const TensorView& input, Foreground fg, int connectivity, const TensorView& labels,
                std::vector<std::vector<int64_t>>& areas, void* stream_ptr) {
  check_args(input, connectivity, labels, DType::Int32);
  const int64_t N = input.shape[0], total = input.numel();
  areas.assign(N, {});
  if (total == 0) return;
  cuda::DeviceGuard device(input.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Geometry g = geometry(input);
  const int grid = grid_for(total);
  // parent, area, is_root, rank: int32 each over the batch; areas_out int64; per-image counts.
  cuda::ScratchBuffer parent(sizeof(int32_t) * total, stream), area(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer is_root(sizeof(int32_t) * total, stream), rank(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer areas_out(sizeof(int64_t) * total, stream), per_image(sizeof(int32_t) * N, stream);
  PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(area.as<int32_t>(), 0, sizeof(int32_t) * total, stream));
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "mask", [&] {
    init_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(static_cast<const scalar_t*>(input.data), g,
                                                         IsForeground<scalar_t>{fg.use_threshold, fg.threshold},
                                                         nullptr, nullptr, 0, parent.as<int32_t>());
    PNEUMOSEG_CHECK_LAUNCH("init_kernel");
  });
  merge_kernel<<<grid, kThreads, 0, stream>>>(g, connectivity, parent.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("merge_kernel");
  compress_count_kernel<<<grid, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(),
                                                       is_root.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("compress_count_kernel");
  size_t temp_bytes = 0;
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, is_root.as<int32_t>(), rank.as<int32_t>(),
                                                     static_cast<int>(total), stream));
  cuda::ScratchBuffer temp(temp_bytes, stream);
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.as<void>(), temp_bytes, is_root.as<int32_t>(),
                                                     rank.as<int32_t>(), static_cast<int>(total), stream));
  write_labels_kernel<<<grid, kThreads, 0, stream>>>(g, parent.as<int32_t>(), rank.as<int32_t>(),
                                                     static_cast<int32_t*>(labels.data));
  PNEUMOSEG_CHECK_LAUNCH("write_labels_kernel");
  compact_areas_kernel<<<grid, kThreads, 0, stream>>>(g, is_root.as<int32_t>(), rank.as<int32_t>(),
                                                      area.as<int32_t>(), areas_out.as<int64_t>(),
                                                      per_image.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("compact_areas_kernel");

  std::vector<int32_t> counts(N);
  PNEUMOSEG_CUDA_CHECK(
      cudaMemcpyAsync(counts.data(), per_image.as<int32_t>(), sizeof(int32_t) * N, cudaMemcpyDeviceToHost, stream));
  PNEUMOSEG_CUDA_CHECK(cudaStreamSynchronize(stream));
  int64_t k_total = 0;
  for (int32_t c : counts) {
    if (c < 0) throw NativeError("label_cuda: negative component count");
    k_total += c;
  }
  std::vector<int64_t> flat(k_total);
  if (k_total > 0) {
    PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(flat.data(), areas_out.as<int64_t>(), sizeof(int64_t) * k_total,
                                         cudaMemcpyDeviceToHost, stream));
    PNEUMOSEG_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  int64_t at = 0;
  for (int64_t n = 0; n < N; ++n) {
    areas[n].assign(flat.begin() + at, flat.begin() + at + counts[n]);
    at += counts[n];
  }
}

void postprocess_cuda(const TensorView& input, const PostprocessParams& p, const uint8_t* keep_image_device,
                      const TensorView& out, void* stream_ptr) {
  check_args(input, p.connectivity, out, DType::UInt8);
  const int64_t N = input.shape[0], total = input.numel();
  if (total == 0) return;
  cuda::DeviceGuard device(input.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Geometry g = geometry(input);
  const int grid = grid_for(total);
  cuda::ScratchBuffer parent(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer counts(sizeof(int32_t) * N, stream);
  const bool components = p.min_component_area > 0;
  cuda::ScratchBuffer area(components ? sizeof(int32_t) * total : 1, stream);
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "probs", [&] {
    const auto* data = static_cast<const scalar_t*>(input.data);
    if (p.use_triplet) {
      PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(counts.as<int32_t>(), 0, sizeof(int32_t) * N, stream));
      count_above_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          data, g, IsForeground<scalar_t>{true, p.triplet_top}, counts.as<int32_t>());
      PNEUMOSEG_CHECK_LAUNCH("count_above_kernel");
    }
    init_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        data, g, IsForeground<scalar_t>{p.mask.use_threshold, p.mask.threshold}, keep_image_device,
        p.use_triplet ? counts.as<int32_t>() : nullptr, p.triplet_min_area, parent.as<int32_t>());
    PNEUMOSEG_CHECK_LAUNCH("init_kernel");
  });
  if (components) {
    PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(area.as<int32_t>(), 0, sizeof(int32_t) * total, stream));
    merge_kernel<<<grid, kThreads, 0, stream>>>(g, p.connectivity, parent.as<int32_t>());
    PNEUMOSEG_CHECK_LAUNCH("merge_kernel");
    compress_count_kernel<<<grid, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(), nullptr);
    PNEUMOSEG_CHECK_LAUNCH("compress_count_kernel");
  }
  write_mask_kernel<<<grid, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(),
                                                   p.min_component_area, static_cast<uint8_t*>(out.data));
  PNEUMOSEG_CHECK_LAUNCH("write_mask_kernel");
}

}  // namespace pneumoseg::postprocess
