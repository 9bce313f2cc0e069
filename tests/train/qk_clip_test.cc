// MuonClip in the training job: the model's per-head max attention logits reach the Engine, the clip
// keeps them at tau (plus the one-step overshoot), and N ranks equal 1 rank with clipping on.
//
// Overshoot: the clip after step t uses S_t (the max logit of step t's forward, before the update)
// and scales the updated weights, so a clipped head's logit at step t+1 is
//   S_{t+1} = eta_t * S~_{t+1},  eta_t = tau / S_t,  S~_{t+1} = S_t + delta_t,
// where delta_t is what one step changes without the clip (the update, and the next batch). Hence
// S_{t+1} = tau + eta_t * delta_t <= tau + max(delta_t, 0), and a head at or below tau also ends
// at most tau + delta_t. delta_t is measured on the unclipped run (its largest one-step rise), with
// the check made meaningful by choosing tau so that the unclipped run ends far above tau + that rise.
#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>

#include "base/error.h"
#include "tests/train/train_fixture.h"
#include "train/trainer.h"

namespace shardopt::train {
namespace {

using test_fixture::run;

double max_logit_of_run(const TrainResult& r) {
  double m = 0;
  for (const auto& s : r.history) m = std::max(m, s.max_attention_logit);
  return m;
}

TEST(QkClipTrain, ClippedRunStaysAtTauPlusTheOneStepOvershoot) {
  TrainConfig c = test_fixture::small_config("muon", 40);
  c.matrix_lr = 0.06f;  // logits grow fast enough to exceed tau within the run
  const auto plain = run(1, c);
  const auto& h = plain[0].history;
  double max_rise = 0;
  for (size_t s = 1; s < h.size(); ++s) max_rise = std::max(max_rise, h[s].max_attention_logit - h[s - 1].max_attention_logit);
  const double first = h.front().max_attention_logit, last = max_logit_of_run(plain[0]);
  const auto tau = static_cast<float>(first + 0.3 * (last - first));
  ASSERT_GT(last, tau + 3 * max_rise) << "the unclipped run must end far above tau + overshoot, first " << first
                                      << " last " << last << " one-step rise " << max_rise;
  EXPECT_EQ(h.back().qk_clipped_heads, 0);

  c.qk_clip_tau = tau;
  const auto clipped = run(1, c);
  int64_t clipped_heads = 0;
  for (const auto& s : clipped[0].history) {
    clipped_heads += s.qk_clipped_heads;
    EXPECT_LE(s.max_attention_logit, tau + max_rise) << "step " << s.step << ", tau " << tau;
  }
  EXPECT_GT(clipped_heads, 0);
}

struct Case {
  int ranks, stage;
  proto::ShardLayout layout;
};
class QkClipNRank : public testing::TestWithParam<Case> {};

// Same tolerances as tests/train/train_test.cc's NRankEqualsOneRank (and why).
TEST_P(QkClipNRank, EqualsOneRankWithClippingOn) {
  const Case k = GetParam();
  TrainConfig c = test_fixture::small_config("muon", 6);
  const auto plain = run(1, c);
  // Below every step's max logit: heads clip at every step, and the global max (not a rank's) matters.
  c.qk_clip_tau = static_cast<float>(0.9 * plain[0].history.front().max_attention_logit);
  const auto want = run(1, c);
  int64_t clipped_heads = 0;
  for (const auto& s : want[0].history) clipped_heads += s.qk_clipped_heads;
  EXPECT_GT(clipped_heads, 0);
  double clip_effect = 0;  // the clip must change the weights, or the equality proves nothing about it
  for (size_t t = 0; t < want[0].final_params.size(); ++t)
    for (size_t i = 0; i < want[0].final_params[t].size(); ++i)
      clip_effect = std::max(clip_effect, double(std::abs(want[0].final_params[t][i] - plain[0].final_params[t][i])));
  EXPECT_GT(clip_effect, 1e-3);

  c.zero_stage = k.stage;
  c.layout = k.layout;
  const auto got = run(k.ranks, c);
  for (size_t s = 0; s < want[0].history.size(); ++s) {
    EXPECT_NEAR(got[0].history[s].train_loss, want[0].history[s].train_loss, 2e-4 * want[0].history[s].train_loss)
        << "step " << s + 1;
    EXPECT_NEAR(got[0].history[s].max_attention_logit, want[0].history[s].max_attention_logit,
                1e-3 * want[0].history[s].max_attention_logit)
        << "step " << s + 1 << ": the global max over ranks' batches";
    EXPECT_EQ(got[0].history[s].qk_clipped_heads, want[0].history[s].qk_clipped_heads) << "step " << s + 1;
  }
  for (int r = 0; r < k.ranks; ++r)
    for (size_t t = 0; t < want[0].final_params.size(); ++t) {
      double max_diff = 0;
      for (size_t i = 0; i < want[0].final_params[t].size(); ++i)
        max_diff = std::max(max_diff, double(std::abs(got[r].final_params[t][i] - want[0].final_params[t][i])));
      EXPECT_LT(max_diff, 1e-4) << "rank " << r << " tensor " << t;
    }
}

INSTANTIATE_TEST_SUITE_P(Train, QkClipNRank,
                         testing::Values(Case{2, 2, proto::SHARD_LAYOUT_OWNED}, Case{4, 2, proto::SHARD_LAYOUT_OWNED},
                                         Case{2, 3, proto::SHARD_LAYOUT_DIM0}, Case{4, 3, proto::SHARD_LAYOUT_DIM0}),
                         [](const testing::TestParamInfo<Case>& info) {
                           return "N" + std::to_string(info.param.ranks) + "_stage" +
                                  std::to_string(info.param.stage) +
                                  (info.param.layout == proto::SHARD_LAYOUT_DIM0 ? "_dim0" : "_owned");
                         });

TEST(QkClipTrain, NeedsAMatrixOptimizer) {
  TrainConfig c = test_fixture::small_config("adamw", 1);
  c.qk_clip_tau = 5.0f;
  try {
    c.validate(1);
    ADD_FAILURE() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--qk-clip-tau"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardopt::train
