#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "comm/nccl_convert.h"

namespace shardopt::comm::detail {
namespace {

constexpr int kThreads = 256;

int blocks_for(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b < 2048 ? b : 2048));
}

template <typename Half>
__global__ void half_to_float_kernel(const Half* src, float* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    if constexpr (std::is_same_v<Half, __nv_bfloat16>) {
      dst[i] = __bfloat162float(src[i]);
    } else {
      dst[i] = __half2float(src[i]);
    }
  }
}

template <typename Half>
__global__ void float_to_half_kernel(const float* src, Half* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    if constexpr (std::is_same_v<Half, __nv_bfloat16>) {
      dst[i] = __float2bfloat16_rn(src[i]);
    } else {
      dst[i] = __float2half_rn(src[i]);
    }
  }
}

template <typename Int>
__global__ void int_divide_kernel(Int* buf, size_t n, Int divisor) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    buf[i] = buf[i] / divisor;
}

}  // namespace

void launch_half_to_float(const void* src, HalfKind kind, float* dst, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (kind == HalfKind::kBf16)
    half_to_float_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(src), dst, n);
  else
    half_to_float_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const __half*>(src), dst, n);
}

void launch_float_to_half(const float* src, HalfKind kind, void* dst, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (kind == HalfKind::kBf16)
    float_to_half_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n);
  else
    float_to_half_kernel<<<blocks_for(n), kThreads, 0, stream>>>(src, static_cast<__half*>(dst), n);
}

void launch_int_divide(void* buf, IntKind kind, size_t n, int divisor, cudaStream_t stream) {
  if (n == 0) return;
  switch (kind) {
    case IntKind::kI32:
      int_divide_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<int32_t*>(buf), n, int32_t(divisor));
      break;
    case IntKind::kI64:
      int_divide_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<int64_t*>(buf), n, int64_t(divisor));
      break;
    case IntKind::kU8:
      int_divide_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<uint8_t*>(buf), n, uint8_t(divisor));
      break;
  }
}

}  // namespace shardopt::comm::detail
