// Atomicity: a save killed with SIGKILL at any moment leaves a loadable, intact latest checkpoint
// (the previous one, or the new one if it had been published) and nothing under the new step's final
// name unless it is complete. The kill moment adapts to the machine's speed until enough kills have
// landed mid-write, seen on disk: the temporary directory holds shard files, nothing was published.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "base/clock.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "tests/ckpt/ckpt_test_util.h"

namespace shardopt::ckpt {
namespace {

constexpr int64_t kScale = 800;      // ~23 MB per checkpoint: long enough to be killed mid-write
constexpr int kMidWriteKills = 4;    // required kills that landed while shard files were being written
constexpr double kBudgetSeconds = 90;  // bound on the whole test (a loaded 2-core machine is slow)

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

// Shard files present in a directory (0 if it does not exist).
int shard_files_in(const std::filesystem::path& dir) {
  std::error_code ec;
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (e.path().extension() == ".bin") ++n;
  return n;
}

// Runs save_checkpoint(step) in a child process and SIGKILLs it after `delay` seconds (a child that
// finished first exits normally). Returns after the child is gone.
void save_in_child_and_kill(const std::filesystem::path& root, const testing::SyntheticModel& model, int world,
                            int64_t step, double delay) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    try {
      testing::save_checkpoint(root, model, world, step, static_cast<uint64_t>(step), /*keep_last=*/2);
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(0);
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(delay));
  ::kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0)) << "child save failed";
}

TEST(KillDuringSave, PreviousCheckpointStaysLoadableAfterMidWriteKills) {
  testing::TempDir tmp;
  const auto root = tmp.path();
  const auto t0 = clock::now();
  testing::save_checkpoint(root, testing::make_model(1, kScale), 2, 1, 1, 2);
  const double save_seconds = clock::seconds_since(t0);

  std::mt19937_64 rng(2024);
  int64_t latest_step = 1, step = 1;
  int completed = 0, mid_write = 0, before_write = 0;
  double delay = 0.5 * save_seconds;
  const auto start = clock::now();
  while (mid_write < kMidWriteKills && clock::seconds_since(start) < kBudgetSeconds) {
    ++step;
    const auto model = testing::make_model(static_cast<uint64_t>(step), kScale);  // before fork: kill hits the save
    const int world = 1 + static_cast<int>(step % 3);
    const double this_delay = delay * std::uniform_real_distribution<double>(0.7, 1.3)(rng);
    save_in_child_and_kill(root, model, world, step, this_delay);
    if (HasFatalFailure()) return;

    const auto latest = latest_checkpoint(root);
    ASSERT_TRUE(latest.has_value()) << "no loadable checkpoint after a kill at " << this_delay << " s";
    const int64_t found = CheckpointReader(*latest).step();
    ASSERT_TRUE(found == latest_step || found == step) << "latest step " << found;
    expect_intact(*latest, found);
    if (found == step) {
      ++completed;
      // The new one is complete: the one before it is kept (keep_last = 2) and intact too.
      expect_intact(checkpoint_dir(root, latest_step), latest_step);
      latest_step = step;
      delay *= 0.6;  // too late: aim earlier
      continue;
    }
    // Interrupted: nothing may be visible under the final name, however far the save got.
    ASSERT_FALSE(std::filesystem::exists(checkpoint_dir(root, step)))
        << "an interrupted save left " << checkpoint_dir(root, step) << " (killed at " << this_delay << " s)";
    if (shard_files_in(temp_checkpoint_dir(root, step)) > 0) {
      ++mid_write;  // killed between the first shard file's creation and the publishing rename
    } else {
      ++before_write;
      delay = delay * 1.5 + 0.002;  // too early: aim later
    }
  }
  RecordProperty("completed", completed);
  RecordProperty("mid_write", mid_write);
  RecordProperty("before_write", before_write);
  EXPECT_GE(mid_write, kMidWriteKills) << "only " << mid_write << " of " << (step - 1)
                                       << " kills landed mid-write within " << kBudgetSeconds << " s (" << completed
                                       << " completed, " << before_write << " before the first write)";

  // After all the kills, an uninterrupted save publishes and loads, and keep_last removed the oldest.
  ++step;
  testing::save_checkpoint(root, testing::make_model(static_cast<uint64_t>(step), kScale), 3, step,
                           static_cast<uint64_t>(step), 2);
  const auto latest = latest_checkpoint(root);
  ASSERT_TRUE(latest.has_value());
  expect_intact(*latest, step);
  expect_intact(checkpoint_dir(root, latest_step), latest_step);
  EXPECT_EQ(list_checkpoints(root).size(), 2u);
}

}  // namespace
}  // namespace shardopt::ckpt
