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

// The loops below are inlined into one wrapper per instruction set (run_portable / run_avx2 /
// run_avx512), so the same source is vectorized for the baseline x86-64 target, AVX2 + FMA and
// AVX-512, picked at run time (optim/kernel_options.h).
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

// Software prefetch. Each loop streams four to five arrays at once (AdamW: grad, w, m, v and the
// optional mirror). The hardware prefetchers follow a stream only within a 4 KiB page and ramp up
// again after every page boundary, and the update's arithmetic (AdamW: a square root and a division
// per element) delays the loads that would reveal the next page, so each stream keeps fewer misses in
// flight than the memory system allows. Prefetching every stream's line kPrefetchElements ahead, one
// line per kLineElements, keeps them in flight across pages: about 10% more bytes/s at 1 and 2
// threads on AVX-512 (docs/benchmarks.md). Prefetches never fault, so the ones past the end of
// an array are harmless.
constexpr size_t kLineElements = 16;       // one 64-byte line of an fp32 stream
constexpr size_t kPrefetchElements = 512;  // 2 KiB ahead in each fp32 stream

// The address kPrefetchElements past element i of a stream. Integer arithmetic: it may lie past the
// array, where pointer arithmetic is undefined.
template <typename T>
SHARDOPT_KERNEL const void* ahead_of(const T* stream, size_t i) {
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(stream) + (i + kPrefetchElements) * sizeof(T));
}

// Runs range(b, e) over [0, n) one line at a time (each call is one vector iteration of the
// range's loop on AVX-512), prefetching every stream ahead before each line, then the tail. The
// prefetches are issued here, next to the range's stores: a function that only prefetches is pure
// to GCC, and its calls are deleted as dead code.
template <typename Range, typename... Streams>
SHARDOPT_KERNEL void by_lines(size_t n, Range&& range, const Streams*... streams) {
  size_t i = 0;
  for (; i + kLineElements <= n; i += kLineElements) {
    (__builtin_prefetch(ahead_of(streams, i)), ...);
    range(i, i + kLineElements);
  }
  range(i, n);
}

// The per-range loops. `unroll 1`: keep each loop a loop so that it is vectorized (fully unrolled
// 16-element bodies are left scalar by GCC's straight-line vectorizer).
template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_range(const AdamConsts& k, float* __restrict w, bf16* __restrict mirror,
                                 const G* __restrict grad, float* __restrict m, float* __restrict v, size_t b,
                                 size_t e) {
#pragma GCC unroll 1
  for (size_t i = b; i < e; ++i) {
    float mi = m[i], vi = v[i], sqrt_v;
    const float wi = adamw_update(k, load_as_float(grad[i]), w[i], mi, vi, sqrt_v);
    m[i] = mi;
    v[i] = vi;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void lion_range(const LionConsts& k, float* __restrict w, bf16* __restrict mirror,
                                const G* __restrict grad, float* __restrict m, size_t b, size_t e) {
#pragma GCC unroll 1
  for (size_t i = b; i < e; ++i) {
    float mi = m[i];
    const float wi = lion_update(k, load_as_float(grad[i]), w[i], mi);
    m[i] = mi;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

// momentum == 0: plain SGD, no state.
template <typename G, bool kMirror>
SHARDOPT_KERNEL void sgd_plain_range(const SgdConsts& k, float* __restrict w, bf16* __restrict mirror,
                                     const G* __restrict grad, size_t b, size_t e) {
#pragma GCC unroll 1
  for (size_t i = b; i < e; ++i) {
    const float g = load_as_float(grad[i]) + k.weight_decay * w[i];
    const float wi = w[i] - k.lr * g;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void sgd_momentum_range(const SgdConsts& k, const SgdMomentumTerms& t, float* __restrict w,
                                        bf16* __restrict mirror, const G* __restrict grad, float* __restrict buf,
                                        size_t b, size_t e) {
#pragma GCC unroll 1
  for (size_t i = b; i < e; ++i) {
    float bi = buf[i];
    const float wi = sgd_momentum_update(k, t, load_as_float(grad[i]), w[i], bi);
    buf[i] = bi;
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
  }
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_kernel(const AdamConsts k, float* w, bf16* mirror, const G* grad, float* m, float* v,
                                  size_t n) {
  by_lines(
      n, [&](size_t b, size_t e) { adamw_range<G, kMirror>(k, w, mirror, grad, m, v, b, e); }, grad, w, m, v);
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void lion_kernel(const LionConsts k, float* w, bf16* mirror, const G* grad, float* m, size_t n) {
  by_lines(n, [&](size_t b, size_t e) { lion_range<G, kMirror>(k, w, mirror, grad, m, b, e); }, grad, w, m);
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void sgd_kernel(const SgdConsts k, float* w, bf16* mirror, const G* grad, float* buf, size_t n) {
  if (buf == nullptr) {
    by_lines(n, [&](size_t b, size_t e) { sgd_plain_range<G, kMirror>(k, w, mirror, grad, b, e); }, grad, w);
    return;
  }
  const SgdMomentumTerms t = sgd_momentum_terms(k);
  by_lines(
      n, [&](size_t b, size_t e) { sgd_momentum_range<G, kMirror>(k, t, w, mirror, grad, buf, b, e); }, grad, w,
      buf);
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
