// The element-wise optimizers over compact (q8 / bf16) state on the GPU: decode -> update ->
// encode in one pass, one launch over all slices. Same format and arithmetic as the CPU step
// (optim/compact_step.cc): the codes are encoded and decoded by the functions of
// optim/quant8_codec.h, and every float operation is written as an explicitly rounded intrinsic
// (__fmul_rn, __fadd_rn, ...) in the CPU source's order, so nothing is contracted into a fused
// multiply-add: the result equals the CPU's portable (non-FMA) build bit for bit.
//
// Two kernels with the same per-element arithmetic (so the same results bit for bit), differing in
// which lane holds which element and how wide the memory accesses are; CompactKernel
// (compact_elementwise.h) selects one.
//
// Warp kernel (compact_kernel, codec_kernel; the default, verified on an H200): a thread block of 8
// warps takes one CompactChunk; each warp takes one 256-element q8 block at a time (lane l holds
// elements l, l + 32, ..., l + 224: every load is coalesced), keeps the new state in registers,
// reduces the block's new absmax with warp shuffles (an integer max over the magnitude bits:
// NaN-preserving, as codec::block_absmax) and encodes. Measured on an H200 at 0.42 of the in-place
// RMW ceiling (docs/benchmarks.md), against 0.92 for the fp32 kernel (kernels.cu). Reading the code,
// the likely causes: (1) the loop over a lane's 8 elements stores the parameter (and mirror) of
// element k before loading element k + 1, and the compiler cannot prove the arrays do not alias,
// so each element's loads wait for the previous element's stores: a warp has one element per lane
// (about 10 bytes) in flight and pays at least 8 memory latencies per block (the SASS of q8 AdamW
// repeats load codes and grad, sqrt, load param, divide, store, 8 times); (2) the codes move one
// byte per lane per instruction (32 bytes per warp access, 8 accesses per array per block).
//
// Vector kernel (compact_vector_kernel, codec_vector_kernel; not yet measured on a device): the same
// split into chunks, warps and q8 blocks, but lane l holds two runs of 4 consecutive elements, 4l..4l+3 and
// 128 + 4l..128 + 4l + 3, and a block's work is phased: every load of the block is issued first
// (2 x 16-byte param, 2 x 16-byte fp32 or 8-byte bf16 grad, 2 x 4-byte codes or 8-byte bf16 values
// per state array, the absmax), then the update, the absmax reduction and the encode, then the
// stores. So a warp has the whole block in flight (AdamW with fp32 grads: 2.5 KB, against 320
// bytes) and pays one memory latency per block. Runs of 4 rather than 8 contiguous elements per lane
// keep each warp-wide access contiguous (a 16-byte access covers 512 bytes, a 4-byte code access
// 128 bytes: whole 128-byte lines, no access touching half of every sector as 8 contiguous floats per
// lane would) and ask only 16-byte alignment of the fp32 arrays. The widths need aligned pointers:
// the host decides per chunk (compact_chunk_run_aligned) and lists the aligned chunks first; they
// run in one launch with wide accesses, the others in a second launch of the same phased code with
// element-by-element accesses (as does a run that crosses the end of a slice), so the aligned
// kernel's registers are not those of the scalar accesses. Registers: a lane holds 8 params, 8
// grads, the codes, then 8 new m and 8 sqrt(v) until the absmax is known; q8 AdamW compiles to
// 74-76 registers under a bound of 80 (3 blocks, 24 warps per SM, no spills; docs/gpu.md has the
// figures per kernel). 24 warps with a 2.5 KB block each in flight give up to 60 KB per SM, above
// the bandwidth-latency product of HBM3e (about 4.8 TB/s x 800 ns / 132 SMs = 30 KB per SM). The
// fp32 kernel (kernels.cu) reaches 0.92 of the RMW ceiling the same way: the loads of 4 elements per
// thread issued before their stores, 40 warps per SM at 48 registers (AdamW).
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

