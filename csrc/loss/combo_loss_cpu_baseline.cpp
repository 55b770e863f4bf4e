// The CPU loss loops for x86-64 baseline (SSE2).
#define PNEUMOSEG_LOSS_ISA baseline
#include "loss/combo_loss_cpu_kernels.h"
