// The combo-loss kernels for BFloat16Raw logits (see combo_loss_cuda_kernels.cuh).
#include "loss/combo_loss_cuda_kernels.cuh"

namespace pneumoseg::loss::cuda_detail {
PNEUMOSEG_COMBO_LOSS_INSTANTIATE(, ::pneumoseg::BFloat16Raw)
}  // namespace pneumoseg::loss::cuda_detail
