// The reference SIIM / absolute RLE encoder both RLE harnesses check the core against.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rle/rle.h"

namespace fuzz {

// The canonical string of one column-major 0/1 image.
inline std::string ref_encode(const std::vector<uint8_t>& colmajor, pneumoseg::rle::Style style) {
  std::string s;
  int64_t prev_end = 0;
  bool any = false;
  const int64_t n = static_cast<int64_t>(colmajor.size());
  for (int64_t k = 0; k < n;) {
    if (!colmajor[k]) {
      ++k;
      continue;
    }
    int64_t e = k;
    while (e < n && colmajor[e]) ++e;
    if (any) s += ' ';
    const int64_t first = style == pneumoseg::rle::Style::Siim ? (any ? k - prev_end : k) : k + 1;
    s += std::to_string(first) + ' ' + std::to_string(e - k);
    any = true;
    prev_end = e;
    k = e;
  }
  if (!any && style == pneumoseg::rle::Style::Siim) s = "-1";
  return s;
}

}  // namespace fuzz
