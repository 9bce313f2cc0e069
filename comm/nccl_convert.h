// Internal kernels of the NCCL backend: dtype conversion for fp32-accumulated 16-bit reductions
// and integer averaging. Plain types so that nccl_backend.cc (C++ compiler) can call them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace shardopt::comm::detail {

enum class HalfKind { kBf16, kF16 };
enum class IntKind { kI32, kI64, kU8 };

void launch_half_to_float(const void* src, HalfKind kind, float* dst, size_t n, cudaStream_t stream);
void launch_float_to_half(const float* src, HalfKind kind, void* dst, size_t n, cudaStream_t stream);
// buf[i] /= divisor, truncating toward zero (C++ integer division).
void launch_int_divide(void* buf, IntKind kind, size_t n, int divisor, cudaStream_t stream);

}  // namespace shardopt::comm::detail
