#include "bench/gpu/device_ceilings.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "optim/cuda/cuda_check.h"

namespace shardopt::bench {
namespace {

// One pass of the AdamW-shaped stream: 16 bytes read and 12 written per element, vectorized by 4.
// The arithmetic keeps every value live (the compiler cannot drop a load or a store).
__global__ void rmw_adamw_shaped(float4* __restrict__ p, const float4* __restrict__ g, float4* __restrict__ m,
                                 float4* __restrict__ v, size_t n4) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
    const float4 gi = g[i];
    float4 mi = m[i], vi = v[i], pi = p[i];
    mi.x = 0.9f * mi.x + gi.x, mi.y = 0.9f * mi.y + gi.y, mi.z = 0.9f * mi.z + gi.z, mi.w = 0.9f * mi.w + gi.w;
    vi.x = 0.99f * vi.x + gi.x * gi.x, vi.y = 0.99f * vi.y + gi.y * gi.y;
    vi.z = 0.99f * vi.z + gi.z * gi.z, vi.w = 0.99f * vi.w + gi.w * gi.w;
    pi.x -= 1e-9f * mi.x, pi.y -= 1e-9f * mi.y, pi.z -= 1e-9f * mi.z, pi.w -= 1e-9f * mi.w;
    m[i] = mi, v[i] = vi, p[i] = pi;
  }
}

}  // namespace

double median_event_seconds(const std::function<void()>& fn, int warmup, int reps) {
  cudaEvent_t start, stop;
  SHARDOPT_CUDA_CHECK(cudaEventCreate(&start));
  SHARDOPT_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) fn();
  SHARDOPT_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < std::max(reps, 1); ++i) {
    SHARDOPT_CUDA_CHECK(cudaEventRecord(start));
    fn();
    SHARDOPT_CUDA_CHECK(cudaEventRecord(stop));
    SHARDOPT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    SHARDOPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    t.push_back(ms * 1e-3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

DeviceBandwidth device_copy_bandwidth(size_t bytes, int reps) {
  void *a = nullptr, *b = nullptr;
  SHARDOPT_CUDA_CHECK(cudaMalloc(&a, bytes));
  SHARDOPT_CUDA_CHECK(cudaMalloc(&b, bytes));
  SHARDOPT_CUDA_CHECK(cudaMemset(a, 1, bytes));
  DeviceBandwidth r;
  r.bytes = 2.0 * double(bytes);
  r.seconds = median_event_seconds([&] { SHARDOPT_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); },
                                   1, reps);
  r.gbytes_per_s = r.bytes / r.seconds / 1e9;
  cudaFree(a);
  cudaFree(b);
  return r;
}

DeviceBandwidth device_rmw_bandwidth(size_t elements, int reps) {
  const size_t n4 = (elements + 3) / 4;
  float4* buf[4] = {};
  for (auto& b : buf) {
    SHARDOPT_CUDA_CHECK(cudaMalloc(&b, n4 * sizeof(float4)));
    SHARDOPT_CUDA_CHECK(cudaMemset(b, 0, n4 * sizeof(float4)));  // zeros stay finite through the passes
  }
  int device = 0, sms = 0;
  SHARDOPT_CUDA_CHECK(cudaGetDevice(&device));
  SHARDOPT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DeviceBandwidth best;
  best.bytes = 28.0 * double(n4 * 4);
  for (int blocks_per_sm : {2, 4, 8, 16, 32}) {
    const int threads = 256, blocks = sms * blocks_per_sm;
    const double s = median_event_seconds(
        [&] {
          rmw_adamw_shaped<<<blocks, threads>>>(buf[0], buf[1], buf[2], buf[3], n4);
          SHARDOPT_CUDA_CHECK_LAUNCH();
        },
        1, reps);
    if (best.seconds == 0 || s < best.seconds) best.seconds = s;
  }
  best.gbytes_per_s = best.bytes / best.seconds / 1e9;
  for (auto* b : buf) cudaFree(b);
  return best;
}

}  // namespace shardopt::bench
