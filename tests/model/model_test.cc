// Transformer forward/backward against an independent double-precision reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "base/error.h"
#include "base/thread_pool.h"
#include "model/transformer.h"
#include "tests/model/reference_model.h"

namespace shardopt::model {
namespace {

using testing::RefConfig;
using testing::reference_forward;

ModelConfig tiny_config(Activation act = Activation::kGeluTanh) {
  ModelConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.context = 8;
  c.mlp_ratio = 4;
  c.activation = act;
  return c;
}

RefConfig ref_config(const ModelConfig& c) {
  return {c.vocab, c.d_model, c.n_layer, c.n_head, c.context, c.mlp_hidden(),
          c.activation == Activation::kReluSquared, static_cast<double>(c.norm_eps)};
}

// Parameter and gradient storage the test owns (the model never does).
struct Params {
  std::vector<std::vector<float>> value, grad;
  std::vector<ParamBinding> bindings;
  explicit Params(const Transformer& m) {
    for (const auto& p : m.params()) {
      value.emplace_back(static_cast<size_t>(p.numel()));
      grad.emplace_back(static_cast<size_t>(p.numel()), 0.0f);
    }
    for (size_t i = 0; i < value.size(); ++i) bindings.push_back({value[i].data(), grad[i].data()});
  }
  // Larger-than-init weights so attention is far from uniform and every nonlinearity matters.
  void randomize(const Transformer& m, uint32_t seed) {
    std::mt19937 gen(seed);
    for (size_t i = 0; i < value.size(); ++i) {
      const auto& p = m.params()[i];
      if (p.kind == ParamKind::kNormGain) {
        std::uniform_real_distribution<float> g(0.5f, 1.5f);
        for (float& v : value[i]) v = g(gen);
      } else {
        const float scale = p.kind == ParamKind::kEmbedding ? 1.0f : 1.5f / std::sqrt(float(p.shape[1]));
        std::normal_distribution<float> n(0.0f, scale);
        for (float& v : value[i]) v = n(gen);
      }
    }
  }
  std::vector<std::vector<double>> as_double() const {
    std::vector<std::vector<double>> out;
    for (const auto& v : value) out.emplace_back(v.begin(), v.end());
    return out;
  }
};

struct Tokens {
  std::vector<uint8_t> in, tgt;
};
Tokens random_tokens(int B, int T, uint32_t seed) {
  std::mt19937 gen(seed);
  Tokens t;
  for (int i = 0; i < B * T; ++i) {
    t.in.push_back(static_cast<uint8_t>(gen() % 256));
    t.tgt.push_back(static_cast<uint8_t>(gen() % 256));
  }
  return t;
}

constexpr int kB = 3, kT = 8;

TEST(Transformer, RegistersTensorsInOrderWithShapes) {
  Transformer m(tiny_config());
  const auto& p = m.params();
  ASSERT_EQ(p.size(), 2u + 8u * 2u + 2u);
  EXPECT_EQ(p.front().name, "tok_emb");
  EXPECT_EQ(p.front().shape, (std::vector<int64_t>{256, 16}));
  EXPECT_EQ(p[1].shape, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(p.back().name, "lm_head");
  EXPECT_EQ(p.back().shape, (std::vector<int64_t>{256, 16}));
  const auto li = m.layer_index(1);
  EXPECT_EQ(p[li.w_q].name, "layers.1.w_q");
  EXPECT_EQ(p[li.w_up].shape, (std::vector<int64_t>{64, 16}));
  EXPECT_EQ(p[li.w_down].shape, (std::vector<int64_t>{16, 64}));
  int64_t total = 0;
  for (const auto& s : p) total += s.numel();
  EXPECT_EQ(m.num_params(), total);
  const auto specs = m.tensor_specs();
  ASSERT_EQ(specs.size(), p.size());
  EXPECT_EQ(specs[li.w_k].name(), "layers.1.w_k");
  EXPECT_EQ(specs[li.w_k].shape_size(), 2);
  EXPECT_EQ(specs[li.w_k].dtype(), proto::F32);
  for (size_t i = 0; i < specs.size(); ++i) {
    const bool hidden = specs[i].shape_size() == 2 && i != m.tok_emb_index() && i != m.pos_emb_index() &&
                        i != m.lm_head_index();
    EXPECT_EQ(specs[i].group(), hidden ? "muon" : "adamw") << specs[i].name();
  }
  EXPECT_EQ(m.tensor_specs(false)[li.w_k].group(), "");
}

class GradCheck : public ::testing::TestWithParam<Activation> {};

TEST_P(GradCheck, LossLogitsAndMaxLogitMatchDoubleReference) {
  Transformer m(tiny_config(GetParam()));
  Params ps(m);
  ps.randomize(m, 7);
  const Tokens tok = random_tokens(kB, kT, 11);
  const float loss = m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  const auto ref = reference_forward(ref_config(m.config()), ps.as_double(), tok.in, tok.tgt, kB, kT);
  EXPECT_NEAR(loss, ref.loss, 1e-5 * std::fabs(ref.loss));
  double max_logit_abs = 0;
  for (size_t i = 0; i < ref.logits.size(); ++i) max_logit_abs = std::max(max_logit_abs, std::fabs(ref.logits[i]));
  for (size_t i = 0; i < ref.logits.size(); ++i) ASSERT_NEAR(m.logits()[i], ref.logits[i], 1e-5 * max_logit_abs) << i;
  const auto ml = m.max_attn_logits();
  ASSERT_EQ(ml.size(), ref.max_logit.size());
  for (size_t i = 0; i < ml.size(); ++i) {
    EXPECT_GT(ref.max_logit[i], 0.5) << "weights too small for a meaningful check";
    EXPECT_NEAR(ml[i], ref.max_logit[i], 1e-5 * ref.max_logit[i]) << "layer*head " << i;
  }
}

TEST_P(GradCheck, EveryTensorMatchesFiniteDifferencesOfDoubleReference) {
  Transformer m(tiny_config(GetParam()));
  Params ps(m);
  ps.randomize(m, 3);
  const Tokens tok = random_tokens(kB, kT, 5);
  m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kOverwrite);

  const RefConfig rc = ref_config(m.config());
  auto w = ps.as_double();
  std::mt19937 gen(99);
  for (size_t t = 0; t < w.size(); ++t) {
    const auto& spec = m.params()[t];
    std::vector<size_t> picks;
    if (spec.numel() <= 128) {
      for (size_t i = 0; i < w[t].size(); ++i) picks.push_back(i);
    } else {
      for (int i = 0; i < 64; ++i) picks.push_back(gen() % w[t].size());
      if (t == m.tok_emb_index())  // most rows are unused (zero gradient): also probe used ones
        for (int i = 0; i < 32; ++i) picks.push_back(size_t(tok.in[gen() % tok.in.size()]) * 16 + gen() % 16);
    }
    double max_fd = 0, max_err = 0, err2 = 0, fd2 = 0;
    for (size_t i : picks) {
      const double orig = w[t][i], h = 1e-5;
      w[t][i] = orig + h;
      const double lp = reference_forward(rc, w, tok.in, tok.tgt, kB, kT).loss;
      w[t][i] = orig - h;
      const double lm = reference_forward(rc, w, tok.in, tok.tgt, kB, kT).loss;
      w[t][i] = orig;
      const double fd = (lp - lm) / (2 * h);
      const double err = std::fabs(fd - ps.grad[t][i]);
      max_fd = std::max(max_fd, std::fabs(fd));
      max_err = std::max(max_err, err);
      err2 += err * err;
      fd2 += fd * fd;
    }
    EXPECT_GT(max_fd, 1e-6) << spec.name << ": vacuous check, all probed gradients are zero";
    EXPECT_LE(max_err, 2e-3 * max_fd + 1e-7) << spec.name;
    EXPECT_LE(std::sqrt(err2), 1e-3 * std::sqrt(fd2) + 1e-7) << spec.name;
  }
}

INSTANTIATE_TEST_SUITE_P(Activations, GradCheck,
                         ::testing::Values(Activation::kGeluTanh, Activation::kReluSquared),
                         [](const auto& info) { return info.param == Activation::kGeluTanh ? "Gelu" : "ReluSquared"; });

TEST(Transformer, OverwriteReplacesGarbageAndZeroesUnusedEmbeddingRows) {
  Transformer m(tiny_config());
  Params ps(m);
  ps.randomize(m, 1);
  const Tokens tok = random_tokens(kB, kT, 2);
  m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kOverwrite);
  const auto clean = ps.grad;
  EXPECT_THROW(m.backward(ps.bindings, GradMode::kOverwrite), ConfigError);  // once per forward
  for (auto& g : ps.grad) std::fill(g.begin(), g.end(), std::nanf(""));
  m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kOverwrite);
  for (size_t t = 0; t < clean.size(); ++t) EXPECT_EQ(ps.grad[t], clean[t]) << m.params()[t].name;
  std::vector<bool> used(256, false);
  for (uint8_t c : tok.in) used[c] = true;
  for (int r = 0; r < 256; ++r) {
    if (used[r]) continue;
    for (int i = 0; i < 16; ++i) ASSERT_EQ(ps.grad[0][r * 16 + i], 0.0f);
  }
}

