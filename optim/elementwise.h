// Element-wise optimizers (AdamW, Lion, SGD) over many contiguous slices in one call.
//
// The runtime calls elementwise_step() once per group on the element ranges it owns: each slice is
// a contiguous run of fp32 master parameters with its gradient and state. One fused pass per slice
// reads grad + state + master, writes state + master and, when present, the bf16 mirror.
// Formulas (docs/algorithms.md, "Element-wise optimizers"), t = step >= 1, lr = the scheduled learning rate of this call:
//   AdamW  m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//          W = W (1 - lr wd) - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
//   Lion   c = b1 m + (1-b1) g; W = W (1 - lr wd) - lr sign(c); m = b2 m + (1-b2) g
//   SGD    torch.optim.SGD: g += wd W; if momentum: buf = (t == 1 ? g : mu buf + (1-dampening) g),
//          g = nesterov ? g + mu buf : buf; W -= lr g
// State layout: slot k of a slice is `count` fp32 values (AdamW: 0 = m, 1 = v; Lion: 0 = m;
// SGD with momentum: 0 = momentum buffer). The runtime zero-fills state before step 1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "base/dtype.h"
#include "base/thread_pool.h"
#include "optim/config.h"
#include "optim/kernel_options.h"  // KernelOptions: the pool and the instruction-set build

namespace shardopt::optim {

struct ElementwiseSlice {
  float* master = nullptr;       // fp32 master params, updated in place
  bf16* mirror = nullptr;        // optional bf16 copy of the new master (nullptr: none)
  const void* grad = nullptr;    // `count` values of grad_dtype
  DType grad_dtype = DType::kF32;  // F32 or BF16
  float* state[2] = {nullptr, nullptr};  // state_values_per_element(params) slots are used
  size_t count = 0;
};

enum class FiniteCheck {
  kNone,       // the caller has checked the gradients (the runtime's normal path)
  kGradients,  // scan every gradient first; on NaN/Inf write nothing and report
};

struct StepResult {
  bool applied = true;             // false: a non-finite gradient was found, nothing was written
  int64_t nonfinite_gradients = 0;  // counted only with FiniteCheck::kGradients
};

// One optimizer step over `slices` (AdamW, Lion or SGD per params.kind). Throws ConfigError for a
// matrix optimizer kind, step < 1, a non-finite or negative lr, a slice with a null pointer and
// count > 0, or a grad dtype other than F32/BF16.
StepResult elementwise_step(const OptimizerParams& params, std::span<const ElementwiseSlice> slices, float lr,
                            int64_t step, FiniteCheck check = FiniteCheck::kNone, const KernelOptions& exec = {});

}  // namespace shardopt::optim
