#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "common/errors.h"
#include "common/half.h"
#include "common/parallel.h"
#include "loss/combo_loss.h"
#include "loss/combo_loss_math.h"

namespace pneumoseg::loss {
namespace {

constexpr int64_t kChunk = 1 << 15;  // pixels per parallel task
constexpr int kLanes = 16;           // independent float accumulators: lets the loop vectorise
constexpr int kFlushEvery = 16;      // lane-groups between flushes to double (bounds float error)

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

template <typename L, typename T, int kMode>
void forward_chunk(const L* x, const T* t, int64_t count, double w, double gamma, double out[6]) {
  using C = typename FloatIO<L>::compute;
  const C wc = static_cast<C>(w), gc = static_cast<C>(gamma);
  double total[6] = {0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  while (i + kLanes <= count) {
    C acc[5][kLanes] = {};
    int bad[kLanes] = {};
    for (int g = 0; g < kFlushEvery && i + kLanes <= count; ++g, i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const C xv = FloatIO<L>::load(x[i + j]);
        const C tv = load_as<T, C>(t[i + j]);
        const PixelForward<C> r = pixel_forward<C, kMode>(xv, tv, wc, gc);
        acc[0][j] += r.bce;
        acc[1][j] += r.focal;
        acc[2][j] += r.p * tv;
        acc[3][j] += r.p;
        acc[4][j] += tv;
        bad[j] += !(tv >= C(0) && tv <= C(1));
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      for (int c = 0; c < 5; ++c) total[c] += acc[c][j];
      total[5] += bad[j];
    }
  }
  for (; i < count; ++i) {
    const C xv = FloatIO<L>::load(x[i]);
    const C tv = load_as<T, C>(t[i]);
    const PixelForward<C> r = pixel_forward<C, kMode>(xv, tv, wc, gc);
    total[0] += r.bce;
    total[1] += r.focal;
    total[2] += r.p * tv;
    total[3] += r.p;
    total[4] += tv;
    total[5] += !(tv >= C(0) && tv <= C(1));
  }
  for (int c = 0; c < 6; ++c) out[c] = total[c];
}

template <typename L, typename T, int kMode>
void backward_chunk(const L* x, const T* t, int64_t count, double w, double gamma, const double* coef, double grad_out,
                    L* grad) {
  using C = typename FloatIO<L>::compute;
  const C wc = static_cast<C>(w), gc = static_cast<C>(gamma);
  const C cb = static_cast<C>(grad_out * coef[0]), cf = static_cast<C>(grad_out * coef[1]);
  const C dt = static_cast<C>(grad_out * coef[2]), dc = static_cast<C>(grad_out * coef[3]);
  for (int64_t i = 0; i < count; ++i) {
    const C xv = FloatIO<L>::load(x[i]);
    const C tv = load_as<T, C>(t[i]);
    grad[i] = FloatIO<L>::store(pixel_gradient<C, kMode>(xv, tv, wc, gc, cb, cf, dt, dc));
  }
}

int focal_mode(const ComboParams& p) {
  if (p.focal_weight == 0.0) return kNoFocal;
  return p.focal_gamma == 2.0 ? kFocalSquare : kFocalPow;
}

// Runtime focal mode -> template parameter.
template <typename F>
void with_focal_mode(int mode, F&& f) {
  switch (mode) {
    case kNoFocal: f(std::integral_constant<int, kNoFocal>()); break;
    case kFocalSquare: f(std::integral_constant<int, kFocalSquare>()); break;
    default: f(std::integral_constant<int, kFocalPow>()); break;
  }
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
  std::vector<double> partial(N * chunks * 6, 0.0);
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p), [&](auto mode) {
        const auto* x = static_cast<const L*>(logits.data);
        const auto* t = static_cast<const target_t*>(target.data);
        parallel_for(N * chunks, 4, [&](int64_t task) {
          const int64_t n = task / chunks, c = task % chunks;
          const int64_t begin = n * P + c * kChunk, count = std::min(kChunk, P - c * kChunk);
          forward_chunk<L, target_t, decltype(mode)::value>(x + begin, t + begin, count, p.pos_weight, p.focal_gamma,
                                                           &partial[task * 6]);
        });
      });
    });
  });
  auto* s = static_cast<double*>(state.data);
  for (int64_t n = 0; n < N; ++n) {
    for (int col = 0; col < 6; ++col) {
      double sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[(n * chunks + c) * 6 + col];
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
  PNEUMOSEG_DISPATCH_FLOATING(logits.dtype, "logits", [&] {
    using L = scalar_t;
    PNEUMOSEG_DISPATCH_TARGET(target.dtype, "target", [&] {
      with_focal_mode(focal_mode(p), [&](auto mode) {
        const auto* x = static_cast<const L*>(logits.data);
        const auto* t = static_cast<const target_t*>(target.data);
        auto* out = static_cast<L*>(grad_logits.data);
        parallel_for(N * chunks, 4, [&](int64_t task) {
          const int64_t n = task / chunks, c = task % chunks;
          const int64_t begin = n * P + c * kChunk, count = std::min(kChunk, P - c * kChunk);
          backward_chunk<L, target_t, decltype(mode)::value>(x + begin, t + begin, count, p.pos_weight, p.focal_gamma,
                                                            s + n * kStateCols + kCoefBce, g, out + begin);
        });
      });
    });
  });
}

}  // namespace pneumoseg::loss