// A q8 block's new absmax from its lanes' largest magnitude bits (m; v too for AdamW) and the factors
// the codes are encoded with (1 / a_m; 1 / sqrt(a_v), codec::encode_unsigned_block_from_sqrt); lane 0
// stores the absmax. Both kernels end a block with it.
struct BlockScales {
  float a_m, r_m, a_v, r_v;
};
template <bool kAdam>
__device__ __forceinline__ BlockScales block_scales(const CompactChunk& c, uint32_t b, int lane, uint32_t m_max,
                                                    uint32_t v_max) {
  BlockScales k{};
  k.a_m = codec::float_of(warp_max(m_max));
  k.r_m = __frcp_rn(k.a_m);
  if constexpr (kAdam) {
    k.a_v = codec::float_of(warp_max(v_max));
    k.r_v = __frcp_rn(__fsqrt_rn(k.a_v));
  }
  if (lane == 0) {
    c.absmax[0][b] = k.a_m;
    if constexpr (kAdam) c.absmax[1][b] = k.a_v;
  }
  return k;
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
      const auto [a_m, r_m, a_v, r_v] = block_scales<kAdam>(c, b, lane, m_max, v_max);
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


// ---- The vector kernel (see the top) ----

constexpr int kRun = static_cast<int>(kCompactRunElements);
constexpr int kRuns = kBlock / (32 * kRun);  // runs per lane per block: 2
constexpr int kRunStride = 32 * kRun;        // elements between a lane's runs: 128
static_assert(kRuns * kRunStride == kBlock, "a q8 block is a whole number of warp-wide runs");
// Resident thread blocks per SM the aligned vector kernel's register allocation must allow
// (__launch_bounds__): 3 x 8 warps, at most 80 registers per thread, which q8 AdamW fits without
// spilling; 4 blocks (64 registers) made it spill 16-32 bytes per thread (nvcc 13.0, sm_90).
constexpr int kVectorBlocksPerSm = 3;

// Run [i, i + 4) of an array of n elements (i a multiple of 4 from the chunk start): one access when
// the chunk is aligned (kAligned) and the run is whole, else element by element (elements at n or
// beyond read as 0 and are not written).
template <bool kAligned>
__device__ __forceinline__ void load_run(const float* p, uint32_t i, uint32_t n, float (&x)[kRun]) {
  if (kAligned && i + kRun <= n) {
    const float4 v = *reinterpret_cast<const float4*>(p + i);
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j) x[j] = i + j < n ? p[i + j] : 0.0f;
  }
}
template <bool kAligned>
__device__ __forceinline__ void load_run(const uint16_t* p, uint32_t i, uint32_t n, uint16_t (&x)[kRun]) {
  if (kAligned && i + kRun <= n) {
    const uint2 v = *reinterpret_cast<const uint2*>(p + i);
    x[0] = static_cast<uint16_t>(v.x), x[1] = static_cast<uint16_t>(v.x >> 16);
    x[2] = static_cast<uint16_t>(v.y), x[3] = static_cast<uint16_t>(v.y >> 16);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j) x[j] = i + j < n ? p[i + j] : uint16_t{0};
  }
}
// Four codes, element i + j in byte j (little-endian, as a 4-byte load gives them).
template <bool kAligned>
__device__ __forceinline__ uint32_t load_run_codes(const uint8_t* p, uint32_t i, uint32_t n) {
  if (kAligned && i + kRun <= n) return *reinterpret_cast<const uint32_t*>(p + i);
  uint32_t codes = 0;
#pragma unroll
  for (int j = 0; j < kRun; ++j)
    if (i + j < n) codes |= static_cast<uint32_t>(p[i + j]) << (8 * j);
  return codes;
}
template <bool kAligned>
__device__ __forceinline__ void store_run(float* p, uint32_t i, uint32_t n, const float (&x)[kRun]) {
  if (kAligned && i + kRun <= n) {
    *reinterpret_cast<float4*>(p + i) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j)
      if (i + j < n) p[i + j] = x[j];
  }
}
template <bool kAligned>
__device__ __forceinline__ void store_run(uint16_t* p, uint32_t i, uint32_t n, const uint16_t (&x)[kRun]) {
  if (kAligned && i + kRun <= n) {
    *reinterpret_cast<uint2*>(p + i) = make_uint2(x[0] | static_cast<uint32_t>(x[1]) << 16,
                                                  x[2] | static_cast<uint32_t>(x[3]) << 16);
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j)
      if (i + j < n) p[i + j] = x[j];
  }
}
template <bool kAligned>
__device__ __forceinline__ void store_run_codes(uint8_t* p, uint32_t i, uint32_t n, uint32_t codes) {
  if (kAligned && i + kRun <= n) {
    *reinterpret_cast<uint32_t*>(p + i) = codes;
  } else {
#pragma unroll
    for (int j = 0; j < kRun; ++j)
      if (i + j < n) p[i + j] = static_cast<uint8_t>(codes >> (8 * j));
  }
}
template <bool kAligned>
__device__ __forceinline__ void store_run_bf16(uint16_t* p, uint32_t i, uint32_t n, const float (&x)[kRun]) {
  uint16_t h[kRun];
#pragma unroll
  for (int j = 0; j < kRun; ++j) h[j] = f32_to_bf16(x[j]);
  store_run<kAligned>(p, i, n, h);
}
template <bool kGradBf16, bool kAligned>
__device__ __forceinline__ void load_grad_run(const void* grad, uint32_t i, uint32_t n, float (&g)[kRun]) {
  if constexpr (kGradBf16) {
    uint16_t h[kRun];
    load_run<kAligned>(static_cast<const uint16_t*>(grad), i, n, h);
#pragma unroll
    for (int j = 0; j < kRun; ++j) g[j] = bf16_to_f32(h[j]);
  } else {
    load_run<kAligned>(static_cast<const float*>(grad), i, n, g);
  }
}

