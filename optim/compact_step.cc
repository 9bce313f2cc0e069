#include "optim/compact_step.h"

#include <algorithm>
#include <string>
#include <vector>

#include <fmt/format.h>

#if defined(__x86_64__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized (their _mm512_undefined_* self-initialize).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "base/error.h"
#include "base/thread_pool.h"
#include "optim/compact_codec.h"
#include "optim/elementwise_kernels.h"
#include "optim/quant8_codec.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

// Elements per tile: the decoded state of a tile (2 slots x 8 KiB) stays in L1 between the decode,
// the update and the encode.
constexpr int64_t kTileElems = 8 * kQ8BlockElems;
static_assert(kCompactChunkElems % kTileElems == 0, "a pool task is a whole number of tiles");

void check_compact(const CompactState& s, const char* what, size_t index, int slot) {
  if ((s.dtype != proto::STATE_BF16 && s.dtype != proto::STATE_Q8) || s.values == nullptr ||
      (s.dtype == proto::STATE_Q8 && s.absmax == nullptr))
    throw ConfigError(fmt::format("{}: slice {} state slot {}: expected bf16 or q8 storage with non-null buffers, "
                                  "found {}", what, index, slot, state_dtype_name(s.dtype)));
}

// bf16 state: elements [start, start + n) of slice s, tile by tile: decode the tile's state slots
// into L1 scratch, run the fp32 update loops on them, encode the new state.
SHARDOPT_KERNEL void run_range_bf16(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                    const CompactSlots& slots, int64_t start, int64_t n) {
  alignas(64) static thread_local float scratch[2][kTileElems];
  const size_t gsize = dtype_size(s.grad_dtype);
  for (int64_t t = start; t < start + n; t += kTileElems) {
    const int64_t len = std::min(kTileElems, start + n - t);
    ElementwiseSlice tile = s;
    tile.master = s.master + t;
    tile.mirror = s.mirror ? s.mirror + t : nullptr;
    tile.grad = static_cast<const unsigned char*>(s.grad) + static_cast<size_t>(t) * gsize;
    tile.count = static_cast<size_t>(len);
    CompactState st[2];
    for (int k = 0; k < p.state_slots; ++k) {
      st[k] = advanced(slots.slot[k], t);
      decode_compact(st[k], len, scratch[k]);
      tile.state[k] = scratch[k];
    }
    detail::run_prepared(p, tile, 0, static_cast<size_t>(len));
    for (int k = 0; k < p.state_slots; ++k) encode_compact(st[k], len, scratch[k]);
  }
}

// q8 state, one block (len <= kQ8BlockElems elements) per call, in one pass over memory: each
// element's state is decoded from its code in the update loop, the update is the fp32 one
// (elementwise_kernels.h), the new state goes to an L1 scratch while the loop keeps the block's new
// absmax (an integer max over the magnitude bits, NaN-preserving: quant8_codec.h), then the block
// is encoded. AdamW's v is encoded from the sqrt(v) the update computed (the unsigned code lives in
// the sqrt domain).
constexpr int64_t kPrefetchBlocks = 2;

struct Q8Block {
  uint8_t* codes;
  float* absmax;  // the block's one absmax: read, then replaced
};

template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_q8_block(const detail::AdamConsts& k, float* __restrict w, bf16* __restrict mirror,
                                    const G* __restrict grad, Q8Block m_block, Q8Block v_block, int64_t len) {
  alignas(64) float m_new[kQ8BlockElems], sqrt_v_new[kQ8BlockElems];
  const uint8_t* __restrict mc = m_block.codes;
  const uint8_t* __restrict vc = v_block.codes;
  const float am = *m_block.absmax, av = *v_block.absmax;
  uint32_t m_max = 0, v_max = 0;
  for (int64_t i = 0; i < len; ++i) {
    float m = codec::decode_signed(mc[i]) * am, v = codec::decode_unsigned(vc[i]) * av, sqrt_v;
    const float wi = detail::adamw_update(k, load_as_float(grad[i]), w[i], m, v, sqrt_v);
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
    m_new[i] = m;
    sqrt_v_new[i] = sqrt_v;
    const uint32_t mb = codec::bits_of(m) & 0x7fffffffu, vb = codec::bits_of(v) & 0x7fffffffu;
    m_max = mb > m_max ? mb : m_max;
    v_max = vb > v_max ? vb : v_max;
  }
  *m_block.absmax = codec::float_of(m_max);
  *v_block.absmax = codec::float_of(v_max);
  codec::encode_signed_block(m_new, len, *m_block.absmax, m_block.codes);
  codec::encode_unsigned_block_from_sqrt(sqrt_v_new, len, *v_block.absmax, v_block.codes);
}

