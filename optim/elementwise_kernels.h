// The element-wise update loops (AdamW, Lion, SGD; formulas in optim/elementwise.h) with their
// per-call constants, and the checks every element-wise step makes before it writes anything. Shared
// by elementwise_step (fp32 state) and elementwise_step_compact (state decoded tile by tile, the same
// loops on the decoded values). Internal to optim/: the loops are inline so that each caller
// compiles them into its own per-instruction-set wrapper.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "optim/elementwise.h"
#include "optim/simd_util.h"

namespace shardopt::optim::detail {

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

// One element's update, shared by the fp32 loops below and the fused q8 loops of compact_step.cc,
// so that a compact step applies exactly the fp32 arithmetic to its decoded state. Each returns the
// new weight and updates the state in place.
SHARDOPT_KERNEL float adamw_update(const AdamConsts& k, float g, float w, float& m, float& v, float& sqrt_v) {
  m = k.beta1 * m + k.one_minus_beta1 * g;
  v = k.beta2 * v + k.one_minus_beta2 * g * g;
  sqrt_v = std::sqrt(v);
  return w * k.decay - k.step_size * m / (sqrt_v * k.inv_sqrt_bias2 + k.eps);
}

SHARDOPT_KERNEL float lion_update(const LionConsts& k, float g, float w, float& m) {
  const float c = k.beta1 * m + k.one_minus_beta1 * g;
  const float sign = static_cast<float>(c > 0.0f) - static_cast<float>(c < 0.0f);
  m = k.beta2 * m + k.one_minus_beta2 * g;
  return w * k.decay - k.lr * sign;
}

// SGD with a momentum buffer; torch initializes the buffer with the first gradient (no dampening on
// step 1): keep = 0, take = 1 then.
struct SgdMomentumTerms {
  float keep, take, nesterov;
};
SHARDOPT_KERNEL SgdMomentumTerms sgd_momentum_terms(const SgdConsts& k) {
  return {k.first_step ? 0.0f : k.momentum, k.first_step ? 1.0f : k.one_minus_dampening, k.nesterov ? 1.0f : 0.0f};
}
SHARDOPT_KERNEL float sgd_momentum_update(const SgdConsts& k, const SgdMomentumTerms& t, float grad, float w,
                                          float& buf) {
  const float g = grad + k.weight_decay * w;
  buf = t.keep * buf + t.take * g;
  // Nesterov: g + mu*b; heavy ball: b. Written branch-free so the loop vectorizes.
  const float d = t.nesterov * (g + k.momentum * buf) + (1.0f - t.nesterov) * buf;
  return w - k.lr * d;
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_kernel(const AdamConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
                  float* __restrict m, float* __restrict v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float mi = m[i], vi = v[i], sqrt_v;
    const float wi = adamw_update(k, load_as_float(grad[i]), w[i], mi, vi, sqrt_v);
    m[i] = mi;
    v[i] = vi;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void lion_kernel(const LionConsts k, float* __restrict w, bf16* __restrict mirror, const G* __restrict grad,
                 float* __restrict m, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float mi = m[i];
    const float wi = lion_update(k, load_as_float(grad[i]), w[i], mi);
    m[i] = mi;
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
  const SgdMomentumTerms t = sgd_momentum_terms(k);
  for (size_t i = 0; i < n; ++i) {
    float b = buf[i];
    const float wi = sgd_momentum_update(k, t, load_as_float(grad[i]), w[i], b);
    buf[i] = b;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

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

// A step's kind and constants, computed once per call.
struct PreparedStep {
  OptimizerKind kind = proto::OPTIMIZER_KIND_UNSPECIFIED;
  int state_slots = 0;
  AdamConsts adam{};
  LionConsts lion{};
  SgdConsts sgd{};
};

// The prologue of every element-wise step: checks the kind, step, lr and the slices (ConfigError;
// state pointers only when check_state_pointers: compact steps keep their state elsewhere), computes
// the constants into `prepared`, and with FiniteCheck::kGradients counts non-finite gradients
// (result.applied = false when there are any: the caller then writes nothing).
StepResult prepare_elementwise_step(const OptimizerParams& params, std::span<const ElementwiseSlice> slices, float lr,
                                    int64_t step, FiniteCheck check, bool check_state_pointers,
                                    PreparedStep& prepared);

// Elements [b, b + n) of slice s under the prepared step (state read from s.state).
SHARDOPT_KERNEL void run_prepared(const PreparedStep& p, const ElementwiseSlice& s, size_t b, size_t n) {
  switch (p.kind) {
    case proto::OPTIMIZER_ADAMW: dispatch<AdamRun>(s, b, n, p.adam); break;
    case proto::OPTIMIZER_LION: dispatch<LionRun>(s, b, n, p.lion); break;
    case proto::OPTIMIZER_SGD: dispatch<SgdRun>(s, b, n, p.sgd); break;
    default: break;
  }
}

}  // namespace shardopt::optim::detail
