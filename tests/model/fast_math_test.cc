#include <gtest/gtest.h>

#include <cmath>

#include "model/fast_math.h"

namespace shardopt::model {
namespace {

TEST(FastMath, ExpMatchesDoubleExpToFloatPrecision) {
  double worst = 0;
  for (double x = -87.0; x <= 88.0; x += 0.001953125 * 3.1) {
    const double ref = std::exp(x);
    worst = std::max(worst, std::fabs(fast_exp(static_cast<float>(x)) - std::exp(double(float(x)))) / ref);
  }
  EXPECT_LT(worst, 3e-7);
  EXPECT_EQ(fast_exp(0.0f), 1.0f);
  EXPECT_TRUE(std::isfinite(fast_exp(1000.0f)));  // clamped, no inf
  EXPECT_GT(fast_exp(-1000.0f), 0.0f);            // clamped, no zero/denormal
}

TEST(FastMath, TanhMatchesDoubleTanh) {
  double worst = 0;
  for (double z = -20.0; z <= 20.0; z += 0.0007) worst = std::max(worst, std::fabs(fast_tanh(float(z)) - std::tanh(double(float(z)))));
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(fast_tanh(50.0f), 1.0f);
  EXPECT_EQ(fast_tanh(-50.0f), -1.0f);
}

}  // namespace
}  // namespace shardopt::model
