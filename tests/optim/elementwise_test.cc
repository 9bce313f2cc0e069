// AdamW / Lion / SGD against plain double-precision references written here (no BLAS, no code
// shared with optim/), over several steps and many slices in one call.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "base/dtype.h"
#include "base/error.h"
#include "optim/config.h"
#include "optim/elementwise.h"

namespace shardopt::optim {
namespace {

// Slice sizes covering empty, single, odd, vector-width tails and ones that span several of the
// kernel's 32768-element chunks (so a multi-threaded step splits a slice between threads).
const std::vector<size_t> kSizes = {0, 1, 7, 16, 33, 1000, 4099, 100003};
constexpr int kSteps = 5;
// bf16 keeps 8 significant bits: a rounded value is within 2^-9 relative of the exact one.
constexpr double kBf16RelTol = 1.0 / 256.0;

struct RefSlice {
  std::vector<double> w, s0, s1;
};

// torch.optim.AdamW, written out in double.
void ref_adamw(RefSlice& r, const std::vector<double>& g, double lr, double wd, double b1, double b2, double eps, int t) {
  for (size_t i = 0; i < g.size(); ++i) {
    r.s0[i] = b1 * r.s0[i] + (1 - b1) * g[i];
    r.s1[i] = b2 * r.s1[i] + (1 - b2) * g[i] * g[i];
    const double mhat = r.s0[i] / (1 - std::pow(b1, t));
    const double vhat = r.s1[i] / (1 - std::pow(b2, t));
    r.w[i] = r.w[i] * (1 - lr * wd) - lr * mhat / (std::sqrt(vhat) + eps);
  }
}

void ref_lion(RefSlice& r, const std::vector<double>& g, double lr, double wd, double b1, double b2) {
  for (size_t i = 0; i < g.size(); ++i) {
    const double c = b1 * r.s0[i] + (1 - b1) * g[i];
    const double sign = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
    r.w[i] = r.w[i] * (1 - lr * wd) - lr * sign;
    r.s0[i] = b2 * r.s0[i] + (1 - b2) * g[i];
  }
}

// torch.optim.SGD (_single_tensor_sgd) in double.
void ref_sgd(RefSlice& r, const std::vector<double>& grad, double lr, double wd, double mu, double damp, bool nesterov,
             int t) {
  for (size_t i = 0; i < grad.size(); ++i) {
    double g = grad[i] + wd * r.w[i];
    if (mu != 0) {
      r.s0[i] = t == 1 ? g : mu * r.s0[i] + (1 - damp) * g;
      g = nesterov ? g + mu * r.s0[i] : r.s0[i];
    }
    r.w[i] -= lr * g;
  }
}

struct Case {
  proto::OptimizerConfig config;
  bool bf16_grads;
  bool mirror;
  int threads = 1;         // pool size
  Isa max_isa = Isa::kAvx512;  // the widest instruction-set build to run
};

void run_case(const Case& c) {
  const OptimizerParams params = resolve_optimizer_config(c.config);
  const proto::OptimizerConfig full = with_defaults(c.config);
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);

