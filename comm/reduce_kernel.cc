#include "comm/reduce_kernel.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "base/error.h"

namespace shardopt::comm::detail {
namespace {

// Elements per block: the accumulator block stays in L1.
constexpr size_t kBlock = 1024;

template <class T>
struct Traits;
template <>
struct Traits<float> {
  using Acc = float;
  static Acc load(float v) { return v; }
  static float store(Acc a) { return a; }
};
template <>
struct Traits<bf16> {
  using Acc = float;
  static Acc load(bf16 v) { return bf16_to_float(v); }
  static bf16 store(Acc a) { return float_to_bf16(a); }
};
template <>
struct Traits<_Float16> {
  using Acc = float;
  static Acc load(_Float16 v) { return static_cast<float>(v); }
  static _Float16 store(Acc a) { return static_cast<_Float16>(a); }
};
// Integer sums wrap to the element width: accumulate in unsigned 64-bit arithmetic (no UB).
template <>
struct Traits<int32_t> {
  using Acc = int64_t;
  static Acc load(int32_t v) { return v; }
  static int32_t store(Acc a) { return static_cast<int32_t>(a); }
};
template <>
struct Traits<int64_t> {
  using Acc = int64_t;
  static Acc load(int64_t v) { return v; }
  static int64_t store(Acc a) { return a; }
};
template <>
struct Traits<uint8_t> {
  using Acc = int64_t;
  static Acc load(uint8_t v) { return v; }
  static uint8_t store(Acc a) { return static_cast<uint8_t>(a); }
};

template <class A>
inline A add(A a, A b) {
  if constexpr (std::is_integral_v<A>)
    return static_cast<A>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  else
    return a + b;
}

template <class T>
void reduce_typed(ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs, size_t len) {
  using Tr = Traits<T>;
  using A = typename Tr::Acc;
  const size_t n = inputs.size();
  A acc[kBlock];
  for (size_t b = 0; b < len; b += kBlock) {
    const size_t m = std::min(kBlock, len - b);
    const T* in0 = static_cast<const T*>(inputs[0]) + b;
    for (size_t i = 0; i < m; ++i) acc[i] = Tr::load(in0[i]);
    for (size_t r = 1; r < n; ++r) {
      const T* in = static_cast<const T*>(inputs[r]) + b;
      switch (op) {
        case ReduceOp::kSum:
        case ReduceOp::kAvg:
          for (size_t i = 0; i < m; ++i) acc[i] = add<A>(acc[i], Tr::load(in[i]));
          break;
        case ReduceOp::kMax:
          for (size_t i = 0; i < m; ++i) acc[i] = std::max(acc[i], Tr::load(in[i]));
          break;
        case ReduceOp::kMin:
          for (size_t i = 0; i < m; ++i) acc[i] = std::min(acc[i], Tr::load(in[i]));
          break;
      }
    }
    if (op == ReduceOp::kAvg) {
      if constexpr (std::is_integral_v<A>) {
        // Average of the wrapped sum, truncated toward zero.
        for (size_t i = 0; i < m; ++i) acc[i] = Tr::load(Tr::store(acc[i])) / static_cast<A>(n);
      } else {
        const A inv = static_cast<A>(n);
        for (size_t i = 0; i < m; ++i) acc[i] = acc[i] / inv;
      }
    }
    for (void* out_v : outputs) {
      T* out = static_cast<T*>(out_v) + b;
      for (size_t i = 0; i < m; ++i) out[i] = Tr::store(acc[i]);
    }
  }
}

template <class T>
void divide_typed(void* buf, size_t len, int divisor) {
  using Tr = Traits<T>;
  using A = typename Tr::Acc;
  T* p = static_cast<T*>(buf);
  for (size_t i = 0; i < len; ++i) p[i] = Tr::store(Tr::load(p[i]) / static_cast<A>(divisor));
}

}  // namespace

void reduce_elements(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
                     size_t len) {
  SHARDOPT_ASSERT(!inputs.empty(), "reduction needs at least one input");
  if (len == 0) return;
  switch (dtype) {
    case DType::kF32: return reduce_typed<float>(op, inputs, outputs, len);
    case DType::kBF16: return reduce_typed<bf16>(op, inputs, outputs, len);
    case DType::kF16: return reduce_typed<_Float16>(op, inputs, outputs, len);
    case DType::kI32: return reduce_typed<int32_t>(op, inputs, outputs, len);
    case DType::kI64: return reduce_typed<int64_t>(op, inputs, outputs, len);
    case DType::kU8: return reduce_typed<uint8_t>(op, inputs, outputs, len);
    default: break;
  }
  throw ConfigError("reduction: unsupported dtype " + std::string(dtype_name(dtype)));
}

void divide_elements(DType dtype, void* buf, size_t len, int divisor) {
  switch (dtype) {
    case DType::kF32: return divide_typed<float>(buf, len, divisor);
    case DType::kBF16: return divide_typed<bf16>(buf, len, divisor);
    case DType::kF16: return divide_typed<_Float16>(buf, len, divisor);
    case DType::kI32: return divide_typed<int32_t>(buf, len, divisor);
    case DType::kI64: return divide_typed<int64_t>(buf, len, divisor);
    case DType::kU8: return divide_typed<uint8_t>(buf, len, divisor);
    default: break;
  }
  throw ConfigError("avg: unsupported dtype " + std::string(dtype_name(dtype)));
}

// The attribute keeps GCC from turning the loop back into a memcpy call.
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void copy_bytes(void* dst, const void* src, size_t n) {
  if (n >= (size_t{1} << 20)) {
    std::memcpy(dst, src, n);
    return;
  }
  typedef char v32 __attribute__((vector_size(32)));
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    v32 a, b, c, e;
    __builtin_memcpy(&a, s + i, 32);
    __builtin_memcpy(&b, s + i + 32, 32);
    __builtin_memcpy(&c, s + i + 64, 32);
    __builtin_memcpy(&e, s + i + 96, 32);
    __builtin_memcpy(d + i, &a, 32);
    __builtin_memcpy(d + i + 32, &b, 32);
    __builtin_memcpy(d + i + 64, &c, 32);
    __builtin_memcpy(d + i + 96, &e, 32);
  }
  if (i < n) std::memcpy(d + i, s + i, n - i);
}

bool is_half_type(DType dtype) { return dtype == DType::kBF16 || dtype == DType::kF16; }

void half_to_f32(DType dtype, const void* src, float* dst, size_t len) {
  if (dtype == DType::kBF16) {
    const bf16* s = static_cast<const bf16*>(src);
    for (size_t i = 0; i < len; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    SHARDOPT_ASSERT(dtype == DType::kF16, "half_to_f32 on a non-half dtype");
    const _Float16* s = static_cast<const _Float16*>(src);
    for (size_t i = 0; i < len; ++i) dst[i] = static_cast<float>(s[i]);
  }
}

void f32_to_half(DType dtype, const float* src, void* dst, size_t len) {
  if (dtype == DType::kBF16) {
    bf16* d = static_cast<bf16*>(dst);
    for (size_t i = 0; i < len; ++i) d[i] = float_to_bf16(src[i]);
  } else {
    SHARDOPT_ASSERT(dtype == DType::kF16, "f32_to_half on a non-half dtype");
    _Float16* d = static_cast<_Float16*>(dst);
    for (size_t i = 0; i < len; ++i) d[i] = static_cast<_Float16>(src[i]);
  }
}

}  // namespace shardopt::comm::detail