TEST(Transformer, AccumulateAddsToExistingGradients) {
  Transformer m(tiny_config());
  Params ps(m);
  ps.randomize(m, 4);
  const Tokens t1 = random_tokens(kB, kT, 20), t2 = random_tokens(kB, kT, 21);
  m.forward(ps.bindings, t1.in.data(), t1.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kOverwrite);
  const auto g1 = ps.grad;
  m.forward(ps.bindings, t2.in.data(), t2.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kOverwrite);
  const auto g2 = ps.grad;
  m.forward(ps.bindings, t1.in.data(), t1.tgt.data(), kB, kT);
  m.backward(ps.bindings, GradMode::kAccumulate);  // g2 + g1
  for (size_t t = 0; t < g1.size(); ++t)
    for (size_t i = 0; i < g1[t].size(); ++i)
      ASSERT_NEAR(ps.grad[t][i], g1[t][i] + g2[t][i], 1e-6f * (std::fabs(g1[t][i]) + std::fabs(g2[t][i])) + 1e-12f)
          << m.params()[t].name << "[" << i << "]";
}

TEST(Transformer, GradReadyFiresOncePerTensorInReverseOrderWithFinalGradient) {
  Transformer m(tiny_config());
  Params ps(m);
  ps.randomize(m, 8);
  const Tokens tok = random_tokens(kB, kT, 9);
  m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  for (auto& g : ps.grad) std::fill(g.begin(), g.end(), 0.5f);  // accumulate onto a known base
  std::vector<size_t> order;
  std::vector<std::vector<float>> snapshot(ps.grad.size());
  m.backward(ps.bindings, GradMode::kAccumulate, [&](size_t idx) {
    order.push_back(idx);
    snapshot[idx] = ps.grad[idx];
  });
  ASSERT_EQ(order.size(), m.num_tensors());
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(order[i], m.num_tensors() - 1 - i);
  for (size_t t = 0; t < ps.grad.size(); ++t) {
    EXPECT_EQ(snapshot[t], ps.grad[t]) << m.params()[t].name << " changed after on_grad_ready";
    bool changed = false;
    for (float g : ps.grad[t]) changed |= g != 0.5f;
    EXPECT_TRUE(changed) << m.params()[t].name << " was never written";
  }
}

