// Element-type helpers: sizes, names, and bf16 <-> fp32 conversion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "proto/types.pb.h"

namespace shardopt {

using DType = proto::DType;

// Bytes per element; throws ConfigError for DTYPE_UNSPECIFIED.
size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);
// Parses "f32", "bf16", ... (the names dtype_name prints); throws ConfigError otherwise.
DType parse_dtype(std::string_view name);

// bfloat16 stored as its raw 16 bits.
struct bf16 {
  uint16_t bits;
};

inline float bf16_to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as hardware and PyTorch do; NaN stays NaN.
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

}  // namespace shardopt
