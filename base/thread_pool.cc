#include "base/thread_pool.h"

#include <sched.h>

#include <cstdlib>
#include <string>

#include "base/env.h"
#include "base/error.h"

namespace shardopt {

namespace {
// The pool whose task the current thread is running, to run nested calls inline.
// and with which thread index (so nested work keeps using that thread's workspace).
thread_local const ThreadPool* current_pool = nullptr;
thread_local int current_thread = 0;

struct CurrentPoolScope {
  const ThreadPool* saved_pool;
  int saved_thread;
  CurrentPoolScope(const ThreadPool* pool, int thread) : saved_pool(current_pool), saved_thread(current_thread) {
    current_pool = pool;
    current_thread = thread;
  }
  ~CurrentPoolScope() {
    current_pool = saved_pool;
    current_thread = saved_thread;
  }
};
}  // namespace

int default_thread_count() {
  int64_t forced = env::get_int("SHARDOPT_NUM_THREADS");
  if (forced < 0) throw ConfigError("SHARDOPT_NUM_THREADS=" + std::to_string(forced) + " must be >= 0 (0 = automatic)");
  if (forced > 0) return static_cast<int>(forced);
  int cpus = 1;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  if (cpus < 1) cpus = static_cast<int>(std::thread::hardware_concurrency());
  int local_ranks = 1;
  // Set by OpenMPI's mpirun: ranks sharing this host share its cores.
  if (const char* s = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) {
    int v = std::atoi(s);
    if (v > 0) local_ranks = v;
  }
  int threads = cpus / local_ranks;
  return threads < 1 ? 1 : threads;
}

ThreadPool::ThreadPool(int threads) {
  if (threads < 1) throw ConfigError("ThreadPool needs at least 1 thread, got " + std::to_string(threads));
  workers_.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::drain(int thread) {
  CurrentPoolScope scope(this, thread);
  for (;;) {
    if (failed_.load(std::memory_order_relaxed)) return;
    int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
    if (task >= n_) return;
    try {
      fn_(ctx_, task, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
}

void ThreadPool::worker_loop(int thread) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    drain(thread);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--running_workers_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::run(int64_t n, TaskFn fn, void* ctx) {
  if (current_pool == this) {
    // Nested inside one of this pool's tasks: run inline on this thread, keeping its index.
    const int thread = current_thread;
    for (int64_t task = 0; task < n; ++task) fn(ctx, task, thread);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  if (workers_.empty() || n == 1) {
    CurrentPoolScope scope(this, 0);
    for (int64_t task = 0; task < n; ++task) fn(ctx, task, 0);  // exceptions propagate directly
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    running_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return running_workers_ == 0; });
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace shardopt
