#include "optim/elementwise.h"

#include <cmath>
#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"
#include "optim/finite.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

inline float f32(double x) { return static_cast<float>(x); }

// The loops below are inlined into one wrapper per instruction set (run_portable / run_avx512), so
// the same source is vectorized for the baseline x86-64 target and for AVX-512, picked at run time.
#define SHARDOPT_KERNEL inline __attribute__((always_inline))

// Per-call constants, computed once so the per-element loops are pure arithmetic.
struct AdamConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, inv_sqrt_bias2, eps;
};
struct LionConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr;
};
struct SgdConsts {
  float lr, weight_decay, momentum, one_minus_dampening;
  bool first_step, nesterov, has_momentum;
};

template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_kernel(const AdamConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
                  float* __restrict m, float* __restrict v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float g = load_as_float(grad[i]);
    const float mi = k.beta1 * m[i] + k.one_minus_beta1 * g;
    const float vi = k.beta2 * v[i] + k.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const float wi = w[i] * k.decay - k.step_size * mi / (std::sqrt(vi) * k.inv_sqrt_bias2 + k.eps);
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void lion_kernel(const LionConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
                 float* __restrict m, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float g = load_as_float(grad[i]);
    const float c = k.beta1 * m[i] + k.one_minus_beta1 * g;
    const float sign = static_cast<float>(c > 0.0f) - static_cast<float>(c < 0.0f);
    const float wi = w[i] * k.decay - k.lr * sign;
    m[i] = k.beta2 * m[i] + k.one_minus_beta2 * g;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void sgd_kernel(const SgdConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
                float* __restrict buf, size_t n) {
  if (buf == nullptr) {  // momentum == 0: plain SGD, no state
    for (size_t i = 0; i < n; ++i) {
      const float g = load_as_float(grad[i]) + k.weight_decay * w[i];
      const float wi = w[i] - k.lr * g;
      w[i] = wi;
      if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
    }
    return;
  }
  // torch initializes the buffer with the first gradient (no dampening on step 1).
  const float keep = k.first_step ? 0.0f : k.momentum;
  const float take = k.first_step ? 1.0f : k.one_minus_dampening;
  const float nesterov = k.nesterov ? 1.0f : 0.0f;
  for (size_t i = 0; i < n; ++i) {
    const float g = load_as_float(grad[i]) + k.weight_decay * w[i];
    const float b = keep * buf[i] + take * g;
    buf[i] = b;
    // Nesterov: g + mu*b; heavy ball: b. Written branch-free so the loop vectorizes.
    const float d = nesterov * (g + k.momentum * b) + (1.0f - nesterov) * b;
    const float wi = w[i] - k.lr * d;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

// Dispatch on (grad dtype, mirror present) once per slice.
// Elements [b, b + n) of slice s, dispatched on (grad dtype, mirror present).
template <template <typename, bool> class Kernel, typename Consts>
SHARDOPT_KERNEL void dispatch(const ElementwiseSlice& s, size_t b, size_t n, const Consts& k) {
  bf16* mirror = s.mirror ? s.mirror + b : nullptr;
  if (s.grad_dtype == DType::kBF16) {
    const auto* g = static_cast<const bf16*>(s.grad) + b;
    if (mirror) Kernel<bf16, true>::run(s, b, n, mirror, g, k);
    else Kernel<bf16, false>::run(s, b, n, mirror, g, k);
  } else {
    const auto* g = static_cast<const float*>(s.grad) + b;
    if (mirror) Kernel<float, true>::run(s, b, n, mirror, g, k);
    else Kernel<float, false>::run(s, b, n, mirror, g, k);
  }
}

template <typename G, bool kMirror>
struct AdamRun {
  SHARDOPT_KERNEL static void run(const ElementwiseSlice& s, size_t b, size_t n, bf16* mirror, const G* g,
                                  const AdamConsts& k) {
    adamw_kernel<G, kMirror>(k, s.master + b, mirror, g, s.state[0] + b, s.state[1] + b, n);
  }
};
template <typename G, bool kMirror>
struct LionRun {
  SHARDOPT_KERNEL static void run(const ElementwiseSlice& s, size_t b, size_t n, bf16* mirror, const G* g,
                                  const LionConsts& k) {
    lion_kernel<G, kMirror>(k, s.master + b, mirror, g, s.state[0] + b, n);
  }
};
template <typename G, bool kMirror>
struct SgdRun {
  SHARDOPT_KERNEL static void run(const ElementwiseSlice& s, size_t b, size_t n, bf16* mirror, const G* g,
                                  const SgdConsts& k) {
    sgd_kernel<G, kMirror>(k, s.master + b, mirror, g, k.has_momentum ? s.state[0] + b : nullptr, n);
  }
};

// One instantiation per kernel and instruction set. flatten inlines the whole call tree, so the
// loops are compiled (and vectorized) for the wrapper's target.
template <template <typename, bool> class Kernel, typename Consts>
__attribute__((flatten)) void run_portable(const ElementwiseSlice& s, size_t b, size_t n, const Consts& k) {
  dispatch<Kernel>(s, b, n, k);
}
template <template <typename, bool> class Kernel, typename Consts>
__attribute__((flatten, target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512"))) void run_avx512(
    const ElementwiseSlice& s, size_t b, size_t n, const Consts& k) {
  dispatch<Kernel>(s, b, n, k);
}

// Elements per task: large enough that scheduling costs nothing next to the memory traffic
// (~100 µs of work), small enough that two threads split a mid-sized parameter.
constexpr size_t kChunkElements = size_t{1} << 15;

// Runs Kernel over all slices, split into chunks of kChunkElements scheduled on the pool. Chunk
// boundaries are multiples of 64 elements within a slice, so vector loops stay aligned as the
// slice is. Chunk i is found by walking the slices (their count is small next to the chunks).
template <template <typename, bool> class Kernel, typename Consts>
void run_all(std::span<const ElementwiseSlice> slices, const Consts& k, const KernelOptions& exec) {
  const bool avx512 = exec.use_avx512 && cpu_has_avx512();
  auto run_range = [&](const ElementwiseSlice& s, size_t b, size_t n) {
    if (avx512) run_avx512<Kernel>(s, b, n, k);
    else run_portable<Kernel>(s, b, n, k);
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

void check_slices(std::span<const ElementwiseSlice> slices, int state_slots, const char* kind) {
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

StepResult elementwise_step(const OptimizerParams& params, std::span<const ElementwiseSlice> slices, float lr,
                            int64_t step, FiniteCheck check, const KernelOptions& exec) {
  const std::string kind = optimizer_kind_name(params.kind);
  if (params.is_matrix_optimizer() || params.kind == proto::OPTIMIZER_KIND_UNSPECIFIED) {
    throw ConfigError(fmt::format("elementwise_step: expected kind adamw|lion|sgd, found {}", kind));
  }
  if (step < 1) throw ConfigError(fmt::format("{} step: step counter must be >= 1, found {}", kind, step));
  if (!std::isfinite(lr) || lr < 0.0f) {
    throw ConfigError(fmt::format("{} step: lr must be finite and >= 0, found {}", kind, lr));
  }
  const int slots = state_values_per_element(params);
  check_slices(slices, slots, kind.c_str());

  StepResult result;
  if (check == FiniteCheck::kGradients) {
    for (const ElementwiseSlice& s : slices) result.nonfinite_gradients += count_nonfinite(s.grad, s.grad_dtype, s.count);
    if (result.nonfinite_gradients != 0) {
      result.applied = false;
      return result;
    }
  }

  switch (params.kind) {
    case proto::OPTIMIZER_ADAMW: {
      const double t = static_cast<double>(step);
      const double bias1 = 1.0 - std::pow(params.beta1, t);
      const double bias2 = 1.0 - std::pow(params.beta2, t);
      const AdamConsts k{f32(params.beta1),         f32(1.0 - params.beta1),
                         f32(params.beta2),         f32(1.0 - params.beta2),
                         f32(1.0 - lr * params.weight_decay), f32(lr / bias1),
                         f32(1.0 / std::sqrt(bias2)), f32(params.eps)};
      run_all<AdamRun>(slices, k, exec);
      break;
    }
    case proto::OPTIMIZER_LION: {
      const LionConsts k{f32(params.beta1), f32(1.0 - params.beta1), f32(params.beta2), f32(1.0 - params.beta2),
                         f32(1.0 - lr * params.weight_decay), lr};
      run_all<LionRun>(slices, k, exec);
      break;
    }
    case proto::OPTIMIZER_SGD: {
      const SgdConsts k{lr, f32(params.weight_decay), f32(params.momentum), f32(1.0 - params.dampening), step == 1,
                        params.nesterov, params.momentum != 0.0};
      run_all<SgdRun>(slices, k, exec);
      break;
    }
    default: break;
  }
  return result;
}

}  // namespace shardopt::optim
