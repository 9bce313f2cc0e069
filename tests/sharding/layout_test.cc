// Layout names: the one mapping between what users type (--layout) and proto::ShardLayout.
#include "sharding/layout.h"

#include <gtest/gtest.h>

#include <string>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

TEST(LayoutNames, RoundTripBothWays) {
  // The user-facing names are fixed by the CLI and reports (README, summary.json): written out here.
  EXPECT_EQ(parse_layout("owned"), proto::SHARD_LAYOUT_OWNED);
  EXPECT_EQ(parse_layout("dim0"), proto::SHARD_LAYOUT_DIM0);
  EXPECT_STREQ(layout_name(proto::SHARD_LAYOUT_OWNED), "owned");
  EXPECT_STREQ(layout_name(proto::SHARD_LAYOUT_DIM0), "dim0");
  EXPECT_STREQ(layout_name(proto::SHARD_LAYOUT_UNSPECIFIED), "owned") << "unspecified defaults to owned";
  for (auto l : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) EXPECT_EQ(parse_layout(layout_name(l)), l);
  EXPECT_EQ(layout_names(), "owned | dim0");
}

TEST(LayoutNames, UnknownNameIsAConfigErrorNamingTheKnownOnes) {
  for (const char* bad : {"", "Owned", "DIM0", "dim1", "SHARD_LAYOUT_OWNED", "owned "}) {
    try {
      parse_layout(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("'" + std::string(bad) + "'"), std::string::npos) << what;
      EXPECT_NE(what.find("owned"), std::string::npos) << what;
      EXPECT_NE(what.find("dim0"), std::string::npos) << what;
    }
  }
  EXPECT_THROW(layout_name(static_cast<proto::ShardLayout>(77)), ConfigError);
}

}  // namespace
}  // namespace shardopt::sharding