TEST(Transformer, FutureTokensDoNotChangeEarlierLogits) {
  Transformer m(tiny_config());
  Params ps(m);
  ps.randomize(m, 12);
  Tokens tok = random_tokens(kB, kT, 13);
  m.forward(ps.bindings, tok.in.data(), nullptr, kB, kT);
  const std::vector<float> before(m.logits(), m.logits() + kB * kT * 256);
  const int b = 1, t0 = 5;
  tok.in[b * kT + t0] ^= 0x5A;
  m.forward(ps.bindings, tok.in.data(), nullptr, kB, kT);
  for (int bb = 0; bb < kB; ++bb)
    for (int t = 0; t < kT; ++t) {
      double diff = 0;
      for (int c = 0; c < 256; ++c) {
        const size_t i = (size_t(bb) * kT + t) * 256 + c;
        diff = std::max(diff, double(std::fabs(m.logits()[i] - before[i])));
      }
      if (bb == b && t >= t0)
        EXPECT_GT(diff, 1e-3) << "position " << t << " should see the change";
      else
        EXPECT_LE(diff, 1e-6) << "sequence " << bb << " position " << t << " saw a future or foreign token";
    }
}

// The property data-parallel training rests on: the mean over N equal rank slices of each
// slice's mean-loss gradient equals the full batch's gradient.
TEST(Transformer, AveragedRankSliceGradientsEqualFullBatchGradient) {
  Transformer m(tiny_config());
  Params full(m), part(m);
  full.randomize(m, 30);
  part.value = full.value;
  for (size_t i = 0; i < part.value.size(); ++i) part.bindings[i].value = part.value[i].data();
  const int B = 4, N = 2;
  const Tokens tok = random_tokens(B, kT, 31);
  m.forward(full.bindings, tok.in.data(), tok.tgt.data(), B, kT);
  m.backward(full.bindings, GradMode::kOverwrite);
  for (int r = 0; r < N; ++r) {
    const size_t off = size_t(r) * (B / N) * kT;
    m.forward(part.bindings, tok.in.data() + off, tok.tgt.data() + off, B / N, kT);
    m.backward(part.bindings, r == 0 ? GradMode::kOverwrite : GradMode::kAccumulate);
  }
  for (size_t t = 0; t < full.grad.size(); ++t) {
    float scale = 0;
    for (float g : full.grad[t]) scale = std::max(scale, std::fabs(g));
    for (size_t i = 0; i < full.grad[t].size(); ++i)
      ASSERT_NEAR(part.grad[t][i] / N, full.grad[t][i], 1e-5f * scale) << m.params()[t].name;
  }
}