// Lion's m and SGD's momentum buffer: one signed slot; Update(g, w, state&) -> new w. The update
// loop writes the new state to m_new and the block's new absmax; one_slot_q8_block then encodes.
template <typename G, bool kMirror, typename Update>
SHARDOPT_KERNEL void one_slot_q8_update(const Update& update, float* __restrict w, bf16* __restrict mirror,
                                        const G* __restrict grad, Q8Block block, int64_t len,
                                        float* __restrict m_new) {
  const uint8_t* __restrict mc = block.codes;
  const float am = *block.absmax;
  uint32_t m_max = 0;
  for (int64_t i = 0; i < len; ++i) {
    float m = codec::decode_signed(mc[i]) * am;
    const float wi = update(load_as_float(grad[i]), w[i], m);
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
    m_new[i] = m;
    const uint32_t mb = codec::bits_of(m) & 0x7fffffffu;
    m_max = mb > m_max ? mb : m_max;
  }
  *block.absmax = codec::float_of(m_max);
}

template <typename G, bool kMirror, typename Update>
SHARDOPT_KERNEL void one_slot_q8_block(const Update& update, float* __restrict w, bf16* __restrict mirror,
                                       const G* __restrict grad, Q8Block block, int64_t len) {
  alignas(64) float m_new[kQ8BlockElems];
  one_slot_q8_update<G, kMirror>(update, w, mirror, grad, block, len, m_new);
  codec::encode_signed_block(m_new, len, *block.absmax, block.codes);
}

