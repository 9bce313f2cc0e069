// 8-bit block-wise quantization (optim/quant8.h): the float8 encoder against a brute-force nearest
// search; the error of every code stays within the bound the header derives; zero, tiny, huge and
// non-finite blocks; the AVX2 and AVX-512 builds against the portable one; bf16 storage.
#include "optim/quant8.h"

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "optim/kernel_options.h"

namespace shardopt::optim {
namespace {

TEST(Q8Codebook, HasTwoHundredFiftySixSortedDistinctValuesWithZeroAndOne) {
  for (bool is_signed : {true, false}) {
    const Q8Codebook& book = q8_codebook(Q8CodeKind::kDynamic, is_signed);
    for (size_t k = 1; k < 256; ++k) EXPECT_LT(book.values[k - 1], book.values[k]) << "k " << k;
    EXPECT_EQ(book.values[255], 1.0f);
    // Signed: 0 is a code, and the code is symmetric but for +1. Unsigned: no zero (a decoded
    // second moment of 0 would make m / (sqrt(v) + eps) explode), the lowest code is 0.5e-7.
    EXPECT_EQ(book.values[book.encode(0.0f)], is_signed ? 0.0f : 0.5e-7f);
    EXPECT_EQ(book.values[0], is_signed ? -book.values[254] : 0.5e-7f);
  }
}

// The float8 code against a brute-force reference: in a block whose absmax is 1 (so x is the
// normalized value exactly), every signed code is the nearest of the 255 code values (ties either
// way) outside the zero zone below t_s, where the code is 0. Probes: every midpoint between
// neighbouring code values and its float neighbours, and random values over 17 binades.
TEST(Q8Float8, SignedEncoderPicksTheNearestCodeValue) {
  std::vector<float> values(256);
  std::vector<uint8_t> all(256);
  for (int c = 0; c < 256; ++c) all[static_cast<size_t>(c)] = static_cast<uint8_t>(c);
  const float one = 1.0f;
  for (int c = 0; c < 256; ++c) q8_dequantize(&all[static_cast<size_t>(c)], &one, 1, false, &values[static_cast<size_t>(c)]);
  EXPECT_EQ(values[127], 1.0f);
  EXPECT_EQ(values[0], 0.0f);
  EXPECT_EQ(values[255], -1.0f);
  std::vector<float> probes;
  std::vector<float> positive(values.begin() + 1, values.begin() + 128);
  for (size_t k = 1; k < positive.size(); ++k) {
    ASSERT_LT(positive[k - 1], positive[k]);
    const float mid = static_cast<float>((static_cast<double>(positive[k - 1]) + positive[k]) / 2);
    for (float y : {mid, std::nextafter(mid, 2.0f), std::nextafter(mid, 0.0f)}) probes.insert(probes.end(), {y, -y});
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> exponent(-17.0, 0.0), unit(-1.0, 1.0);
  for (int i = 0; i < 100000; ++i)
    probes.push_back(static_cast<float>(std::exp2(exponent(rng)) * (unit(rng) < 0 ? -1 : 1)));
  const double t_s = 0x1p-16 * 1.1875;
  for (size_t start = 0; start < probes.size(); start += kQ8BlockElems - 1) {
    std::vector<float> x = {1.0f};  // the block's absmax
    for (size_t i = start; i < std::min(probes.size(), start + kQ8BlockElems - 1); ++i) x.push_back(probes[i]);
    std::vector<uint8_t> codes(x.size());
    float absmax;
    q8_quantize(x.data(), static_cast<int64_t>(x.size()), false, codes.data(), &absmax);
    ASSERT_EQ(absmax, 1.0f);
    for (size_t i = 1; i < x.size(); ++i) {
      const double y = x[i], got = values[codes[i]];
      if (std::fabs(y) < t_s) {
        ASSERT_EQ(got, 0.0) << "y " << y;
        continue;
      }
      double nearest = 2.0;
      for (float v : values) nearest = std::min(nearest, std::fabs(y - v));
      ASSERT_EQ(std::fabs(y - got), nearest) << "y " << y << " decoded " << got;
    }
  }
}

// Values of every kind a block can hold: heavy-tailed random blocks over many scales (including the
// division path of tiny and huge blocks), a zero block, subnormal blocks, blocks near FLT_MAX, blocks
// holding NaN, +Inf or -Inf among finite values, and a short last block. is_signed = false: |x|.
std::vector<float> mixed_blocks(bool is_signed) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x;
  const auto push = [&](float v) { x.push_back(is_signed ? v : std::fabs(v)); };
  for (int block = 0; block < 200; ++block) {
    const float scale = std::pow(10.0f, static_cast<float>(block % 40) * (is_signed ? 2.0f : 1.0f) - 39.0f);
    for (int64_t i = 0; i < kQ8BlockElems; ++i) push(normal(rng) * std::exp(2.0f * normal(rng)) * scale);
  }
  for (int64_t i = 0; i < kQ8BlockElems; ++i) push(0.0f);
  for (int64_t i = 0; i < kQ8BlockElems; ++i) push(normal(rng) * 1e-42f);  // all subnormal
  for (int64_t i = 0; i < kQ8BlockElems; ++i) push(i == 3 ? 1e-45f : 0.0f);  // the smallest subnormal alone
  for (int64_t i = 0; i < kQ8BlockElems; ++i)
    push(std::numeric_limits<float>::max() * std::min(1.0f, std::fabs(normal(rng))) * (i % 2 ? 1.0f : -1.0f));
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()})
    for (int64_t i = 0; i < kQ8BlockElems; ++i) push(i == 100 ? bad : normal(rng));
  for (int i = 0; i < 77; ++i) push(normal(rng));
  return x;
}

