#include "optim/quant8.h"


#include <algorithm>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "base/error.h"
#include "optim/compact_codec.h"
#include "optim/quant8_codec.h"
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
  return book;
}

// The unsigned code (second moments) has no zero: its lowest value is 0.5e-7 (see quant8.h).
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

std::string q8_code_name(Q8CodeKind kind) {
  switch (kind) {
    case Q8CodeKind::kFloat8: return "float8";
    case Q8CodeKind::kDynamic: return "dynamic";
    case Q8CodeKind::kLinear: return "linear";
  }
  return "unknown";
}

Q8CodeKind q8_code_from_name(const std::string& name) {
  for (auto kind : {Q8CodeKind::kFloat8, Q8CodeKind::kDynamic, Q8CodeKind::kLinear})
    if (q8_code_name(kind) == name) return kind;
  throw ConfigError("unknown q8 code '" + name + "': expected float8, dynamic or linear");
}

const Q8Codebook& q8_codebook(Q8CodeKind kind, bool is_signed) {
  if (kind == Q8CodeKind::kFloat8) throw ConfigError("q8_codebook: the float8 code has no table");
  static const Q8Codebook books[2][2] = {{make_dynamic(false), make_dynamic(true)},
                                         {make_linear(false), make_linear(true)}};
  return books[kind == Q8CodeKind::kLinear ? 1 : 0][is_signed ? 1 : 0];
}

float q8_code_value(Q8CodeKind kind, bool is_signed, uint8_t code) {
  if (kind != Q8CodeKind::kFloat8) return q8_codebook(kind, is_signed).values[code];
  return is_signed ? codec::decode_signed(code) : codec::decode_unsigned(code);
}

double q8_error_bound(Q8CodeKind kind, bool is_signed, double y) {
  const double a = std::fabs(y);
  if (kind == Q8CodeKind::kFloat8) {
    if (is_signed) {
      const double t_s = 0x1p-16 * 1.1875;
      return a < t_s ? a : a / 16.0;
    }
    const double t_u = 0x1p-16 * 1.09375;
    return a < t_u * t_u ? t_u * t_u : a * (1.0 / 16.0 + 1.0 / 1024.0);
  }
  if (kind == Q8CodeKind::kLinear) return is_signed ? 0.5 / 127.0 : 0.5 / 255.0;
  if (a <= 1e-7) return is_signed ? a : 0.5e-7;  // nearest of {0 or 0.5e-7, the decade-0 codes}
  int decade = static_cast<int>(std::ceil(std::log10(a) + 7.0 - 1e-12)) - 1;  // a in (1e-7*10^i, 1e-6*10^i]
  decade = std::clamp(decade, 0, kDecades - 1);
  const double top = std::pow(10.0, decade - 6);
  return 0.5 * (top - top / 10.0) / static_cast<double>(cells_in_decade(decade, is_signed));
}

