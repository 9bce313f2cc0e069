// Atomicity: a save killed with SIGKILL at a random moment always leaves a loadable, intact latest
// checkpoint (the previous one, or the new one if it had completed).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "tests/ckpt/ckpt_test_util.h"

namespace shardopt::ckpt {
namespace {
using Clock = std::chrono::steady_clock;

constexpr int64_t kScale = 800;  // ~23 MB per checkpoint: long enough to be killed mid-write

// Independent check: every array equals the synthetic model regenerated from the step.
void expect_intact(const std::filesystem::path& dir, int64_t step) {
  CheckpointReader reader(dir);
  ASSERT_EQ(reader.step(), step);
  reader.validate_all();
  const auto model = testing::make_model(static_cast<uint64_t>(step), kScale);
  for (const auto& g : model.states) {
    std::vector<unsigned char> out(g.bytes.size());
    reader.read(g.tensor, g.state, 0, g.numel, out.data());
    ASSERT_EQ(out, g.bytes) << dir << " " << g.tensor << "/" << g.state;
  }
}

TEST(KillDuringSave, PreviousCheckpointStaysLoadable) {
  testing::TempDir tmp;
  const auto root = tmp.path();
  auto t0 = Clock::now();
  testing::save_checkpoint(root, testing::make_model(1, kScale), 2, 1, 1, 2);
  const double save_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::mt19937_64 rng(2024);
  int64_t latest_step = 1, completed = 0, interrupted = 0;
  const auto deadline = Clock::now() + std::chrono::seconds(25);
  for (int iter = 0; iter < 20 && Clock::now() < deadline; ++iter) {
    const int64_t step = iter + 2;
    const auto model = testing::make_model(static_cast<uint64_t>(step), kScale);  // before fork: kill hits the save
    const int world = 1 + iter % 3;
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      try {
        testing::save_checkpoint(root, model, world, step, step, /*keep_last=*/2);
      } catch (...) {
        ::_exit(3);
      }
      ::_exit(0);
    }
    const double delay = std::uniform_real_distribution<double>(0.0, 1.2 * save_seconds)(rng);
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0)) << "child save failed";

    const auto latest = latest_checkpoint(root);
    ASSERT_TRUE(latest.has_value()) << "no loadable checkpoint after kill at " << delay << " s";
    const int64_t found = CheckpointReader(*latest).step();
    ASSERT_TRUE(found == latest_step || found == step) << "latest step " << found;
    expect_intact(*latest, found);
    if (found == step) {
      ++completed;
      // The new one is complete: the one before it is kept (keep_last = 2) and intact too.
      expect_intact(checkpoint_dir(root, latest_step), latest_step);
    } else {
      ++interrupted;
    }
    latest_step = found;
  }
  RecordProperty("completed", static_cast<int>(completed));
  RecordProperty("interrupted", static_cast<int>(interrupted));
  EXPECT_GE(completed + interrupted, 5);
}

}  // namespace
}  // namespace shardopt::ckpt
