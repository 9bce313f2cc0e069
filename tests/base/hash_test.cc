// base/hash.h against the published FNV-1a 64-bit test vectors (draft-eastlake-fnv, and the
// reference table at isthe.com/chongo/tech/comp/fnv).
#include "base/hash.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace shardopt {
namespace {

TEST(Fnv1a64, PublishedVectors) {
  EXPECT_EQ(fnv1a64(""), 0xcbf29ce484222325ull);  // the offset basis
  EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(fnv1a64("b"), 0xaf63df4c8601f1a5ull);
  EXPECT_EQ(fnv1a64("foobar"), 0x85944171f73967e8ull);
  EXPECT_EQ(fnv1a64("chongo was here!\n"), 0x46810940eff5f915ull);
}

TEST(Fnv1a64, UpdateContinuesTheHash) {
  const std::string a = "foo", b = "bar";
  const uint64_t h = fnv1a64_update(fnv1a64(a), {reinterpret_cast<const unsigned char*>(b.data()), b.size()});
  EXPECT_EQ(h, 0x85944171f73967e8ull);
}

TEST(Fnv1a64, U64IsItsLittleEndianBytes) {
  // 0x0000000000000061 as little-endian bytes is "a" followed by seven zero bytes.
  const std::string bytes("a\0\0\0\0\0\0\0", 8);
  EXPECT_EQ(fnv1a64_update_u64(kFnv1a64OffsetBasis, 0x61), fnv1a64(bytes));
}

}  // namespace
}  // namespace shardopt
