// CUDA combo loss: forward = one reduction pass over (image, block) tiles writing per-block partials
// (deterministic), then a one-block finalize that reduces them per image (one warp per image) and
// writes the state and the loss; backward = one elementwise pass with the image's coefficients held
// in registers. Both passes read 16-byte-aligned vectors where the layout allows. Everything runs on
// the caller's stream and reads the incoming gradient from device memory: no host synchronisation.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/cuda_memory.h"
#include "common/dispatch.h"
#include "common/half.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_cuda_finalize.cuh"
#include "loss/combo_loss_cuda_kernels.cuh"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss {
namespace {

using namespace cuda_detail;

// Blocks per image: enough for about 8 resident blocks per multiprocessor over the whole batch, and
// no more than one vector (of `width` pixels) per thread.
int blocks_per_image(int64_t images, int64_t pixels, int width, int device) {
  static std::atomic<int> cached_sms[64];
  int sms = device >= 0 && device < 64 ? cached_sms[device].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    PNEUMOSEG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) cached_sms[device].store(sms, std::memory_order_relaxed);
  }
  const int64_t wanted = (int64_t(sms) * 8 + images - 1) / images;
  const int64_t useful = (pixels + int64_t(kThreads) * width - 1) / (int64_t(kThreads) * width);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, useful, 65535})));
}

}  // namespace

void forward_cuda(const TensorView& logits, const TensorView& target, const ComboParams& p, const TensorView& state,
                  const TensorView& loss, void* stream_ptr) {
  check_forward_args(logits, target, p, state, loss, Device::CUDA);
  cuda::DeviceGuard device(logits.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  if (N > 65535) fail_value("logits: at most 65535 images per call on CUDA");
  const int blocks = blocks_per_image(N, P, vector_width(logits.dtype), logits.device_index);
  cuda::ScratchBuffer partials(sizeof(double) * kSums * N * blocks, stream);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits",
                              [&] { launch_forward<scalar_t>(logits, target, p, blocks, partials.as<double>(), stream); });
  finalize_kernel<<<1, kThreads, 0, stream>>>(partials.as<double>(), N, blocks, P, p, static_cast<double*>(state.data),
                                              loss.data, loss.dtype == DType::Float64);
  PNEUMOSEG_CHECK_LAUNCH("finalize_kernel");
}

void backward_cuda(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                   const TensorView& state, const ComboParams& p, const TensorView& grad_logits, void* stream_ptr) {
  check_backward_args(grad_loss, logits, target, state, grad_logits, Device::CUDA);
  cuda::DeviceGuard device(logits.device_index);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  if (N > 65535) fail_value("logits: at most 65535 images per call on CUDA");
  const int blocks = blocks_per_image(N, P, vector_width(logits.dtype), logits.device_index);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    launch_backward<scalar_t>(grad_loss, logits, target, state, p, grad_logits, blocks, stream);
  });
}

}  // namespace pneumoseg::loss