// The threaded forward/backward computes what the single-threaded one does (split matmuls and
// per-(sequence, head) attention only reorder independent work), with a larger batch so every
// thread gets rows, heads and weight rows to do.
TEST(Transformer, ThreadPoolGivesTheSameLossLogitsGradientsAndMaxLogits) {
  ModelConfig c = tiny_config();
  c.n_head = 4;
  Transformer serial(c), threaded(c);
  ThreadPool pool(3);
  threaded.set_thread_pool(&pool);
  EXPECT_EQ(threaded.threads(), 3);
  Params a(serial), b(threaded);
  a.randomize(serial, 60);
  b.value = a.value;
  for (size_t i = 0; i < b.value.size(); ++i) b.bindings[i].value = b.value[i].data();
  const int B = 5;
  const Tokens tok = random_tokens(B, kT, 61);
  for (int micro = 0; micro < 2; ++micro) {  // the second backward accumulates
    const auto mode = micro == 0 ? GradMode::kOverwrite : GradMode::kAccumulate;
    const float la = serial.forward(a.bindings, tok.in.data(), tok.tgt.data(), B, kT);
    const float lb = threaded.forward(b.bindings, tok.in.data(), tok.tgt.data(), B, kT);
    EXPECT_NEAR(lb, la, 1e-6f * std::fabs(la));
    for (int64_t i = 0; i < int64_t{B} * kT * c.vocab; ++i)
      ASSERT_NEAR(threaded.logits()[i], serial.logits()[i], 1e-5f) << "logit " << i;
    for (size_t i = 0; i < serial.max_attn_logits().size(); ++i)
      EXPECT_NEAR(threaded.max_attn_logits()[i], serial.max_attn_logits()[i], 1e-5f) << "layer*head " << i;
    serial.backward(a.bindings, mode);
    threaded.backward(b.bindings, mode);
  }
  for (size_t t = 0; t < a.grad.size(); ++t) {
    float scale = 0;
    for (float g : a.grad[t]) scale = std::max(scale, std::fabs(g));
    ASSERT_GT(scale, 0.0f) << serial.params()[t].name;
    for (size_t i = 0; i < a.grad[t].size(); ++i)
      ASSERT_NEAR(b.grad[t][i], a.grad[t][i], 1e-5f * scale) << serial.params()[t].name << " [" << i << "]";
  }
}

