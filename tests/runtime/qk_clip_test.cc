// MuonClip through the Engine: set_attention_max_logits -> global max over ranks -> every holder of
// W_q / W_k master rows scales them after the Muon step, in every stage and layout.
//
// With weight decay 0, neither Muon's nor AdamW's update depends on the current weights, so a run
// with clipping and a run without it apply the same updates dW_t; the clipped weights then follow the
// double recursion W <- f_h * (W + dW_t) (f_h = (tau/S_h)^alpha on W_q, ^(1-alpha) on W_k, 1 when
// S_h <= tau), which the tests check against 1-rank unclipped runs.
#include "runtime/engine.h"

#include <cmath>
#include <mutex>

#include <gtest/gtest.h>

#include "base/error.h"
#include "comm/thread_backend.h"
#include "tests/common/engine_reference.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

constexpr int kHeads = 4;
constexpr size_t kWq = 1, kWk = 2;  // indices in specs()

// W_q and W_k with 4 heads of 2 rows (W_k larger than a 600-byte bucket), between other tensors.
std::vector<proto::TensorSpec> specs() {
  return {spec("tok_embed", {13, 8}), spec("layer0.w_q", {8, 8}), spec("layer0.w_k", {8, 24}),
          spec("layer0.w_up", {24, 8}), spec("lm_head", {13, 8})};
}

EngineOptions options(int stage, proto::ShardLayout layout, float tau) {
  EngineOptions o = engine_options(stage, layout, "muon");
  o.matrix_optimizer.set_weight_decay(0);
  o.elementwise_optimizer.set_weight_decay(0);
  if (tau > 0) {
    o.matrix_optimizer.mutable_qk_clip()->set_enabled(true);
    o.matrix_optimizer.mutable_qk_clip()->set_tau(tau);
    o.matrix_optimizer.mutable_qk_clip()->set_alpha(0.3);  // asymmetric: a swapped exponent shows
  }
  return o;
}

// Global max logit of head h at step s (0-based); heads 1 and 3 exceed tau = 1 at every step.
double global_logit(int s, int h) {
  const double base[kHeads] = {0.5, 2.0, 1.0, 3.5};
  return base[h] * (1.0 + 0.25 * s);  // head 0 stays below 1 until s = 4; head 2 crosses at s = 1
}
// What rank r reports: the global value on one rank per head (a different one per head), less elsewhere.
float local_logit(int s, int h, int rank, int world) {
  const double g = global_logit(s, h);
  return static_cast<float>(rank == (h + s) % world ? g : 0.5 * g);
}

struct ClipRun {
  std::vector<std::vector<std::vector<float>>> params_after_step;  // [step][tensor] (rank 0's full view)
  std::vector<StepReport> reports;                                 // rank 0's
  bool ranks_agree = true;  // every rank holds the same full parameters at the end
};

ClipRun run(int world, int stage, proto::ShardLayout layout, float tau, int steps) {
  ClipRun out;
  std::mutex mu;
  std::vector<std::vector<std::vector<float>>> final_by_rank(world);
  const auto sp = specs();
  comm::run_ranks(world, [&](comm::Communicator& comm) {
    Engine engine(comm, sp, options(stage, layout, tau));
    engine.set_params([&](size_t t, float* dst) {
      for (int64_t i = 0; i < numel(sp[t]); ++i) dst[i] = initial_value(t, i);
    });
    auto snapshot = [&] {
      if (stage == 3) engine.gather_all();
      std::vector<std::vector<float>> p(sp.size());
      for (size_t t = 0; t < sp.size(); ++t) p[t].assign(engine.param(t), engine.param(t) + numel(sp[t]));
      if (stage == 3) engine.release_all();
      return p;
    };
    for (int s = 0; s < steps; ++s) {
      for (size_t t = 0; t < sp.size(); ++t) {
        float* g = engine.grad(t);
        for (int64_t i = 0; i < numel(sp[t]); ++i)
          g[i] = common_grad(s, t, i) + rank_offset(comm.rank(), world, t, i);
        engine.grad_ready(t);
      }
      std::vector<float> logits(kHeads);
      for (int h = 0; h < kHeads; ++h) logits[h] = local_logit(s, h, comm.rank(), world);
      engine.set_attention_max_logits(kWq, kWk, logits);
      StepReport report = engine.step();
      auto p = snapshot();
      std::lock_guard<std::mutex> lock(mu);
      if (comm.rank() == 0) {
        out.params_after_step.push_back(std::move(p));
        out.reports.push_back(std::move(report));
      } else if (s == steps - 1) {
        final_by_rank[comm.rank()] = std::move(p);
      }
    }
  });
  for (int r = 1; r < world; ++r) out.ranks_agree &= final_by_rank[r] == out.params_after_step.back();
  return out;
}

struct Case {
  int world, stage;
  proto::ShardLayout layout;
};

class QkClipEngine : public testing::TestWithParam<Case> {};

