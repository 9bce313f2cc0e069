// Checkpoint/resume and replica (NoLoCo / DiLoCo) wiring of train_rank.
//
// Resume: a run that saves at step 3 and a second run that resumes from that checkpoint at another
// world size (and stage/layout) must continue exactly where the first one went: the losses of steps
// 4-6 and the final parameters equal the uninterrupted run within the tolerance of train_test.cc's
// N-rank test (2e-4 relative on losses, 1e-4 absolute on parameters; only the float summation order
// of the gradient average differs). A resume that ignored the checkpoint restarts from the init and
// is off by > 1e-2 in both.
//
// Replicas: invariants that hold whatever the numbers are: after a DiLoCo outer step (and a NoLoCo one
// with the whole world in one group and alpha = gamma = 1, beta = 0: phi = mean theta) every replica
// holds the same parameters, while replicas that train on different data between outer steps drift
// apart (consensus distance > 0); the outer traffic is counted in bytes_per_rank.
#include <cmath>
#include <filesystem>
#include <sstream>
#include <fstream>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>
#include <unistd.h>

#include "base/error.h"
#include "comm/thread_backend.h"
#include "train/trainer.h"
#include "tests/train/train_fixture.h"

namespace shardopt::train {
namespace {

using test_fixture::run;

TrainConfig small_config() { return test_fixture::small_config("muon", 6); }

double max_param_diff(const TrainResult& a, const TrainResult& b) {
  EXPECT_EQ(a.final_params.size(), b.final_params.size());
  double d = 0;
  for (size_t t = 0; t < a.final_params.size(); ++t)
    for (size_t i = 0; i < a.final_params[t].size(); ++i)
      d = std::max(d, double(std::abs(a.final_params[t][i] - b.final_params[t][i])));
  return d;
}

class TempDir {
 public:
  TempDir() : path_(std::filesystem::temp_directory_path() / ("shardopt_wiring_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

TEST(Resume, ContinuesAtAnotherWorldSizeStageAndLayout) {
  TempDir tmp;
  TrainConfig c = small_config();
  c.seed = 7;
  c.save_every = 3;
  c.ckpt_dir = tmp.path().string();
  const auto full = run(4, c);  // saves at steps 3 and 6; the uninterrupted reference
  ASSERT_EQ(full[0].history.size(), 6u);
  ASSERT_EQ(full[0].saved_checkpoints.size(), 2u);
  EXPECT_LT(full[0].history.back().train_loss, full[0].history.front().train_loss - 0.05);

  struct Target {
    int ranks, stage;
    proto::ShardLayout layout;
  };
  for (const Target& t : {Target{2, 2, proto::SHARD_LAYOUT_OWNED}, Target{2, 3, proto::SHARD_LAYOUT_DIM0}}) {
    SCOPED_TRACE("resume at " + std::to_string(t.ranks) + " ranks, stage " + std::to_string(t.stage));
    TrainConfig r = small_config();
    r.seed = 99;  // ignored: a resume continues with the checkpoint's seed
    r.zero_stage = t.stage;
    r.layout = t.layout;
    r.resume_from = full[0].saved_checkpoints[0];
    const auto resumed = run(t.ranks, r);
    ASSERT_EQ(resumed[0].first_step, 4);
    ASSERT_EQ(resumed[0].history.size(), 3u);
    for (size_t s = 0; s < 3; ++s) {
      EXPECT_EQ(resumed[0].history[s].step, int64_t(s + 4));
      const double want = full[0].history[s + 3].train_loss;
      EXPECT_NEAR(resumed[0].history[s].train_loss, want, 2e-4 * std::abs(want)) << "step " << s + 4;
    }
    EXPECT_NEAR(resumed[0].final_val_loss, full[0].final_val_loss, 2e-4 * full[0].final_val_loss);
    for (int rank = 0; rank < t.ranks; ++rank) EXPECT_LT(max_param_diff(resumed[rank], full[0]), 1e-4) << rank;
  }
}

TEST(Resume, ResolvesLatestUnderRootAndRejectsMissing) {
  TempDir tmp;
  TrainConfig c = small_config();
  c.steps = 4;
  c.save_every = 2;
  c.keep_last = 1;
  c.ckpt_dir = tmp.path().string();
  const auto r = run(2, c);
  ASSERT_EQ(r[0].saved_checkpoints.size(), 2u);
  // The latest under the root (keep_last 1 removed ckpt-2), by root and by default.
  EXPECT_EQ(std::filesystem::path(resolve_resume_dir(c.ckpt_dir, "")), std::filesystem::path(r[0].saved_checkpoints[1]));
  EXPECT_EQ(std::filesystem::path(resolve_resume_dir("", c.ckpt_dir)), std::filesystem::path(r[0].saved_checkpoints[1]));
  EXPECT_EQ(resolve_resume_dir(r[0].saved_checkpoints[1], ""), r[0].saved_checkpoints[1]);
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(c.ckpt_dir) / "ckpt-2"));
  EXPECT_THROW(resolve_resume_dir((tmp.path() / "nothing").string(), ""), ConfigError);
  EXPECT_THROW(resolve_resume_dir("", ""), ConfigError);
  // Resuming a checkpoint that is already at --steps has nothing to do.
  c.save_every = 0;
  c.resume_from = r[0].saved_checkpoints[1];
  EXPECT_THROW(run(2, c), ConfigError);
}

TrainConfig replica_config(SyncMode mode) {
  TrainConfig c = small_config();
  c.sync = mode;
  c.replicas = 2;
  c.steps = 12;
  c.outer_every = 3;
  c.warmup_steps = 0;
  return c;
}

// NoLoCo and DiLoCo save per replica (phi, m, outer counters next to the engine state) and resume
// exactly: 4 replicas x 1 shard save at step 3 (between the outer steps at 2 and 4); resuming at 4 x 1
// and at 4 x 2 gives the uninterrupted run's losses of steps 4-7 and every replica's final parameters
// (tolerances of the resume test above). The run ends between outer steps, so the replicas differ; and
// NoLoCo's pairs change every outer step: a resume that shared one checkpoint, dropped phi / m, or
// restarted the outer step count (pairing) would not match.
TEST(Resume, ReplicatedRunsResumeExactlyAtEqualAndOtherShardCount) {
  TempDir tmp;
  for (SyncMode mode : {SyncMode::kNoLoCo, SyncMode::kDiLoCo}) {
    SCOPED_TRACE(sync_mode_name(mode));
    TrainConfig c = replica_config(mode);
    c.replicas = 4;
    c.steps = 7;
    c.outer_every = 2;
    c.save_every = 3;
    c.seed = 5;
    c.ckpt_dir = (tmp.path() / sync_mode_name(mode)).string();
    const auto full = run(4, c);
    ASSERT_EQ(full[0].saved_checkpoints.size(), 2u);
    EXPECT_EQ(std::filesystem::path(full[0].saved_checkpoints[0]).parent_path().filename(), "replica-0");
    EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(c.ckpt_dir) / "replica-3" / "ckpt-3" / "manifest.pb"));
    EXPECT_EQ(std::filesystem::path(resolve_resume_dir("", c.ckpt_dir)), std::filesystem::path(full[0].saved_checkpoints[1]));
    EXPECT_GT(max_param_diff(full[0], full[1]), 1e-3) << "the replicas differ at the end (the test needs it)";
    for (int ranks : {4, 8}) {
      SCOPED_TRACE("resume at " + std::to_string(ranks) + " ranks");
      TrainConfig r = c;
      r.seed = 99;  // ignored: a resume continues with the checkpoint's seed (data order and pairing)
      r.save_every = 0;
      r.resume_from = full[0].saved_checkpoints[0];
      const auto resumed = run(ranks, r);
      ASSERT_EQ(resumed[0].first_step, 4);
      ASSERT_EQ(resumed[0].history.size(), 4u);
      for (size_t s = 0; s < 4; ++s) {
        const double want = full[0].history[s + 3].train_loss;
        EXPECT_NEAR(resumed[0].history[s].train_loss, want, 2e-4 * std::abs(want)) << "step " << s + 4;
      }
      const int shards = ranks / 4;
      for (int rank = 0; rank < ranks; ++rank)
        EXPECT_LT(max_param_diff(resumed[rank], full[rank / shards]), 1e-4) << "rank " << rank;
    }
    // Another replica count cannot take over per-replica state: the error names both counts.
    TrainConfig wrong = c;
    wrong.replicas = 2;
    wrong.save_every = 0;
    wrong.resume_from = full[0].saved_checkpoints[0];
    try {
      run(4, wrong);
      ADD_FAILURE() << "expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("written by 4 replicas"), std::string::npos) << e.what();
    }
  }
}

// Straggler report: rank 2 spends 200 ms more in every step's compute. Every step after the first names
// it as the slowest (> 1.2 x the median), and its compute-time percentiles are above every other rank's.
// The first step is left out of the per-step check: every rank generates its GEMM kernels there (oneDNN's
// JIT), which can take as long as the delay on a loaded machine.
TEST(Straggler, SlowRankIsNamedAndItsPercentilesStandOut) {
  TrainConfig c = small_config();
  c.steps = 4;
  const int ranks = 4, slow = 2;
  std::vector<TrainResult> out(ranks);
  std::mutex mu;
  TrainHooks hooks;
  hooks.before_step = [&](int rank, int64_t) {
    if (rank == slow) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  };
  comm::run_ranks(ranks, [&](comm::Communicator& comm) {
    auto r = train_rank(comm, test_fixture::corpus(), c, hooks);
    std::lock_guard<std::mutex> lock(mu);
    out[comm.rank()] = std::move(r);
  });
  for (const StepRecord& r : out[0].history) {
    if (r.step == 1) continue;
    EXPECT_EQ(r.slowest_rank, slow) << "step " << r.step;
    EXPECT_GT(r.slowest_over_median, 1.2) << "step " << r.step;
  }
  const auto& t = out[0].step_compute_seconds_by_rank;
  ASSERT_EQ(t.size(), size_t(ranks));
  for (int r = 0; r < ranks; ++r) {
    EXPECT_EQ(t[r].max, out[r].step_compute_seconds_by_rank[r].max) << "the same table on every rank";
    EXPECT_LE(t[r].p50, t[r].p90);
    EXPECT_LE(t[r].p90, t[r].max);
    if (r != slow) { EXPECT_LT(t[r].max, t[slow].p50) << "rank " << r; }
  }
  EXPECT_GE(t[slow].p50, 0.2);
  // Independent percentiles of rank 2's own compute times would need its history; rank 0's p50 is
  // bounded by its summed compute time.
  EXPECT_LE(t[0].p50 * 2, out[0].compute_seconds + 1e-6);
}

// Rank r of a 2 x 2 world is replica r / 2, shard r % 2.
void expect_replicas_agree_and_learn(const std::vector<TrainResult>& got, const TrainConfig& c) {
  const auto& h = got[0].history;
  ASSERT_EQ(h.size(), size_t(c.steps));
  EXPECT_LT(h.back().train_loss, h.front().train_loss - 0.1);
  for (const auto& s : h) {
    const bool outer = s.step % c.outer_every == 0;
    EXPECT_EQ(s.outer_step, outer) << s.step;
    if (!outer) {
      EXPECT_TRUE(std::isnan(s.consensus_distance)) << s.step;
      // An inner step costs the same engine traffic every time (the outer step's refresh is not in it).
      EXPECT_EQ(s.bytes_per_rank, h.front().bytes_per_rank) << s.step;
      continue;
    }
    // Different data per replica between outer steps: the replicas drift apart.
    EXPECT_GT(s.consensus_distance, 0) << s.step;
    EXPECT_EQ(s.skipped_rounds, 0) << s.step;
    // The outer exchange is counted: an outer step sends more than the inner step before it.
    EXPECT_GT(s.bytes_per_rank, h[s.step - 2].bytes_per_rank) << s.step;
  }
  // The run ends on an outer step: both replicas hold the same model (the shards of one replica too).
  EXPECT_LT(max_param_diff(got[0], got[2]), 1e-6);
  EXPECT_LT(max_param_diff(got[1], got[3]), 1e-6);
  EXPECT_EQ(max_param_diff(got[0], got[1]), 0.0);
}

TEST(Replicas, DiLoCoTwoByTwoLearnsAndAgreesAfterOuterSteps) {
  const TrainConfig c = replica_config(SyncMode::kDiLoCo);
  expect_replicas_agree_and_learn(run(4, c), c);
}

TEST(Replicas, NoLoCoWholeGroupAveragesToOneModel) {
  TrainConfig c = replica_config(SyncMode::kNoLoCo);
  c.gossip_group = 2;  // both replicas in one group
  c.outer_lr = 1.0;    // alpha = gamma = 1, beta = 0: phi = mean theta
  c.outer_momentum = 0.0;
  expect_replicas_agree_and_learn(run(4, c), c);
}

// bytes_per_rank counts training traffic only. With 2 replicas, DiLoCo's ring all-reduce sends
// 2 B (N-1)/N = B per rank, the size of NoLoCo's single exchange (gamma = alpha: theta only), and the
// parameter refresh is the same: every step of the two runs sends the same bytes. The consensus
// distance (a cross-replica all-reduce of the shard for DiLoCo, a 2-float sum for NoLoCo) is logging
// and must not be in it.
TEST(Replicas, OuterStepBytesAreTheExchangeAloneInBothModes) {
  const TrainConfig diloco = replica_config(SyncMode::kDiLoCo);
  const TrainConfig noloco = replica_config(SyncMode::kNoLoCo);
  const auto d = run(4, diloco), n = run(4, noloco);
  for (int r = 0; r < 4; ++r) {
    ASSERT_EQ(d[r].history.size(), n[r].history.size());
    for (size_t k = 0; k < d[r].history.size(); ++k)
      EXPECT_EQ(d[r].history[k].bytes_per_rank, n[r].history[k].bytes_per_rank)
          << "rank " << r << " step " << d[r].history[k].step << (d[r].history[k].outer_step ? " (outer)" : "");
  }
}

TEST(Replicas, NoLoCoDefaultsLearn) {
  TrainConfig c = replica_config(SyncMode::kNoLoCo);
  const auto got = run(4, c);
  EXPECT_LT(got[0].history.back().train_loss, got[0].history.front().train_loss - 0.1);
  EXPECT_FALSE(std::isnan(got[0].final_consensus_distance));
}

TEST(Replicas, ValidationNamesTheProblem) {
  TrainConfig c = replica_config(SyncMode::kNoLoCo);
  c.replicas = 3;
  try {
    c.validate(4);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--replicas (3) must divide the world size"), std::string::npos) << e.what();
  }
  c.replicas = 2;
  c.save_every = 2;
  c.ckpt_dir = "/tmp/unused";
  EXPECT_NO_THROW(c.validate(4));  // gossip state is checkpointed per replica
  c.sync = SyncMode::kZero;
  EXPECT_THROW(c.validate(4), ConfigError);  // zero with replicas > 1
  c.replicas = 1;
  EXPECT_NO_THROW(c.validate(4));
  c.ckpt_dir.clear();
  EXPECT_THROW(c.validate(4), ConfigError);  // --save-every without --ckpt-dir
}


// A communication error ends the run with every rank's flight record in the run folder: rank 1
// stalls at step 3 for longer than the 400 ms communicator timeout, so rank 0's first collective of
// step 3 (a gradient reduction inside Engine::step) times out. Rank 0's error names its file, and the
// file says where each of its communicators stopped: the world stopped at an op it issued in step 3,
// after the steps 1-2 operations completed.
TEST(FlightRecords, TimeoutWritesEveryRanksRecordIntoTheRunFolder) {
  const auto dir = std::filesystem::temp_directory_path() / ("flight_records_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  TrainConfig c = test_fixture::small_config("adamw", 4);
  TrainHooks hooks;
  hooks.flight_record_dir = dir.string();
  hooks.before_step = [](int rank, int64_t step) {
    if (rank == 1 && step == 3) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  };
  std::mutex mu;
  std::vector<std::string> errors(2);
  comm::CommOptions options;
  options.timeout = std::chrono::milliseconds(400);
  comm::run_ranks(
      2,
      [&](comm::Communicator& world) {
        try {
          train_rank(world, test_fixture::corpus(), c, hooks);
        } catch (const Error& e) {
          std::lock_guard lock(mu);
          errors[static_cast<size_t>(world.rank())] = e.what();
        }
      },
      options);
  const std::string path0 = flight_record_path(dir.string(), 0);
  ASSERT_FALSE(errors[0].empty()) << "rank 0 must fail: its partner stalled past the timeout";
  EXPECT_NE(errors[0].find("flight records of every communicator of rank 0: " + path0), std::string::npos) << errors[0];
  std::ifstream in(path0);
  ASSERT_TRUE(in.good()) << "no flight record at " << path0;
  std::stringstream text;
  text << in.rdbuf();
  const std::string report = text.str();
  EXPECT_EQ(report.rfind("rank 0 of 2 ended the run: ", 0), 0u) << report;
  // Where the world stopped: the first gradient reduce-scatter of step 3, which rank 1 never joined.
  const size_t at = report.find("world (rank 0 of 2): stopped at seq ");
  ASSERT_NE(at, std::string::npos) << report;
  const std::string stop_line = report.substr(at, report.find('\n', at) - at);
  EXPECT_NE(stop_line.find("reduce_scatter"), std::string::npos) << stop_line;
  EXPECT_NE(stop_line.find("(failed)"), std::string::npos) << stop_line;
  EXPECT_NE(report.find("flight recorder world (rank 0 of 2, last "), std::string::npos) << report;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace shardopt::train