// q8 block b of chunk c by one warp: loads, update, absmax, encode, stores (see the top).
template <ElementwiseKind kKind, bool kQ8, bool kGradBf16, bool kAligned>
__device__ __forceinline__ void vector_block(const CompactChunk& c, const CompactScalars& s, uint32_t b, int lane) {
  constexpr bool kAdam = kKind == ElementwiseKind::kAdamW;
  const uint32_t n = c.count;
  const uint32_t first = b * kBlock + kRun * static_cast<uint32_t>(lane);  // this lane's first run
  // Loads: everything this lane needs from the block, in flight together.
  float w[kRuns][kRun], g[kRuns][kRun];
  uint32_t codes[2][kRuns];          // q8: four codes per run, per state slot
  uint16_t bf[2][kRuns][kRun];       // bf16 state, per slot
  float am = 0.0f, av = 0.0f;
#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
    const uint32_t i = first + r * kRunStride;
    load_run<kAligned>(c.param, i, n, w[r]);
    load_grad_run<kGradBf16, kAligned>(c.grad, i, n, g[r]);
#pragma unroll
    for (int k = 0; k < (kAdam ? 2 : 1); ++k) {
      if constexpr (kQ8) codes[k][r] = load_run_codes<kAligned>(static_cast<const uint8_t*>(c.values[k]), i, n);
      else load_run<kAligned>(static_cast<const uint16_t*>(c.values[k]), i, n, bf[k][r]);
    }
  }
  if constexpr (kQ8) {
    am = c.absmax[0][b];
    if constexpr (kAdam) av = c.absmax[1][b];
  }
  // Update, element by element in the warp kernel's arithmetic, one run after the other; a run's new
  // parameters (and mirror) are stored as soon as they are computed (fewer live registers; the loads
  // of both runs are already in flight). m and v_or_sqrt keep the new state (q8 AdamW: sqrt(v), from
  // which the unsigned code is encoded) until the block's absmax is known.
  float m[kRuns][kRun], v_or_sqrt[kRuns][kRun];
  uint32_t m_max = 0, v_max = 0;
#pragma unroll
  for (int r = 0; r < kRuns; ++r) {
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      const uint32_t i = first + r * kRunStride + j;
      m[r][j] = v_or_sqrt[r][j] = 0.0f;
      if (i >= n) continue;
      float mi, vi = 0.0f, sqrt_v = 0.0f;
      if constexpr (kQ8) {
        mi = __fmul_rn(codec::decode_signed(static_cast<uint8_t>(codes[0][r] >> (8 * j))), am);
        if constexpr (kAdam) vi = __fmul_rn(codec::decode_unsigned(static_cast<uint8_t>(codes[1][r] >> (8 * j))), av);
      } else {
        mi = bf16_to_f32(bf[0][r][j]);
        if constexpr (kAdam) vi = bf16_to_f32(bf[1][r][j]);
      }
      if constexpr (kAdam) w[r][j] = adamw_update(s, g[r][j], w[r][j], mi, vi, sqrt_v);
      else if constexpr (kKind == ElementwiseKind::kLion) w[r][j] = lion_update(s, g[r][j], w[r][j], mi);
      else w[r][j] = sgd_momentum_update(s, g[r][j], w[r][j], mi);
      m[r][j] = mi;
      const uint32_t mb = codec::bits_of(mi) & 0x7fffffffu;
      m_max = mb > m_max ? mb : m_max;
      if constexpr (kAdam) {
        v_or_sqrt[r][j] = kQ8 ? sqrt_v : vi;
        const uint32_t vb = codec::bits_of(vi) & 0x7fffffffu;
        v_max = vb > v_max ? vb : v_max;
      }
    }
    const uint32_t i = first + r * kRunStride;
    store_run<kAligned>(c.param, i, n, w[r]);
    if (c.mirror != nullptr) store_run_bf16<kAligned>(c.mirror, i, n, w[r]);
  }
  // The state.
  if constexpr (kQ8) {
    const auto [a_m, r_m, a_v, r_v] = block_scales<kAdam>(c, b, lane, m_max, v_max);
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      uint32_t m_codes = 0, v_codes = 0;
#pragma unroll
      for (int j = 0; j < kRun; ++j) {
        m_codes |= static_cast<uint32_t>(encode_signed_in_block(m[r][j], a_m, r_m)) << (8 * j);
        if constexpr (kAdam)
          v_codes |= static_cast<uint32_t>(a_v == 0.0f ? 0 : codec::encode_unsigned(__fmul_rn(v_or_sqrt[r][j], r_v)))
                     << (8 * j);
      }
      const uint32_t i = first + r * kRunStride;
      store_run_codes<kAligned>(static_cast<uint8_t*>(c.values[0]), i, n, m_codes);
      if constexpr (kAdam) store_run_codes<kAligned>(static_cast<uint8_t*>(c.values[1]), i, n, v_codes);
    }
  } else {
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const uint32_t i = first + r * kRunStride;
      store_run_bf16<kAligned>(static_cast<uint16_t*>(c.values[0]), i, n, m[r]);
      if constexpr (kAdam) store_run_bf16<kAligned>(static_cast<uint16_t*>(c.values[1]), i, n, v_or_sqrt[r]);
    }
  }
}

