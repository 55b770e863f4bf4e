#pragma once
// Connected components and the post-processing built on them (thresholding, area filter, SIIM
// "triplet" rule, classifier gating), over (N, H, W) batches of any dtype.
#include <cstdint>
#include <functional>
#include <vector>

#include "common/tensor_view.h"

namespace pneumoseg::postprocess {

// Which pixels are foreground: nonzero ones, or those strictly above a threshold.
struct Foreground {
  bool use_threshold = false;
  double threshold = 0.0;
};

// Labels 1..K per image in raster order of each component's first pixel (scipy.ndimage.label's
// order), 0 for background, into `labels` (int32 (N, H, W)); areas[n][k - 1] is label k's size.
void label_cpu(const TensorView& input, Foreground fg, int connectivity, const TensorView& labels,
               std::vector<std::vector<int64_t>>& areas);

struct PostprocessParams {
  Foreground mask;            // the final mask: p > bottom (or nonzero)
  bool use_triplet = false;   // image kept only if at least triplet_min_area pixels are > triplet_top
  double triplet_top = 0.75;
  int64_t triplet_min_area = 0;
  int64_t min_component_area = 0;  // components smaller than this are removed (0: keep all)
  int connectivity = 8;
};

// out (uint8 (N, H, W)) = the post-processed masks; keep_image[n] == 0 empties image n (gating).
// Returns, per image, whether it came out non-empty. With `components` (N int32, or null), also the
// number of connected components in each output mask (what labelling it again would count), so a
// caller that reports them does not label the result a second time.
std::vector<uint8_t> postprocess_cpu(const TensorView& input, const PostprocessParams& p,
                                     const std::vector<uint8_t>& keep_image, const TensorView& out,
                                     int32_t* components = nullptr);

#ifdef PNEUMOSEG_WITH_CUDA
// CUDA: labels as label_cpu. The areas stay on the device: once the components are found, one small
// copy (and one synchronisation) brings back the number of labels per image into `counts`; then
// allocate_areas(K) must return device memory for K int64 values, which receives every image's areas
// in label order, one image after another, while the labels are written (both stream-ordered after
// allocate_areas returns, no further synchronisation). Scratch: 8 bytes per pixel of the batch.
void label_cuda(const TensorView& input, Foreground fg, int connectivity, const TensorView& labels,
                const std::function<int64_t*(int64_t)>& allocate_areas, std::vector<int64_t>& counts,
                void* stream);
// CUDA: as postprocess_cpu, fully asynchronous; keep_image is a device uint8 (N,) array (or null
// for all kept), components_device a device int32 (N,) array (or null).
void postprocess_cuda(const TensorView& input, const PostprocessParams& p, const uint8_t* keep_image_device,
                      const TensorView& out, int32_t* components_device, void* stream);
#endif

}  // namespace pneumoseg::postprocess