// The update and encode phases of a block leave the memory streams idle; prefetching the block
// kPrefetchBlocks ahead of block b (when it lies before `end`) keeps them busy (the fp32 loop
// streams without gaps).
template <typename G>
SHARDOPT_KERNEL void prefetch_ahead(const detail::PreparedStep& p, const ElementwiseSlice& s, const G* grad,
                                    const CompactSlots& slots, int64_t b, int64_t end) {
  if (b + (kPrefetchBlocks + 1) * kQ8BlockElems > end) return;
  const int64_t ahead = b + kPrefetchBlocks * kQ8BlockElems;
  for (int64_t e = 0; e < kQ8BlockElems; e += 16) {
    __builtin_prefetch(grad + ahead + e);
    __builtin_prefetch(s.master + ahead + e, 1);
  }
  for (int k = 0; k < p.state_slots; ++k)
    for (int64_t e = 0; e < kQ8BlockElems; e += 64)
      __builtin_prefetch(static_cast<uint8_t*>(slots.slot[k].values) + ahead + e, 1);
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void run_range_q8_typed(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                        const CompactSlots& slots, int64_t start, int64_t n) {
  const G* grad = static_cast<const G*>(s.grad);
  const detail::SgdMomentumTerms sgd_terms = detail::sgd_momentum_terms(p.sgd);
  auto lion = [&](float g, float w, float& m) { return detail::lion_update(p.lion, g, w, m); };
  auto sgd = [&](float g, float w, float& m) { return detail::sgd_momentum_update(p.sgd, sgd_terms, g, w, m); };
  for (int64_t b = start; b < start + n; b += kQ8BlockElems) {
    const int64_t len = std::min(kQ8BlockElems, start + n - b);
    const int64_t j = b / kQ8BlockElems;
    prefetch_ahead(p, s, grad, slots, b, start + n);
    bf16* mirror = kMirror ? s.mirror + b : nullptr;
    const Q8Block m{static_cast<uint8_t*>(slots.slot[0].values) + b, slots.slot[0].absmax + j};
    switch (p.kind) {
      case proto::OPTIMIZER_ADAMW:
        adamw_q8_block<G, kMirror>(p.adam, s.master + b, mirror, grad + b, m,
                                   {static_cast<uint8_t*>(slots.slot[1].values) + b, slots.slot[1].absmax + j}, len);
        break;
      case proto::OPTIMIZER_LION: one_slot_q8_block<G, kMirror>(lion, s.master + b, mirror, grad + b, m, len); break;
      case proto::OPTIMIZER_SGD: one_slot_q8_block<G, kMirror>(sgd, s.master + b, mirror, grad + b, m, len); break;
      default: break;
    }
  }
}

// Elements [start, start + n) of slice s (start on a block boundary). A block touches only its own
// codes and absmax, so ranges may run in any order on any thread.
SHARDOPT_KERNEL void run_range(const detail::PreparedStep& p, const ElementwiseSlice& s, const CompactSlots& slots,
                               int64_t start, int64_t n) {
  if (slots.slot[0].dtype != proto::STATE_Q8) return run_range_bf16(p, s, slots, start, n);
  if (s.grad_dtype == DType::kBF16) {
    if (s.mirror) run_range_q8_typed<bf16, true>(p, s, slots, start, n);
    else run_range_q8_typed<bf16, false>(p, s, slots, start, n);
  } else {
    if (s.mirror) run_range_q8_typed<float, true>(p, s, slots, start, n);
    else run_range_q8_typed<float, false>(p, s, slots, start, n);
  }
}

// Vector builds of the q8 ranges (AVX-512 and AVX2 + FMA). In the loops above, a block's AdamW update
// loop is bound by the divider (one vdivps and one vsqrtps per vector, like the fp32 step), and the
// two encode loops (integer work on the vector ALU ports) run after it with the divider idle; the
// compiler also widens the code bytes through 16-bit lanes and narrows them back through permutes
// (AVX-512: vpermt2w + vpmovwb), and in AVX2 its one-slot (Lion, SGD) loops spill. Here, in
// intrinsics, each full block's AdamW update loop also encodes the previous block from its scratch
// (the encode runs while the divider is busy), the code bytes are widened with one vpmovzxbd (or
// vpmovsxbd) per vector and the codes packed back with saturating packs, which also clamp them
// (in-lane packs, their byte order fixed by one dword permute per pack). Lion and SGD momentum (no
// divider work to hide) update a full block the same way, then encode it. The arithmetic is the
// loops' above, operation for operation (the products GCC fuses into FMAs in adamw_update,
// lion_update and sgd_momentum_update are the fused ones here; the codec is integer work on the
// bits): codes, absmax, weights and mirror are the same bit for bit as the loops above in the same
// build (tests/optim/compact_step_test.cc). What the fast encode does not cover (a short last block,
// an absmax outside the normal range of 1 / absmax, a zero v absmax) goes through the block functions
// above. The loops are written once, in compact_step_q8_ranges.inc, included into each build's
// namespace below after its vector primitives (16 lanes for AVX-512; 8 for AVX2, which has no mask
// registers: its selects are and / andnot / blends).
#if defined(__x86_64__)

// A full block whose update ran and whose codes are still to be written (AdamW: m and sqrt(v)).
struct PendingBlock {
  Q8Block m, v;
  const float* m_new = nullptr;  // nullptr: none pending
  const float* sqrt_v_new = nullptr;
};

// Whether encode_signed64 / encode_unsigned64 with factors 1 / a_m and 1 / sqrt(a_v) encode the
// block as codec::encode_signed_block / encode_unsigned_block_from_sqrt do (their common case).
SHARDOPT_KERNEL bool fast_encodable(const PendingBlock& b) {
  const float a_m = *b.m.absmax, a_v = *b.v.absmax;
  return a_m >= 0x1p-126f && a_m <= 0x1p126f && a_v != 0.0f;
}

SHARDOPT_KERNEL void encode_portable(const PendingBlock& b) {
  codec::encode_signed_block(b.m_new, kQ8BlockElems, *b.m.absmax, b.m.codes);
  codec::encode_unsigned_block_from_sqrt(b.sqrt_v_new, kQ8BlockElems, *b.v.absmax, b.v.codes);
}

#define SHARDOPT_AVX512_INLINE \
  inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace avx512 {

using F = __m512;
using I = __m512i;
constexpr int64_t kLanes = 16;

SHARDOPT_AVX512_INLINE I splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
SHARDOPT_AVX512_INLINE F set1(float x) { return _mm512_set1_ps(x); }
SHARDOPT_AVX512_INLINE I zero_i() { return _mm512_setzero_si512(); }
SHARDOPT_AVX512_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
SHARDOPT_AVX512_INLINE F load(const bf16* p) {  // bf16_to_float: the bits << 16
  const I h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
SHARDOPT_AVX512_INLINE void store(float* p, F x) { _mm512_storeu_ps(p, x); }
SHARDOPT_AVX512_INLINE void store_aligned(float* p, F x) { _mm512_store_ps(p, x); }
SHARDOPT_AVX512_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
SHARDOPT_AVX512_INLINE F div(F a, F b) { return _mm512_div_ps(a, b); }
SHARDOPT_AVX512_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
SHARDOPT_AVX512_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
SHARDOPT_AVX512_INLINE F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
SHARDOPT_AVX512_INLINE F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
SHARDOPT_AVX512_INLINE F sign(F x) {
  const F zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  return _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), one),
                       _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), one));
}
SHARDOPT_AVX512_INLINE I max_magnitude(I acc, F x) {
  return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), splat(0x7fffffffu)));
}
SHARDOPT_AVX512_INLINE uint32_t reduce_max(I x) { return _mm512_reduce_max_epu32(x); }

