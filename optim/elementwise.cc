#include "optim/elementwise.h"

#include <cmath>
#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"
#include "optim/finite.h"
#include "optim/elementwise_kernels.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace detail {

// The instantiation per instruction set (optim/kernel_options.h).
namespace {
SHARDOPT_BUILD_PORTABLE void run_portable(const PreparedStep& p, const ElementwiseSlice& s, size_t b, size_t n) {
  run_prepared(p, s, b, n);
}
SHARDOPT_BUILD_AVX2 void run_avx2(const PreparedStep& p, const ElementwiseSlice& s, size_t b, size_t n) {
  run_prepared(p, s, b, n);
}
SHARDOPT_BUILD_AVX512 void run_avx512(const PreparedStep& p, const ElementwiseSlice& s, size_t b, size_t n) {
  run_prepared(p, s, b, n);
}

// Elements per task: large enough that scheduling costs nothing next to the memory traffic
// (~100 µs of work), small enough that two threads split a mid-sized parameter.
constexpr size_t kChunkElements = size_t{1} << 15;

// Runs the step over all slices, split into chunks of kChunkElements scheduled on the pool. Chunk
// boundaries are multiples of 64 elements within a slice, so vector loops stay aligned as the
// slice is. Chunk i is found by walking the slices (their count is small next to the chunks).
void run_all(std::span<const ElementwiseSlice> slices, const PreparedStep& p, const KernelOptions& exec) {
  const Isa isa = select_isa(exec.max_isa);
  auto run_range = [&](const ElementwiseSlice& s, size_t b, size_t n) {
    switch (isa) {
      case Isa::kAvx512: run_avx512(p, s, b, n); break;
      case Isa::kAvx2: run_avx2(p, s, b, n); break;
      case Isa::kPortable: run_portable(p, s, b, n); break;
    }
  };
  int64_t chunks = 0;
  for (const ElementwiseSlice& s : slices) chunks += static_cast<int64_t>((s.count + kChunkElements - 1) / kChunkElements);
  if (exec.pool == nullptr || exec.pool->size() == 1 || chunks <= 1) {
    for (const ElementwiseSlice& s : slices)
      if (s.count) run_range(s, 0, s.count);
    return;
  }
  exec.pool->parallel_for(chunks, [&](int64_t chunk, int) {
    for (const ElementwiseSlice& s : slices) {
      const auto in_slice = static_cast<int64_t>((s.count + kChunkElements - 1) / kChunkElements);
      if (chunk < in_slice) {
        const size_t b = static_cast<size_t>(chunk) * kChunkElements;
        run_range(s, b, std::min(kChunkElements, s.count - b));
        return;
      }
      chunk -= in_slice;
    }
  });
}

void check_slices(std::span<const ElementwiseSlice> slices, int state_slots, const std::string& kind) {
  for (size_t i = 0; i < slices.size(); ++i) {
    const ElementwiseSlice& s = slices[i];
    if (s.grad_dtype != DType::kF32 && s.grad_dtype != DType::kBF16) {
      throw ConfigError(fmt::format("{} step: slice {}: grad dtype must be f32 or bf16, found {}", kind, i,
                                    dtype_name(s.grad_dtype)));
    }
    if (s.count == 0) continue;
    if (s.master == nullptr || s.grad == nullptr) {
      throw ConfigError(fmt::format("{} step: slice {} ({} elements): master and grad must be non-null", kind, i,
                                    s.count));
    }
    for (int k = 0; k < state_slots; ++k) {
      if (s.state[k] == nullptr) {
        throw ConfigError(fmt::format("{} step: slice {} ({} elements): state slot {} is null, {} slots needed",
                                      kind, i, s.count, k, state_slots));
      }
    }
  }
}

}  // namespace

StepResult prepare_elementwise_step(const OptimizerParams& params, std::span<const ElementwiseSlice> slices, float lr,
                                    int64_t step, FiniteCheck check, bool check_state_pointers,
                                    PreparedStep& prepared) {
  const std::string kind = optimizer_kind_name(params.kind);
  if (params.is_matrix_optimizer() || params.kind == proto::OPTIMIZER_KIND_UNSPECIFIED) {
    throw ConfigError(fmt::format("elementwise_step: expected kind adamw|lion|sgd, found {}", kind));
  }
  if (step < 1) throw ConfigError(fmt::format("{} step: step counter must be >= 1, found {}", kind, step));
  if (!std::isfinite(lr) || lr < 0.0f) {
    throw ConfigError(fmt::format("{} step: lr must be finite and >= 0, found {}", kind, lr));
  }
  prepared.kind = params.kind;
  prepared.state_slots = state_values_per_element(params);
  check_slices(slices, check_state_pointers ? prepared.state_slots : 0, kind);

  switch (params.kind) {
    case proto::OPTIMIZER_ADAMW: {
      const double t = static_cast<double>(step);
      const double bias1 = 1.0 - std::pow(params.beta1, t);
      const double bias2 = 1.0 - std::pow(params.beta2, t);
      prepared.adam = AdamConsts{f32(params.beta1),         f32(1.0 - params.beta1),
                                 f32(params.beta2),         f32(1.0 - params.beta2),
                                 f32(1.0 - lr * params.weight_decay), f32(lr / bias1),
                                 f32(1.0 / std::sqrt(bias2)), f32(params.eps)};
      break;
    }
    case proto::OPTIMIZER_LION:
      prepared.lion = LionConsts{f32(params.beta1), f32(1.0 - params.beta1), f32(params.beta2),
                                 f32(1.0 - params.beta2), f32(1.0 - lr * params.weight_decay), lr};
      break;
    case proto::OPTIMIZER_SGD:
      prepared.sgd = SgdConsts{lr, f32(params.weight_decay), f32(params.momentum), f32(1.0 - params.dampening),
                               step == 1, params.nesterov, params.momentum != 0.0};
      break;
    default: break;
  }

  StepResult result;
  if (check == FiniteCheck::kGradients) {
    for (const ElementwiseSlice& s : slices) result.nonfinite_gradients += count_nonfinite(s.grad, s.grad_dtype, s.count);
    result.applied = result.nonfinite_gradients == 0;
  }
  return result;
}

}  // namespace detail

StepResult elementwise_step(const OptimizerParams& params, std::span<const ElementwiseSlice> slices, float lr,
                            int64_t step, FiniteCheck check, const KernelOptions& exec) {
  detail::PreparedStep prepared;
  const StepResult result = detail::prepare_elementwise_step(params, slices, lr, step, check, true, prepared);
  if (result.applied) detail::run_all(slices, prepared, exec);
  return result;
}

}  // namespace shardopt::optim
