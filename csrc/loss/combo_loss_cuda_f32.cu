// The combo-loss kernels for float logits (see combo_loss_cuda_kernels.cuh).
#include "loss/combo_loss_cuda_kernels.cuh"

namespace pneumoseg::loss::cuda_detail {
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(, float)
}  // namespace pneumoseg::loss::cuda_detail
