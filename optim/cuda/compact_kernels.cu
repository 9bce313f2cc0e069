// The element-wise optimizers over compact (q8 / bf16) state on the GPU: decode -> update ->
// encode in one pass, one launch over all slices. Same format and arithmetic as the CPU step
// (optim/compact_step.cc): the codes are encoded and decoded by the functions of
// optim/quant8_codec.h, and every float operation is written as an explicitly rounded intrinsic
// (__fmul_rn, __fadd_rn, ...) in the CPU source's order, so nothing is contracted into a fused
// multiply-add: the result equals the CPU's portable (non-FMA) build bit for bit.
//
// Work split: a thread block of 8 warps takes one CompactChunk; each warp takes one 256-element q8
// block at a time (lane l holds elements l, l + 32, ..., l + 224: every load is coalesced), keeps
// the new state in registers, reduces the block's new absmax with warp shuffles (an integer max
// over the magnitude bits: NaN-preserving, as codec::block_absmax) and encodes.
#include <cuda_bf16.h>

#include "optim/cuda/compact_kernels.h"
#include "optim/quant8_codec.h"

namespace shardopt::cuda::detail {
namespace {

namespace codec = ::shardopt::optim::codec;

constexpr int kBlock = static_cast<int>(kCompactBlockElems);
constexpr int kPerLane = kBlock / 32;
constexpr int kWarps = 8;
static_assert(kBlock % 32 == 0, "a q8 block is a whole number of warp rows");

__device__ __forceinline__ float bf16_to_f32(uint16_t bits) { return __uint_as_float(static_cast<uint32_t>(bits) << 16); }
__device__ __forceinline__ uint16_t f32_to_bf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

template <bool kGradBf16>
__device__ __forceinline__ float load_grad(const void* grad, uint32_t i) {
  if constexpr (kGradBf16) return bf16_to_f32(static_cast<const uint16_t*>(grad)[i]);
  else return static_cast<const float*>(grad)[i];
}

// optim/elementwise_kernels.h's adamw_update / lion_update / sgd_momentum_update, operation for
// operation.
__device__ __forceinline__ float adamw_update(const CompactScalars& k, float g, float w, float& m, float& v,
                                              float& sqrt_v) {
  m = __fadd_rn(__fmul_rn(k.beta1, m), __fmul_rn(k.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(k.beta2, v), __fmul_rn(__fmul_rn(k.one_minus_beta2, g), g));
  sqrt_v = __fsqrt_rn(v);
  return __fsub_rn(__fmul_rn(w, k.decay),
                   __fdiv_rn(__fmul_rn(k.step_size, m), __fadd_rn(__fmul_rn(sqrt_v, k.inv_sqrt_bias2), k.eps)));
}
__device__ __forceinline__ float lion_update(const CompactScalars& k, float g, float w, float& m) {
  const float c = __fadd_rn(__fmul_rn(k.beta1, m), __fmul_rn(k.one_minus_beta1, g));
  const float sign = static_cast<float>(c > 0.0f) - static_cast<float>(c < 0.0f);
  m = __fadd_rn(__fmul_rn(k.beta2, m), __fmul_rn(k.one_minus_beta2, g));
  return __fsub_rn(__fmul_rn(w, k.decay), __fmul_rn(k.lr, sign));
}
__device__ __forceinline__ float sgd_momentum_update(const CompactScalars& k, float grad, float w, float& buf) {
  const float g = __fadd_rn(grad, __fmul_rn(k.weight_decay, w));
  buf = __fadd_rn(__fmul_rn(k.keep, buf), __fmul_rn(k.take, g));
  const float d = __fadd_rn(__fmul_rn(k.nesterov, __fadd_rn(g, __fmul_rn(k.momentum, buf))),
                            __fmul_rn(__fsub_rn(1.0f, k.nesterov), buf));
  return __fsub_rn(w, __fmul_rn(k.lr, d));
}

__device__ __forceinline__ uint32_t warp_max(uint32_t x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const uint32_t y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

// codec::encode_signed_block for one element of a block with absmax a.
__device__ __forceinline__ uint8_t encode_signed_in_block(float x, float a, float r) {
  if (a == 0.0f) return 0;
  return codec::encode_signed(a >= 0x1p-126f && a <= 0x1p126f ? __fmul_rn(x, r) : __fdiv_rn(x, a));
}

template <ElementwiseKind kKind, bool kQ8, bool kGradBf16>
__global__ void __launch_bounds__(kWarps * 32) compact_kernel(const CompactChunk* chunks, CompactScalars s) {
  const CompactChunk c = chunks[blockIdx.x];
  constexpr bool kAdam = kKind == ElementwiseKind::kAdamW;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t blocks = (c.count + kBlock - 1) / kBlock;
  for (uint32_t b = warp; b < blocks; b += kWarps) {
    const uint32_t base = b * kBlock;
    float m[kPerLane], v_or_sqrt[kPerLane];
    uint32_t m_max = 0, v_max = 0;
    float am = 0.0f, av = 0.0f;
    if constexpr (kQ8) {
      am = c.absmax[0][b];
      if constexpr (kAdam) av = c.absmax[1][b];
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const uint32_t i = base + lane + 32 * k;
      if (i >= c.count) continue;
      float mi, vi = 0.0f, sqrt_v = 0.0f;
      if constexpr (kQ8) {
        mi = __fmul_rn(codec::decode_signed(static_cast<const uint8_t*>(c.values[0])[i]), am);
        if constexpr (kAdam) vi = __fmul_rn(codec::decode_unsigned(static_cast<const uint8_t*>(c.values[1])[i]), av);
      } else {
        mi = bf16_to_f32(static_cast<const uint16_t*>(c.values[0])[i]);
        if constexpr (kAdam) vi = bf16_to_f32(static_cast<const uint16_t*>(c.values[1])[i]);
      }
      const float g = load_grad<kGradBf16>(c.grad, i);
      float w;
      if constexpr (kAdam) w = adamw_update(s, g, c.param[i], mi, vi, sqrt_v);
      else if constexpr (kKind == ElementwiseKind::kLion) w = lion_update(s, g, c.param[i], mi);
      else w = sgd_momentum_update(s, g, c.param[i], mi);
      c.param[i] = w;
      if (c.mirror != nullptr) c.mirror[i] = f32_to_bf16(w);
      if constexpr (kQ8) {
        m[k] = mi;
        const uint32_t mb = codec::bits_of(mi) & 0x7fffffffu;
        m_max = mb > m_max ? mb : m_max;
        if constexpr (kAdam) {
          v_or_sqrt[k] = sqrt_v;  // the unsigned code is encoded from sqrt(v)
          const uint32_t vb = codec::bits_of(vi) & 0x7fffffffu;
          v_max = vb > v_max ? vb : v_max;
        }
      } else {
        static_cast<uint16_t*>(c.values[0])[i] = f32_to_bf16(mi);
        if constexpr (kAdam) static_cast<uint16_t*>(c.values[1])[i] = f32_to_bf16(vi);
      }
    }
    if constexpr (kQ8) {
      const float a_m = codec::float_of(warp_max(m_max));
      const float r_m = __frcp_rn(a_m);
      float a_v = 0.0f, r_v = 0.0f;
      if constexpr (kAdam) {
        a_v = codec::float_of(warp_max(v_max));
        r_v = __frcp_rn(__fsqrt_rn(a_v));  // codec::encode_unsigned_block_from_sqrt: 1 / sqrt(a)
      }
      if (lane == 0) {
        c.absmax[0][b] = a_m;
        if constexpr (kAdam) c.absmax[1][b] = a_v;
      }
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const uint32_t i = base + lane + 32 * k;
        if (i >= c.count) continue;
        static_cast<uint8_t*>(c.values[0])[i] = encode_signed_in_block(m[k], a_m, r_m);
        if constexpr (kAdam)
          static_cast<uint8_t*>(c.values[1])[i] = a_v == 0.0f ? 0 : codec::encode_unsigned(__fmul_rn(v_or_sqrt[k], r_v));
      }
    }
  }
}

template <ElementwiseKind kKind, bool kQ8>
void launch_typed(bool grad_bf16, const CompactChunk* chunks, int n, const CompactScalars& s, cudaStream_t stream) {
  if (grad_bf16) compact_kernel<kKind, kQ8, true><<<n, kWarps * 32, 0, stream>>>(chunks, s);
  else compact_kernel<kKind, kQ8, false><<<n, kWarps * 32, 0, stream>>>(chunks, s);
}

template <ElementwiseKind kKind>
void launch_kind(bool q8, bool grad_bf16, const CompactChunk* chunks, int n, const CompactScalars& s,
                 cudaStream_t stream) {
  if (q8) launch_typed<kKind, true>(grad_bf16, chunks, n, s, stream);
  else launch_typed<kKind, false>(grad_bf16, chunks, n, s, stream);
}

// Decode or encode of one chunk per thread block; a warp per q8 block as in compact_kernel.
template <bool kEncode, bool kQ8>
__global__ void __launch_bounds__(kWarps * 32) codec_kernel(const CompactCodecChunk* chunks) {
  const CompactCodecChunk c = chunks[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t blocks = (c.count + kBlock - 1) / kBlock;
  for (uint32_t b = warp; b < blocks; b += kWarps) {
    const uint32_t base = b * kBlock;
    if constexpr (!kEncode) {
      const float a = kQ8 ? c.absmax[b] : 0.0f;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const uint32_t i = base + lane + 32 * k;
        if (i >= c.count) continue;
        c.f32[i] = kQ8 ? __fmul_rn(codec::decode_signed(static_cast<const uint8_t*>(c.values)[i]), a)
                       : bf16_to_f32(static_cast<const uint16_t*>(c.values)[i]);
      }
    } else if constexpr (!kQ8) {
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const uint32_t i = base + lane + 32 * k;
        if (i < c.count) static_cast<uint16_t*>(c.values)[i] = f32_to_bf16(c.f32[i]);
      }
    } else {
      float x[kPerLane];
      uint32_t x_max = 0;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const uint32_t i = base + lane + 32 * k;
        x[k] = i < c.count ? c.f32[i] : 0.0f;
        const uint32_t xb = codec::bits_of(x[k]) & 0x7fffffffu;
        x_max = xb > x_max ? xb : x_max;
      }
      const float a = codec::float_of(warp_max(x_max));
      const float r = __frcp_rn(a);
      if (lane == 0) c.absmax[b] = a;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const uint32_t i = base + lane + 32 * k;
        if (i < c.count) static_cast<uint8_t*>(c.values)[i] = encode_signed_in_block(x[k], a, r);
      }
    }
  }
}

}  // namespace

