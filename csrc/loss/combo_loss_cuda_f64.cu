// The combo-loss kernels for double logits (see combo_loss_cuda_kernels.cuh).
#include "loss/combo_loss_cuda_kernels.cuh"

namespace pneumoseg::loss::cuda_detail {
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(, double)
}  // namespace pneumoseg::loss::cuda_detail