TEST_P(QkClipEngine, ClippedWeightsFollowTheDoubleReferenceOnEveryLayout) {
  const Case k = GetParam();
  const float tau = 1.0f;
  const double alpha = 0.3;
  const int steps = 3;
  const ClipRun plain = run(1, 2, proto::SHARD_LAYOUT_OWNED, 0.0f, steps);  // unclipped, 1 rank
  const ClipRun clipped = run(k.world, k.stage, k.layout, tau, steps);
  ASSERT_EQ(clipped.reports.size(), static_cast<size_t>(steps));
  EXPECT_TRUE(clipped.ranks_agree) << "every rank must hold the same clipped parameters";
  EXPECT_TRUE(plain.reports[0].attention_max_logits.empty());  // clipping off: no exchange

  const auto sp = specs();
  std::vector<std::vector<double>> ref(sp.size()), prev_plain(sp.size());
  for (size_t t = 0; t < sp.size(); ++t)
    for (int64_t i = 0; i < numel(sp[t]); ++i) {
      ref[t].push_back(initial_value(t, i));
      prev_plain[t].push_back(initial_value(t, i));
    }
  for (int s = 0; s < steps; ++s) {
    const StepReport& rep = clipped.reports[s];
    int64_t expect_clipped = 0;
    ASSERT_EQ(rep.attention_max_logits.size(), static_cast<size_t>(kHeads));
    for (int h = 0; h < kHeads; ++h) {
      // The all-reduce max over ranks, not this rank's value.
      EXPECT_FLOAT_EQ(rep.attention_max_logits[h], static_cast<float>(global_logit(s, h))) << "step " << s << " head " << h;
      expect_clipped += global_logit(s, h) > tau ? 1 : 0;
    }
    EXPECT_EQ(rep.qk_clipped_heads, expect_clipped) << "step " << s;
    for (size_t t = 0; t < sp.size(); ++t) {
      const int64_t cols = sp[t].shape_size() == 2 ? sp[t].shape(1) : 1;
      const int64_t head_rows = sp[t].shape(0) / kHeads;
      const auto& now_plain = plain.params_after_step[s][t];
      for (int64_t i = 0; i < numel(sp[t]); ++i) {
        const double dw = static_cast<double>(now_plain[i]) - prev_plain[t][i];  // the update, same in both runs
        double f = 1.0;
        if (t == kWq || t == kWk) {
          const double S = global_logit(s, static_cast<int>(i / cols / head_rows));
          const double eta = std::min(1.0, tau / S);
          f = std::pow(eta, t == kWq ? alpha : 1.0 - alpha);
        }
        ref[t][i] = f * (ref[t][i] + dw);
        prev_plain[t][i] = now_plain[i];
        const float got = clipped.params_after_step[s][t][i];
        ASSERT_NEAR(got, ref[t][i], 2e-6 * (1 + std::abs(ref[t][i])))
            << "step " << s << " tensor " << sp[t].name() << " element " << i << " factor " << f;
      }
    }
  }
  // The clip must have changed something, or equality with the reference would prove nothing.
  double moved = 0;
  for (size_t i = 0; i < plain.params_after_step.back()[kWk].size(); ++i)
    moved = std::max(moved, std::abs(double(plain.params_after_step.back()[kWk][i]) - clipped.params_after_step.back()[kWk][i]));
  EXPECT_GT(moved, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Layouts, QkClipEngine,
                         testing::Values(Case{1, 2, proto::SHARD_LAYOUT_OWNED}, Case{2, 2, proto::SHARD_LAYOUT_OWNED},
                                         Case{4, 2, proto::SHARD_LAYOUT_OWNED}, Case{2, 3, proto::SHARD_LAYOUT_DIM0},
                                         Case{4, 3, proto::SHARD_LAYOUT_DIM0}, Case{4, 1, proto::SHARD_LAYOUT_DIM0}),
                         [](const testing::TestParamInfo<Case>& info) {
                           return "N" + std::to_string(info.param.world) + "_stage" + std::to_string(info.param.stage) +
                                  (info.param.layout == proto::SHARD_LAYOUT_DIM0 ? "_dim0" : "_owned");
                         });

TEST(QkClipEngineErrors, AStepWithoutFreshLogitsOrAHeadMismatchIsRefused) {
  comm::run_ranks(1, [&](comm::Communicator& comm) {
    Engine engine(comm, specs(), options(2, proto::SHARD_LAYOUT_OWNED, 1.0f));
    const std::vector<float> four(kHeads, 0.5f), three(3, 0.5f);
    EXPECT_THROW(engine.set_attention_max_logits(kWq, kWk, three), ConfigError);  // 8 rows, 3 heads
    engine.set_attention_max_logits(kWq, kWk, four);
    engine.step();
    try {
      engine.step();  // the pair was registered but not set for this step
      ADD_FAILURE() << "expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("layer0.w_q"), std::string::npos) << e.what();
    }
  });
}

}  // namespace
}  // namespace shardopt::runtime
