// The float8 q8 code's block loops (optim/quant8.h), inline so that each caller compiles them into its
// own per-instruction-set wrapper (quant8.cc through compact_codec.h: quantize/dequantize;
// compact_step.cc: fused into the optimizer step). Internal to optim/. Every step is an IEEE-exact
// float operation (multiply, divide, sqrt; no additions, so no fused multiply-add can form) or
// integer arithmetic on the bits, so the portable, AVX2 + FMA and AVX-512 builds of these loops give
// the same codes and values bit for bit. The per-element functions (bits_of to
// decode_unsigned) also compile as device functions under nvcc: the CUDA q8 step
// (optim/cuda/compact_kernels.cu) encodes and decodes with these same functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace shardopt::optim::codec {

#define SHARDOPT_CODEC inline __attribute__((always_inline))
#if defined(__CUDACC__)
#define SHARDOPT_CODEC_ELEMENT __host__ __device__ __forceinline__
#else
#define SHARDOPT_CODEC_ELEMENT SHARDOPT_CODEC
#endif

// Signed: |y| rounded to 3 mantissa bits; code k in 1..127 <-> float bits (k + kSignedOffset) << 20,
// so k = 127 is 1.0 and k = 1 is 2^-16 * 1.25; k = 0 is 0. Bit 7 is the sign.
inline constexpr uint32_t kSignedShift = 20;
inline constexpr int32_t kSignedOffset = (127 << 3) - 127;  // 889
// Unsigned (second moments, in the sqrt domain): s = sqrt(x) / sqrt(A) rounded to 4 mantissa bits;
// code k in 0..255 <-> s with bits (k + kUnsignedOffset) << 19: k = 255 is 1.0, k = 0 is
// 2^-16 * 1.0625 (not 0); decoded as s * s * A.
inline constexpr uint32_t kUnsignedShift = 19;
inline constexpr int32_t kUnsignedOffset = (127 << 4) - 255;  // 1777

SHARDOPT_CODEC_ELEMENT uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
SHARDOPT_CODEC_ELEMENT float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Magnitude bits of y rounded to the code's grid (half up in bit space = nearest on the grid,
// carrying into the exponent), as a code clamped to [0, top]. NaN bits exceed every code: top.
template <uint32_t kShift, int32_t kOffset, int32_t kTop>
SHARDOPT_CODEC_ELEMENT int32_t magnitude_code(uint32_t magnitude_bits) {
  const int32_t k = static_cast<int32_t>((magnitude_bits + (1u << (kShift - 1))) >> kShift) - kOffset;
  return k < 0 ? 0 : (k > kTop ? kTop : k);
}

SHARDOPT_CODEC_ELEMENT uint8_t encode_signed(float y) {
  const uint32_t u = bits_of(y);
  const int32_t k = magnitude_code<kSignedShift, kSignedOffset, 127>(u & 0x7fffffffu);
  return static_cast<uint8_t>(static_cast<uint32_t>(k) | ((u >> 24) & 0x80u));
}
SHARDOPT_CODEC_ELEMENT float decode_signed(uint8_t code) {
  const uint32_t k = code & 0x7fu;
  const uint32_t magnitude = k == 0 ? 0u : (k + kSignedOffset) << kSignedShift;
  return float_of(magnitude | (static_cast<uint32_t>(code & 0x80u) << 24));
}
// s = sqrt(x / A) >= 0, computed by the caller as sqrt(x) * (1 / sqrt(A)) (a NaN gives the top code;
// its block's absmax is NaN anyway).
SHARDOPT_CODEC_ELEMENT uint8_t encode_unsigned(float s) {
  return static_cast<uint8_t>(magnitude_code<kUnsignedShift, kUnsignedOffset, 255>(bits_of(s) & 0x7fffffffu));
}
SHARDOPT_CODEC_ELEMENT float decode_unsigned(uint8_t code) {
  const float s = float_of((static_cast<uint32_t>(code) + kUnsignedOffset) << kUnsignedShift);
  return s * s;
}

// Absmax of a block; NaN if any element is NaN (a NaN must not vanish from a max). A max over the
// magnitude bits as integers: they order like the magnitudes, and every NaN is above +Inf. (It
// vectorizes, which a float max with a NaN flag does not.)
SHARDOPT_CODEC float block_absmax(const float* x, int64_t len) {
  uint32_t a = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t m = bits_of(x[i]) & 0x7fffffffu;
    a = m > a ? m : a;
  }
  return float_of(a);
}

// Signed: y = x * (1 / a) when 1 / a is a normal float (2^-126 <= a <= 2^126), else x / a (a
// subnormal, huge, infinite or NaN absmax): the division keeps a subnormal or huge block exact to the
// code's bound, and turns a non-finite absmax into codes that decode to non-finite values.
SHARDOPT_CODEC void encode_signed_block(const float* x, int64_t len, float a, uint8_t* codes) {
  if (a == 0.0f) {  // all zeros: code 0 (decodes to 0 x 0 = +0)
    for (int64_t i = 0; i < len; ++i) codes[i] = 0;
  } else if (a >= 0x1p-126f && a <= 0x1p126f) {
    const float r = 1.0f / a;
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_signed(x[i] * r);
  } else {
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_signed(x[i] / a);
  }
}

// Unsigned, from sqrt_x[i] = sqrt(x[i]) (AdamW computes it anyway): s = sqrt_x * (1 / sqrt(a)). The
// factor is a normal float for every finite a > 0 (sqrt halves the exponent range); a = +Inf gives
// 0 and NaN gives NaN, so the codes decode to non-finite values with that absmax.
SHARDOPT_CODEC void encode_unsigned_block_from_sqrt(const float* sqrt_x, int64_t len, float a, uint8_t* codes) {
  if (a == 0.0f) {
    for (int64_t i = 0; i < len; ++i) codes[i] = 0;
  } else {
    const float r = 1.0f / std::sqrt(a);
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_unsigned(sqrt_x[i] * r);
  }
}

template <bool kSigned>
SHARDOPT_CODEC void encode_block(const float* x, int64_t len, float a, uint8_t* codes) {
  if constexpr (kSigned) {
    encode_signed_block(x, len, a, codes);
  } else if (a == 0.0f) {
    for (int64_t i = 0; i < len; ++i) codes[i] = 0;
  } else {
    const float r = 1.0f / std::sqrt(a);
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_unsigned(std::sqrt(x[i]) * r);
  }
}

template <bool kSigned>
SHARDOPT_CODEC void decode_block(const uint8_t* codes, int64_t len, float a, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = (kSigned ? decode_signed(codes[i]) : decode_unsigned(codes[i])) * a;
}

// n elements from a block boundary: absmax per block, then the codes.
template <bool kSigned>
SHARDOPT_CODEC void quantize(const float* x, int64_t n, uint8_t* codes, float* absmax, int64_t block) {
  for (int64_t start = 0, j = 0; start < n; start += block, ++j) {
    const int64_t len = n - start < block ? n - start : block;
    const float a = block_absmax(x + start, len);
    absmax[j] = a;
    encode_block<kSigned>(x + start, len, a, codes + start);
  }
}

template <bool kSigned>
SHARDOPT_CODEC void dequantize(const uint8_t* codes, const float* absmax, int64_t n, float* out, int64_t block) {
  for (int64_t start = 0, j = 0; start < n; start += block, ++j) {
    const int64_t len = n - start < block ? n - start : block;
    decode_block<kSigned>(codes + start, len, absmax[j], out + start);
  }
}

}  // namespace shardopt::optim::codec