// One launch over the chunks of one alignment class (kAligned: all pointers aligned for the runs),
// so that the aligned kernel's registers are not those of the element-by-element accesses.
template <ElementwiseKind kKind, bool kQ8, bool kGradBf16, bool kAligned>
__global__ void __launch_bounds__(kWarps * 32, kAligned ? kVectorBlocksPerSm : 1)
    compact_vector_kernel(const CompactChunk* chunks, CompactScalars s) {
  const CompactChunk c = chunks[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t blocks = (c.count + kBlock - 1) / kBlock;
  for (uint32_t b = warp; b < blocks; b += kWarps) vector_block<kKind, kQ8, kGradBf16, kAligned>(c, s, b, lane);
}

// Decode or encode of q8 block b of chunk c by one warp, lanes and phases as vector_block.
template <bool kEncode, bool kQ8, bool kAligned>
__device__ __forceinline__ void codec_vector_block(const CompactCodecChunk& c, uint32_t b, int lane) {
  const uint32_t n = c.count;
  const uint32_t first = b * kBlock + kRun * static_cast<uint32_t>(lane);
  if constexpr (!kEncode) {
    uint32_t codes[kRuns];
    uint16_t bf[kRuns][kRun];
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      const uint32_t i = first + r * kRunStride;
      if constexpr (kQ8) codes[r] = load_run_codes<kAligned>(static_cast<const uint8_t*>(c.values), i, n);
      else load_run<kAligned>(static_cast<const uint16_t*>(c.values), i, n, bf[r]);
    }
    const float a = kQ8 ? c.absmax[b] : 0.0f;
#pragma unroll
    for (int r = 0; r < kRuns; ++r) {
      float x[kRun];
#pragma unroll
      for (int j = 0; j < kRun; ++j)
        x[j] = kQ8 ? __fmul_rn(codec::decode_signed(static_cast<uint8_t>(codes[r] >> (8 * j))), a)
                   : bf16_to_f32(bf[r][j]);
      store_run<kAligned>(c.f32, first + r * kRunStride, n, x);
    }
  } else {
    float x[kRuns][kRun];
#pragma unroll
    for (int r = 0; r < kRuns; ++r) load_run<kAligned>(c.f32, first + r * kRunStride, n, x[r]);
    if constexpr (!kQ8) {
#pragma unroll
      for (int r = 0; r < kRuns; ++r)
        store_run_bf16<kAligned>(static_cast<uint16_t*>(c.values), first + r * kRunStride, n, x[r]);
    } else {
      // Elements past n read as 0: they leave the max unchanged, as in the warp kernel.
      uint32_t x_max = 0;
#pragma unroll
      for (int r = 0; r < kRuns; ++r)
#pragma unroll
        for (int j = 0; j < kRun; ++j) {
          const uint32_t xb = codec::bits_of(x[r][j]) & 0x7fffffffu;
          x_max = xb > x_max ? xb : x_max;
        }
      const float a = codec::float_of(warp_max(x_max));
      const float rcp = __frcp_rn(a);
      if (lane == 0) c.absmax[b] = a;
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        uint32_t codes = 0;
#pragma unroll
        for (int j = 0; j < kRun; ++j)
          codes |= static_cast<uint32_t>(encode_signed_in_block(x[r][j], a, rcp)) << (8 * j);
        store_run_codes<kAligned>(static_cast<uint8_t*>(c.values), first + r * kRunStride, n, codes);
      }
    }
  }
}