// codec::decode_signed(codes[i]) * absmax for 16 codes.
SHARDOPT_AVX512_INLINE F decode_signed(const uint8_t* codes, F absmax) {
  const I c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __mmask16 nonzero = _mm512_test_epi32_mask(c, splat(0x7fu));
  // ((c & 0x7f) + kSignedOffset) << kSignedShift, 0 for code 0
  const I k_bits = _mm512_and_si512(_mm512_slli_epi32(c, codec::kSignedShift), splat(0x7fu << codec::kSignedShift));
  const I magnitude = _mm512_maskz_add_epi32(
      nonzero, k_bits, splat(static_cast<uint32_t>(codec::kSignedOffset) << codec::kSignedShift));
  // magnitude | (sign bit of c << 24)
  const I bits = _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi32(c, 24), splat(0x80000000u), 0xf8);
  return _mm512_mul_ps(_mm512_castsi512_ps(bits), absmax);
}

// codec::decode_unsigned(codes[i]) * absmax for 16 codes: s has the bits (c + kUnsignedOffset) << 19;
// (s * s) * absmax.
SHARDOPT_AVX512_INLINE F decode_unsigned(const uint8_t* codes, F absmax) {
  const I c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const F sq = _mm512_castsi512_ps(_mm512_add_epi32(
      _mm512_slli_epi32(c, codec::kUnsignedShift),
      splat(static_cast<uint32_t>(codec::kUnsignedOffset) << codec::kUnsignedShift)));
  return _mm512_mul_ps(_mm512_mul_ps(sq, sq), absmax);
}

// to_bf16_rne for 16 values.
SHARDOPT_AVX512_INLINE void store_bf16(bf16* p, F x) {
  const I u = _mm512_castps_si512(x), high = _mm512_srli_epi32(u, 16);
  const I rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, splat(0x7fffu)), _mm512_and_si512(high, splat(1u))), 16);
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, splat(0x7fffffffu)), splat(0x7f800000u));
  const I out = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_or_si512(high, splat(0x40u)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}

