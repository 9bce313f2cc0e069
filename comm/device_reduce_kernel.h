// Internal kernel of the threads backend's CUDA mover (comm/cuda_buffer_mover.h): the element-wise
// reduction of comm/reduce_kernel.h on device memory. Plain types so that C++20 code can call it
// from a C++17 CUDA translation unit.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace shardopt::comm::detail {

enum class DeviceElem { kF32, kBF16, kF16, kI32, kI64, kU8 };
enum class DeviceReduceOp { kSum, kAvg, kMax, kMin };

// Inputs and outputs per launch (kernel arguments).
inline constexpr int kMaxDeviceReduceBuffers = 64;

// outputs[o][i] = op(inputs[0][i], ..., inputs[n_in - 1][i]) for i < len, every o < n_out: each
// element's inputs are read before its outputs are written, so an output may alias an input at the
// same index. 1 <= n_in, n_out <= kMaxDeviceReduceBuffers. Returns the launch's error.
cudaError_t launch_device_reduce(DeviceElem elem, DeviceReduceOp op, const void* const* inputs, int n_in,
                                 void* const* outputs, int n_out, size_t len, cudaStream_t stream);

}  // namespace shardopt::comm::detail
