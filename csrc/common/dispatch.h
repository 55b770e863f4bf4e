#pragma once
// Runtime dtype -> template parameter, in the spirit of flash-attention's static_switch.h.
#include <cstdint>
#include <string>

#include "common/errors.h"
#include "common/macros.h"
#include "common/tensor_view.h"

namespace pneumoseg {

// Half types travel as their raw 16 bits; only "is it nonzero" is ever asked of them here.
struct Half16 { uint16_t bits; };
struct BFloat16Raw { uint16_t bits; };

template <typename T>
PNEUMOSEG_HD bool is_nonzero(T v) { return v != T(0); }
template <>
PNEUMOSEG_HD bool is_nonzero<Half16>(Half16 v) { return (v.bits & 0x7fffu) != 0; }
template <>
PNEUMOSEG_HD bool is_nonzero<BFloat16Raw>(BFloat16Raw v) { return (v.bits & 0x7fffu) != 0; }

#define PNEUMOSEG_DISPATCH_CASE(ENUM, TYPE, ...) \
  case DType::ENUM: {                            \
    using scalar_t = TYPE;                       \
    __VA_ARGS__();                               \
    break;                                       \
  }

// Every dtype a mask may come in.
#define PNEUMOSEG_DISPATCH_ALL(DTYPE, NAME, ...)                                         \
  switch (DTYPE) {                                                                       \
    PNEUMOSEG_DISPATCH_CASE(Bool, uint8_t, __VA_ARGS__)                                  \
    PNEUMOSEG_DISPATCH_CASE(Int8, int8_t, __VA_ARGS__)                                   \
    PNEUMOSEG_DISPATCH_CASE(UInt8, uint8_t, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(Int16, int16_t, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(UInt16, uint16_t, __VA_ARGS__)                               \
    PNEUMOSEG_DISPATCH_CASE(Int32, int32_t, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(UInt32, uint32_t, __VA_ARGS__)                               \
    PNEUMOSEG_DISPATCH_CASE(Int64, int64_t, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(UInt64, uint64_t, __VA_ARGS__)                               \
    PNEUMOSEG_DISPATCH_CASE(Float16, ::pneumoseg::Half16, __VA_ARGS__)                   \
    PNEUMOSEG_DISPATCH_CASE(BFloat16, ::pneumoseg::BFloat16Raw, __VA_ARGS__)             \
    PNEUMOSEG_DISPATCH_CASE(Float32, float, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(Float64, double, __VA_ARGS__)                                \
    default:                                                                             \
      ::pneumoseg::fail_value(std::string(NAME) + ": unsupported dtype " +               \
                              ::pneumoseg::dtype_name(DTYPE));                           \
  }

}  // namespace pneumoseg

namespace pneumoseg {
// Floating types only (logits).
#define PNEUMOSEG_DISPATCH_FLOATING(DTYPE, NAME, ...)                                    \
  switch (DTYPE) {                                                                       \
    PNEUMOSEG_DISPATCH_CASE(Float16, ::pneumoseg::Half16, __VA_ARGS__)                   \
    PNEUMOSEG_DISPATCH_CASE(BFloat16, ::pneumoseg::BFloat16Raw, __VA_ARGS__)             \
    PNEUMOSEG_DISPATCH_CASE(Float32, float, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE(Float64, double, __VA_ARGS__)                                \
    default:                                                                             \
      ::pneumoseg::fail_value(std::string(NAME) + " must be float16, bfloat16, float32 or float64, got " + \
                              ::pneumoseg::dtype_name(DTYPE));                           \
  }

// A second type switch nested in a first needs its own alias name.
#define PNEUMOSEG_DISPATCH_CASE_AS(ENUM, TYPE, ALIAS, ...) \
  case DType::ENUM: {                                      \
    using ALIAS = TYPE;                                    \
    __VA_ARGS__();                                         \
    break;                                                 \
  }

// Targets: floats (soft labels), uint8 and bool.
#define PNEUMOSEG_DISPATCH_TARGET(DTYPE, NAME, ...)                                                  \
  switch (DTYPE) {                                                                                   \
    PNEUMOSEG_DISPATCH_CASE_AS(Bool, uint8_t, target_t, __VA_ARGS__)                                 \
    PNEUMOSEG_DISPATCH_CASE_AS(UInt8, uint8_t, target_t, __VA_ARGS__)                                \
    PNEUMOSEG_DISPATCH_CASE_AS(Float16, ::pneumoseg::Half16, target_t, __VA_ARGS__)                  \
    PNEUMOSEG_DISPATCH_CASE_AS(BFloat16, ::pneumoseg::BFloat16Raw, target_t, __VA_ARGS__)            \
    PNEUMOSEG_DISPATCH_CASE_AS(Float32, float, target_t, __VA_ARGS__)                                \
    PNEUMOSEG_DISPATCH_CASE_AS(Float64, double, target_t, __VA_ARGS__)                               \
    default:                                                                                         \
      ::pneumoseg::fail_value(std::string(NAME) + " must be float, uint8 or bool, got " +            \
                              ::pneumoseg::dtype_name(DTYPE));                                       \
  }
}  // namespace pneumoseg