// Rounded magnitude bits of x * factor, (|bits| + half) >> shift (magnitude_code before the offset):
// at most 4096, so the saturating packs below keep it exact.
template <uint32_t kShift>
SHARDOPT_AVX512_INLINE I rounded_magnitude(I bits) {
  const I magnitude = _mm512_and_si512(bits, splat(0x7fffffffu));
  return _mm512_srli_epi32(_mm512_add_epi32(magnitude, splat(1u << (kShift - 1))), kShift);
}

// The byte order of two packs of four vectors (in-lane packs leave 4-byte groups transposed).
SHARDOPT_AVX512_INLINE I unpack_order(I packed) {
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), packed);
}

// codes[i] = codec::encode_signed(x[i] * factor) for 64 values: the code k = rounded - kSignedOffset
// clamped to [0, 127] by an unsigned saturating subtract, the byte pack's saturation at 255 and a
// min; the sign byte from signed saturating packs of the bits.
SHARDOPT_AVX512_INLINE void encode_signed64(const float* x, F factor, uint8_t* codes) {
  I bits[4], rounded[4];
  for (int j = 0; j < 4; ++j) {
    bits[j] = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * j), factor));
    rounded[j] = rounded_magnitude<codec::kSignedShift>(bits[j]);
  }
  const I offset = _mm512_set1_epi16(static_cast<int16_t>(codec::kSignedOffset));
  const I k01 = _mm512_subs_epu16(_mm512_packus_epi32(rounded[0], rounded[1]), offset);
  const I k23 = _mm512_subs_epu16(_mm512_packus_epi32(rounded[2], rounded[3]), offset);
  const I k = _mm512_min_epu8(_mm512_packus_epi16(k01, k23), _mm512_set1_epi8(127));
  const I sign = _mm512_packs_epi16(_mm512_packs_epi32(bits[0], bits[1]), _mm512_packs_epi32(bits[2], bits[3]));
  const I code = _mm512_ternarylogic_epi32(k, sign, _mm512_set1_epi8(static_cast<char>(0x80)), 0xf8);
  _mm512_storeu_si512(codes, unpack_order(code));
}

// codes[i] = codec::encode_unsigned(sqrt_x[i] * factor) for 64 values (clamp as above, top 255).
SHARDOPT_AVX512_INLINE void encode_unsigned64(const float* sqrt_x, F factor, uint8_t* codes) {
  I rounded[4];
  for (int j = 0; j < 4; ++j)
    rounded[j] = rounded_magnitude<codec::kUnsignedShift>(
        _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(sqrt_x + 16 * j), factor)));
  const I offset = _mm512_set1_epi16(static_cast<int16_t>(codec::kUnsignedOffset));
  const I k01 = _mm512_subs_epu16(_mm512_packus_epi32(rounded[0], rounded[1]), offset);
  const I k23 = _mm512_subs_epu16(_mm512_packus_epi32(rounded[2], rounded[3]), offset);
  _mm512_storeu_si512(codes, unpack_order(_mm512_packus_epi16(k01, k23)));
}

#define SHARDOPT_Q8_INLINE SHARDOPT_AVX512_INLINE
#define SHARDOPT_Q8_BUILD SHARDOPT_BUILD_AVX512
#include "optim/compact_step_q8_ranges.inc"
#undef SHARDOPT_Q8_INLINE
#undef SHARDOPT_Q8_BUILD

}  // namespace avx512

#define SHARDOPT_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma")))