  const size_t nslices = kSizes.size();
  std::vector<std::vector<float>> master(nslices), s0(nslices), s1(nslices), gf(nslices);
  std::vector<std::vector<bf16>> mirror(nslices), gb(nslices);
  std::vector<RefSlice> ref(nslices);
  for (size_t k = 0; k < nslices; ++k) {
    const size_t n = kSizes[k];
    master[k].resize(n);
    for (auto& x : master[k]) x = normal(rng);
    s0[k].assign(n, 0.0f);
    s1[k].assign(n, 0.0f);
    gf[k].resize(n);
    gb[k].resize(n);
    mirror[k].assign(n, bf16{0});
    ref[k].w.assign(master[k].begin(), master[k].end());
    ref[k].s0.assign(n, 0.0);
    ref[k].s1.assign(n, 0.0);
  }
  const double lr = 0.01;
  ThreadPool pool(c.threads);
  const KernelOptions exec{&pool, c.max_isa};
  for (int t = 1; t <= kSteps; ++t) {
    std::vector<ElementwiseSlice> slices;
    for (size_t k = 0; k < nslices; ++k) {
      std::vector<double> g(kSizes[k]);
      for (size_t i = 0; i < kSizes[k]; ++i) {
        gf[k][i] = normal(rng) * 0.1f;
        gb[k][i] = float_to_bf16(gf[k][i]);
        g[i] = c.bf16_grads ? bf16_to_float(gb[k][i]) : gf[k][i];
      }
      switch (full.kind()) {
        case proto::OPTIMIZER_ADAMW:
          ref_adamw(ref[k], g, lr, full.weight_decay(), full.beta1(), full.beta2(), full.eps(), t);
          break;
        case proto::OPTIMIZER_LION: ref_lion(ref[k], g, lr, full.weight_decay(), full.beta1(), full.beta2()); break;
        default:
          ref_sgd(ref[k], g, lr, full.weight_decay(), full.momentum(), full.dampening(), full.nesterov(), t);
      }
      ElementwiseSlice s;
      s.master = master[k].data();
      s.mirror = c.mirror ? mirror[k].data() : nullptr;
      s.grad = c.bf16_grads ? static_cast<const void*>(gb[k].data()) : gf[k].data();
      s.grad_dtype = c.bf16_grads ? DType::kBF16 : DType::kF32;
      s.state[0] = s0[k].data();
      s.state[1] = s1[k].data();
      s.count = kSizes[k];
      slices.push_back(s);
    }
    const StepResult r = elementwise_step(params, slices, static_cast<float>(lr), t, FiniteCheck::kNone, exec);
    ASSERT_TRUE(r.applied);
  }
  for (size_t k = 0; k < nslices; ++k) {
    for (size_t i = 0; i < kSizes[k]; ++i) {
      const double expect = ref[k].w[i];
      ASSERT_NEAR(master[k][i], expect, 2e-6 * std::max(1.0, std::abs(expect)))
          << "slice " << k << " element " << i << " of " << kSizes[k];
      ASSERT_NEAR(s0[k][i], ref[k].s0[i], 2e-6 * std::max(1.0, std::abs(ref[k].s0[i]))) << "state 0, slice " << k;
      if (full.kind() == proto::OPTIMIZER_ADAMW) {
        ASSERT_NEAR(s1[k][i], ref[k].s1[i], 2e-6 * std::max(1e-3, std::abs(ref[k].s1[i]))) << "state 1, slice " << k;
      }
      if (c.mirror) {
        // The mirror is the master rounded to bf16, and within bf16 precision of the reference.
        ASSERT_EQ(mirror[k][i].bits, float_to_bf16(master[k][i]).bits) << "slice " << k << " element " << i;
        ASSERT_NEAR(bf16_to_float(mirror[k][i]), expect, kBf16RelTol * std::abs(expect) + 1e-6);
      }
    }
  }
}

proto::OptimizerConfig make(proto::OptimizerKind kind) {
  proto::OptimizerConfig c;
  c.set_kind(kind);
  return c;
}

TEST(Elementwise, AdamWMatchesReference) {
  for (bool bf16_grads : {false, true}) {
    for (bool mirror : {false, true}) {
      SCOPED_TRACE(testing::Message() << "bf16 grads " << bf16_grads << " mirror " << mirror);
      run_case({make(proto::OPTIMIZER_ADAMW), bf16_grads, mirror});
    }
  }
}

// Every kernel on 2 and 3 threads and in every instruction-set build, against the same double
// reference (the single-threaded runs above use the default path).
TEST(Elementwise, ThreadsAndInstructionSetsMatchReference) {
  for (int threads : {2, 3}) {
    for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
      for (proto::OptimizerKind kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD}) {
        proto::OptimizerConfig c = make(kind);
        if (kind == proto::OPTIMIZER_SGD) c.set_momentum(0.9);
        for (bool bf16_grads : {false, true}) {
          SCOPED_TRACE(testing::Message() << "threads " << threads << " " << isa_name(isa) << " kind "
                                          << optimizer_kind_name(kind) << " bf16 grads " << bf16_grads);
          run_case({c, bf16_grads, bf16_grads, threads, isa});
        }
      }
    }
  }
}

TEST(Elementwise, AdamWNonDefaultHyperparameters) {
  proto::OptimizerConfig c = make(proto::OPTIMIZER_ADAMW);
  c.set_beta1(0.8);
  c.set_beta2(0.95);
  c.set_eps(1e-6);
  c.set_weight_decay(0.1);
  run_case({c, false, true});
}

TEST(Elementwise, LionMatchesReference) {
  for (bool bf16_grads : {false, true}) {
    proto::OptimizerConfig c = make(proto::OPTIMIZER_LION);
    c.set_weight_decay(0.1);
    SCOPED_TRACE(testing::Message() << "bf16 grads " << bf16_grads);
    run_case({c, bf16_grads, true});
  }
}

TEST(Elementwise, SgdVariantsMatchReference) {
  struct V {
    double momentum, dampening;
    bool nesterov;
  };
  for (const V v : {V{0.0, 0.0, false}, V{0.9, 0.0, false}, V{0.9, 0.0, true}, V{0.9, 0.1, false}}) {
    for (bool bf16_grads : {false, true}) {
      proto::OptimizerConfig c = make(proto::OPTIMIZER_SGD);
      c.set_momentum(v.momentum);
      c.set_dampening(v.dampening);
      c.set_nesterov(v.nesterov);
      c.set_weight_decay(0.01);
      SCOPED_TRACE(testing::Message() << "momentum " << v.momentum << " dampening " << v.dampening << " nesterov "
                                      << v.nesterov << " bf16 " << bf16_grads);
      run_case({c, bf16_grads, !bf16_grads});
    }
  }
}

