#include "optim/quant8.h"

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "base/error.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

constexpr int kDecades = 7;  // normalized magnitudes 1e-7 .. 1

// Cells of decade i: 2^i for the signed code (each mirrored), 2^(i+1) for the unsigned one.
int64_t cells_in_decade(int decade, bool is_signed) { return int64_t{1} << (decade + (is_signed ? 0 : 1)); }

Q8Codebook finish(std::vector<double> values) {
  SHARDOPT_ASSERT(values.size() <= 256, "q8 code has more than 256 values");
  while (values.size() < 256) values.push_back(1.0);  // duplicates of the top value: never nearer
  std::sort(values.begin(), values.end());
  Q8Codebook book;
  for (size_t k = 0; k < 256; ++k) book.values[k] = static_cast<float>(values[k]);
  book.midpoints[0] = -INFINITY;
  for (size_t k = 1; k < 256; ++k)
    book.midpoints[k] = static_cast<float>((static_cast<double>(book.values[k - 1]) + book.values[k]) / 2.0);
  book.midpoints[256] = INFINITY;
  for (uint32_t key = 0; key < Q8Codebook::kKeys; ++key) {
    float lo, hi;
    const uint32_t lo_bits = key << 16, hi_bits = (key << 16) | 0xffffu;
    std::memcpy(&lo, &lo_bits, sizeof lo);
    std::memcpy(&hi, &hi_bits, sizeof hi);
    book.start_positive[key] = book.encode(lo);
    book.start_negative[key] = book.encode(-hi);
  }
  return book;
}

// The unsigned code (second moments) has no zero: its lowest value is 0.5e-7. A second moment
// decoded to 0 would turn m / (sqrt(v) + eps) into m / eps (the "zero-point problem", Li et al. 2023,
// "Memory Efficient Optimizers with 4-bit States"); an all-zero block still decodes to 0 (absmax 0).
Q8Codebook make_dynamic(bool is_signed) {
  std::vector<double> values = {is_signed ? 0.0 : 0.5e-7, 1.0};
  for (int i = 0; i < kDecades; ++i) {
    const double top = std::pow(10.0, i - 6), bottom = top / 10.0;
    const int64_t cells = cells_in_decade(i, is_signed);
    const double width = (top - bottom) / static_cast<double>(cells);
    for (int64_t c = 0; c < cells; ++c) {
      const double center = bottom + (static_cast<double>(c) + 0.5) * width;
      values.push_back(center);
      if (is_signed) values.push_back(-center);
    }
  }
  return finish(std::move(values));
}

Q8Codebook make_linear(bool is_signed) {
  std::vector<double> values;
  if (is_signed)
    for (int k = 0; k <= 254; ++k) values.push_back((k - 127) / 127.0);
  else
    for (int k = 0; k <= 255; ++k) values.push_back(k / 255.0);
  return finish(std::move(values));
}

}  // namespace

const Q8Codebook& q8_codebook(Q8CodeKind kind, bool is_signed) {
  static const Q8Codebook books[2][2] = {{make_dynamic(false), make_dynamic(true)},
                                         {make_linear(false), make_linear(true)}};
  return books[kind == Q8CodeKind::kLinear ? 1 : 0][is_signed ? 1 : 0];
}

double q8_error_bound(Q8CodeKind kind, bool is_signed, double y) {
  const double a = std::fabs(y);
  if (kind == Q8CodeKind::kLinear) return is_signed ? 0.5 / 127.0 : 0.5 / 255.0;
  if (a <= 1e-7) return is_signed ? a : 0.5e-7;  // nearest of {0 or 0.5e-7, the decade-0 codes}
  int decade = static_cast<int>(std::ceil(std::log10(a) + 7.0 - 1e-12)) - 1;  // a in (1e-7*10^i, 1e-6*10^i]
  decade = std::clamp(decade, 0, kDecades - 1);
  const double top = std::pow(10.0, decade - 6);
  return 0.5 * (top - top / 10.0) / static_cast<double>(cells_in_decade(decade, is_signed));
}

namespace {

// Absmax of a block (NaN if any element is NaN, see header); the max loop vectorizes.
inline float block_absmax(const float* xb, int64_t len) {
  float a = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const float v = std::fabs(xb[i]);
    a = v > a ? v : a;
    nan |= v != v;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : a;
}

// Divide (not multiply by 1/a): 1/a overflows for subnormal a and loses bits for huge a.
void encode_block_portable(const Q8Codebook& book, const float* xb, int64_t len, float a, uint8_t* cb) {
  for (int64_t i = 0; i < len; ++i) cb[i] = book.encode_fast(xb[i] / a);
}

void decode_block_portable(const Q8Codebook& book, const uint8_t* cb, int64_t len, float a, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = book.values[cb[i]] * a;
}

#define SHARDOPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// encode_fast on 16 lanes: the start table is gathered as bytes (a 4-byte gather, low byte kept;
// Q8Codebook::gather_pad keeps the last read inside the struct), then the two threshold compares.
SHARDOPT_AVX512 void encode_block_avx512(const Q8Codebook& book, const float* xb, int64_t len, float a,
                                         uint8_t* cb) {
  const __m512 va = _mm512_set1_ps(a);
  const auto* base = reinterpret_cast<const char*>(&book);
  const __m512i pos_off = _mm512_set1_epi32(static_cast<int>(offsetof(Q8Codebook, start_positive)));
  const __m512i neg_off = _mm512_set1_epi32(static_cast<int>(offsetof(Q8Codebook, start_negative)));
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), last_key = _mm512_set1_epi32(Q8Codebook::kKeys - 1);
  const __m512i byte = _mm512_set1_epi32(0xff), one = _mm512_set1_epi32(1);
  const float* above = book.midpoints.data() + 1;  // midpoints[c + 1]
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 y = _mm512_div_ps(_mm512_loadu_ps(xb + i), va);
    const __m512i bits = _mm512_castps_si512(y);
    const __m512i key = _mm512_min_epu32(_mm512_srli_epi32(_mm512_and_si512(bits, abs_mask), 16), last_key);
    const __mmask16 negative = _mm512_movepi32_mask(bits);
    const __m512i index = _mm512_add_epi32(key, _mm512_mask_blend_epi32(negative, pos_off, neg_off));
    __m512i c = _mm512_and_si512(_mm512_i32gather_epi32(index, base, 1), byte);
    for (int step = 0; step < 2; ++step) {
      const __m512 m = _mm512_i32gather_ps(c, above, 4);
      c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(m, y, _CMP_LT_OQ), c, one);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(cb + i), _mm512_cvtepi32_epi8(c));
  }
  encode_block_portable(book, xb + i, len - i, a, cb + i);
}

