#pragma once
// The foreground test shared by the CPU and CUDA post-processing: nonzero, or strictly above a
// threshold (half types compared after conversion to float).
#include <type_traits>

#include "common/dispatch.h"
#include "common/half.h"
#include "common/macros.h"

namespace pneumoseg::postprocess {

template <typename T>
struct IsForeground {
  bool use_threshold;
  double threshold;
  PNEUMOSEG_HD bool operator()(T v) const {
    if constexpr (std::is_same_v<T, Half16> || std::is_same_v<T, BFloat16Raw>) {
      return use_threshold ? static_cast<double>(load_as<T, float>(v)) > threshold : is_nonzero<T>(v);
    } else {
      return use_threshold ? static_cast<double>(v) > threshold : is_nonzero<T>(v);
    }
  }
};

}  // namespace pneumoseg::postprocess