// backward with a GradBufferFn writes where the callback says, asks once per tensor right before
// writing it (before its on_grad_ready), and gives the same gradients as bound buffers.
TEST(Transformer, GradBufferCallbackIsAskedOncePerTensorBeforeItsReadyCall) {
  Transformer m(tiny_config());
  Params bound(m), lazy(m);
  bound.randomize(m, 70);
  lazy.value = bound.value;
  for (size_t i = 0; i < lazy.value.size(); ++i) lazy.bindings[i] = {lazy.value[i].data(), nullptr};
  const Tokens tok = random_tokens(kB, kT, 71);
  m.forward(bound.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  m.backward(bound.bindings, GradMode::kOverwrite);
  m.forward(lazy.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  std::vector<int> asked(m.num_tensors(), 0);
  std::vector<bool> ready(m.num_tensors(), false);
  for (auto& g : lazy.grad) std::fill(g.begin(), g.end(), std::nanf(""));  // overwrite mode must not read
  m.backward(
      lazy.bindings, GradMode::kOverwrite, [&](size_t t) { ready[t] = true; },
      [&](size_t t) {
        EXPECT_FALSE(ready[t]) << "buffer of " << m.params()[t].name << " asked after its ready call";
        ++asked[t];
        return lazy.grad[t].data();
      });
  for (size_t t = 0; t < m.num_tensors(); ++t) {
    EXPECT_EQ(asked[t], 1) << m.params()[t].name;
    EXPECT_EQ(lazy.grad[t], bound.grad[t]) << m.params()[t].name;
  }
}

TEST(Transformer, SmallerShapeAfterLargerReusesWorkspaceCorrectly) {
  Transformer big(tiny_config()), fresh(tiny_config());
  Params ps(big);
  ps.randomize(big, 40);
  const Tokens tok = random_tokens(kB, kT, 41);
  big.forward(ps.bindings, tok.in.data(), tok.tgt.data(), kB, kT);
  const float l_big = big.forward(ps.bindings, tok.in.data(), tok.tgt.data(), 2, 5);
  big.backward(ps.bindings, GradMode::kOverwrite);
  const auto g_big = ps.grad;
  const float l_fresh = fresh.forward(ps.bindings, tok.in.data(), tok.tgt.data(), 2, 5);
  fresh.backward(ps.bindings, GradMode::kOverwrite);
  EXPECT_EQ(l_big, l_fresh);
  for (size_t t = 0; t < g_big.size(); ++t) EXPECT_EQ(g_big[t], ps.grad[t]) << big.params()[t].name;
  auto w = ps.as_double();
  std::vector<uint8_t> in(tok.in.begin(), tok.in.begin() + 10), tg(tok.tgt.begin(), tok.tgt.begin() + 10);
  EXPECT_NEAR(l_fresh, reference_forward(ref_config(big.config()), w, in, tg, 2, 5).loss, 1e-4);
}

TEST(Transformer, InitIsDeterministicPerTensorAndScaled) {
  ModelConfig c = tiny_config();
  c.d_model = 64;
  c.n_layer = 4;
  Transformer m(c);
  Params a(m), b(m), other(m);
  std::vector<float*> pa, pb, po;
  for (size_t i = 0; i < m.num_tensors(); ++i) {
    pa.push_back(a.value[i].data());
    pb.push_back(b.value[i].data());
    po.push_back(other.value[i].data());
  }
  m.init(123, pa);
  m.init(123, pb);
  m.init(124, po);
  EXPECT_EQ(a.value, b.value);
  EXPECT_NE(a.value[2 + 1], other.value[2 + 1]);
  std::vector<float> single(a.value[5].size());
  m.init_tensor(123, 5, single.data());
  EXPECT_EQ(single, a.value[5]);
  auto stddev = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return std::sqrt(s / v.size());
  };
  const auto li = m.layer_index(2);
  EXPECT_NEAR(stddev(a.value[li.w_q]), 0.02, 0.002);
  EXPECT_NEAR(stddev(a.value[li.w_up]), 0.02, 0.001);
  EXPECT_NEAR(stddev(a.value[li.w_o]), 0.02 / std::sqrt(8.0), 0.0005);
  EXPECT_NEAR(stddev(a.value[li.w_down]), 0.02 / std::sqrt(8.0), 0.0003);
  for (float g : a.value[li.attn_norm]) EXPECT_EQ(g, 1.0f);
  EXPECT_NE(a.value[li.w_q], a.value[li.w_k]);
  // Near-uniform predictions at init: loss close to ln(256).
  Tokens tok = random_tokens(8, 8, 3);
  const float loss = m.forward(a.bindings, tok.in.data(), tok.tgt.data(), 8, 8);
  EXPECT_NEAR(loss, std::log(256.0), 0.1);
}

TEST(Transformer, RejectsBadConfigsAndCalls) {
  ModelConfig c = tiny_config();
  c.n_head = 3;
  EXPECT_THROW(Transformer{c}, ConfigError);
  c = tiny_config();
  c.context = 0;
  EXPECT_THROW(Transformer{c}, ConfigError);
  Transformer m(tiny_config());
  Params ps(m);
  ps.randomize(m, 1);
  const Tokens tok = random_tokens(1, 9, 1);
  EXPECT_THROW(m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), 1, 9), ConfigError);  // > context
  EXPECT_THROW(m.backward(ps.bindings, GradMode::kOverwrite), ConfigError);               // no forward yet
  std::vector<ParamBinding> short_list(ps.bindings.begin(), ps.bindings.end() - 1);
  EXPECT_THROW(m.forward(short_list, tok.in.data(), tok.tgt.data(), 1, 8), ConfigError);
  m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), 1, 8);
  auto no_grad = ps.bindings;
  no_grad[3].grad = nullptr;
  EXPECT_THROW(m.backward(no_grad, GradMode::kOverwrite), ConfigError);
  ps.value[m.layer_index(0).w_v][5] = std::nanf("");
  EXPECT_THROW(m.forward(ps.bindings, tok.in.data(), tok.tgt.data(), 1, 8), NumericError);
  EXPECT_THROW(m.backward(ps.bindings, GradMode::kOverwrite), ConfigError);  // that forward left nothing
  ModelConfig small_vocab = tiny_config();
  small_vocab.vocab = 16;
  Transformer sv(small_vocab);
  Params ps2(sv);
  std::vector<uint8_t> bad(8, 200);
  EXPECT_THROW(sv.forward(ps2.bindings, bad.data(), nullptr, 1, 8), ConfigError);
}

}  // namespace
}  // namespace shardopt::model
