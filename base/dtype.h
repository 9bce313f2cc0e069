// Element types of raw buffers: sizes, names, and bf16 <-> fp32 conversion.
//
// DType is a plain enum so that the ground floor (and comm's raw-buffer API) does not depend on
// generated protobuf code. Its values equal proto::DType's (proto/types.proto), which are written into
// plans and checkpoints; proto/dtype_convert.h converts at the proto boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace shardopt {

enum class DType : uint8_t {
  kUnspecified = 0,
  kF32 = 1,
  kBF16 = 2,
  kF16 = 3,
  kI32 = 4,
  kI64 = 5,
  kU8 = 6,
};

// Bytes per element; throws ConfigError for kUnspecified or an out-of-range value.
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
