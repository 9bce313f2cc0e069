#include "base/thread_pool.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"

namespace shardopt {
namespace {

// Every index runs exactly once, on a valid thread index, for several pool sizes and task
// counts (fewer, equal and more tasks than threads). Written so ThreadSanitizer sees every
// cross-thread access (-DSHARDOPT_SANITIZE=thread).
TEST(ThreadPool, RunsEveryTaskExactlyOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (int64_t n : {0, 1, 2, 7, 1000}) {
      for (int round = 0; round < 3; ++round) {  // reuse across calls
        std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
        std::vector<int> owner(static_cast<size_t>(n), -1);  // each slot written by its one task
        std::atomic<bool> bad_thread{false};
        pool.parallel_for(n, [&](int64_t task, int thread) {
          if (thread < 0 || thread >= threads) bad_thread = true;
          runs[static_cast<size_t>(task)].fetch_add(1);
          owner[static_cast<size_t>(task)] = thread;
        });
        EXPECT_FALSE(bad_thread);
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_EQ(runs[static_cast<size_t>(i)].load(), 1) << "threads " << threads << " n " << n << " task " << i;
          EXPECT_GE(owner[static_cast<size_t>(i)], 0);  // the write is visible to the caller after return
        }
      }
    }
  }
}

// Each thread index is used by one thread at a time: per-thread scratch needs no locking.
TEST(ThreadPool, ThreadIndexIsExclusive) {
  ThreadPool pool(4);
  std::vector<std::atomic<int>> in_use(4);
  std::atomic<bool> shared{false};
  pool.parallel_for(2000, [&](int64_t, int thread) {
    if (in_use[static_cast<size_t>(thread)].fetch_add(1) != 0) shared = true;
    volatile double x = 0;
    for (int k = 0; k < 100; ++k) x = x + k;
    in_use[static_cast<size_t>(thread)].fetch_sub(1);
  });
  EXPECT_FALSE(shared);
}

TEST(ThreadPool, ExceptionsPropagateToTheCallerAndThePoolStaysUsable) {
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    std::atomic<int> ran{0};
    EXPECT_THROW(pool.parallel_for(100,
                                   [&](int64_t task, int) {
                                     ran.fetch_add(1);
                                     if (task == 17) throw NumericError("task 17 failed");
                                   }),
                 NumericError);
    EXPECT_GE(ran.load(), 1);
    EXPECT_LE(ran.load(), 100);
    std::atomic<int64_t> sum{0};
    pool.parallel_for(100, [&](int64_t task, int) { sum.fetch_add(task); });
    EXPECT_EQ(sum.load(), 99 * 100 / 2);
  }
}

TEST(ThreadPool, NestedCallsRunInlineOnTheCallingThread) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> runs(50);
  std::atomic<bool> index_changed{false};
  pool.parallel_for(5, [&](int64_t outer, int thread) {
    pool.parallel_for(10, [&](int64_t inner, int inner_thread) {
      if (inner_thread != thread) index_changed = true;
      runs[static_cast<size_t>(outer * 10 + inner)].fetch_add(1);
    });
  });
  EXPECT_FALSE(index_changed);
  for (auto& r : runs) EXPECT_EQ(r.load(), 1);
}

TEST(ThreadPool, RejectsZeroThreads) { EXPECT_THROW(ThreadPool(0), ConfigError); }

TEST(ThreadPool, DefaultThreadCountHonoursOverrideAndLocalRanks) {
  ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  ::setenv("SHARDOPT_NUM_THREADS", "3", 1);
  EXPECT_EQ(default_thread_count(), 3);
  ::setenv("SHARDOPT_NUM_THREADS", "-1", 1);
  EXPECT_THROW(default_thread_count(), ConfigError);
  ::setenv("SHARDOPT_NUM_THREADS", "0", 1);
  const int all = default_thread_count();
  EXPECT_GE(all, 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1000000", 1);  // more ranks than cores: still one thread
  EXPECT_EQ(default_thread_count(), 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1);
  EXPECT_EQ(default_thread_count(), all >= 2 ? all / 2 : 1);
  ::unsetenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  ::unsetenv("SHARDOPT_NUM_THREADS");
}

}  // namespace
}  // namespace shardopt
