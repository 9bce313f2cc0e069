// End-to-end: N-rank training (threads backend, sharded optimizer) equals 1-rank training on the same
// global batch, and runs are deterministic given the seed.
//
// Tolerance: the ranks see the same sequences, but each rank's gradient is the mean over its B/N
// sequences and the engine averages the N rank means, while one rank sums all B in one pass: the
// float summation order differs (relative ~1e-7 per gradient element). Adam's normalization and
// Muon's Newton–Schulz turn that into update differences of the same relative order, which compound
// mildly over a few steps. With 5 steps of a tiny model we allow 2e-4 relative on the loss and
// 1e-4 absolute on parameters (whose scale is ~0.02-1): a wrong gradient slice, a missed
// reduction, a wrong averaging factor or a stale stage-3 parameter shifts them by > 1e-2.
#include "train/trainer.h"

#include <cmath>
#include <mutex>

#include <numeric>

#include <gtest/gtest.h>

#include "base/error.h"
#include "comm/thread_backend.h"
#include "sharding/layout.h"
#include "tests/train/train_fixture.h"

namespace shardopt::train {
namespace {

using test_fixture::run;

TrainConfig small_config(const std::string& optimizer) { return test_fixture::small_config(optimizer, 5); }

struct Case {
  int ranks;
  int stage;
  proto::ShardLayout layout;
  std::string optimizer;
  int grad_accumulation;
  bool local_grad_accumulation = false;  // full-size buffers instead of ZeRO-2 gradient shards
};

class NRankEqualsOneRank : public testing::TestWithParam<Case> {};

TEST_P(NRankEqualsOneRank, LossCurveAndFinalParameters) {
  const Case k = GetParam();
  TrainConfig c = small_config(k.optimizer);
  c.grad_accumulation = k.grad_accumulation;
  c.global_batch = std::lcm(c.global_batch, k.ranks * k.grad_accumulation);
  // The reference: one rank, the same micro-batches (a micro-batch is a sampler step of B/accum
  // sequences, so accumulation changes which sequences a step sees, not the N-rank equivalence).
  const auto want = run(1, c);
  c.zero_stage = k.stage;
  c.layout = k.layout;
  c.local_grad_accumulation = k.local_grad_accumulation;
  const auto got = run(k.ranks, c);
  ASSERT_EQ(got[0].history.size(), want[0].history.size());
  // The loss must actually move, or equal curves would prove nothing.
  EXPECT_LT(want[0].history.back().train_loss, want[0].history.front().train_loss - 0.05);
  for (size_t s = 0; s < want[0].history.size(); ++s) {
    const double a = got[0].history[s].train_loss, b = want[0].history[s].train_loss;
    EXPECT_NEAR(a, b, 2e-4 * std::abs(b)) << "step " << s + 1;
  }
  EXPECT_NEAR(got[0].final_val_loss, want[0].final_val_loss, 2e-4 * want[0].final_val_loss);
  for (int r = 0; r < k.ranks; ++r) {
    ASSERT_EQ(got[r].final_params.size(), want[0].final_params.size());
    for (size_t t = 0; t < want[0].final_params.size(); ++t) {
      double max_diff = 0;
      for (size_t i = 0; i < want[0].final_params[t].size(); ++i)
        max_diff = std::max(max_diff, double(std::abs(got[r].final_params[t][i] - want[0].final_params[t][i])));
      EXPECT_LT(max_diff, 1e-4) << "rank " << r << " tensor " << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Train, NRankEqualsOneRank,
    testing::Values(Case{2, 2, proto::SHARD_LAYOUT_OWNED, "muon", 1}, Case{4, 2, proto::SHARD_LAYOUT_OWNED, "adamw", 1},
                    Case{4, 2, proto::SHARD_LAYOUT_DIM0, "muon", 1}, Case{4, 3, proto::SHARD_LAYOUT_OWNED, "muon", 1},
                    Case{2, 2, proto::SHARD_LAYOUT_OWNED, "normuon", 2}, Case{2, 2, proto::SHARD_LAYOUT_OWNED, "muon", 3},
                    Case{2, 3, proto::SHARD_LAYOUT_DIM0, "muon", 2}, Case{2, 2, proto::SHARD_LAYOUT_OWNED, "adamw", 2, true}),
    [](const testing::TestParamInfo<Case>& info) {
      const Case& k = info.param;
      return "N" + std::to_string(k.ranks) + "_stage" + std::to_string(k.stage) +
             "_" + sharding::layout_name(k.layout) + "_" + k.optimizer + "_accum" +
             std::to_string(k.grad_accumulation) + (k.local_grad_accumulation ? "_local" : "");
    });

// The model asks for each gradient's buffer right before writing it, so a stage-2 run keeps only
// the engine's pool of bucket buffers (it never has every bucket open), and local accumulation
// keeps the full gradient.
TEST(Train, StageTwoGradientsLiveInThePoolOfBucketBuffers) {
  TrainConfig c = small_config("muon");
  c.steps = 2;
  c.grad_accumulation = 2;
  const auto pooled = run(2, c);
  c.local_grad_accumulation = true;
  const auto full = run(2, c);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(pooled[r].memory.grad_slots, 2) << "rank " << r;
    EXPECT_EQ(full[r].memory.grad_slots, 0) << "rank " << r;
    EXPECT_GE(full[r].memory.grad_buffer_bytes, 4 * pooled[r].num_params) << "rank " << r;
    EXPECT_LT(pooled[r].memory.grad_bytes(), full[r].memory.grad_bytes()) << "rank " << r;
  }
}

// Each rank's model on a 3-thread pool trains like the single-threaded one (same losses and
// parameters up to float reassociation).
TEST(Train, ThreadedModelTrainsLikeTheSingleThreadedOne) {
  TrainConfig c = small_config("muon");
  const auto serial = run(2, c);
  c.model_threads = 3;
  const auto threaded = run(2, c);
  EXPECT_LT(serial[0].history.back().train_loss, serial[0].history.front().train_loss - 0.05);
  for (size_t s = 0; s < serial[0].history.size(); ++s) {
    const double a = threaded[0].history[s].train_loss, b = serial[0].history[s].train_loss;
    EXPECT_NEAR(a, b, 2e-4 * std::abs(b)) << "step " << s + 1;
  }
  for (size_t t = 0; t < serial[0].final_params.size(); ++t)
    for (size_t i = 0; i < serial[0].final_params[t].size(); ++i)
      ASSERT_NEAR(threaded[1].final_params[t][i], serial[1].final_params[t][i], 1e-4) << "tensor " << t;
}

TEST(Train, SameSeedGivesIdenticalLosses) {
  TrainConfig c = small_config("muon");
  const auto a = run(2, c);
  const auto b = run(2, c);
  for (size_t s = 0; s < a[0].history.size(); ++s) EXPECT_EQ(a[0].history[s].train_loss, b[0].history[s].train_loss);
  c.seed = 2;
  const auto other = run(2, c);
  EXPECT_NE(other[0].history[0].train_loss, a[0].history[0].train_loss);
}

TEST(Train, LearningRateScheduleIsWarmupThenCosine) {
  TrainConfig c;
  c.steps = 110;
  c.warmup_steps = 10;
  c.min_lr_ratio = 0.1f;
  EXPECT_FLOAT_EQ(lr_multiplier(c, 5), 0.5f);
  EXPECT_FLOAT_EQ(lr_multiplier(c, 10), 1.0f);
  EXPECT_NEAR(lr_multiplier(c, 60), 0.1 + 0.9 * 0.5, 1e-6);  // half-way through the cosine
  EXPECT_NEAR(lr_multiplier(c, 110), 0.1, 1e-6);
}

TEST(Train, RejectsBatchNotDivisibleByRanks) {
  TrainConfig c = small_config("muon");
  c.global_batch = 10;
  try {
    c.validate(4);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("10 sequences"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("4 x 1"), std::string::npos) << e.what();
  }
  c.global_batch = 8;
  c.optimizer = "sgdx";
  EXPECT_THROW(c.validate(4), ConfigError);
}

}  // namespace
}  // namespace shardopt::train
