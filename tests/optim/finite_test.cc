#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "base/dtype.h"
#include "base/error.h"
#include "optim/finite.h"

namespace shardopt::optim {
namespace {

TEST(Finite, CountsNanAndInfAtEveryPositionFp32) {
  const float specials[] = {NAN, -NAN, INFINITY, -INFINITY};
  for (size_t n : {1u, 7u, 8u, 31u, 1000u, 40001u}) {
    std::vector<float> v(n, 1.0f);
    v[0] = std::numeric_limits<float>::max();  // finite extremes are not flagged
    if (n > 1) v[1] = std::numeric_limits<float>::denorm_min();
    if (n > 2) v[2] = -std::numeric_limits<float>::max();
    EXPECT_EQ(count_nonfinite(v.data(), n), 0);
    EXPECT_TRUE(all_finite(v.data(), n));
    for (size_t pos : {size_t{0}, n / 2, n - 1}) {
      for (float s : specials) {
        std::vector<float> w = v;
        w[pos] = s;
        EXPECT_EQ(count_nonfinite(w.data(), n), 1) << "n " << n << " pos " << pos;
        EXPECT_FALSE(all_finite(w.data(), n)) << "n " << n << " pos " << pos;
        EXPECT_FALSE(all_finite(w.data(), DType::kF32, n));
      }
    }
    std::vector<float> many = v;
    for (size_t i = 0; i < n; i += 3) many[i] = NAN;
    EXPECT_EQ(count_nonfinite(many.data(), n), static_cast<int64_t>((n + 2) / 3));
  }
}

TEST(Finite, CountsNanAndInfBf16) {
  for (size_t n : {1u, 9u, 64u, 20001u}) {
    std::vector<bf16> v(n, float_to_bf16(-2.5f));
    v[0] = float_to_bf16(3.0e38f);
    EXPECT_EQ(count_nonfinite(v.data(), n), 0);
    EXPECT_TRUE(all_finite(v.data(), DType::kBF16, n));
    for (float s : {NAN, INFINITY, -INFINITY}) {
      std::vector<bf16> w = v;
      w[n - 1] = float_to_bf16(s);
      EXPECT_EQ(count_nonfinite(w.data(), DType::kBF16, n), 1);
      EXPECT_FALSE(all_finite(w.data(), n));
    }
  }
  // A float that rounds past bf16's max becomes Inf, and is then flagged.
  bf16 big = float_to_bf16(std::numeric_limits<float>::max());
  EXPECT_EQ(count_nonfinite(&big, 1), 1);
}

TEST(Finite, EmptyAndBadDtype) {
  EXPECT_TRUE(all_finite(static_cast<const float*>(nullptr), 0));
  EXPECT_EQ(count_nonfinite(static_cast<const bf16*>(nullptr), 0), 0);
  float x = 1.0f;
  EXPECT_THROW(count_nonfinite(&x, DType::kI32, 1), ConfigError);
  EXPECT_THROW(all_finite(&x, DType::kF16, 1), ConfigError);
}

}  // namespace
}  // namespace shardopt::optim
