// The CPU loss loops for AVX2 + FMA (compiled with -mavx2 -mfma, see CMakeLists.txt).
#define PNEUMOSEG_LOSS_ISA avx2
#include "loss/combo_loss_cpu_kernels.h"