namespace avx2 {

using F = __m256;
using I = __m256i;
constexpr int64_t kLanes = 8;

SHARDOPT_AVX2_INLINE I splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
SHARDOPT_AVX2_INLINE F set1(float x) { return _mm256_set1_ps(x); }
SHARDOPT_AVX2_INLINE I zero_i() { return _mm256_setzero_si256(); }
SHARDOPT_AVX2_INLINE F load(const float* p) { return _mm256_loadu_ps(p); }
SHARDOPT_AVX2_INLINE F load(const bf16* p) {  // bf16_to_float: the bits << 16
  const I h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
SHARDOPT_AVX2_INLINE void store(float* p, F x) { _mm256_storeu_ps(p, x); }
SHARDOPT_AVX2_INLINE void store_aligned(float* p, F x) { _mm256_store_ps(p, x); }
SHARDOPT_AVX2_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
SHARDOPT_AVX2_INLINE F div(F a, F b) { return _mm256_div_ps(a, b); }
SHARDOPT_AVX2_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
SHARDOPT_AVX2_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
SHARDOPT_AVX2_INLINE F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
SHARDOPT_AVX2_INLINE F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
SHARDOPT_AVX2_INLINE F sign(F x) {
  const F zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), one));
}
SHARDOPT_AVX2_INLINE I max_magnitude(I acc, F x) {
  return _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(x), splat(0x7fffffffu)));
}
SHARDOPT_AVX2_INLINE uint32_t reduce_max(I x) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// 8 code bytes widened to int32.
SHARDOPT_AVX2_INLINE I load_codes(const uint8_t* codes) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
}

// codec::decode_signed(codes[i]) * absmax for 8 codes, sign-extended (the code's sign bit fills bits
// 7-31): (sign << 31 | k << 20) + (k == 0 ? 0 : kSignedOffset << 20), k = code & 0x7f.
SHARDOPT_AVX2_INLINE F decode_signed(const uint8_t* codes, F absmax) {
  const I c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  const I k_is_zero = _mm256_cmpeq_epi32(_mm256_slli_epi32(c, 25), zero_i());
  const I sign_and_k = _mm256_and_si256(_mm256_slli_epi32(c, codec::kSignedShift),
                                        splat(0x80000000u | (0x7fu << codec::kSignedShift)));
  const I bits = _mm256_add_epi32(
      sign_and_k,
      _mm256_andnot_si256(k_is_zero, splat(static_cast<uint32_t>(codec::kSignedOffset) << codec::kSignedShift)));
  return _mm256_mul_ps(_mm256_castsi256_ps(bits), absmax);
}

// codec::decode_unsigned(codes[i]) * absmax for 8 codes: s has the bits (c + kUnsignedOffset) << 19;
// (s * s) * absmax.
SHARDOPT_AVX2_INLINE F decode_unsigned(const uint8_t* codes, F absmax) {
  const F sq = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(load_codes(codes), codec::kUnsignedShift),
                       splat(static_cast<uint32_t>(codec::kUnsignedOffset) << codec::kUnsignedShift)));
  return _mm256_mul_ps(_mm256_mul_ps(sq, sq), absmax);
}

// to_bf16_rne for 8 values (the magnitude bits compare as signed int32: both sides are below 2^31).
SHARDOPT_AVX2_INLINE void store_bf16(bf16* p, F x) {
  const I u = _mm256_castps_si256(x), high = _mm256_srli_epi32(u, 16);
  const I rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, splat(0x7fffu)), _mm256_and_si256(high, splat(1u))), 16);
  const I is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, splat(0x7fffffffu)), splat(0x7f800000u));
  const I out = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, splat(0x40u)), is_nan);
  // Every lane is at most 0xffff: the unsigned saturating pack keeps it.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1)));
}

// Rounded magnitude bits of x * factor, (|bits| + half) >> shift (magnitude_code before the offset):
// at most 4096, so the saturating packs below keep it exact.
template <uint32_t kShift>
SHARDOPT_AVX2_INLINE I rounded_magnitude(I bits) {
  const I magnitude = _mm256_and_si256(bits, splat(0x7fffffffu));
  return _mm256_srli_epi32(_mm256_add_epi32(magnitude, splat(1u << (kShift - 1))), kShift);
}