template <bool kEncode, bool kQ8, bool kAligned>
__global__ void __launch_bounds__(kWarps * 32, kAligned ? kVectorBlocksPerSm : 1)
    codec_vector_kernel(const CompactCodecChunk* chunks) {
  const CompactCodecChunk c = chunks[blockIdx.x];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const uint32_t blocks = (c.count + kBlock - 1) / kBlock;
  for (uint32_t b = warp; b < blocks; b += kWarps) codec_vector_block<kEncode, kQ8, kAligned>(c, b, lane);
}

// The warp kernel over all chunks, or the vector kernel: aligned chunks (the table's first
// `aligned`) and the others, one launch each.
template <ElementwiseKind kKind, bool kQ8, bool kGradBf16>
void launch_one(bool vector, const CompactChunk* chunks, int n, int aligned, const CompactScalars& s,
                cudaStream_t stream) {
  if (!vector) {
    compact_kernel<kKind, kQ8, kGradBf16><<<n, kWarps * 32, 0, stream>>>(chunks, s);
    return;
  }
  if (aligned > 0) compact_vector_kernel<kKind, kQ8, kGradBf16, true><<<aligned, kWarps * 32, 0, stream>>>(chunks, s);
  if (n > aligned)
    compact_vector_kernel<kKind, kQ8, kGradBf16, false><<<n - aligned, kWarps * 32, 0, stream>>>(chunks + aligned, s);
}

template <ElementwiseKind kKind, bool kQ8>
void launch_typed(bool vector, bool grad_bf16, const CompactChunk* chunks, int n, int aligned, const CompactScalars& s,
                  cudaStream_t stream) {
  if (grad_bf16) launch_one<kKind, kQ8, true>(vector, chunks, n, aligned, s, stream);
  else launch_one<kKind, kQ8, false>(vector, chunks, n, aligned, s, stream);
}

template <ElementwiseKind kKind>
void launch_kind(bool vector, bool q8, bool grad_bf16, const CompactChunk* chunks, int n, int aligned,
                 const CompactScalars& s, cudaStream_t stream) {
  if (q8) launch_typed<kKind, true>(vector, grad_bf16, chunks, n, aligned, s, stream);
  else launch_typed<kKind, false>(vector, grad_bf16, chunks, n, aligned, s, stream);
}

template <bool kEncode, bool kQ8>
void launch_codec(bool vector, const CompactCodecChunk* chunks, int n, int aligned, cudaStream_t stream) {
  if (!vector) {
    codec_kernel<kEncode, kQ8><<<n, kWarps * 32, 0, stream>>>(chunks);
    return;
  }
  if (aligned > 0) codec_vector_kernel<kEncode, kQ8, true><<<aligned, kWarps * 32, 0, stream>>>(chunks);
  if (n > aligned) codec_vector_kernel<kEncode, kQ8, false><<<n - aligned, kWarps * 32, 0, stream>>>(chunks + aligned);
}

}  // namespace

void launch_compact_codec(bool vector, bool encode, bool q8, const CompactCodecChunk* chunks, int chunk_count,
                          int aligned_count, cudaStream_t stream) {
  if (chunk_count == 0) return;
  if (encode) {
    if (q8) launch_codec<true, true>(vector, chunks, chunk_count, aligned_count, stream);
    else launch_codec<true, false>(vector, chunks, chunk_count, aligned_count, stream);
  } else {
    if (q8) launch_codec<false, true>(vector, chunks, chunk_count, aligned_count, stream);
    else launch_codec<false, false>(vector, chunks, chunk_count, aligned_count, stream);
  }
}

void launch_compact_elementwise(bool vector, ElementwiseKind kind, bool q8, bool grad_bf16, const CompactChunk* chunks,
                                int chunk_count, int aligned_count, const CompactScalars& s, cudaStream_t stream) {
  if (chunk_count == 0) return;
  switch (kind) {
    case ElementwiseKind::kAdamW:
      launch_kind<ElementwiseKind::kAdamW>(vector, q8, grad_bf16, chunks, chunk_count, aligned_count, s, stream);
      break;
    case ElementwiseKind::kLion:
      launch_kind<ElementwiseKind::kLion>(vector, q8, grad_bf16, chunks, chunk_count, aligned_count, s, stream);
      break;
    case ElementwiseKind::kSgd:
      launch_kind<ElementwiseKind::kSgd>(vector, q8, grad_bf16, chunks, chunk_count, aligned_count, s, stream);
      break;
  }
}

}  // namespace shardopt::cuda::detail