SHARDOPT_AVX512 void decode_block_avx512(const Q8Codebook& book, const uint8_t* cb, int64_t len, float a,
                                         float* out) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(c, book.values.data(), 4), va));
  }
  decode_block_portable(book, cb + i, len - i, a, out + i);
}

template <bool kAvx512>
inline void quantize_blocks(const Q8Codebook& book, const float* x, int64_t n, uint8_t* codes, float* absmax) {
  for (int64_t start = 0, j = 0; start < n; start += kQ8BlockElems, ++j) {
    const int64_t len = std::min(kQ8BlockElems, n - start);
    const float a = block_absmax(x + start, len);
    absmax[j] = a;
    uint8_t* cb = codes + start;
    if (a > 0.0f) {
      if constexpr (kAvx512) encode_block_avx512(book, x + start, len, a, cb);
      else encode_block_portable(book, x + start, len, a, cb);
    } else {
      const uint8_t zero = book.encode(0.0f);  // decodes to 0 x a = 0 whatever the code's value
      std::memset(cb, zero, static_cast<size_t>(len));
    }
  }
}

// flatten: the absmax loop is compiled (vectorized) for the wrapper's target.
SHARDOPT_AVX512 __attribute__((flatten)) void quantize_blocks_avx512(const Q8Codebook& book, const float* x,
                                                                      int64_t n, uint8_t* codes, float* absmax) {
  quantize_blocks<true>(book, x, n, codes, absmax);
}

}  // namespace

void q8_quantize(const float* x, int64_t n, bool nonnegative, uint8_t* codes, float* absmax, Q8CodeKind kind,
                 bool use_avx512) {
  const Q8Codebook& book = q8_codebook(kind, !nonnegative);
  if (use_avx512 && cpu_has_avx512()) quantize_blocks_avx512(book, x, n, codes, absmax);
  else quantize_blocks<false>(book, x, n, codes, absmax);
}

void q8_dequantize(const uint8_t* codes, const float* absmax, int64_t n, bool nonnegative, float* out,
                   Q8CodeKind kind, bool use_avx512) {
  const Q8Codebook& book = q8_codebook(kind, !nonnegative);
  const bool avx512 = use_avx512 && cpu_has_avx512();
  for (int64_t start = 0, j = 0; start < n; start += kQ8BlockElems, ++j) {
    const int64_t len = std::min(kQ8BlockElems, n - start);
    if (avx512) decode_block_avx512(book, codes + start, len, absmax[j], out + start);
    else decode_block_portable(book, codes + start, len, absmax[j], out + start);
  }
}

void load_compact(const CompactState& state, int64_t n, float* out, bool use_avx512) {
  switch (state.dtype) {
    case proto::STATE_BF16: {
      const auto* v = static_cast<const bf16*>(state.values);
      for (int64_t i = 0; i < n; ++i) out[i] = load_as_float(v[i]);
      break;
    }
    case proto::STATE_Q8:
      q8_dequantize(static_cast<const uint8_t*>(state.values), state.absmax, n, state.nonnegative, out,
                    Q8CodeKind::kDynamic, use_avx512);
      break;
    default: throw ConfigError("load_compact: state dtype " + state_dtype_name(state.dtype) + " is not compact");
  }
}

void store_compact(const CompactState& state, int64_t n, const float* in, bool use_avx512) {
  switch (state.dtype) {
    case proto::STATE_BF16: {
      auto* v = static_cast<bf16*>(state.values);
      for (int64_t i = 0; i < n; ++i) v[i] = to_bf16_rne(in[i]);
      break;
    }
    case proto::STATE_Q8:
      q8_quantize(in, n, state.nonnegative, static_cast<uint8_t*>(state.values), state.absmax, Q8CodeKind::kDynamic,
                  use_avx512);
      break;
    default: throw ConfigError("store_compact: state dtype " + state_dtype_name(state.dtype) + " is not compact");
  }
}

int64_t compact_bytes(StateDType dtype, int64_t n) {
  switch (dtype) {
    case proto::STATE_BF16: return 2 * n;
    case proto::STATE_Q8: return n + 4 * q8_num_blocks(n);
    default: return 4 * n;
  }
}

}  // namespace shardopt::optim
