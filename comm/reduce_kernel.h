// Element-wise reduction kernels on host memory, shared by the CPU backends.
// bf16 and f16 are accumulated in fp32 and rounded once; integers accumulate in 64 bits
// (sums wrap to the element width) and avg truncates toward zero.
#pragma once

#include <cstddef>
#include <span>

#include "comm/communicator.h"

namespace shardopt::comm::detail {

// outputs[o][i] = op(inputs[0][i], ..., inputs[n-1][i]) for i < len, for every output o.
// Inputs are all read before outputs are written, block by block, so an output may alias an input
// at the same index. avg divides the sum by inputs.size().
void reduce_elements(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
                     size_t len);

// buf[i] = buf[i] / divisor (avg after a sum; integers truncate toward zero).
void divide_elements(DType dtype, void* buf, size_t len, int divisor);

// Copies n bytes (non-overlapping). Below 1 MiB a plain vector loop: glibc's memcpy takes the
// `rep movsb` path for 4 KiB-256 KiB, which runs at ~3 GB/s on some virtualized AMD EPYC hosts
// (measured 8x slower than this loop there); large copies go to memcpy (non-temporal stores).
void copy_bytes(void* dst, const void* src, size_t n);

// fp16 types <-> fp32 (used to reduce bf16/f16 in fp32 on backends whose reductions are pairwise).
bool is_half_type(DType dtype);
void half_to_f32(DType dtype, const void* src, float* dst, size_t len);
void f32_to_half(DType dtype, const float* src, void* dst, size_t len);

}  // namespace shardopt::comm::detail
