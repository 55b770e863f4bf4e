#pragma once
// Fused BCE + soft Dice + focal loss over (N, P) logits/targets (P pixels per image), CPU and CUDA.
//
// Forward writes, per image, the sums the loss needs and the coefficients its gradient needs (the
// "state", float64 (N, kStateCols)), plus the scalar loss. Backward is one elementwise pass that
// reads the state and the incoming gradient from memory: no host synchronisation on CUDA.
#include <cstdint>

#include "common/tensor_view.h"

namespace pneumoseg::loss {

struct ComboParams {
  double bce_weight = 1.0;
  double dice_weight = 1.0;
  double focal_weight = 0.0;
  double focal_gamma = 2.0;
  double smooth = 1.0;
  double pos_weight = 1.0;  // torch's pos_weight; 1 is plain BCE
  bool per_image = false;
};

// Columns of the state.
enum StateCol : int {
  kSumBce = 0,     // sum of per-pixel BCE (with pos_weight)
  kSumFocal,       // sum of per-pixel focal terms
  kSumPT,          // sum p * t
  kSumP,           // sum p
  kSumT,           // sum t
  kBadTargets,     // targets outside [0, 1] or NaN
  kSumMismatch,    // sum p (1 - t) + (1 - p) t = sum p + sum t - 2 sum p t, without the cancellation
  kCoefBce,        // d loss / d bce_pixel
  kCoefFocal,      // d loss / d focal_pixel
  kCoefDiceT,      // d loss / d p = kCoefDiceT * t + kCoefDiceC
  kCoefDiceC,
  kStateCols
};

// logits, target: (N, P), contiguous. state: float64 (N, kStateCols). loss: 0-d float32 or float64.
void forward_cpu(const TensorView& logits, const TensorView& target, const ComboParams& p, const TensorView& state,
                 const TensorView& loss);
// grad_loss: 0-d float32/float64; grad_logits: (N, P) of the logits' dtype.
void backward_cpu(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                  const TensorView& state, const ComboParams& p, const TensorView& grad_logits);

#ifdef PNEUMOSEG_WITH_CUDA
void forward_cuda(const TensorView& logits, const TensorView& target, const ComboParams& p, const TensorView& state,
                  const TensorView& loss, void* stream);
void backward_cuda(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                   const TensorView& state, const ComboParams& p, const TensorView& grad_logits, void* stream);
#endif

// Shared boundary checks (combo_loss_cpu.cpp): shapes, dtypes, devices, contiguity.
void check_forward_args(const TensorView& logits, const TensorView& target, const ComboParams& p,
                        const TensorView& state, const TensorView& loss, Device device);
void check_backward_args(const TensorView& grad_loss, const TensorView& logits, const TensorView& target,
                         const TensorView& state, const TensorView& grad_logits, Device device);

}  // namespace pneumoseg::loss
