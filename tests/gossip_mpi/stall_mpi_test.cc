// A stalled replica under mpirun (MPI backend, 4 replicas x 1 shard, NoLoCo pairs): one rank (or the
// ranks named by SHARDOPT_TEST_STALL_RANKS, e.g. a whole node of the namespace harness) stops
// itself with SIGSTOP before a step, for several times the gossip timeout, and a helper process sends
// SIGCONT. The other replicas must keep training while it is stopped (no per-step collective joins the
// replicas), its partner of the first outer round after the stop must record that round as skipped,
// and the stalled rank must catch up: finish every step (skipping the rounds its partners abandoned)
// and meet the others in the end-of-run collectives. Every rank's train_rank returns normally.
//
// Robust to a loaded machine: the stop lasts 4 x the 2 s gossip timeout, and the assertions are on
// steps and skip counts, never on durations. Progress is observed through small files (one per rank,
// the last step begun) that the stalled rank reads when it wakes up.
#include <gtest/gtest.h>
#include <mpi.h>
#include <signal.h>
#include <spawn.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <set>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "comm/mpi_backend.h"
#include "model/data.h"
#include "runtime/gossip/outer_sync.h"
#include "tests/common/mpi_suite_main.h"
#include "train/trainer.h"

extern char** environ;

namespace shardopt::train {
namespace {

comm::Communicator* g_world = nullptr;  // set by main()

const model::ByteCorpus& corpus() {
  static const model::ByteCorpus c = model::ByteCorpus::load(SHARDOPT_SOURCE_DIR "/data/tinyshakespeare.txt");
  return c;
}

// Stops this process and has a child process continue it after `seconds`.
void stop_for(int seconds) {
  const std::string script = "sleep " + std::to_string(seconds) + "; kill -CONT " + std::to_string(::getpid());
  const char* argv[] = {"sh", "-c", script.c_str(), nullptr};
  pid_t child = 0;
  ASSERT_EQ(posix_spawnp(&child, "sh", nullptr, nullptr, const_cast<char* const*>(argv), environ), 0);
  ::raise(SIGSTOP);
}

int read_step(const std::filesystem::path& file) {
  std::ifstream in(file);
  int step = -1;
  in >> step;
  return step;
}

TEST(StalledReplica, OthersSkipAndKeepTrainingTheStalledOneCatchesUp) {
  comm::Communicator& world = *g_world;
  const int replicas = world.size();
  ASSERT_GE(replicas, 4) << "run with mpirun -np 4 or more (one shard per replica)";
  TrainConfig c;
  c.model.d_model = 32;
  c.model.n_layer = 2;
  c.model.n_head = 2;
  c.model.context = 16;
  c.global_batch = 2 * replicas;
  c.steps = 30;
  c.optimizer = "adamw";
  c.warmup_steps = 2;
  c.eval_every = 0;
  c.eval_batches = 1;
  c.log_every = 0;
  c.trace_steps = 0;
  c.sample_chars = 0;
  c.bucket_bytes = 8192;
  c.sync = SyncMode::kNoLoCo;
  c.replicas = replicas;
  c.outer_every = 3;
  c.gossip_group = 2;
  c.outer_timeout_ms = 2000;
  // The stalled ranks: the last one, or those listed in SHARDOPT_TEST_STALL_RANKS ("2,3": a whole
  // node of the 2-node namespace run). They stop before stop_step for stop_seconds.
  std::set<int> stalled;
  if (const char* list = std::getenv("SHARDOPT_TEST_STALL_RANKS")) {
    std::stringstream ss(list);
    for (std::string item; std::getline(ss, item, ',');) stalled.insert(std::stoi(item));
  } else {
    stalled.insert(replicas - 1);
  }
  for (int r : stalled) ASSERT_TRUE(r >= 0 && r < replicas) << "SHARDOPT_TEST_STALL_RANKS names rank " << r;
  const bool i_stall = stalled.count(world.rank()) > 0;
  const int stop_step = 5, stop_seconds = 8;
  // The first outer round after the stop (at step 6: round index 1). A seed whose pairing of that round
  // joins a stalled rank with one that keeps running (same seed on every rank: a pure function).
  const int first_round_step = ((stop_step + c.outer_every - 1) / c.outer_every) * c.outer_every;
  const int64_t first_round = first_round_step / c.outer_every - 1;
  std::map<int, int> partner;  // this round's partner of every replica
  for (;; ++c.seed) {
    partner.clear();
    for (const auto& g : runtime::gossip::outer_groups(replicas, 2, runtime::gossip::OddGroupPolicy::kMerge, c.seed,
                                                       first_round))
      if (g.size() == 2) partner[g[0]] = g[1], partner[g[1]] = g[0];
    bool mixed = false;
    for (int r : stalled)
      if (partner.count(r) && !stalled.count(partner[r])) mixed = true;
    if (mixed) break;
  }
  // One folder for every rank's progress file: rank 0's pid names it.
  int64_t tag = ::getpid();
  world.broadcast(&tag, 1, DType::kI64, 0)->wait();
  const auto dir = std::filesystem::temp_directory_path() / ("shardopt_stall_" + std::to_string(tag));
  std::filesystem::create_directories(dir);
  std::vector<int> others_at_wake;

  TrainHooks hooks;
  hooks.before_step = [&](int rank, int64_t step) {
    {
      const auto tmp = dir / ("rank" + std::to_string(rank) + ".tmp");
      std::ofstream(tmp) << step << "\n";
      std::filesystem::rename(tmp, dir / ("rank" + std::to_string(rank)));
    }
    if (!i_stall || step != stop_step) return;
    stop_for(stop_seconds);
    for (int r = 0; r < replicas; ++r)
      if (!stalled.count(r)) others_at_wake.push_back(read_step(dir / ("rank" + std::to_string(r))));
  };
  const TrainResult result = train_rank(world, corpus(), c, hooks);
  world.barrier()->wait();
  if (world.rank() == 0) std::filesystem::remove_all(dir);

  const int rank = world.rank();
  ASSERT_EQ(result.history.size(), static_cast<size_t>(c.steps)) << "rank " << rank;
  for (const auto& s : result.history) ASSERT_TRUE(std::isfinite(s.train_loss)) << "rank " << rank << " step " << s.step;
  // Skips of this rank per outer round, from the cumulative count.
  std::vector<int> skipped_in_round;
  int64_t before = 0;
  for (const auto& s : result.history)
    if (s.outer_step) {
      skipped_in_round.push_back(static_cast<int>(s.skipped_rounds - before));
      before = s.skipped_rounds;
    }
  std::printf("rank %d%s: %lld skipped rounds of %zu\n", rank, i_stall ? " (stalled)" : "", static_cast<long long>(result.skipped_rounds),
              skipped_in_round.size());
  const bool partner_stalled = partner.count(rank) && stalled.count(partner[rank]);
  if (i_stall) {
    ASSERT_EQ(others_at_wake.size(), static_cast<size_t>(replicas) - stalled.size());
    for (int step : others_at_wake)
      EXPECT_GT(step, first_round_step) << "another replica was still at step " << step
                                        << " when the stalled rank woke up: something joined it to the stalled one";
    if (partner.count(rank) && !partner_stalled) {
      EXPECT_GE(result.skipped_rounds, 1) << "its partner abandoned round " << first_round;
    }
  } else if (partner_stalled) {
    EXPECT_EQ(skipped_in_round.at(static_cast<size_t>(first_round)), 1)
        << "the partner of stalled rank " << partner[rank] << " must skip round " << first_round;
  }
}

}  // namespace
}  // namespace shardopt::train

int main(int argc, char** argv) {
  shardopt::comm::CommOptions options = shardopt::comm::CommOptions::from_env();
  options.timeout = std::chrono::milliseconds(300000);  // the end-of-run collectives wait for the stalled rank
  return shardopt::test_fixture::run_mpi_suite(argc, argv, "stall MPI suite", options, &shardopt::train::g_world);
}
