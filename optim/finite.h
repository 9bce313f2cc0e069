// Fast NaN/Inf detection over fp32 / bf16 buffers.
//
// How shardopt keeps non-finite values out of parameters: the optimizer kernels do not test every
// element (that would cost a branch per element and still leave a half-written step). Instead the
// runtime calls all_finite / count_nonfinite on the reduced gradient shard it owns before the step
// and skips the step (for every rank, after agreeing on the flag) when any value is NaN or Inf.
// elementwise_step() / muon_step() can do that check themselves (FiniteCheck::kGradients): they then
// scan the gradients first and write nothing when one is non-finite.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/dtype.h"

namespace shardopt::optim {

// Number of NaN or +-Inf values.
int64_t count_nonfinite(const float* data, size_t count);
int64_t count_nonfinite(const bf16* data, size_t count);
// F32 or BF16 buffer given as bytes; throws ConfigError for other dtypes.
int64_t count_nonfinite(const void* data, DType dtype, size_t count);

// True when every value is finite; stops at the first chunk holding a non-finite value.
bool all_finite(const float* data, size_t count);
bool all_finite(const bf16* data, size_t count);
bool all_finite(const void* data, DType dtype, size_t count);

}  // namespace shardopt::optim
