// The combo-loss kernels for Half16 logits (see combo_loss_cuda_kernels.cuh).
#include "loss/combo_loss_cuda_kernels.cuh"

namespace pneumoseg::loss::cuda_detail {
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(, ::pneumoseg::Half16)
}  // namespace pneumoseg::loss::cuda_detail
