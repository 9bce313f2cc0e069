// Host emulation of the device features shardopt's element-wise kernels use (optim/cuda/
// compact_kernels.cu, comm/device_reduce_kernel.cu), for the emulated GPU suites
// (gpu_compact_emulated_test, gpu_comm_emulated_test in tests/gpu/CMakeLists.txt): kernel qualifiers compile
// away, the explicitly rounded intrinsics are single IEEE operations (the file is compiled with
// -ffp-contract=off, and each result goes through a volatile so that nothing fuses or stays in wider
// precision), and a launch runs every warp of every block on 32 lane threads whose shuffles meet at
// a barrier. It checks
// what the kernels compute (indexing, tails, both access paths, the arithmetic bit for bit), not
// the device's timing, memory model or instruction selection.
#pragma once

#include <cuda_bf16.h>  // host implementations of __float2bfloat16_rn, __bfloat16_as_ushort
#include <cuda_fp16.h>  // and of __half2float, __float2half_rn
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmulatedIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedIndex emulated_thread_idx, emulated_block_idx, emulated_block_dim, emulated_grid_dim;
#define threadIdx emulated_thread_idx
#define blockIdx emulated_block_idx
#define blockDim emulated_block_dim
#define gridDim emulated_grid_dim

inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsqrt_rn(float a) { volatile float r = std::sqrt(a); return r; }
inline float __frcp_rn(float a) { volatile float r = 1.0f / a; return r; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// The 32 lanes of one warp exchange values here.
struct EmulatedWarp {
  std::barrier<> meet{32};
  uint32_t slot[32];
};
inline thread_local EmulatedWarp* emulated_warp = nullptr;
inline thread_local int emulated_lane = 0;

inline uint32_t __shfl_xor_sync(unsigned, uint32_t x, int lane_mask) {
  emulated_warp->slot[emulated_lane] = x;
  emulated_warp->meet.arrive_and_wait();
  const uint32_t y = emulated_warp->slot[emulated_lane ^ lane_mask];
  emulated_warp->meet.arrive_and_wait();
  return y;
}

// kernel<<<grid, threads>>>(args...): 32 lane threads (made once per launch) run every warp of every
// block, one warp after another (the kernels share nothing across warps), meeting at the barrier
// after each warp.
template <typename Kernel, typename... Args>
void emulated_launch(int grid, int threads, Kernel kernel, Args... args) {
  EmulatedWarp warp;
  std::vector<std::thread> lanes;
  for (int l = 0; l < 32; ++l)
    lanes.emplace_back([&, l] {
      emulated_warp = &warp;
      emulated_lane = l;
      emulated_block_dim.x = static_cast<unsigned>(threads);
      emulated_grid_dim.x = static_cast<unsigned>(grid);
      for (int b = 0; b < grid; ++b)
        for (int w = 0; w < threads / 32; ++w) {
          emulated_block_idx.x = static_cast<unsigned>(b);
          emulated_thread_idx.x = static_cast<unsigned>(w * 32 + l);
          kernel(args...);
          warp.meet.arrive_and_wait();
        }
    });
  for (auto& t : lanes) t.join();
}
