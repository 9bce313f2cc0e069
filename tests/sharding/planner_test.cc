#include "sharding/planner.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "plan_checker.h"
#include "sharding/plan_util.h"

namespace shardopt::sharding {
namespace {

using testing::check_plan;

proto::TensorSpec make_spec(const std::string& name, std::vector<int64_t> shape, proto::DType dtype = proto::BF16,
                            std::vector<int64_t> blocks = {}, const std::string& group = "") {
  proto::TensorSpec s;
  s.set_name(name);
  for (int64_t d : shape) s.add_shape(d);
  s.set_dtype(dtype);
  for (int64_t b : blocks) s.add_block_rows(b);
  s.set_group(group);
  return s;
}

// A small model with odd sizes, mixed dtypes, 0-D/1-D/3-D tensors, a fused QKV with blocks,
// explicit groups, and matrices that are larger than some bucket sizes.
std::vector<proto::TensorSpec> odd_model() {
  return {
      make_spec("embed_tokens", {37, 13}),
      make_spec("l0.norm", {13}),
      make_spec("l0.qkv", {15, 13}, proto::BF16, {5, 5, 5}),
      make_spec("l0.o", {13, 5}),
      make_spec("l0.up", {29, 13}),
      make_spec("l0.up.bias", {29}),
      make_spec("l0.down", {13, 29}),
      make_spec("scale", {}, proto::F32),
      make_spec("conv", {3, 5, 7}, proto::F32),
      make_spec("l1.w", {1, 1}),
      make_spec("l1.fp32_w", {11, 3}, proto::F32),
      make_spec("l1.forced_adamw", {9, 9}, proto::BF16, {}, "adamw"),
      make_spec("l1.tall", {61, 2}),
      make_spec("final_norm", {13}),
      make_spec("lm_head", {37, 13}),
  };
}

TEST(Planner, ExhaustiveInvariantsOverWorldsLayoutsStagesBucketsAlignment) {
  const auto specs = odd_model();
  int plans = 0;
  for (int world : {1, 2, 3, 5, 7, 8})
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
      for (int stage : {1, 2, 3})
        for (int64_t bucket : {1, 64, 333, 1000, 1 << 20})
          for (int64_t align : {1, 4, 16, 64}) {
            auto req = make_plan_request(specs, world, stage, layout, bucket);
            req.set_align_bytes(align);
            const auto plan = make_plan(req);
            const std::string ctx = "world " + std::to_string(world) + " layout " + std::to_string(layout) + " stage " +
                                    std::to_string(stage) + " bucket " + std::to_string(bucket) + " align " +
                                    std::to_string(align);
            check_plan(req, plan, ctx);
            if (::testing::Test::HasFatalFailure()) return;
            EXPECT_EQ(plan.request().zero_stage(), stage);
            ++plans;
          }
  EXPECT_EQ(plans, 6 * 2 * 3 * 5 * 4);
}

TEST(Planner, ElementwiseOnlyRunRoutesEverythingElementwise) {
  auto req = make_plan_request(odd_model(), 3, 2);
  // The explicit "muon" group would contradict an element-wise-only run, so none is set here.
  req.mutable_routing()->set_elementwise_only(true);
  req.mutable_routing()->set_elementwise_group("lion");
  const auto plan = make_plan(req);
  check_plan(req, plan, "elementwise only");
  for (const auto& t : plan.tensors()) {
    EXPECT_FALSE(t.muon()) << t.name();
    EXPECT_EQ(t.group(), t.name() == "l1.forced_adamw" ? "adamw" : "lion");
  }
  EXPECT_EQ(plan.request().elementwise_state_bytes_per_param(), 8.0);  // Lion: master + momentum
  EXPECT_EQ(plan.stats().muon_matrices(), 0);
  EXPECT_EQ(plan.stats().ns_balance_ratio(), 1.0);
}

TEST(Planner, CustomPatternsAndExplicitGroupWin) {
  std::vector<proto::TensorSpec> specs = {make_spec("a.proj", {8, 8}), make_spec("b.proj", {8, 8}),
                                          make_spec("c.embed", {8, 8}, proto::BF16, {}, "muon")};
  auto req = make_plan_request(specs, 2, 1);
  req.mutable_routing()->add_elementwise_patterns("A.PROJ");  // case-insensitive
  const auto plan = make_plan(req);
  check_plan(req, plan, "custom", /*default_routing=*/false);
  EXPECT_FALSE(plan.tensors(0).muon());
  EXPECT_TRUE(plan.tensors(1).muon());
  EXPECT_TRUE(plan.tensors(2).muon());  // explicit group beats the "embed" pattern
}

TEST(Planner, OwnedLayoutBalancesSegmentsWhenElementwiseTensorsCanFill) {
  // 4 equal matrices on 4 ranks plus 8 element-wise tensors: segment boundaries cut element-wise
  // tensors, so every segment can reach the mean (up to alignment).
  std::vector<proto::TensorSpec> specs;
  for (int i = 0; i < 4; ++i) specs.push_back(make_spec("m" + std::to_string(i), {64, 32}));
  for (int i = 0; i < 8; ++i) specs.push_back(make_spec("bias" + std::to_string(i), {4000}));
  auto req = make_plan_request(specs, 4, 2, proto::SHARD_LAYOUT_OWNED, 1 << 30);
  const auto plan = make_plan(req);
  check_plan(req, plan, "balanced");
  ASSERT_EQ(plan.buckets_size(), 1);
  const double mean = double(plan.buckets(0).numel()) / 4;
  for (const auto& s : plan.buckets(0).segments()) EXPECT_NEAR(double(s.count()), mean, 32.0) << "rank " << s.rank();
  EXPECT_LT(plan.buckets(0).segment_imbalance(), 1.01);
  // Each matrix on a different rank (equal costs: LPT spreads them).
  std::vector<int> owners;
  for (int i = 0; i < 4; ++i) owners.push_back(plan.tensors(i).owner());
  std::sort(owners.begin(), owners.end());
  EXPECT_EQ(owners, (std::vector<int>{0, 1, 2, 3}));
}

TEST(Planner, OwnedLayoutReportsImbalanceItCannotAvoid) {
  // One contiguous element-wise tensor can span only one segment boundary between two matrices, so a
  // big embedding next to 4 small matrices leaves segments unequal; the plan reports it.
  std::vector<proto::TensorSpec> specs;
  for (int i = 0; i < 4; ++i) specs.push_back(make_spec("m" + std::to_string(i), {64, 32}));
  specs.push_back(make_spec("embed", {500, 64}));
  const auto plan = make_plan(make_plan_request(specs, 4, 2, proto::SHARD_LAYOUT_OWNED, 1 << 30));
  const auto& b = plan.buckets(0);
  int64_t max_seg = 0;
  for (const auto& s : b.segments()) max_seg = std::max(max_seg, s.count());
  EXPECT_DOUBLE_EQ(b.segment_imbalance(), double(max_seg) * 4 / double(b.numel()));
  EXPECT_GT(b.segment_imbalance(), 1.5);
  EXPECT_DOUBLE_EQ(plan.stats().max_segment_imbalance(), b.segment_imbalance());
  // The best any layout can do: two segments hold only a matrix each, the other two share the rest.
  EXPECT_LE(double(max_seg), (double(b.numel()) - 2 * 2048) / 2 + 64);
}

TEST(Planner, Dim0PadsWhenRowsFewerThanRanksAndCountsAlltoAll) {
  std::vector<proto::TensorSpec> specs = {make_spec("w", {3, 10}), make_spec("b", {5})};
  auto req = make_plan_request(specs, 8, 3, proto::SHARD_LAYOUT_DIM0, 1 << 20);
  req.set_align_bytes(2);  // one bf16 element
  const auto plan = make_plan(req);
  check_plan(req, plan, "dim0 small");
  ASSERT_EQ(plan.buckets_size(), 1);
  // Slots: w -> ceil(3/8) * 10 = 10 elements, b -> 1 element: 11 per rank, 88 in all, 88 - 35 padding.
  EXPECT_EQ(plan.buckets(0).segments(0).count(), 11);
  EXPECT_EQ(plan.buckets(0).numel(), 88);
  EXPECT_EQ(plan.buckets(0).padding_elems(), 88 - 35);
  // The owner of w receives the other two non-empty row shards (10 elements each).
  const int owner = plan.tensors(0).owner();
  int64_t sent = 0;
  for (const auto& r : plan.stats().ranks()) sent += r.dim0_alltoall_send_elems();
  EXPECT_EQ(sent, owner < 3 ? 20 : 30);
}

TEST(Planner, MemoryCapRespectedOrError) {
  std::vector<proto::TensorSpec> specs;
  for (int i = 0; i < 6; ++i) specs.push_back(make_spec("m" + std::to_string(i), {16 + i, 16}));
  auto req = make_plan_request(specs, 3, 2);
  // Muon state is 8 bytes per element; the two largest matrices (21x16, 20x16) need 2688 + 2560.
  req.set_memory_cap_bytes(8 * (21 * 16 + 20 * 16));
  const auto plan = make_plan(req);
  check_plan(req, plan, "cap");
  for (const auto& r : plan.stats().ranks()) EXPECT_LE(r.optimizer_state_bytes(), req.memory_cap_bytes());
  req.set_memory_cap_bytes(8 * 20 * 16);  // the 21x16 matrix alone is bigger
  try {
    make_plan(req);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("m5"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cap"), std::string::npos) << e.what();
  }
  // Total state exceeds N * cap: error even though each matrix alone fits.
  req.set_memory_cap_bytes(8 * 21 * 16);
  EXPECT_THROW(make_plan(req), ConfigError);
}

void expect_config_error(const proto::PlanRequest& req, const std::string& needle) {
  try {
    make_plan(req);
    ADD_FAILURE() << "expected ConfigError mentioning '" << needle << "'";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Planner, BadInputsThrowConfigErrorWithClearMessages) {
  const auto specs = odd_model();
  auto ok = make_plan_request(specs, 2, 2);
  auto r = ok;
  r.set_world_size(0);
  expect_config_error(r, "world_size");
  r = ok;
  r.set_zero_stage(4);
  expect_config_error(r, "zero_stage");
  r = ok;
  r.set_bucket_bytes(0);
  expect_config_error(r, "bucket_bytes");
  r = ok;
  r.set_align_bytes(24);
  expect_config_error(r, "power of two");
  r = ok;
  r.mutable_params(3)->set_shape(1, 0);
  expect_config_error(r, "l0.o");
  r = ok;
  *r.add_params() = specs[2];
  expect_config_error(r, "duplicate parameter name 'l0.qkv'");
  r = ok;
  r.mutable_params(2)->set_block_rows(0, 4);
  expect_config_error(r, "block_rows sum to 14 but the matrix has 15 rows");
  r = ok;
  r.mutable_params(1)->set_dtype(proto::DTYPE_UNSPECIFIED);
  expect_config_error(r, "dtype");
  r = ok;
  r.mutable_params(1)->set_group("muon");
  expect_config_error(r, "2-D");
  r = ok;
  r.clear_params();
  expect_config_error(r, "no parameters");
  r = ok;
  r.set_memory_cap_bytes(-1);
  expect_config_error(r, "memory_cap_bytes");
}

TEST(Planner, DeterministicAndNormalized) {
  const auto specs = odd_model();
  for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) {
    auto req = make_plan_request(specs, 5, 3, layout, 333);
    const auto a = make_plan(req);
    const auto b = make_plan(req);
    EXPECT_EQ(plan_hash(a), plan_hash(b));
    EXPECT_EQ(describe_difference(a, b), "");
    // Spelling out the defaults changes nothing.
    auto explicit_req = req;
    explicit_req.set_align_bytes(64);
    explicit_req.mutable_routing()->set_muon_group("muon");
    explicit_req.mutable_routing()->set_elementwise_group("adamw");
    explicit_req.set_muon_state_bytes_per_param(8);
    explicit_req.set_elementwise_state_bytes_per_param(12);
    EXPECT_EQ(plan_hash(make_plan(explicit_req)), plan_hash(a));
    // A real change changes the hash.
    auto other = req;
    other.set_world_size(4);
    EXPECT_NE(plan_hash(make_plan(other)), plan_hash(a));
  }
}

}  // namespace
}  // namespace shardopt::sharding