// The AVX2 + FMA and the AVX-512 builds of the float8 loops against the portable build, bit for bit
// (codes, absmax and decoded values), signed and unsigned, on mixed_blocks.
TEST(Q8Float8, VectorBuildsGiveThePortableCodesBitForBit) {
  if (!cpu_supports(Isa::kAvx2)) GTEST_SKIP() << "this CPU has neither AVX2 nor AVX-512: only the portable loops run";
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!cpu_supports(isa)) continue;  // an AVX2-only CPU: the AVX2 build is still compared
    for (bool is_signed : {true, false}) {
      SCOPED_TRACE(testing::Message() << isa_name(isa) << (is_signed ? " signed" : " unsigned"));
      const std::vector<float> x = mixed_blocks(is_signed);
      const auto n = static_cast<int64_t>(x.size());
      std::vector<uint8_t> codes_vec(x.size()), codes_port(x.size());
      std::vector<float> absmax_vec(static_cast<size_t>(q8_num_blocks(n))), absmax_port(absmax_vec.size());
      q8_quantize(x.data(), n, !is_signed, codes_vec.data(), absmax_vec.data(), Q8CodeKind::kFloat8, isa);
      q8_quantize(x.data(), n, !is_signed, codes_port.data(), absmax_port.data(), Q8CodeKind::kFloat8,
                  Isa::kPortable);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(std::bit_cast<uint32_t>(absmax_vec[i / kQ8BlockElems]),
                  std::bit_cast<uint32_t>(absmax_port[i / kQ8BlockElems]));
        ASSERT_EQ(codes_vec[i], codes_port[i]) << "element " << i << " x " << x[i];
      }
      std::vector<float> out_vec(x.size()), out_port(x.size());
      q8_dequantize(codes_vec.data(), absmax_vec.data(), n, !is_signed, out_vec.data(), Q8CodeKind::kFloat8, isa);
      q8_dequantize(codes_vec.data(), absmax_vec.data(), n, !is_signed, out_port.data(), Q8CodeKind::kFloat8,
                    Isa::kPortable);
      int64_t nonfinite = 0;
      for (size_t i = 0; i < x.size(); ++i) {  // bit patterns: NaN == NaN, and blocks past FLT_MAX decode to NaN
        ASSERT_EQ(std::bit_cast<uint32_t>(out_vec[i]), std::bit_cast<uint32_t>(out_port[i])) << "element " << i;
        nonfinite += !std::isfinite(out_port[i]);
      }
      // The non-finite blocks (and the huge ones) were really there: the comparison covered them.
      EXPECT_GE(nonfinite, 3 * kQ8BlockElems);
    }
  }
}

