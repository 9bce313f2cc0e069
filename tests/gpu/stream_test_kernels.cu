#include "tests/gpu/stream_test_kernels.h"

namespace shardopt::testing {
namespace {

__device__ void spin_for(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

__global__ void delayed_copy_kernel(float* dst, const float* src, size_t n, long long cycles) {
  spin_for(cycles);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

__global__ void spin_kernel(long long cycles) { spin_for(cycles); }

}  // namespace

void launch_delayed_copy(float* dst, const float* src, size_t n, long long cycles, cudaStream_t stream) {
  // One wave of blocks, so the whole copy lands after about `cycles`.
  delayed_copy_kernel<<<8, 256, 0, stream>>>(dst, src, n, cycles);
}

void launch_spin(long long cycles, cudaStream_t stream) { spin_kernel<<<1, 1, 0, stream>>>(cycles); }

long long cycles_of(double seconds) {
  int device = 0, khz = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device);
  return static_cast<long long>(seconds * khz * 1e3);
}

}  // namespace shardopt::testing
