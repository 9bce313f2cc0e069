#include "base/dtype.h"

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "base/error.h"

namespace shardopt {
namespace {

TEST(DType, SizesAndNamesRoundTrip) {
  EXPECT_EQ(dtype_size(DType::kF32), 4u);
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_EQ(dtype_size(DType::kI64), 8u);
  EXPECT_EQ(dtype_size(DType::kU8), 1u);
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64, DType::kU8})
    EXPECT_EQ(parse_dtype(dtype_name(d)), d);
  EXPECT_THROW(dtype_size(DType::kUnspecified), ConfigError);
  EXPECT_THROW(parse_dtype("float"), ConfigError);
}

// Reference: bf16 rounding computed in double from the exact value, ties to even.
double reference_bf16(double x) {
  if (x == 0) return x;
  int e;
  std::frexp(x, &e);               // x = f * 2^e, 0.5 <= |f| < 1
  double ulp = std::ldexp(1.0, e - 8);  // bf16 keeps 8 significant bits
  double q = x / ulp;
  double r = std::nearbyint(q);    // default rounding mode: ties to even
  return r * ulp;
}

TEST(DType, Bf16RoundsToNearestEven) {
  const float cases[] = {1.0f, -1.0f, 3.14159f, 1.00390625f /* tie: 1 + 2^-8 */, 1.01171875f /* tie, odd */,
                         65504.0f, 1e-20f, -2.5e10f, 0.1f};
  for (float f : cases) {
    float got = bf16_to_float(float_to_bf16(f));
    EXPECT_EQ(got, static_cast<float>(reference_bf16(f))) << "input " << f;
  }
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(std::numeric_limits<float>::infinity()))));
}

}  // namespace
}  // namespace shardopt
