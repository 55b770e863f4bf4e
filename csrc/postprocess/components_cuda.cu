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

// One scratch allocation per call: parent and area (int32 over the batch), per-image int32 counts and
// the scan's temporary storage, each at a 256-byte boundary.
struct ScratchLayout {
  size_t parent_at = 0, area_at, counts_at, scan_at, bytes;
  ScratchLayout(int64_t total, int64_t images, size_t scan_bytes) {
    const auto aligned = [](size_t b) { return (b + 255) / 256 * 256; };
    area_at = aligned(sizeof(int32_t) * total);
    counts_at = area_at + aligned(sizeof(int32_t) * total);
    scan_at = counts_at + aligned(sizeof(int32_t) * images);
    bytes = scan_at + scan_bytes;
  }
};

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, 65535)));
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
  int32_t* const out = static_cast<int32_t*>(labels.data);
  // Scratch: parent and area (int32 over the batch), the per-image counts and the scan's temporary
  // storage, in one allocation. The root flags and their ranks live in `out` (contiguous int32 of the
  // batch's size, checked above) until write_labels_kernel overwrites them; the areas go straight into
  // the caller's array once the counts are known. 8 bytes per pixel (was 24: is_root, rank and an int64
  // areas array of the batch's size as well).
  size_t scan_bytes = 0;
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, out, out, static_cast<int>(total), stream));
  const ScratchLayout layout(total, N, scan_bytes);
  cuda::ScratchBuffer scratch(layout.bytes, stream);
  int32_t* const parent = scratch.as<int32_t>(layout.parent_at);
  int32_t* const area = scratch.as<int32_t>(layout.area_at);
  int32_t* const per_image = scratch.as<int32_t>(layout.counts_at);
  const dim3 tiles = tile_grid(g), block(kTile, kRowsPerPass), flat = flat_grid_2d(g);
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "mask", [&] {
    local_kernel<scalar_t><<<tiles, block, 0, stream>>>(
        static_cast<const scalar_t*>(input.data), g, IsForeground<scalar_t>{fg.use_threshold, fg.threshold}, nullptr,
        connectivity, parent, area, IsForeground<scalar_t>{true, 0.0}, nullptr);
    PNEUMOSEG_CHECK_LAUNCH("local_kernel");
  });
  border_kernel<<<tiles, block, 0, stream>>>(g, connectivity, parent);
  PNEUMOSEG_CHECK_LAUNCH("border_kernel");
  resolve_kernel<<<flat, kThreads, 0, stream>>>(g, parent, area, out);
  PNEUMOSEG_CHECK_LAUNCH("resolve_kernel");
  // In place: out[i] = final roots before flat pixel i. int32 input, so CUB accumulates in int32
  // (enough: total < 2^31 is checked above).
  PNEUMOSEG_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scratch.as<void>(layout.scan_at), scan_bytes, out, out,
                                                     static_cast<int>(total), stream));
  image_counts_kernel<<<grid_for(N), kThreads, 0, stream>>>(g, parent, out, per_image);
  PNEUMOSEG_CHECK_LAUNCH("image_counts_kernel");

  // Pageable memory on purpose: the shared pinned staging buffer would serialise concurrent callers
  // on its lock for the whole synchronisation, to save microseconds.
  std::vector<int32_t> per_image_host(N);
  PNEUMOSEG_CUDA_CHECK(cudaMemcpyAsync(per_image_host.data(), per_image, sizeof(int32_t) * N, cudaMemcpyDeviceToHost,
                                       stream));
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
    compact_areas_kernel<<<flat, kThreads, 0, stream>>>(g, parent, out, area, areas_device);
    PNEUMOSEG_CHECK_LAUNCH("compact_areas_kernel");
  }
  // Without components every parent is -1 and nothing reads the areas.
  write_labels_kernel<<<flat, kThreads, 0, stream>>>(g, parent, area, out);
  PNEUMOSEG_CHECK_LAUNCH("write_labels_kernel");
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
  // Scratch: parent and area (int32 over the batch) and the per-image counts above `top`, one allocation.
  const ScratchLayout layout(total, N, 0);
  cuda::ScratchBuffer scratch(layout.bytes, stream);
  int32_t* const parent = scratch.as<int32_t>(layout.parent_at);
  int32_t* const area = scratch.as<int32_t>(layout.area_at);
  int32_t* const counts = scratch.as<int32_t>(layout.counts_at);
  if (p.use_triplet) PNEUMOSEG_CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * N, stream));
  const dim3 tiles = tile_grid(g), block(kTile, kRowsPerPass), flat = flat_grid_2d(g);
  PNEUMOSEG_DISPATCH_ALL(input.dtype, "probs", [&] {
    local_kernel<scalar_t><<<tiles, block, 0, stream>>>(
        static_cast<const scalar_t*>(input.data), g, IsForeground<scalar_t>{p.mask.use_threshold, p.mask.threshold},
        keep_image_device, p.connectivity, parent, area,
        IsForeground<scalar_t>{true, p.triplet_top}, p.use_triplet ? counts : nullptr);
    PNEUMOSEG_CHECK_LAUNCH("local_kernel");
  });
  if (components) {
    border_kernel<<<tiles, block, 0, stream>>>(g, p.connectivity, parent);
    PNEUMOSEG_CHECK_LAUNCH("border_kernel");
    resolve_kernel<<<flat, kThreads, 0, stream>>>(g, parent, area, nullptr);
    PNEUMOSEG_CHECK_LAUNCH("resolve_kernel");
  }
  write_mask_kernel<<<flat, kThreads, 0, stream>>>(g, parent, area,
                                                   p.min_component_area > 0 ? p.min_component_area : 0,
                                                   p.use_triplet ? counts : nullptr,
                                                   p.triplet_min_area, static_cast<uint8_t*>(out.data),
                                                   components_device);
  PNEUMOSEG_CHECK_LAUNCH("write_mask_kernel");
}

}  // namespace pneumoseg::postprocess
