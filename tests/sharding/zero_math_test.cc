#include "sharding/zero_math.h"

#include <gtest/gtest.h>

#include "base/error.h"
#include "sharding/planner.h"
#include "sharding/presets.h"

namespace shardopt::sharding {
namespace {

// The ZeRO paper's worked example: 7.5B parameters, 64 ranks, K = 12:
// 120 GB replicated, 31.4 GB stage 1, 16.6 GB stage 2, 1.9 GB stage 3 (1 GB = 1e9 bytes).
TEST(ZeroMath, MatchesThePaperExample) {
  const double psi = 7.5e9;
  EXPECT_DOUBLE_EQ(zero_memory_per_rank(0, psi, 64).total_bytes, 120e9);
  EXPECT_DOUBLE_EQ(zero_memory_per_rank(1, psi, 64).total_bytes, 30e9 + 12 * 7.5e9 / 64);  // 31.41 GB
  EXPECT_DOUBLE_EQ(zero_memory_per_rank(2, psi, 64).total_bytes, 15e9 + 14 * 7.5e9 / 64);  // 16.64 GB
  EXPECT_DOUBLE_EQ(zero_memory_per_rank(3, psi, 64).total_bytes, 16 * 7.5e9 / 64);        // 1.875 GB
  EXPECT_NEAR(zero_memory_per_rank(1, psi, 64).total_bytes / 1e9, 31.4, 0.05);
  EXPECT_NEAR(zero_memory_per_rank(2, psi, 64).total_bytes / 1e9, 16.6, 0.05);
  EXPECT_NEAR(zero_memory_per_rank(3, psi, 64).total_bytes / 1e9, 1.9, 0.05);
}

TEST(ZeroMath, TableColumnsPerStage) {
  // Ψ = 1000, N = 4, K = 12.
  auto m = zero_memory_per_rank(0, 1000, 4);
  EXPECT_EQ(m.param_bytes, 2000);
  EXPECT_EQ(m.grad_bytes, 2000);
  EXPECT_EQ(m.optimizer_state_bytes, 12000);
  m = zero_memory_per_rank(1, 1000, 4);
  EXPECT_EQ(m.param_bytes, 2000);
  EXPECT_EQ(m.grad_bytes, 2000);
  EXPECT_EQ(m.optimizer_state_bytes, 3000);
  m = zero_memory_per_rank(2, 1000, 4);
  EXPECT_EQ(m.param_bytes, 2000);
  EXPECT_EQ(m.grad_bytes, 500);
  EXPECT_EQ(m.optimizer_state_bytes, 3000);
  m = zero_memory_per_rank(3, 1000, 4);
  EXPECT_EQ(m.param_bytes, 500);
  EXPECT_EQ(m.grad_bytes, 500);
  EXPECT_EQ(m.optimizer_state_bytes, 3000);
  EXPECT_EQ(m.total_bytes, 4000);
  // Muon: K = 8.
  EXPECT_EQ(zero_memory_per_rank(2, 1000, 4, state_bytes_per_param("muon")).optimizer_state_bytes, 2000);
  EXPECT_EQ(state_bytes_per_param("adamw"), 12);
  EXPECT_EQ(state_bytes_per_param("lion"), 8);
  EXPECT_THROW(state_bytes_per_param("rmsprop"), ConfigError);
}

TEST(ZeroMath, TrafficPerStage) {
  // Ring all-reduce: 2Ψ(N-1)/N; Ψ = 1000, N = 4 -> 1500 elements, 3000 bf16 bytes.
  EXPECT_EQ(zero_traffic_per_rank(0, 1000, 4).elements, 1500);
  EXPECT_EQ(zero_traffic_per_rank(0, 1000, 4).bytes, 3000);
  EXPECT_EQ(zero_traffic_per_rank(1, 1000, 4).elements, 1500);
  EXPECT_EQ(zero_traffic_per_rank(2, 1000, 4).elements, 1500);
  EXPECT_EQ(zero_traffic_per_rank(3, 1000, 4).elements, 2250);
  EXPECT_EQ(zero_traffic_per_rank(3, 1000, 4, 4).bytes, 9000);
  EXPECT_EQ(zero_traffic_per_rank(2, 1000, 1).elements, 0);
  // dim0 Muon: 2Ψ_m(N-1)/N^2 = 2 * 1600 * 3 / 16 = 600.
  EXPECT_EQ(dim0_muon_extra_traffic_per_rank(1600, 4).elements, 600);
  EXPECT_THROW(zero_traffic_per_rank(4, 1000, 4), ConfigError);
  EXPECT_THROW(zero_memory_per_rank(1, 1000, 0), ConfigError);
}

// The plan's per-rank statistics agree with the closed formulas (up to padding) on a real model.

TEST(ZeroMath, PlanStatisticsAgreeWithFormulas) {
  const auto specs = preset_specs("llama-125m");
  const double psi = 134105856;
  for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
    for (int stage : {1, 2, 3})
      for (int world : {1, 4, 8}) {
        SCOPED_TRACE("layout " + std::to_string(layout) + " stage " + std::to_string(stage) + " world " +
                     std::to_string(world));
        auto req = make_plan_request(specs, world, stage, layout);
        req.mutable_routing()->set_elementwise_only(true);  // pure AdamW: K = 12 everywhere
        const auto plan = make_plan(req);
        const auto formula = zero_memory_per_rank(stage, psi, world);
        double state_sum = 0;
        for (const auto& r : plan.stats().ranks()) {
          state_sum += r.optimizer_state_bytes();
          // Padding is a tiny fraction here, and both layouts spread element-wise tensors evenly.
          EXPECT_NEAR(r.optimizer_state_bytes(), formula.optimizer_state_bytes, 0.002 * formula.optimizer_state_bytes);
          EXPECT_NEAR(r.grad_bytes(), formula.grad_bytes, 0.002 * formula.grad_bytes);
          if (stage < 3) {
            EXPECT_NEAR(r.param_bytes(), formula.param_bytes, 0.002 * formula.param_bytes);
          } else {
            // Stage 3 keeps the largest gathered bucket live on top of its 2Ψ/N shard.
            EXPECT_NEAR(r.param_bytes() - plan.stats().largest_bucket_bytes(), formula.param_bytes,
                        0.002 * formula.param_bytes);
          }
        }
        EXPECT_DOUBLE_EQ(state_sum, 12 * psi);  // every element's state lives on exactly one rank
      }
}

TEST(ZeroMath, MuonStateIsKEightOnOwners) {
  const auto specs = preset_specs("llama-125m");
  const auto plan = make_plan(make_plan_request(specs, 8, 2));
  double state_sum = 0;
  for (const auto& r : plan.stats().ranks()) state_sum += r.optimizer_state_bytes();
  // 12 layers x (q, k, v, o: 768 x 768; gate, up: 2048 x 768; down: 768 x 2048).
  EXPECT_EQ(plan.stats().muon_params(), 12 * (4 * 768 * 768 + 3 * 768 * 2048));
  EXPECT_DOUBLE_EQ(state_sum, 8.0 * plan.stats().muon_params() + 12.0 * plan.stats().elementwise_params());
}

}  // namespace
}  // namespace shardopt::sharding