namespace {

// Table codes: nearest value by binary search; divide (1/a overflows for a subnormal a).
void quantize_table(const Q8Codebook& book, const float* x, int64_t n, uint8_t* codes, float* absmax) {
  for (int64_t start = 0, j = 0; start < n; start += kQ8BlockElems, ++j) {
    const int64_t len = std::min(kQ8BlockElems, n - start);
    const float a = codec::block_absmax(x + start, len);
    absmax[j] = a;
    const uint8_t zero = book.encode(0.0f);  // an all-zero block: decodes to 0 x a = 0 whatever the code's value
    for (int64_t i = 0; i < len; ++i) codes[start + i] = a > 0.0f ? book.encode(x[start + i] / a) : zero;
  }
}

void dequantize_table(const Q8Codebook& book, const uint8_t* codes, const float* absmax, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = book.values[codes[i]] * absmax[i / kQ8BlockElems];
}

// float8 and bf16: one source (compact_codec.h), compiled per instruction set.
SHARDOPT_BUILD_PORTABLE void decode_portable(const CompactState& s, int64_t n, float* out) { decode_compact(s, n, out); }
SHARDOPT_BUILD_AVX2 void decode_avx2(const CompactState& s, int64_t n, float* out) { decode_compact(s, n, out); }
SHARDOPT_BUILD_AVX512 void decode_avx512(const CompactState& s, int64_t n, float* out) { decode_compact(s, n, out); }
SHARDOPT_BUILD_PORTABLE void encode_portable(const CompactState& s, int64_t n, const float* in) {
  encode_compact(s, n, in);
}
SHARDOPT_BUILD_AVX2 void encode_avx2(const CompactState& s, int64_t n, const float* in) { encode_compact(s, n, in); }
SHARDOPT_BUILD_AVX512 void encode_avx512(const CompactState& s, int64_t n, const float* in) {
  encode_compact(s, n, in);
}

void decode_with(Isa isa, const CompactState& s, int64_t n, float* out) {
  switch (isa) {
    case Isa::kAvx512: return decode_avx512(s, n, out);
    case Isa::kAvx2: return decode_avx2(s, n, out);
    case Isa::kPortable: return decode_portable(s, n, out);
  }
}

void encode_with(Isa isa, const CompactState& s, int64_t n, const float* in) {
  switch (isa) {
    case Isa::kAvx512: return encode_avx512(s, n, in);
    case Isa::kAvx2: return encode_avx2(s, n, in);
    case Isa::kPortable: return encode_portable(s, n, in);
  }
}

// fn(start, len) over [0, n) in runs of kCompactChunkElems (whole q8 blocks) on `pool`. A block is
// encoded and decoded from its own elements and absmax only, so the runs are independent and the
// result is the one-run result bit for bit at any pool size. Allocates nothing.
template <class F>
void for_each_chunk(int64_t n, ThreadPool* pool, const F& fn) {
  const int64_t chunks = (n + kCompactChunkElems - 1) / kCompactChunkElems;
  if (pool == nullptr || pool->size() == 1 || chunks <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  pool->parallel_for(chunks, [&](int64_t chunk, int) {
    const int64_t start = chunk * kCompactChunkElems;
    fn(start, std::min(kCompactChunkElems, n - start));
  });
}

void check_compact_dtype(const CompactState& state, const char* what) {
  if (state.dtype != proto::STATE_BF16 && state.dtype != proto::STATE_Q8)
    throw ConfigError(std::string(what) + ": state dtype " + state_dtype_name(state.dtype) + " is not compact");
}

}  // namespace

void q8_quantize(const float* x, int64_t n, bool nonnegative, uint8_t* codes, float* absmax, Q8CodeKind kind,
                 Isa max_isa) {
  if (kind != Q8CodeKind::kFloat8) return quantize_table(q8_codebook(kind, !nonnegative), x, n, codes, absmax);
  encode_with(select_isa(max_isa), CompactState{proto::STATE_Q8, codes, absmax, nonnegative}, n, x);
}

void q8_dequantize(const uint8_t* codes, const float* absmax, int64_t n, bool nonnegative, float* out,
                   Q8CodeKind kind, Isa max_isa) {
  if (kind != Q8CodeKind::kFloat8) return dequantize_table(q8_codebook(kind, !nonnegative), codes, absmax, n, out);
  // The decode only reads through the state's pointers.
  const CompactState state{proto::STATE_Q8, const_cast<uint8_t*>(codes), const_cast<float*>(absmax), nonnegative};
  decode_with(select_isa(max_isa), state, n, out);
}

void load_compact(const CompactState& state, int64_t n, float* out, const KernelOptions& exec) {
  check_compact_dtype(state, "load_compact");
  const Isa isa = select_isa(exec.max_isa);
  for_each_chunk(n, exec.pool, [&](int64_t start, int64_t len) {
    decode_with(isa, advanced(state, start), len, out + start);
  });
}

void store_compact(const CompactState& state, int64_t n, const float* in, const KernelOptions& exec) {
  check_compact_dtype(state, "store_compact");
  const Isa isa = select_isa(exec.max_isa);
  for_each_chunk(n, exec.pool, [&](int64_t start, int64_t len) {
    encode_with(isa, advanced(state, start), len, in + start);
  });
}

int64_t compact_bytes(StateDType dtype, int64_t n) {
  switch (dtype) {
    case proto::STATE_BF16: return 2 * n;
    case proto::STATE_Q8: return n + 4 * q8_num_blocks(n);
    default: return 4 * n;
  }
}

}  // namespace shardopt::optim
