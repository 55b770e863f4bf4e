#pragma once
// Arithmetic shared by the CPU encoder, its serial "units" twin and the CUDA kernels.
//
// A transition is a column-major index k in [0, H*W] where foreground starts or stops:
// fg(k) != fg(k - 1), with fg(-1) = fg(H*W) = 0. Transitions t_0 < t_1 < ... alternate run start,
// run end, so the j-th number of the string is derived from t_j and t_{j-1} alone.
//
// The data-parallel encoder splits each column into units of kRowsPerUnit rows; unit u = c * S + s
// covers the contiguous column-major range [c*H + s*R, c*H + min((s+1)*R, H)), so units in index
// order are transitions in string order. The last unit of an image also owns k = H*W.
#include <cstdint>

#include "common/dispatch.h"
#include "common/macros.h"
#include "rle/rle.h"

namespace pneumoseg::rle {

constexpr int64_t kRowsPerUnit = 32;

PNEUMOSEG_HD int64_t units_per_column(int64_t height) { return (height + kRowsPerUnit - 1) / kRowsPerUnit; }

PNEUMOSEG_HD int decimal_digits(uint64_t v) {
  int d = 1;
  for (uint64_t bound = 10; v >= bound && d < 20; bound *= 10) ++d;
  return d;
}

// Writes exactly `digits` characters.
PNEUMOSEG_HD void write_decimal(char* dst, uint64_t v, int digits) {
  for (int i = digits - 1; i >= 0; --i) {
    dst[i] = static_cast<char>('0' + v % 10);
    v /= 10;
  }
}

// The number written for transition j at index k; prev is t_{j-1} (unused for j == 0).
PNEUMOSEG_HD uint64_t transition_number(Style style, int64_t j, int64_t k, int64_t prev) {
  if (j & 1) return static_cast<uint64_t>(k - prev);  // run length
  if (style == Style::Absolute) return static_cast<uint64_t>(k + 1);
  return static_cast<uint64_t>(j == 0 ? k : k - prev);  // background since the previous run
}

// Characters the number of transition j takes, with the separating space before it.
PNEUMOSEG_HD int64_t transition_chars(Style style, int64_t j, int64_t k, int64_t prev) {
  return decimal_digits(transition_number(style, j, k, prev)) + (j > 0 ? 1 : 0);
}

// Where a unit's transitions start, image-local, from batch-wide exclusive scans over the slots
// t = n * U + u of every image's units: first_j (sum of transition counts) and prev_key (max of
// the last transitions' keys n * HW + k). Subtracting the image's first value makes j local; a key
// below n * HW belongs to an earlier image, so the unit has no transition before it in its own.
struct UnitStart {
  int64_t j, prev;
};
template <typename Array>
PNEUMOSEG_HD UnitStart unit_start(const Array& first_j, const Array& prev_key, int64_t image, int64_t units,
                                  int64_t hw, int64_t slot) {
  const int64_t key = prev_key[slot];
  return UnitStart{first_j[slot] - first_j[image * units], key >= image * hw ? key - image * hw : -1};
}

// Reads foreground flags of one image of a strided (N, H, W) batch in column-major order.
template <typename T>
struct ColumnMajorMask {
  const T* image;  // element [n, 0, 0]
  int64_t height, width, stride_h, stride_w;

  PNEUMOSEG_HD bool fg(int64_t row, int64_t col) const {
    return is_nonzero<T>(image[row * stride_h + col * stride_w]);
  }
};

// Walks unit (col, seg) of one image and calls emit(k) for each transition it owns, in order.
template <typename T, typename Emit>
PNEUMOSEG_HD void walk_unit(const ColumnMajorMask<T>& m, int64_t col, int64_t seg, Emit&& emit) {
  const int64_t row0 = seg * kRowsPerUnit;
  int64_t row1 = row0 + kRowsPerUnit;
  if (row1 > m.height) row1 = m.height;
  bool prev;
  if (row0 > 0) {
    prev = m.fg(row0 - 1, col);
  } else {
    prev = col > 0 ? m.fg(m.height - 1, col - 1) : false;
  }
  const int64_t base = col * m.height;
  for (int64_t r = row0; r < row1; ++r) {
    const bool cur = m.fg(r, col);
    if (cur != prev) emit(base + r);
    prev = cur;
  }
  const bool last_unit = (col == m.width - 1) && (row1 == m.height);
  if (last_unit && prev) emit(m.height * m.width);
}

}  // namespace pneumoseg::rle
