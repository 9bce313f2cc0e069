// A persistent pool of worker threads for data-parallel loops inside one process.
//
// parallel_for(n, fn) runs fn(task, thread) for every task in [0, n) and returns when all are
// done. The calling thread takes part as thread 0, so a pool of size() == T uses T - 1 workers.
// Tasks are handed out dynamically (one atomic counter), so submitting the largest tasks first
// balances uneven work. A call allocates nothing on the heap (the callable is passed by
// reference), unless a task throws: the first exception is rethrown in the caller after all
// started tasks have finished, and tasks not yet started are skipped.
//
// Calls from several threads on one pool are serialised. A parallel_for issued from inside a
// task of the same pool runs inline on that thread (no deadlock, no oversubscription).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace shardopt {

// Threads this process should use for its own compute: the CPUs in its affinity mask
// (sched_getaffinity) divided by the ranks on this host under mpirun
// (OMPI_COMM_WORLD_LOCAL_SIZE), at least 1. SHARDOPT_NUM_THREADS > 0 overrides it.
int default_thread_count();

class ThreadPool {
 public:
  // threads >= 1 (ConfigError otherwise); threads == 1 runs everything on the caller.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  template <class F>
  void parallel_for(int64_t n, F&& fn) {
    if (n <= 0) return;
    using Fn = std::remove_reference_t<F>;
    run(n, [](void* ctx, int64_t task, int thread) { (*static_cast<Fn*>(ctx))(task, thread); },
        const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  using TaskFn = void (*)(void* ctx, int64_t task, int thread);
  void run(int64_t n, TaskFn fn, void* ctx);
  void worker_loop(int thread);
  void drain(int thread);

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // one parallel_for at a time

  std::mutex mutex_;  // guards the job fields below and the two condition variables
  std::condition_variable wake_;
  std::condition_variable done_;
  uint64_t generation_ = 0;  // bumped once per job; workers run each generation once
  int running_workers_ = 0;  // workers that have not finished the current job
  bool stop_ = false;
  std::exception_ptr error_;

  // The current job; written before generation_ is bumped (under mutex_), read by workers after.
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
};

}  // namespace shardopt