TEST(Q8Float8, CodeNamesRoundTripAndAnUnknownNameIsAConfigError) {
  for (auto kind : {Q8CodeKind::kFloat8, Q8CodeKind::kDynamic, Q8CodeKind::kLinear})
    EXPECT_EQ(q8_code_from_name(q8_code_name(kind)), kind);
  EXPECT_THROW(q8_code_from_name("e5m2"), ConfigError);
  EXPECT_THROW(q8_codebook(Q8CodeKind::kFloat8, true), ConfigError);
}

// Bound (optim/quant8.h): |x - decode(encode(x))| <= A * b(x / A) with b the code's bound (float8:
// |y| / 16 signed, y (1/16 + 1/1024) unsigned, with their zero zones; dynamic: the per-decade half cell
// width w_i / 2; linear: half a level); plus float rounding of the scaling, the sqrt and code * A,
// at most 8 ulp of A.
void expect_within_bound(const std::vector<float>& x, bool nonnegative, Q8CodeKind kind, const char* what) {
  std::vector<uint8_t> codes(x.size());
  std::vector<float> absmax(static_cast<size_t>(q8_num_blocks(static_cast<int64_t>(x.size())))), back(x.size());
  q8_quantize(x.data(), static_cast<int64_t>(x.size()), nonnegative, codes.data(), absmax.data(), kind);
  q8_dequantize(codes.data(), absmax.data(), static_cast<int64_t>(x.size()), nonnegative, back.data(), kind);
  double worst_ratio = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double a = absmax[i / kQ8BlockElems];
    const double bound = a * q8_error_bound(kind, !nonnegative, x[i] / a) + 8.0 * a * 0x1p-24;
    const double err = std::fabs(static_cast<double>(x[i]) - back[i]);
    ASSERT_LE(err, bound) << what << ": element " << i << " x " << x[i] << " decoded " << back[i] << " absmax " << a;
    worst_ratio = std::max(worst_ratio, err / bound);
  }
  // The bound is not vacuous: some element comes close to it.
  EXPECT_GT(worst_ratio, 0.5) << what;
}

std::vector<float> log_spread(bool nonnegative, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> exponent(-9.0, 0.0), sign(0.0, 1.0);
  std::vector<float> x(4 * kQ8BlockElems + 37);  // 4 full blocks and a short one
  for (size_t i = 0; i < x.size(); ++i) {
    double v = std::pow(10.0, exponent(rng));
    if (!nonnegative && sign(rng) < 0.5) v = -v;
    x[i] = static_cast<float>(v * scale);
  }
  return x;
}

TEST(Q8Quantize, Float8CodeErrorWithinTheDerivedBoundOverNineDecades) {
  expect_within_bound(log_spread(false, 1.0f, 8), false, Q8CodeKind::kFloat8, "signed");
  expect_within_bound(log_spread(true, 1.0f, 9), true, Q8CodeKind::kFloat8, "unsigned");
}

TEST(Q8Quantize, DynamicCodeErrorWithinTheDerivedBoundOverNineDecades) {
  expect_within_bound(log_spread(false, 1.0f, 1), false, Q8CodeKind::kDynamic, "signed");
  expect_within_bound(log_spread(true, 1.0f, 2), true, Q8CodeKind::kDynamic, "unsigned");
}

TEST(Q8Quantize, LinearCodeErrorWithinItsBound) {
  expect_within_bound(log_spread(false, 1.0f, 3), false, Q8CodeKind::kLinear, "signed");
  expect_within_bound(log_spread(true, 1.0f, 4), true, Q8CodeKind::kLinear, "unsigned");
}

