// 8-bit block-wise quantization (optim/quant8.h): the error of every code stays within the bound
// the header derives; zero, tiny, huge and non-finite blocks; bf16 storage.
#include "optim/quant8.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "optim/simd_util.h"

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

TEST(Q8Codebook, FastEncoderAgreesWithTheBinarySearchEverywhereInMinusOneToOne) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> exponent(-12.0, 0.0), unit(-1.0, 1.0);
  for (auto kind : {Q8CodeKind::kDynamic, Q8CodeKind::kLinear})
    for (bool is_signed : {true, false}) {
      const Q8Codebook& book = q8_codebook(kind, is_signed);
      std::vector<float> probes = {0.0f, 1.0f, -1.0f, 1e-38f, -1e-38f};
      for (size_t k = 1; k < 256; ++k) {  // every threshold and its float neighbours
        const float m = book.midpoints[k];
        probes.insert(probes.end(), {m, std::nextafter(m, 2.0f), std::nextafter(m, -2.0f)});
      }
      for (int i = 0; i < 200000; ++i) {
        probes.push_back(static_cast<float>(std::pow(10.0, exponent(rng)) * (unit(rng) < 0 ? -1 : 1)));
        probes.push_back(static_cast<float>(unit(rng)));
      }
      for (float y : probes) {
        if (!is_signed && y < 0) continue;
        if (std::fabs(y) > 1.0f) continue;
        ASSERT_EQ(book.encode_fast(y), book.encode(y)) << "y " << y << " signed " << is_signed;
      }
    }
}

// The AVX-512 loops (run-time dispatch) against the portable ones and against the plain binary
// search: every threshold and its float neighbours (in blocks whose absmax is 1, so x / absmax is
// the probe exactly), then heavy-tailed random blocks over many scales, with a short last block.
TEST(Q8Quantize, VectorLoopsGiveTheBinarySearchCodesBitForBit) {
  if (!cpu_has_avx512()) GTEST_SKIP() << "this CPU has no AVX-512: only the portable loops run";
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto kind : {Q8CodeKind::kDynamic, Q8CodeKind::kLinear})
    for (bool is_signed : {true, false}) {
      const Q8Codebook& book = q8_codebook(kind, is_signed);
      std::vector<float> x;
      auto push = [&](float y) {
        if (x.size() % kQ8BlockElems == 0) x.push_back(1.0f);  // the block's absmax
        x.push_back(y);
      };
      for (size_t k = 1; k < 256; ++k) {
        const float m = book.midpoints[k];
        for (float y : {m, std::nextafter(m, 2.0f), std::nextafter(m, -2.0f)})
          if ((is_signed || y >= 0.0f) && std::fabs(y) <= 1.0f) push(y);
      }
      while (x.size() % kQ8BlockElems != 0) push(0.0f);
      for (int block = 0; block < 200; ++block) {
        const float scale = std::pow(10.0f, static_cast<float>(block % 20) - 10.0f);  // no overflow when squared
        for (int64_t i = 0; i < kQ8BlockElems; ++i) {
          const float v = normal(rng) * std::exp(2.0f * normal(rng)) * scale;
          x.push_back(is_signed ? v : v * v);
        }
      }
      for (int i = 0; i < 77; ++i) x.push_back(is_signed ? normal(rng) : std::fabs(normal(rng)));
      const auto n = static_cast<int64_t>(x.size());
      std::vector<uint8_t> codes_vec(x.size()), codes_port(x.size());
      std::vector<float> absmax_vec(static_cast<size_t>(q8_num_blocks(n))), absmax_port(absmax_vec.size());
      q8_quantize(x.data(), n, !is_signed, codes_vec.data(), absmax_vec.data(), kind, true);
      q8_quantize(x.data(), n, !is_signed, codes_port.data(), absmax_port.data(), kind, false);
      for (size_t i = 0; i < x.size(); ++i) {
        const float a = absmax_port[i / kQ8BlockElems];
        ASSERT_EQ(absmax_vec[i / kQ8BlockElems], a);
        ASSERT_EQ(codes_port[i], book.encode(x[i] / a)) << "x " << x[i] << " signed " << is_signed;
        ASSERT_EQ(codes_vec[i], codes_port[i]) << "x " << x[i] << " signed " << is_signed;
      }
      std::vector<float> out_vec(x.size()), out_port(x.size());
      q8_dequantize(codes_vec.data(), absmax_vec.data(), n, !is_signed, out_vec.data(), kind, true);
      q8_dequantize(codes_vec.data(), absmax_vec.data(), n, !is_signed, out_port.data(), kind, false);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(out_port[i], book.values[codes_vec[i]] * absmax_vec[i / kQ8BlockElems]);
        ASSERT_EQ(out_vec[i], out_port[i]) << "element " << i;
      }
    }
}

// Bound (optim/quant8.h): |x - decode(encode(x))| <= A * b(x / A) with b the per-decade half cell
// width w_i / 2 (dynamic) or half a level (linear); plus float rounding of x / A and of code * A,
// at most 2 ulp of A.
void expect_within_bound(const std::vector<float>& x, bool nonnegative, Q8CodeKind kind, const char* what) {
  std::vector<uint8_t> codes(x.size());
  std::vector<float> absmax(static_cast<size_t>(q8_num_blocks(static_cast<int64_t>(x.size())))), back(x.size());
  q8_quantize(x.data(), static_cast<int64_t>(x.size()), nonnegative, codes.data(), absmax.data(), kind);
  q8_dequantize(codes.data(), absmax.data(), static_cast<int64_t>(x.size()), nonnegative, back.data(), kind);
  double worst_ratio = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double a = absmax[i / kQ8BlockElems];
    const double bound = a * q8_error_bound(kind, !nonnegative, x[i] / a) + 2.0 * a * 0x1p-24;
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

TEST(Q8Quantize, DynamicCodeErrorWithinTheDerivedBoundOverNineDecades) {
  expect_within_bound(log_spread(false, 1.0f, 1), false, Q8CodeKind::kDynamic, "signed");
  expect_within_bound(log_spread(true, 1.0f, 2), true, Q8CodeKind::kDynamic, "unsigned");
}

TEST(Q8Quantize, LinearCodeErrorWithinItsBound) {
  expect_within_bound(log_spread(false, 1.0f, 3), false, Q8CodeKind::kLinear, "signed");
  expect_within_bound(log_spread(true, 1.0f, 4), true, Q8CodeKind::kLinear, "unsigned");
}

TEST(Q8Quantize, TinyAndHugeScalesKeepTheRelativeBound) {
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
    // Bound at the top decade plus one subnormal step per rounding.
    EXPECT_LE(std::fabs(x[i] - back[i]), absmax[0] * 0.00704 + 2 * std::numeric_limits<float>::denorm_min());
  }
}

TEST(Q8Quantize, NonFiniteValuePoisonsOnlyItsBlock) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> x(2 * kQ8BlockElems, 0.25f), back(x.size()), absmax(2);
    std::vector<uint8_t> codes(x.size());
    x[kQ8BlockElems + 7] = bad;
    q8_quantize(x.data(), 2 * kQ8BlockElems, false, codes.data(), absmax.data());
    q8_dequantize(codes.data(), absmax.data(), 2 * kQ8BlockElems, false, back.data());
    for (int64_t i = 0; i < kQ8BlockElems; ++i) ASSERT_EQ(back[i], 0.25f) << "block 0 must be untouched";
    for (int64_t i = kQ8BlockElems; i < 2 * kQ8BlockElems; ++i)
      ASSERT_FALSE(std::isfinite(back[i])) << "element " << i << " of the poisoned block decoded to " << back[i];
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
