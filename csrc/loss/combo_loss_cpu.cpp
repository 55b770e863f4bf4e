#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "common/errors.h"
#include "common/half.h"
#include "common/parallel.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss {
// The per-ISA loops (combo_loss_cpu_kernels.h).
#define PNEUMOSEG_DECLARE_LOSS_ISA(ISA)                                                                         \
  namespace ISA {                                                                                             \
  void forward_pixels(DType, DType, int, const void*, const void*, int64_t, int64_t, double, double, double*); \
  void backward_pixels(DType, DType, int, const void*, const void*, int64_t, int64_t, double, double,          \
                       const double*, double, void*);                                                         \
  }
PNEUMOSEG_DECLARE_LOSS_ISA(baseline)
#if defined(PNEUMOSEG_HAVE_AVX2_TU)
PNEUMOSEG_DECLARE_LOSS_ISA(avx2)
#endif

namespace {

constexpr int64_t kChunk = 1 << 15;  // pixels per parallel task

void check_contiguous_2d(const TensorView& v, const char* name) {
  check_ndim(v, 2, name);
  if (v.shape[0] > 1 && v.strides[0] != v.shape[1]) fail_value(std::string(name) + " must be contiguous");
  if (v.shape[1] > 1 && v.strides[1] != 1) fail_value(std::string(name) + " must be contiguous");
}

void check_state(const TensorView& state, int64_t n) {
  check_ndim(state, 2, "state");
  if (state.dtype != DType::Float64 || state.shape[0] != n || state.shape[1] != kStateCols ||
      (n > 1 && state.strides[0] != kStateCols) || state.strides[1] != 1) {
    fail_value("state must be a contiguous float64 (N, " + std::to_string(kStateCols) + ") array");
  }
}

void check_scalar(const TensorView& v, const char* name) {
  if (v.ndim != 0 || (v.dtype != DType::Float32 && v.dtype != DType::Float64)) {
    fail_value(std::string(name) + " must be a 0-d float32 or float64 array");
  }
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  // PNEUMOSEG_DISABLE_AVX2=1 forces the baseline loops (the tests check both builds agree).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("PNEUMOSEG_DISABLE_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

}  // namespace

void check_forward_args(const TensorView& logits, const TensorView& target, const ComboParams& p,
                        const TensorView& state, const TensorView& loss, Device device) {
  check_contiguous_2d(logits, "logits");
  check_contiguous_2d(target, "target");
  for (const TensorView* v : {&logits, &target, &state, &loss}) check_device(*v, device, "every argument");
  if (target.shape[0] != logits.shape[0] || target.shape[1] != logits.shape[1]) {
    fail_value("target must have the shape of logits");
  }
  if (logits.shape[0] == 0) fail_value("logits is an empty batch");
  if (logits.shape[1] == 0) fail_value("logits has images of zero pixels");
  if (!(p.bce_weight >= 0 && p.dice_weight >= 0 && p.focal_weight >= 0 && p.focal_gamma >= 0 && p.smooth >= 0 &&
        p.pos_weight >= 0)) {
    fail_value("weights, focal_gamma, smooth and pos_weight must be non-negative numbers");
  }
  check_state(state, logits.shape[0]);
  check_scalar(loss, "loss");
}

void check_backward_args(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                         const TensorView& state, const TensorView& grad_logits, Device device) {
  check_contiguous_2d(logits, "logits");
  check_contiguous_2d(target, "target");
  check_contiguous_2d(grad_logits, "grad_logits");
  for (const TensorView* v : {&grad_loss, &logits, &target, &state, &grad_logits}) {
    check_device(*v, device, "every argument");
  }
  if (target.shape[0] != logits.shape[0] || target.shape[1] != logits.shape[1] ||
      grad_logits.shape[0] != logits.shape[0] || grad_logits.shape[1] != logits.shape[1]) {
    fail_value("target and grad_logits must have the shape of logits");
  }
  if (grad_logits.dtype != logits.dtype) fail_value("grad_logits must have the dtype of logits");
  check_state(state, logits.shape[0]);
  check_scalar(grad_loss, "grad_loss");
}

void forward_cpu(const TensorView& logits, const TensorView& target, const ComboParams& p, const TensorView& state,
                 const TensorView& loss) {
  check_forward_args(logits, target, p, state, loss, Device::CPU);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  constexpr int kSumCount = kSumMismatch + 1;
  std::vector<double> partial(N * chunks * kSumCount, 0.0);
  auto run = baseline::forward_pixels;
#if defined(PNEUMOSEG_HAVE_AVX2_TU)
  if (cpu_has_avx2()) run = avx2::forward_pixels;
#endif
  const int mode = focal_mode(p.focal_weight, p.focal_gamma);
  parallel_for(N * chunks, 4, [&](int64_t task) {
    const int64_t n = task / chunks, c = task % chunks;
    run(logits.dtype, target.dtype, mode, logits.data, target.data, n * P + c * kChunk,
        std::min(kChunk, P - c * kChunk), p.pos_weight, p.focal_gamma, &partial[task * kSumCount]);
  });
  auto* s = static_cast<double*>(state.data);
  for (int64_t n = 0; n < N; ++n) {
    for (int col = 0; col < kSumCount; ++col) {
      double sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[(n * chunks + c) * kSumCount + col];
      s[n * kStateCols + col] = sum;
    }
  }
  const double value = finalize(
      N, P, p.bce_weight, p.dice_weight, p.focal_weight, p.smooth, p.per_image,
      [&](int64_t n, int col) { return s[n * kStateCols + col]; },
      [&](int64_t n, int col, double v) { s[n * kStateCols + col] = v; });
  if (loss.dtype == DType::Float64) {
    *static_cast<double*>(loss.data) = value;
  } else {
    *static_cast<float*>(loss.data) = static_cast<float>(value);
  }
}

void backward_cpu(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                  const TensorView& state, const ComboParams& p, const TensorView& grad_logits) {
  check_backward_args(grad_loss, logits, target, state, grad_logits, Device::CPU);
  const int64_t N = logits.shape[0], P = logits.shape[1];
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  const double g = grad_loss.dtype == DType::Float64 ? *static_cast<const double*>(grad_loss.data)
                                                     : *static_cast<const float*>(grad_loss.data);
  const auto* s = static_cast<const double*>(state.data);
  auto run = baseline::backward_pixels;
#if defined(PNEUMOSEG_HAVE_AVX2_TU)
  if (cpu_has_avx2()) run = avx2::backward_pixels;
#endif
  const int mode = focal_mode(p.focal_weight, p.focal_gamma);
  parallel_for(N * chunks, 4, [&](int64_t task) {
    const int64_t n = task / chunks, c = task % chunks;
    run(logits.dtype, target.dtype, mode, logits.data, target.data, n * P + c * kChunk,
        std::min(kChunk, P - c * kChunk), p.pos_weight, p.focal_gamma, s + n * kStateCols + kCoefBce, g,
        grad_logits.data);
  });
}

}  // namespace pneumoseg::loss