// The byte order of two packs of four vectors: the in-lane packs leave the 4-byte groups as
// (v0 low, v1 low, v2 low, v3 low, v0 high, ..., v3 high).
SHARDOPT_AVX2_INLINE I unpack_order(I packed) {
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// codes[i] = codec::encode_signed(x[i] * factor) for 64 values, 32 per pack: clamped and signed as
// avx512::encode_signed64.
SHARDOPT_AVX2_INLINE void encode_signed64(const float* x, F factor, uint8_t* codes) {
  const I offset = _mm256_set1_epi16(static_cast<int16_t>(codec::kSignedOffset));
  for (int half = 0; half < 2; ++half) {
    I bits[4], rounded[4];
    for (int j = 0; j < 4; ++j) {
      bits[j] = _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * half + 8 * j), factor));
      rounded[j] = rounded_magnitude<codec::kSignedShift>(bits[j]);
    }
    const I k01 = _mm256_subs_epu16(_mm256_packus_epi32(rounded[0], rounded[1]), offset);
    const I k23 = _mm256_subs_epu16(_mm256_packus_epi32(rounded[2], rounded[3]), offset);
    const I k = _mm256_min_epu8(_mm256_packus_epi16(k01, k23), _mm256_set1_epi8(127));
    const I sign =
        _mm256_packs_epi16(_mm256_packs_epi32(bits[0], bits[1]), _mm256_packs_epi32(bits[2], bits[3]));
    const I code = _mm256_or_si256(k, _mm256_and_si256(sign, _mm256_set1_epi8(static_cast<char>(0x80))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * half), unpack_order(code));
  }
}

// codes[i] = codec::encode_unsigned(sqrt_x[i] * factor) for 64 values (clamp as above, top 255).
SHARDOPT_AVX2_INLINE void encode_unsigned64(const float* sqrt_x, F factor, uint8_t* codes) {
  const I offset = _mm256_set1_epi16(static_cast<int16_t>(codec::kUnsignedOffset));
  for (int half = 0; half < 2; ++half) {
    I rounded[4];
    for (int j = 0; j < 4; ++j)
      rounded[j] = rounded_magnitude<codec::kUnsignedShift>(
          _mm256_castps_si256(_mm256_mul_ps(_mm256_loadu_ps(sqrt_x + 32 * half + 8 * j), factor)));
    const I k01 = _mm256_subs_epu16(_mm256_packus_epi32(rounded[0], rounded[1]), offset);
    const I k23 = _mm256_subs_epu16(_mm256_packus_epi32(rounded[2], rounded[3]), offset);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * half), unpack_order(_mm256_packus_epi16(k01, k23)));
  }
}

#define SHARDOPT_Q8_INLINE SHARDOPT_AVX2_INLINE
#define SHARDOPT_Q8_BUILD SHARDOPT_BUILD_AVX2
#include "optim/compact_step_q8_ranges.inc"
#undef SHARDOPT_Q8_INLINE
#undef SHARDOPT_Q8_BUILD

}  // namespace avx2
#endif

// One build per instruction set (optim/kernel_options.h; flatten: the decode, update and encode
// loops are all compiled for the wrapper's target). The codec is bit-exact across them; the update
// loops may differ in the last bit between the portable and the FMA builds, as elementwise_step's do.
SHARDOPT_BUILD_PORTABLE void run_range_portable(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                                const CompactSlots& slots, int64_t start, int64_t n) {
  run_range(p, s, slots, start, n);
}
SHARDOPT_BUILD_AVX2 void run_range_avx2(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                        const CompactSlots& slots, int64_t start, int64_t n) {
#if defined(__x86_64__)
  if (slots.slot[0].dtype == proto::STATE_Q8) return avx2::run_range_q8(p, s, slots, start, n);
#endif
  run_range(p, s, slots, start, n);
}
SHARDOPT_BUILD_AVX512 void run_range_avx512(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                            const CompactSlots& slots, int64_t start, int64_t n) {
#if defined(__x86_64__)
  if (slots.slot[0].dtype == proto::STATE_Q8) return avx512::run_range_q8(p, s, slots, start, n);
#endif
  run_range(p, s, slots, start, n);
}

}  // namespace

