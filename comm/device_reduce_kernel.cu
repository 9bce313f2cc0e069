#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "comm/device_reduce_kernel.h"

namespace shardopt::comm::detail {
namespace {

constexpr int kThreads = 256;

struct Buffers {
  const void* in[kMaxDeviceReduceBuffers];
  void* out[kMaxDeviceReduceBuffers];
  int n_in, n_out;
};

// Element traits with the host reduction's arithmetic (comm/reduce_kernel.cc; base/dtype.h's bf16
// rounding): Acc is the accumulator, load/store convert.
struct Bf16Bits {
  uint16_t bits;
};

template <class T>
struct Traits;
template <>
struct Traits<float> {
  using Acc = float;
  __device__ static Acc load(float v) { return v; }
  __device__ static float store(Acc a) { return a; }
};
template <>
struct Traits<Bf16Bits> {
  using Acc = float;
  __device__ static Acc load(Bf16Bits v) { return __uint_as_float(static_cast<uint32_t>(v.bits) << 16); }
  // Round to nearest even; NaN stays NaN (quiet bit set), as float_to_bf16.
  __device__ static Bf16Bits store(Acc a) {
    uint32_t u = __float_as_uint(a);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
  }
};
template <>
struct Traits<__half> {
  using Acc = float;
  __device__ static Acc load(__half v) { return __half2float(v); }
  __device__ static __half store(Acc a) { return __float2half_rn(a); }
};
template <class Int>
struct IntTraits {
  using Acc = int64_t;
  __device__ static Acc load(Int v) { return v; }
  __device__ static Int store(Acc a) { return static_cast<Int>(a); }
};
template <>
struct Traits<int32_t> : IntTraits<int32_t> {};
template <>
struct Traits<int64_t> : IntTraits<int64_t> {};
template <>
struct Traits<uint8_t> : IntTraits<uint8_t> {};

template <class T, DeviceReduceOp kOp>
__global__ void reduce_kernel(Buffers b, size_t len) {
  using Tr = Traits<T>;
  using A = typename Tr::Acc;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < len; i += size_t{gridDim.x} * blockDim.x) {
    A acc = Tr::load(static_cast<const T*>(b.in[0])[i]);
    for (int r = 1; r < b.n_in; ++r) {
      const A x = Tr::load(static_cast<const T*>(b.in[r])[i]);
      if constexpr (kOp == DeviceReduceOp::kSum || kOp == DeviceReduceOp::kAvg) {
        if constexpr (std::is_integral_v<A>)  // wraps to the element width, no signed overflow
          acc = static_cast<A>(static_cast<uint64_t>(acc) + static_cast<uint64_t>(x));
        else
          acc = acc + x;
      } else if constexpr (kOp == DeviceReduceOp::kMax) {
        acc = acc < x ? x : acc;  // std::max(acc, x)
      } else {
        acc = x < acc ? x : acc;  // std::min(acc, x)
      }
    }
    if constexpr (kOp == DeviceReduceOp::kAvg) {
      if constexpr (std::is_integral_v<A>)
        acc = Tr::load(Tr::store(acc)) / static_cast<A>(b.n_in);  // of the wrapped sum, toward zero
      else
        acc = acc / static_cast<A>(b.n_in);
    }
    const T v = Tr::store(acc);
    for (int o = 0; o < b.n_out; ++o) static_cast<T*>(b.out[o])[i] = v;
  }
}

template <class T>
cudaError_t launch_typed(DeviceReduceOp op, const Buffers& b, size_t len, cudaStream_t stream) {
  const size_t want = (len + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(want < 1 ? 1 : (want < 4096 ? want : 4096));
  switch (op) {
    case DeviceReduceOp::kSum: reduce_kernel<T, DeviceReduceOp::kSum><<<blocks, kThreads, 0, stream>>>(b, len); break;
    case DeviceReduceOp::kAvg: reduce_kernel<T, DeviceReduceOp::kAvg><<<blocks, kThreads, 0, stream>>>(b, len); break;
    case DeviceReduceOp::kMax: reduce_kernel<T, DeviceReduceOp::kMax><<<blocks, kThreads, 0, stream>>>(b, len); break;
    case DeviceReduceOp::kMin: reduce_kernel<T, DeviceReduceOp::kMin><<<blocks, kThreads, 0, stream>>>(b, len); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_device_reduce(DeviceElem elem, DeviceReduceOp op, const void* const* inputs, int n_in,
                                 void* const* outputs, int n_out, size_t len, cudaStream_t stream) {
  if (n_in < 1 || n_in > kMaxDeviceReduceBuffers || n_out < 0 || n_out > kMaxDeviceReduceBuffers)
    return cudaErrorInvalidValue;
  if (len == 0 || n_out == 0) return cudaSuccess;
  Buffers b{};
  for (int r = 0; r < n_in; ++r) b.in[r] = inputs[r];
  for (int o = 0; o < n_out; ++o) b.out[o] = outputs[o];
  b.n_in = n_in, b.n_out = n_out;
  switch (elem) {
    case DeviceElem::kF32: return launch_typed<float>(op, b, len, stream);
    case DeviceElem::kBF16: return launch_typed<Bf16Bits>(op, b, len, stream);
    case DeviceElem::kF16: return launch_typed<__half>(op, b, len, stream);
    case DeviceElem::kI32: return launch_typed<int32_t>(op, b, len, stream);
    case DeviceElem::kI64: return launch_typed<int64_t>(op, b, len, stream);
    case DeviceElem::kU8: return launch_typed<uint8_t>(op, b, len, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace shardopt::comm::detail
