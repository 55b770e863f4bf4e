// csrc/loss/combo_loss_device_math.h, the GPU's per-pixel loss formulas, compiled for the CPU with
// ex2/rcp correctly rounded, so that tests/test_loss_device_math.py can check that its NumPy model
// of those formulas is the code itself (bit for bit, no FMA contraction on either side).
//
// stdin:  int64 n, float32 w, float32 coef_bce, coef_focal, dice_t, dice_c, float32 x[n], float32 t[n]
// stdout: per pixel, float32 e, p, q, log1p(e), bce, mismatch, focal (gamma 2),
//         gradient (no focal), gradient (gamma 2)
#include <cstdint>
#include <cstdio>
#include <vector>

#define __device__
#define __forceinline__ inline
#include "loss/combo_loss_device_math.h"

namespace dm = pneumoseg::loss::device_math;
using pneumoseg::loss::kFocalSquare;
using pneumoseg::loss::kNoFocal;

int main() {
  int64_t n = 0;
  float w = 0, coef[4] = {};
  if (std::fread(&n, sizeof(n), 1, stdin) != 1 || std::fread(&w, sizeof(w), 1, stdin) != 1 ||
      std::fread(coef, sizeof(float), 4, stdin) != 4 || n < 0) {
    return 2;
  }
  std::vector<float> x(n), t(n), out;
  if (std::fread(x.data(), sizeof(float), n, stdin) != size_t(n) ||
      std::fread(t.data(), sizeof(float), n, stdin) != size_t(n)) {
    return 2;
  }
  const dm::GradientCoefficients c{coef[0], coef[1], 2.0f * coef[1], -4.0f * coef[1], coef[2], coef[3]};
  out.reserve(9 * n);
  for (int64_t i = 0; i < n; ++i) {
    const auto s = dm::sigmoid_parts(x[i]);
    const auto f = dm::pixel_forward<kFocalSquare>(x[i], t[i], w - 1.0f, 2.0);
    for (float v : {s.e, s.p, s.q, dm::log1p_unit(s.e), f.bce, f.mismatch, f.focal,
                    dm::pixel_gradient<kNoFocal>(x[i], t[i], w, w - 1.0f, 2.0, c),
                    dm::pixel_gradient<kFocalSquare>(x[i], t[i], w, w - 1.0f, 2.0, c)}) {
      out.push_back(v);
    }
  }
  return std::fwrite(out.data(), sizeof(float), out.size(), stdout) == out.size() ? 0 : 1;
}
