// CUDA connected components: the host side (launches, scratch memory, the component-number scan)
// of the kernels in components_kernels.cuh, which describes the algorithm.
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <vector>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"
#include "common/dispatch.h"
#include "postprocess/components.h"
#include "postprocess/components_kernels.cuh"
#include "postprocess/foreground.h"

namespace pneumoseg::postprocess {
namespace {

using namespace kernels;  // NOLINT: the kernels are this file's

// Blocks for one image's pixels in the flat kernels, and images per launch in grid.y.
dim3 flat_grid_2d(const Geometry& g) {
  const int64_t per_image = std::max<int64_t>(1, std::min<int64_t>((g.hw() + kThreads - 1) / kThreads, 65535 * 32));
  return dim3(static_cast<unsigned>(per_image), static_cast<unsigned>(std::min<int64_t>(g.n, kMaxGridZ)));
}

void check_args(const TensorView& input, int connectivity, const TensorView& out, DType out_dtype) {
  check_ndim(input, 3, "mask");
  check_device(input, Device::CUDA, "mask");
  check_ndim(out, 3, "out");
  check_device(out, Device::CUDA, "out");
  if ((input.shape[1] + kTile - 1) / kTile > 65535) fail_value("mask: images of more than 2,097,120 rows");
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
  return Geometry{v.shape[0], static_cast<int32_t>(v.shape[1]), static_cast<int32_t>(v.shape[2]),
                  v.strides[0], v.strides[1], v.strides[2]};
}

}  // namespace

void label_cuda(const TensorView& input, Foreground fg, int connectivity, const TensorView& labels,
                const std::function<int64_t*(int64_t)>& allocate_areas, std::vector<int64_t>& counts,
                void* stream_ptr) {
  check_args(input, connectivity, labels, DType::Int32);
  const int64_t N = input.shape[0], total = input.numel();
  counts.assign(N, 0);
  if (total == 0) {
    allocate_areas(0);
    return;
  }
  cuda::DeviceGuard device(input.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Geometry g = geometry(input);
  // parent, area, is_root, rank: int32 each over the batch; areas_out int64; per-image counts.
  cuda::ScratchBuffer parent(sizeof(int32_t) * total, stream), area(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer is_root(sizeof(int32_t) * total, stream), rank(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer areas_out(sizeof(int64_t) * total, stream), per_image(sizeof(int32_t) * N, stream);
  const dim3 tiles = tile_grid(g), block(kTile, kRowsPerPass), flat = flat_grid_2d(g);
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "mask", [&] {
    local_kernel<scalar_t><<<tiles, block, 0, stream>>>(
        static_cast<const scalar_t*>(input.data), g, IsForeground<scalar_t>{fg.use_threshold, fg.threshold}, nullptr,
        connectivity, parent.as<int32_t>(), area.as<int32_t>(), IsForeground<scalar_t>{true, 0.0}, nullptr);
    PNEUMOSEG_CHECK_LAUNCH("local_kernel");
  });
  border_kernel<<<tiles, block, 0, stream>>>(g, connectivity, parent.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("border_kernel");
  resolve_kernel<<<flat, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(), is_root.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("resolve_kernel");
  size_t temp_bytes = 0;
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, is_root.as<int32_t>(), rank.as<int32_t>(),
                                                     static_cast<int>(total), stream));
  cuda::ScratchBuffer temp(temp_bytes, stream);
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.as<void>(), temp_bytes, is_root.as<int32_t>(),
                                                     rank.as<int32_t>(), static_cast<int>(total), stream));
  write_labels_kernel<<<flat, kThreads, 0, stream>>>(g, parent.as<int32_t>(), rank.as<int32_t>(),
                                                     static_cast<int32_t*>(labels.data));
  PNEUMOSEG_CHECK_LAUNCH("write_labels_kernel");
  compact_areas_kernel<<<flat, kThreads, 0, stream>>>(g, is_root.as<int32_t>(), rank.as<int32_t>(),
                                                      area.as<int32_t>(), areas_out.as<int64_t>(),
                                                      per_image.as<int32_t>());
  PNEUMOSEG_CHECK_LAUNCH("compact_areas_kernel");

  std::vector<int32_t> per_image_host(N);
  PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(per_image_host.data(), per_image.as<int32_t>(), sizeof(int32_t) * N,
                                       cudaMemcpyDeviceToHost, stream));
  PNEUMOSEG_CUDA_CHECK(cudaStreamSynchronize(stream));
  int64_t k_total = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (per_image_host[n] < 0) throw NativeError("label_cuda: negative component count");
    counts[n] = per_image_host[n];
    k_total += per_image_host[n];
  }
  if (k_total > total) throw NativeError("label_cuda: more components than pixels");
  int64_t* areas_device = allocate_areas(k_total);
  if (k_total > 0) {
    if (areas_device == nullptr) throw NativeError("label_cuda: no memory was given for the areas");
    PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(areas_device, areas_out.as<int64_t>(), sizeof(int64_t) * k_total,
                                         cudaMemcpyDeviceToDevice, stream));
  }
}

void postprocess_cuda(const TensorView& input, const PostprocessParams& p, const uint8_t* keep_image_device,
                      const TensorView& out, int32_t* components_device, void* stream_ptr) {
  check_args(input, p.connectivity, out, DType::UInt8);
  const int64_t N = input.shape[0], total = input.numel();
  if (N == 0) return;
  cuda::DeviceGuard device(input.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (components_device != nullptr) {
    PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(components_device, 0, sizeof(int32_t) * N, stream));
  }
  if (total == 0) return;
  const Geometry g = geometry(input);
  // Counting components needs their final roots, so passes 2 and 3 run for it even without an area filter.
  const bool components = p.min_component_area > 0 || components_device != nullptr;
  cuda::ScratchBuffer parent(sizeof(int32_t) * total, stream), area(sizeof(int32_t) * total, stream);
  cuda::ScratchBuffer counts(sizeof(int32_t) * N, stream);
  if (p.use_triplet) PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(counts.as<int32_t>(), 0, sizeof(int32_t) * N, stream));
  const dim3 tiles = tile_grid(g), block(kTile, kRowsPerPass), flat = flat_grid_2d(g);
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "probs", [&] {
    local_kernel<scalar_t><<<tiles, block, 0, stream>>>(
        static_cast<const scalar_t*>(input.data), g, IsForeground<scalar_t>{p.mask.use_threshold, p.mask.threshold},
        keep_image_device, p.connectivity, parent.as<int32_t>(), area.as<int32_t>(),
        IsForeground<scalar_t>{true, p.triplet_top}, p.use_triplet ? counts.as<int32_t>() : nullptr);
    PNEUMOSEG_CHECK_LAUNCH("local_kernel");
  });
  if (components) {
    border_kernel<<<tiles, block, 0, stream>>>(g, p.connectivity, parent.as<int32_t>());
    PNEUMOSEG_CHECK_LAUNCH("border_kernel");
    resolve_kernel<<<flat, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(), nullptr);
    PNEUMOSEG_CHECK_LAUNCH("resolve_kernel");
  }
  write_mask_kernel<<<flat, kThreads, 0, stream>>>(g, parent.as<int32_t>(), area.as<int32_t>(),
                                                   p.min_component_area > 0 ? p.min_component_area : 0,
                                                   p.use_triplet ? counts.as<int32_t>() : nullptr,
                                                   p.triplet_min_area, static_cast<uint8_t*>(out.data),
                                                   components_device);
  PNEUMOSEG_CHECK_LAUNCH("write_mask_kernel");
}

}  // namespace pneumoseg::postprocess
