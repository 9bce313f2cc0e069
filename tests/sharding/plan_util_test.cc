#include "sharding/plan_util.h"

#include <gtest/gtest.h>

#include "sharding/planner.h"
#include "sharding/presets.h"

namespace shardopt::sharding {
namespace {

TEST(PlanUtil, DifferenceNamesTheField) {
  const auto specs = preset_specs("tiny");
  auto req = make_plan_request(specs, 4, 2);
  const auto a = make_plan(req);
  auto req_b = req;
  req_b.set_zero_stage(3);
  const auto b = make_plan(req_b);
  EXPECT_NE(plan_hash(a), plan_hash(b));
  const std::string d = describe_difference(a, b);
  EXPECT_NE(d.find("request.zero_stage"), std::string::npos) << d;
  EXPECT_NE(d.find("2 -> 3"), std::string::npos) << d;
  // Requests compare too.
  auto req_c = req;
  req_c.mutable_params(3)->set_shape(0, 7);
  const std::string dr = describe_difference(req, req_c);
  EXPECT_NE(dr.find("params[3].shape[0]"), std::string::npos) << dr;
  EXPECT_EQ(describe_difference(req, req), "");
}

TEST(PlanUtil, HashIsStableAcrossCopiesAndSerialization) {
  const auto plan = make_plan(make_plan_request(preset_specs("tiny"), 3, 2, proto::SHARD_LAYOUT_DIM0, 4096));
  proto::ShardPlan copy;
  ASSERT_TRUE(copy.ParseFromString(deterministic_bytes(plan)));
  EXPECT_EQ(plan_hash(copy), plan_hash(plan));
  // FNV-1a reference on the empty message: the offset basis.
  EXPECT_EQ(stable_hash(proto::ShardPlan()), 14695981039346656037ull);
}

TEST(PlanUtil, SummaryMentionsConfigurationAndEveryRank) {
  const auto plan = make_plan(make_plan_request(preset_specs("tiny"), 3, 2, proto::SHARD_LAYOUT_OWNED, 4096));
  const std::string s = plan_summary(plan, 2);
  EXPECT_NE(s.find("world 3"), std::string::npos) << s;
  EXPECT_NE(s.find("ZeRO stage 2"), std::string::npos) << s;
  EXPECT_NE(s.find("layout owned"), std::string::npos) << s;
  EXPECT_NE(s.find("more buckets"), std::string::npos) << s;
  int rank_lines = 0;
  for (size_t p = 0; (p = s.find("\n     ", p)) != std::string::npos; ++p) ++rank_lines;
  EXPECT_GE(rank_lines, 3) << s;
}

}  // namespace
}  // namespace shardopt::sharding
