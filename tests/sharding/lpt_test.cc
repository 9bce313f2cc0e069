#include "sharding/lpt.h"

#include <algorithm>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "plan_checker.h"
#include "sharding/planner.h"

namespace shardopt::sharding {
namespace {

// Optimal makespan by exhaustive search over all N^k assignments (independent of the planner).
uint64_t brute_force_makespan(const std::vector<uint64_t>& costs, int world) {
  const size_t k = costs.size();
  uint64_t best = ~uint64_t{0};
  std::vector<int> assign(k, 0);
  while (true) {
    std::vector<uint64_t> load(world, 0);
    for (size_t i = 0; i < k; ++i) load[assign[i]] += costs[i];
    best = std::min(best, *std::max_element(load.begin(), load.end()));
    size_t i = 0;
    while (i < k && ++assign[i] == world) assign[i++] = 0;
    if (i == k) break;
  }
  return best;
}

TEST(Lpt, NsCostIsMaxTimesMinSquared) {
  EXPECT_EQ(ns_cost(4, 4), 64u);
  EXPECT_EQ(ns_cost(2, 8), 8u * 2 * 2);
  EXPECT_EQ(ns_cost(8, 2), 8u * 2 * 2);
  EXPECT_EQ(ns_cost_blocks(15, 13, {5, 5, 5}), 3u * 13 * 5 * 5);
  EXPECT_EQ(ns_cost_blocks(15, 13, {}), 15u * 13 * 13);
  EXPECT_THROW(ns_cost(0, 3), ConfigError);
  EXPECT_THROW(ns_cost(int64_t{1} << 40, int64_t{1} << 40), ConfigError);  // overflow, not wrap-around
}

TEST(Lpt, WithinFourThirdsOfBruteForceOptimum) {
  std::mt19937_64 rng(1234);
  int instances = 0;
  double worst = 1.0;
  for (int world : {1, 2, 3, 4})
    for (int jobs = 1; jobs <= 8; ++jobs) {
      if (std::pow(world, jobs) > 70000) continue;
      for (int rep = 0; rep < 6; ++rep) {
        std::vector<uint64_t> costs;
        for (int j = 0; j < jobs; ++j) {
          const int64_t m = 1 + int64_t(rng() % 40), n = 1 + int64_t(rng() % 40);
          costs.push_back(testing::ref_ns_cost(m, n));
        }
        const auto res = assign_owners_lpt(costs, std::vector<double>(costs.size(), 0.0), world, 0);
        // Loads match the assignment.
        std::vector<uint64_t> load(world, 0);
        for (size_t j = 0; j < costs.size(); ++j) {
          ASSERT_GE(res.owner[j], 0);
          ASSERT_LT(res.owner[j], world);
          load[res.owner[j]] += costs[j];
        }
        ASSERT_EQ(load, res.load);
        const uint64_t lpt = *std::max_element(load.begin(), load.end());
        const uint64_t opt = brute_force_makespan(costs, world);
        ASSERT_GE(lpt, opt);
        // Graham's bound: LPT <= (4/3 - 1/(3N)) OPT.
        ASSERT_LE(double(lpt), (4.0 / 3.0 - 1.0 / (3.0 * world)) * double(opt) + 1e-9)
            << "world " << world << " jobs " << jobs;
        worst = std::max(worst, double(lpt) / double(opt));
        ++instances;
      }
    }
  EXPECT_GT(instances, 100);
  RecordProperty("worst_lpt_over_opt", std::to_string(worst));
}

TEST(Lpt, ClassicTightInstanceReachesTheBound) {
  // Graham's tight example for N = 2: jobs 3,3,2,2,2 -> LPT 7, OPT 6.
  const std::vector<uint64_t> costs = {3, 3, 2, 2, 2};
  const auto res = assign_owners_lpt(costs, std::vector<double>(5, 0.0), 2, 0);
  EXPECT_EQ(*std::max_element(res.load.begin(), res.load.end()), 7u);
  EXPECT_EQ(brute_force_makespan(costs, 2), 6u);
}

TEST(Lpt, TiesBreakToLowestRankAndLowestIndex) {
  const auto res = assign_owners_lpt({5, 5, 5, 5}, std::vector<double>(4, 0.0), 3, 0);
  EXPECT_EQ(res.owner, (std::vector<int>{0, 1, 2, 0}));
}

TEST(Lpt, PlannerMatchesBruteForceBoundOnSquareMatrices) {
  std::vector<proto::TensorSpec> specs;
  for (int64_t d : {9, 7, 7, 6, 5, 5, 3}) {
    proto::TensorSpec s;
    s.set_name("m" + std::to_string(specs.size()));
    s.add_shape(d);
    s.add_shape(d);
    s.set_dtype(proto::F32);
    specs.push_back(s);
  }
  std::vector<uint64_t> costs;
  for (const auto& s : specs) costs.push_back(uint64_t(s.shape(0) * s.shape(0) * s.shape(0)));
  for (int world : {2, 3}) {
    const auto plan = make_plan(make_plan_request(specs, world, 2));
    const uint64_t opt = brute_force_makespan(costs, world);
    EXPECT_LE(double(plan.stats().max_ns_load()), 4.0 / 3.0 * double(opt));
    EXPECT_GE(plan.stats().max_ns_load(), opt);
  }
}

}  // namespace
}  // namespace shardopt::sharding