void launch_compact_codec(bool encode, bool q8, const CompactCodecChunk* chunks, int chunk_count, cudaStream_t stream) {
  if (chunk_count == 0) return;
  if (encode) {
    if (q8) codec_kernel<true, true><<<chunk_count, kWarps * 32, 0, stream>>>(chunks);
    else codec_kernel<true, false><<<chunk_count, kWarps * 32, 0, stream>>>(chunks);
  } else {
    if (q8) codec_kernel<false, true><<<chunk_count, kWarps * 32, 0, stream>>>(chunks);
    else codec_kernel<false, false><<<chunk_count, kWarps * 32, 0, stream>>>(chunks);
  }
}

void launch_compact_elementwise(ElementwiseKind kind, bool q8, bool grad_bf16, const CompactChunk* chunks,
                                int chunk_count, const CompactScalars& s, cudaStream_t stream) {
  if (chunk_count == 0) return;
  switch (kind) {
    case ElementwiseKind::kAdamW: launch_kind<ElementwiseKind::kAdamW>(q8, grad_bf16, chunks, chunk_count, s, stream); break;
    case ElementwiseKind::kLion: launch_kind<ElementwiseKind::kLion>(q8, grad_bf16, chunks, chunk_count, s, stream); break;
    case ElementwiseKind::kSgd: launch_kind<ElementwiseKind::kSgd>(q8, grad_bf16, chunks, chunk_count, s, stream); break;
  }
}

}  // namespace shardopt::cuda::detail
