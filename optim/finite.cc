#include "optim/finite.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"

namespace shardopt::optim {
namespace {

// Exponent all ones <=> NaN or Inf. Integer compares keep the loop vectorizable and immune to
// -ffast-math assumptions.
int64_t count_nonfinite_f32_bits(const float* data, size_t count) {
  int64_t nonfinite = 0;
  for (size_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, data + i, sizeof bits);  // a plain load; no aliasing UB
    nonfinite += (bits & 0x7f800000u) == 0x7f800000u;
  }
  return nonfinite;
}

int64_t count_nonfinite_bf16_bits(const bf16* data, size_t count) {
  int64_t nonfinite = 0;
  for (size_t i = 0; i < count; ++i) nonfinite += (data[i].bits & 0x7f80u) == 0x7f80u;
  return nonfinite;
}

constexpr size_t kChunk = 16384;

}  // namespace

int64_t count_nonfinite(const float* data, size_t count) {
  if (count == 0) return 0;
  return count_nonfinite_f32_bits(data, count);
}

int64_t count_nonfinite(const bf16* data, size_t count) {
  static_assert(sizeof(bf16) == sizeof(uint16_t));
  if (count == 0) return 0;
  return count_nonfinite_bf16_bits(data, count);
}

int64_t count_nonfinite(const void* data, DType dtype, size_t count) {
  switch (dtype) {
    case DType::kF32: return count_nonfinite(static_cast<const float*>(data), count);
    case DType::kBF16: return count_nonfinite(static_cast<const bf16*>(data), count);
    default:
      throw ConfigError(fmt::format("count_nonfinite: expected dtype f32 or bf16, found {}", dtype_name(dtype)));
  }
}

bool all_finite(const float* data, size_t count) {
  for (size_t start = 0; start < count; start += kChunk) {
    if (count_nonfinite(data + start, std::min(kChunk, count - start)) != 0) return false;
  }
  return true;
}

bool all_finite(const bf16* data, size_t count) {
  for (size_t start = 0; start < count; start += kChunk) {
    if (count_nonfinite(data + start, std::min(kChunk, count - start)) != 0) return false;
  }
  return true;
}

bool all_finite(const void* data, DType dtype, size_t count) {
  switch (dtype) {
    case DType::kF32: return all_finite(static_cast<const float*>(data), count);
    case DType::kBF16: return all_finite(static_cast<const bf16*>(data), count);
    default: throw ConfigError(fmt::format("all_finite: expected dtype f32 or bf16, found {}", dtype_name(dtype)));
  }
}

}  // namespace shardopt::optim