StepResult elementwise_step_compact(const OptimizerParams& params, std::span<const ElementwiseSlice> slices,
                                    std::span<const CompactSlots> states, float lr, int64_t step, FiniteCheck check,
                                    const KernelOptions& exec) {
  if (slices.size() != states.size())
    throw ConfigError(fmt::format("elementwise_step_compact: {} slices but {} state entries", slices.size(),
                                  states.size()));
  const int slots = state_values_per_element(params);
  for (size_t i = 0; i < slices.size(); ++i)
    for (int k = 0; k < slots; ++k) {
      if (slices[i].count == 0) continue;
      const CompactState& st = states[i].slot[k];
      check_compact(st, "elementwise_step_compact", i, k);
      // The fused q8 loops take the code of each slot from the optimizer (q8_slot_is_nonnegative).
      if (st.dtype != states[i].slot[0].dtype ||
          (st.dtype == proto::STATE_Q8 && st.nonnegative != q8_slot_is_nonnegative(params.kind, k)))
        throw ConfigError(fmt::format("elementwise_step_compact: slice {} state slot {}: {} storage{} where the {} "
                                      "step needs {}{}", i, k, state_dtype_name(st.dtype),
                                      st.nonnegative ? " (unsigned code)" : "", optimizer_kind_name(params.kind),
                                      state_dtype_name(states[i].slot[0].dtype),
                                      q8_slot_is_nonnegative(params.kind, k) ? " (unsigned code)" : ""));
    }
  detail::PreparedStep prepared;
  const StepResult result = detail::prepare_elementwise_step(params, slices, lr, step, check, false, prepared);
  if (!result.applied) return result;
  if (slots == 0) return elementwise_step(params, slices, lr, step, FiniteCheck::kNone, exec);  // plain SGD: no state

  // One pool task per kCompactChunkElems of one slice; the result does not depend on the pool size.
  // Task t is found by walking the slices (few next to the tasks; no per-step table: the step
  // allocates nothing).
  const auto tasks_in = [](const ElementwiseSlice& s) {
    return (static_cast<int64_t>(s.count) + kCompactChunkElems - 1) / kCompactChunkElems;
  };
  int64_t tasks = 0;
  for (const ElementwiseSlice& s : slices) tasks += tasks_in(s);
  const Isa isa = select_isa(exec.max_isa);
  auto run_task = [&](int64_t task) {
    size_t i = 0;
    while (task >= tasks_in(slices[i])) task -= tasks_in(slices[i++]);
    const int64_t start = task * kCompactChunkElems;
    const int64_t n = std::min<int64_t>(kCompactChunkElems, static_cast<int64_t>(slices[i].count) - start);
    switch (isa) {
      case Isa::kAvx512: run_range_avx512(prepared, slices[i], states[i], start, n); break;
      case Isa::kAvx2: run_range_avx2(prepared, slices[i], states[i], start, n); break;
      case Isa::kPortable: run_range_portable(prepared, slices[i], states[i], start, n); break;
    }
  };
  if (exec.pool == nullptr || exec.pool->size() == 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) run_task(t);
  } else {
    exec.pool->parallel_for(tasks, [&](int64_t t, int) { run_task(t); });
  }
  return result;
}

StepResult muon_step_compact(const OptimizerParams& params, const MuonMatrix& matrix, const CompactState& momentum,
                             float lr, MuonWorkspace& workspace, FiniteCheck check, const KernelOptions& exec) {
  check_compact(momentum, "muon_step_compact", 0, 0);
  if (matrix.momentum == nullptr) throw ConfigError("muon_step_compact: matrix.momentum (fp32 scratch) is null");
  const int64_t n = matrix.rows * matrix.cols;
  load_compact(momentum, n, matrix.momentum, exec);
  const StepResult result = muon_step(params, matrix, lr, workspace, check);
  if (result.applied) store_compact(momentum, n, matrix.momentum, exec);
  return result;
}

}  // namespace shardopt::optim
