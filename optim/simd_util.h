// Branch-free element conversions for the optimizer loops (internal to optim/): written so that
// GCC/Clang vectorize the loops that call them.
#pragma once

#include <cstdint>
#include <cstring>

#include "base/dtype.h"
#include "optim/kernel_options.h"

namespace shardopt::optim {

inline float load_as_float(float v) { return v; }

inline float load_as_float(bf16 v) { return bf16_to_float(v); }

// Round to nearest even; NaN stays a (quiet) NaN. Same result as base/dtype.h float_to_bf16, but
// with a select instead of an early return.
inline bf16 to_bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{static_cast<uint16_t>(is_nan ? quiet_nan : rounded)};
}

// Attributes of the per-instruction-set wrappers (optim/kernel_options.h: Isa). flatten inlines the
// wrapper's whole call tree, so the loops are compiled (and vectorized) for the wrapper's target.
#define SHARDOPT_BUILD_PORTABLE __attribute__((flatten))
#define SHARDOPT_BUILD_AVX2 __attribute__((flatten, target("avx2,fma")))
#define SHARDOPT_BUILD_AVX512 \
  __attribute__((flatten, target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512")))

}  // namespace shardopt::optim