TEST(Q8Quantize, TinyAndHugeScalesKeepTheRelativeBound) {
  expect_within_bound(log_spread(false, 1e-30f, 5), false, Q8CodeKind::kFloat8, "float8 tiny");
  expect_within_bound(log_spread(true, 1e-30f, 5), true, Q8CodeKind::kFloat8, "float8 tiny unsigned");
  expect_within_bound(log_spread(false, 3e38f, 6), false, Q8CodeKind::kFloat8, "float8 huge");
  expect_within_bound(log_spread(true, 3e38f, 7), true, Q8CodeKind::kFloat8, "float8 huge unsigned");
  expect_within_bound(log_spread(false, 1e-30f, 5), false, Q8CodeKind::kDynamic, "tiny");
  expect_within_bound(log_spread(false, 3e38f, 6), false, Q8CodeKind::kDynamic, "huge");
  expect_within_bound(log_spread(true, 3e38f, 7), true, Q8CodeKind::kDynamic, "huge unsigned");
}

TEST(Q8Quantize, ZeroBlockDecodesToExactZero) {
  std::vector<float> x(300, 0.0f), back(300, 1.0f), absmax(2, -1.0f);
  std::vector<uint8_t> codes(300);
  q8_quantize(x.data(), 300, false, codes.data(), absmax.data());
  q8_dequantize(codes.data(), absmax.data(), 300, false, back.data());
  EXPECT_EQ(absmax[0], 0.0f);
  for (float v : back) EXPECT_EQ(v, 0.0f);
}

TEST(Q8Quantize, SubnormalBlockStaysFiniteAndClose) {
  std::vector<float> x(kQ8BlockElems), back(x.size()), absmax(1);
  std::vector<uint8_t> codes(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) * 1e-42f * (i % 2 ? 1.0f : -1.0f);
  q8_quantize(x.data(), kQ8BlockElems, false, codes.data(), absmax.data());
  q8_dequantize(codes.data(), absmax.data(), kQ8BlockElems, false, back.data());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_TRUE(std::isfinite(back[i]));
    // The float8 bound (|y| / 16, or |y| in the zero zone) plus one subnormal step per rounding.
    const double y = std::fabs(x[i]) / absmax[0];
    EXPECT_LE(std::fabs(x[i] - back[i]),
              absmax[0] * q8_error_bound(Q8CodeKind::kFloat8, true, y) + 2 * std::numeric_limits<float>::denorm_min());
  }
}

TEST(Q8Quantize, NonFiniteValuePoisonsOnlyItsBlock) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()})
    for (bool nonnegative : {false, true}) {
    if (nonnegative && bad < 0) continue;
    std::vector<float> x(2 * kQ8BlockElems, 0.25f), back(x.size()), absmax(2);
    std::vector<uint8_t> codes(x.size());
    x[kQ8BlockElems + 7] = bad;
    x[kQ8BlockElems + 8] = 0.0f;  // a zero in the poisoned block decodes non-finite too
    q8_quantize(x.data(), 2 * kQ8BlockElems, nonnegative, codes.data(), absmax.data());
    q8_dequantize(codes.data(), absmax.data(), 2 * kQ8BlockElems, nonnegative, back.data());
    for (int64_t i = 0; i < kQ8BlockElems; ++i) ASSERT_EQ(back[i], 0.25f) << "block 0 must be untouched";
    for (int64_t i = kQ8BlockElems; i < 2 * kQ8BlockElems; ++i)
      ASSERT_FALSE(std::isfinite(back[i])) << "element " << i << " of the poisoned block decoded to " << back[i]
                                           << " (unsigned code: " << nonnegative << ")";
  }
}

TEST(CompactState, Bf16RoundsToNearestEven) {
  std::vector<uint16_t> storage(3);
  CompactState s;
  s.dtype = proto::STATE_BF16;
  s.values = storage.data();
  const float in[3] = {1.0f + 0x1p-8f, 1.0f + 0x1p-8f + 0x1p-20f, -3.0f};  // tie -> even, above tie -> up
  float out[3];
  store_compact(s, 3, in);
  load_compact(s, 3, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.0f + 0x1p-7f);
  EXPECT_EQ(out[2], -3.0f);
  EXPECT_EQ(compact_bytes(proto::STATE_Q8, 257), 257 + 8);
}

}  // namespace
}  // namespace shardopt::optim
