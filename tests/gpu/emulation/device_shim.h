// Host emulation of the device features shardopt's kernels use (optim/cuda/*.cu, runtime/cuda/
// step_kernels.cu, comm/device_reduce_kernel.cu), for the emulated GPU suites (the `emulated.*` tests
// of tests/gpu/CMakeLists.txt; no GPU needed). Kernel qualifiers compile away; the explicitly rounded
// intrinsics are single IEEE operations (the sources are compiled with -ffp-contract=off, and each
// result goes through a volatile so that nothing fuses or stays in wider precision); a launch runs
// its blocks one after another, each block's threads at once (one host thread each), __syncthreads
// and the warp shuffles meeting at barriers, __shared__ variables static (one launch runs at a time
// in the process). It checks what the kernels compute (indexing, tails, access paths, reductions, the
// arithmetic), not the device's timing, memory model or instruction selection.
#pragma once

#include <cuda_bf16.h>  // host implementations of __float2bfloat16_rn, __bfloat16_as_ushort
#include <cuda_fp16.h>  // and of __half2float, __float2half_rn
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block of one launch runs at a time

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedIndex emulated_thread_idx, emulated_block_idx, emulated_block_dim, emulated_grid_dim;
#define threadIdx emulated_thread_idx
#define blockIdx emulated_block_idx
#define blockDim emulated_block_dim
#define gridDim emulated_grid_dim

// Device code calls these unqualified.
using std::isfinite;
using std::isinf;
using std::isnan;

inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsqrt_rn(float a) { volatile float r = std::sqrt(a); return r; }
inline float __frcp_rn(float a) { volatile float r = 1.0f / a; return r; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// One warp's lanes exchange values here; one block's threads meet at `block`.
struct EmulatedWarp {
  explicit EmulatedWarp(std::ptrdiff_t lanes) : meet(lanes) {}
  std::barrier<> meet;
  uint64_t slot[32] = {};
};
inline thread_local EmulatedWarp* emulated_warp = nullptr;
inline thread_local std::barrier<>* emulated_block = nullptr;
inline thread_local int emulated_lane = 0;

inline void __syncthreads() { emulated_block->arrive_and_wait(); }

// Lane `emulated_lane` gets the value of lane source(lane) (its own where that is outside the warp).
template <typename T, typename Source>
T emulated_shuffle(T x, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  std::memcpy(&emulated_warp->slot[emulated_lane], &x, sizeof(T));
  emulated_warp->meet.arrive_and_wait();
  const int from = source(emulated_lane);
  T y = x;
  if (from >= 0 && from < 32) std::memcpy(&y, &emulated_warp->slot[from], sizeof(T));
  emulated_warp->meet.arrive_and_wait();
  return y;
}
template <typename T>
T __shfl_xor_sync(unsigned, T x, int lane_mask) {
  return emulated_shuffle(x, [=](int lane) { return lane ^ lane_mask; });
}
template <typename T>
T __shfl_down_sync(unsigned, T x, unsigned delta) {
  return emulated_shuffle(x, [=](int lane) { return lane + static_cast<int>(delta); });
}

// The threads a launch runs on: made on first need (up to the largest block), then reused by every
// launch (making a block's worth of threads per launch cost more than the kernels). One launch at a
// time in the process; never destroyed (workers wait for work until the process ends).
class EmulatedDevice {
 public:
  static EmulatedDevice& get() {
    static EmulatedDevice* device = new EmulatedDevice;
    return *device;
  }

  // body() on every thread of every block of `grid` (blocks of `threads` threads, 1-D), blocks one
  // after another, each block's threads at once. A thread that returns leaves its warp's and its
  // block's barriers (as exited threads no longer take part in __syncthreads on the device); every
  // block gets fresh barriers.
  void launch(dim3 grid, int threads, const std::function<void()>& body) {
    std::lock_guard<std::mutex> one_launch(launch_mutex_);
    const int warps = (threads + 31) / 32;
    std::barrier<> all(threads);
    std::optional<std::barrier<>> block_barrier;
    std::vector<std::optional<EmulatedWarp>> warp_state(static_cast<size_t>(warps));
    Work work{grid, threads, &body, &all, &block_barrier, &warp_state};
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_) < threads) {
      std::thread([this, id = static_cast<int>(workers_)] { serve(id); }).detach();
      ++workers_;
    }
    work_ = work;
    done_ = 0;
    ++generation_;
    wake_.notify_all();
    finished_.wait(lock, [&] { return done_ == threads; });
  }

 private:
  struct Work {
    dim3 grid;
    int threads;
    const std::function<void()>* body;
    std::barrier<>* all;
    std::optional<std::barrier<>>* block_barrier;
    std::vector<std::optional<EmulatedWarp>>* warps;
  };

  void serve(int id) {
    uint64_t seen = 0;
    for (;;) {
      Work w;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        w = work_;
      }
      if (id >= w.threads) continue;
      run(w, id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (++done_ == w.threads) finished_.notify_one();
    }
  }

  static void run(const Work& w, int t) {
    const int warps = (w.threads + 31) / 32;
    emulated_lane = t % 32;
    emulated_block_dim = {static_cast<unsigned>(w.threads), 1, 1};
    emulated_grid_dim = {w.grid.x, w.grid.y, w.grid.z};
    emulated_thread_idx = {static_cast<unsigned>(t), 0, 0};
    for (unsigned z = 0; z < w.grid.z; ++z)
      for (unsigned y = 0; y < w.grid.y; ++y)
        for (unsigned x = 0; x < w.grid.x; ++x) {
          if (t == 0) {
            w.block_barrier->emplace(w.threads);
            for (int k = 0; k < warps; ++k) (*w.warps)[static_cast<size_t>(k)].emplace(std::min(32, w.threads - 32 * k));
          }
          w.all->arrive_and_wait();  // the block's barriers exist
          emulated_block_idx = {x, y, z};
          emulated_block = &**w.block_barrier;
          emulated_warp = &*(*w.warps)[static_cast<size_t>(t / 32)];
          (*w.body)();
          emulated_warp->meet.arrive_and_drop();
          emulated_block->arrive_and_drop();
          w.all->arrive_and_wait();  // every thread is done with this block
        }
  }

  std::mutex launch_mutex_, mutex_;
  std::condition_variable wake_, finished_;
  size_t workers_ = 0;
  uint64_t generation_ = 0;
  int done_ = 0;
  Work work_{};
};

// kernel<<<grid, block>>>(args...) becomes emulated_launch(grid, block, [&] { kernel(args...); }).
template <typename Body>
void emulated_launch(dim3 grid, dim3 block, const Body& body) {
  EmulatedDevice::get().launch(grid, static_cast<int>(block.x), std::function<void()>(body));
}
