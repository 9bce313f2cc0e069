#include "optim/elementwise.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"
#include "optim/finite.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

inline float f32(double x) { return static_cast<float>(x); }

// Per-call constants, computed once so the per-element loops are pure arithmetic.
struct AdamConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, inv_sqrt_bias2, eps;
};
struct LionConsts {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr;
};
struct SgdConsts {
  float lr, weight_decay, momentum, one_minus_dampening;
  bool first_step, nesterov;
};

template <typename G, bool kMirror>
void adamw_kernel(const AdamConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
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
void lion_kernel(const LionConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
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
void sgd_kernel(const SgdConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
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
template <template <typename, bool> class Kernel, typename... Args>
void dispatch(const ElementwiseSlice& s, Args... args) {
  if (s.grad_dtype == DType::kBF16) {
    const auto* g = static_cast<const bf16*>(s.grad);
    if (s.mirror) Kernel<bf16, true>::run(s, g, args...);
    else Kernel<bf16, false>::run(s, g, args...);
  } else {
    const auto* g = static_cast<const float*>(s.grad);
    if (s.mirror) Kernel<float, true>::run(s, g, args...);
    else Kernel<float, false>::run(s, g, args...);
  }
}

template <typename G, bool kMirror>
struct AdamRun {
  static void run(const ElementwiseSlice& s, const G* g, AdamConsts k) {
    adamw_kernel<G, kMirror>(k, s.master, s.mirror, g, s.state[0], s.state[1], s.count);
  }
};
template <typename G, bool kMirror>
struct LionRun {
  static void run(const ElementwiseSlice& s, const G* g, LionConsts k) {
    lion_kernel<G, kMirror>(k, s.master, s.mirror, g, s.state[0], s.count);
  }
};
template <typename G, bool kMirror>
struct SgdRun {
  static void run(const ElementwiseSlice& s, const G* g, SgdConsts k, bool has_momentum) {
    sgd_kernel<G, kMirror>(k, s.master, s.mirror, g, has_momentum ? s.state[0] : nullptr, s.count);
  }
};

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
                            int64_t step, FiniteCheck check) {
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
      for (const ElementwiseSlice& s : slices) dispatch<AdamRun>(s, k);
      break;
    }
    case proto::OPTIMIZER_LION: {
      const LionConsts k{f32(params.beta1), f32(1.0 - params.beta1), f32(params.beta2), f32(1.0 - params.beta2),
                         f32(1.0 - lr * params.weight_decay), lr};
      for (const ElementwiseSlice& s : slices) dispatch<LionRun>(s, k);
      break;
    }
    case proto::OPTIMIZER_SGD: {
      const SgdConsts k{lr, f32(params.weight_decay), f32(params.momentum), f32(1.0 - params.dampening), step == 1,
                        params.nesterov};
      const bool has_momentum = params.momentum != 0.0;
      for (const ElementwiseSlice& s : slices) dispatch<SgdRun>(s, k, has_momentum);
      break;
    }
    default: break;
  }
  return result;
}

}  // namespace shardopt::optim