TEST(Elementwise, StateSlotsPerKind) {
  EXPECT_EQ(state_values_per_element(resolve_optimizer_config(make(proto::OPTIMIZER_ADAMW))), 2);
  EXPECT_EQ(state_values_per_element(resolve_optimizer_config(make(proto::OPTIMIZER_LION))), 1);
  EXPECT_EQ(state_values_per_element(resolve_optimizer_config(make(proto::OPTIMIZER_SGD))), 0);
  proto::OptimizerConfig sgd = make(proto::OPTIMIZER_SGD);
  sgd.set_momentum(0.9);
  EXPECT_EQ(state_values_per_element(resolve_optimizer_config(sgd)), 1);
  EXPECT_EQ(state_values_per_element(resolve_optimizer_config(make(proto::OPTIMIZER_MUON))), 1);
  EXPECT_EQ(state_values_per_row(resolve_optimizer_config(make(proto::OPTIMIZER_NORMUON))), 1);
  EXPECT_EQ(state_values_per_row(resolve_optimizer_config(make(proto::OPTIMIZER_MUON))), 0);
}

TEST(Elementwise, FiniteCheckLeavesEverythingUntouched) {
  const OptimizerParams params = resolve_optimizer_config(make(proto::OPTIMIZER_ADAMW));
  std::vector<float> w = {1, 2, 3}, m = {0.5f, 0.5f, 0.5f}, v = {0.1f, 0.1f, 0.1f};
  const std::vector<float> w0 = w, m0 = m, v0 = v;
  std::vector<float> g = {0.1f, NAN, 0.2f};
  std::vector<float> w2 = {4, 5}, m2 = {0, 0}, v2 = {0, 0};
  std::vector<bf16> g2 = {float_to_bf16(INFINITY), float_to_bf16(1.0f)};
  ElementwiseSlice a{w.data(), nullptr, g.data(), DType::kF32, {m.data(), v.data()}, 3};
  ElementwiseSlice b{w2.data(), nullptr, g2.data(), DType::kBF16, {m2.data(), v2.data()}, 2};
  const std::vector<ElementwiseSlice> slices = {a, b};
  const StepResult r = elementwise_step(params, slices, 0.1f, 1, FiniteCheck::kGradients);
  EXPECT_FALSE(r.applied);
  EXPECT_EQ(r.nonfinite_gradients, 2);
  EXPECT_EQ(w, w0);
  EXPECT_EQ(m, m0);
  EXPECT_EQ(v, v0);
  EXPECT_EQ(w2, (std::vector<float>{4, 5}));
  // With finite gradients the checked step applies.
  g[1] = 0.3f;
  g2[0] = float_to_bf16(0.5f);
  const std::vector<ElementwiseSlice> ok = {a, b};
  const StepResult r2 = elementwise_step(params, ok, 0.1f, 1, FiniteCheck::kGradients);
  EXPECT_TRUE(r2.applied);
  EXPECT_EQ(r2.nonfinite_gradients, 0);
  EXPECT_NE(w, w0);
}

TEST(Elementwise, BadCallsThrowConfigError) {
  const OptimizerParams adamw = resolve_optimizer_config(make(proto::OPTIMIZER_ADAMW));
  std::vector<float> w(4, 1.0f), g(4, 0.1f), m(4, 0.0f);
  ElementwiseSlice missing_v{w.data(), nullptr, g.data(), DType::kF32, {m.data(), nullptr}, 4};
  EXPECT_THROW(elementwise_step(adamw, std::span(&missing_v, 1), 0.1f, 1), ConfigError);
  ElementwiseSlice ok{w.data(), nullptr, g.data(), DType::kF32, {m.data(), m.data()}, 4};
  EXPECT_THROW(elementwise_step(adamw, std::span(&ok, 1), 0.1f, 0), ConfigError);   // step < 1
  EXPECT_THROW(elementwise_step(adamw, std::span(&ok, 1), NAN, 1), ConfigError);    // lr
  ElementwiseSlice bad_dtype = ok;
  bad_dtype.grad_dtype = DType::kF16;
  EXPECT_THROW(elementwise_step(adamw, std::span(&bad_dtype, 1), 0.1f, 1), ConfigError);
  const OptimizerParams muon = resolve_optimizer_config(make(proto::OPTIMIZER_MUON));
  EXPECT_THROW(elementwise_step(muon, std::span(&ok, 1), 0.1f, 1), ConfigError);
  // Zero-size slices may carry null pointers.
  ElementwiseSlice empty{};
  EXPECT_NO_THROW(elementwise_step(adamw, std::span(&empty, 1), 0.1f, 1));
  try {
    elementwise_step(adamw, std::span(&missing_v, 1), 0.1f, 1);
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("state slot 1"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardopt::optim
