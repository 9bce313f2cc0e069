// Kernels of the stream-ordering GPU tests (stream_test_kernels.cu): work that is still running on a
// stream when the host goes on, so a test can tell device-side ordering from host-side waiting.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace shardopt::testing {

// Every thread spins `cycles` clock cycles, then dst[i] = src[i]: a gradient that lands late.
void launch_delayed_copy(float* dst, const float* src, size_t n, long long cycles, cudaStream_t stream);
// One thread spins `cycles` clock cycles: backward still computing.
void launch_spin(long long cycles, cudaStream_t stream);
// Clock cycles of `seconds` on the current device (its clock rate).
long long cycles_of(double seconds);

}  // namespace shardopt::testing
