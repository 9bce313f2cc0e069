// The engine equivalence suite under mpirun: every rank runs one Engine on the MPI world
// communicator and compares its parameters after k steps with a single-process reference that it
// computes itself (no communication), for every stage, layout and optimizer on a mixed model.
//
// Gradients are dyadic rationals with few significant bits, and each rank's gradient is the common
// value plus an offset that sums to exactly zero over ranks, so the averaged gradient equals the
// reference gradient bit for bit whatever order MPI reduces in. Differences can then only come from
// the engine's sharding, routing and bookkeeping.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "comm/mpi_backend.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/muon.h"
#include "runtime/engine.h"
#include "tests/common/engine_reference.h"
#include "tests/common/mpi_suite_main.h"

namespace shardopt::runtime {
namespace {

comm::Communicator* g_world = nullptr;  // set by main()

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

// The fixture's mixed model plus a gate matrix: embeddings/head/norms element-wise, hidden matrices Muon; shapes wide,
// tall and square, a tensor larger than a bucket, more matrices than ranks.
std::vector<proto::TensorSpec> model_with_gate() {
  return {spec("tok_embed", {13, 10}),     spec("layer0.attn_norm", {10}), spec("layer0.w_q", {10, 10}),
          spec("layer0.w_up", {24, 10}),   spec("layer0.w_down", {10, 24}), spec("layer1.w_k", {7, 10}),
          spec("layer1.w_o", {10, 7}),     spec("layer1.w_gate", {16, 10}), spec("layer1.mlp_norm", {10}),
          spec("lm_head", {13, 10})};
}

struct Case {
  int stage;
  proto::ShardLayout layout;
  std::string optimizer;  // muon, normuon, adamw, lion
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return "stage" + std::to_string(c.stage) + "_" + (c.layout == proto::SHARD_LAYOUT_DIM0 ? "dim0" : "owned") + "_" +
         c.optimizer;
}

EngineOptions options_for(const Case& c) { return engine_options(c.stage, c.layout, c.optimizer); }

struct RunResult {
  std::vector<std::vector<float>> params;  // this rank's full view after the last step
  proto::ShardPlan plan;
  std::vector<StepReport> reports;  // one per step
  MemoryReport memory;
};

RunResult engine_run(const std::vector<proto::TensorSpec>& specs, const Case& c, int steps) {
  comm::Communicator& comm = *g_world;
  RunResult out;
  Engine engine(comm, specs, options_for(c));
  engine.set_params([&](size_t t, float* dst) {
    for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
  });
  for (int step = 1; step <= steps; ++step) {
    for (size_t k = specs.size(); k-- > 0;) {  // backward order, each gradient announced
      float* g = engine.grad(k);
      for (int64_t i = 0; i < numel(specs[k]); ++i)
        g[i] = common_grad(step, k, i) + rank_offset(comm.rank(), comm.size(), k, i);
      engine.grad_ready(k);
    }
    out.reports.push_back(engine.step());
  }
  engine.gather_all();
  out.params.resize(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) out.params[t].assign(engine.param(t), engine.param(t) + numel(specs[t]));
  engine.release_all();
  out.plan = engine.plan();
  out.memory = engine.memory();
  return out;
}

class EngineMpiEquivalence : public testing::TestWithParam<Case> {};

TEST_P(EngineMpiEquivalence, NRankTrainingEqualsSingleProcessReference) {
  const Case c = GetParam();
  const auto specs = model_with_gate();
  const int steps = 3;
  const RunResult got = engine_run(specs, c, steps);
  const auto want = reference_run(specs, options_for(c), steps);
  const bool exact_muon = c.layout == proto::SHARD_LAYOUT_OWNED;
  for (const auto& r : got.reports) EXPECT_TRUE(r.applied);
  int muon_tensors = 0;
  for (size_t t = 0; t < specs.size(); ++t) {
    ASSERT_EQ(got.params[t].size(), want[t].size());
    double max_rel = 0;
    bool identical = true;
    for (size_t i = 0; i < want[t].size(); ++i) {
      const double a = got.params[t][i], b = want[t][i];
      max_rel = std::max(max_rel, std::abs(a - b) / std::max(1e-3, std::abs(b)));
      identical = identical && std::memcmp(&got.params[t][i], &want[t][i], sizeof(float)) == 0;
    }
    EXPECT_LE(max_rel, 1e-6) << "tensor " << specs[t].name();
    const bool muon = reference_uses_muon(specs[t], options_for(c));
    EXPECT_EQ(got.plan.tensors(static_cast<int>(t)).muon(), muon) << "routing of " << specs[t].name();
    if (muon) {
      ++muon_tensors;
      if (exact_muon) {
        EXPECT_TRUE(identical) << "owned-layout Muon must be bit-identical: " << specs[t].name();
      }
    }
  }
  // Muon cases route the hidden matrices to Muon; element-wise cases route nothing there.
  const bool matrix_opt = c.optimizer == "muon" || c.optimizer == "normuon";
  EXPECT_EQ(muon_tensors, matrix_opt ? 6 : 0);
  // The parameters moved: an engine that does nothing must not pass.
  EXPECT_NE(got.params[2][0], initial_value(2, 0));
  // Inputs are O(1) so that a 1e-6 relative bound is meaningful.
  for (size_t t = 0; t < specs.size(); ++t)
    for (int64_t i = 0; i < numel(specs[t]); ++i) {
      ASSERT_LE(std::abs(initial_value(t, i)), 0.75f);
      ASSERT_LE(std::abs(common_grad(3, t, i) + rank_offset(g_world->rank(), g_world->size(), t, i)), 1.0f);
    }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (int stage : {1, 2, 3})
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
      for (const char* opt : {"muon", "normuon", "adamw", "lion"}) cases.push_back({stage, layout, opt});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllConfigurations, EngineMpiEquivalence, testing::ValuesIn(all_cases()), case_name);

// Bytes this rank sends in one step by the plan's segments: per bucket, the reduce-scatter sends
// every segment but mine (total - own) and, in stages 1-2, the all-gather sends my segment to the
// N-1 peers (stage 3 gathers on demand, not in step()).
struct SegmentBytes {
  double reduce_scatter = 0, all_gather = 0;
};
SegmentBytes segment_arithmetic(const proto::ShardPlan& plan, int rank, int world, int stage) {
  SegmentBytes out;
  for (const auto& b : plan.buckets()) {
    const double total = static_cast<double>(b.numel()) * 4, own = static_cast<double>(b.segments(rank).count()) * 4;
    out.reduce_scatter += total - own;
    if (stage < 3) out.all_gather += own * (world - 1);
  }
  return out;
}

double sum_over_ranks(double bytes) {
  int64_t value = static_cast<int64_t>(bytes), sum = 0;
  g_world->all_reduce(&value, &sum, 1, DType::kI64, comm::ReduceOp::kSum)->wait();
  return static_cast<double>(sum);
}

uint64_t sent(const StepReport& r, comm::OpKind kind) { return r.traffic.bytes_sent[static_cast<size_t>(kind)]; }

TEST(EngineMpi, BytesSentPerStepEqualThePlansSegmentArithmetic) {
  const auto specs = model_with_gate();
  const int world = g_world->size(), rank = g_world->rank();
  for (int stage : {1, 2, 3}) {
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) {
      const Case c{stage, layout, "muon"};
      const std::string name = case_name({c, 0});
      const RunResult got = engine_run(specs, c, 2);
      const SegmentBytes want = segment_arithmetic(got.plan, rank, world, stage);
      for (size_t s = 0; s < got.reports.size(); ++s) {
        const StepReport& r = got.reports[s];
        EXPECT_EQ(static_cast<double>(sent(r, comm::OpKind::kReduceScatter)), want.reduce_scatter) << name;
        EXPECT_EQ(static_cast<double>(sent(r, comm::OpKind::kAllGather)), want.all_gather) << name;
        // One small all-reduce (non-finite flags + squared norm): 2B(N-1)/N, rounded per rank.
        const double check = 2.0 * (specs.size() + 1) * 4 * (world - 1) / world;
        EXPECT_NEAR(static_cast<double>(sent(r, comm::OpKind::kAllReduce)), check, 1.0) << name;
        const double a2a = static_cast<double>(sent(r, comm::OpKind::kAllToAll));
        const double others = static_cast<double>(r.traffic.total_sent()) - want.reduce_scatter - want.all_gather -
                              static_cast<double>(sent(r, comm::OpKind::kAllReduce)) - a2a;
        EXPECT_EQ(others, 0.0) << name << ": traffic of an unexpected kind";
        if (layout == proto::SHARD_LAYOUT_OWNED) {
          EXPECT_EQ(a2a, 0.0) << name << ": the owned layout moves no Muon shards";
          continue;
        }
        // dim0: my gradient shards go to their owners (the plan's dim0_alltoall_send_elems) and, as
        // an owner, I send the updated shards back; summed over ranks the two volumes are equal.
        const double to_owners = 4.0 * got.plan.stats().ranks(rank).dim0_alltoall_send_elems();
        EXPECT_GE(a2a, to_owners) << name;
        double to_owners_sum = 0;
        for (const auto& rs : got.plan.stats().ranks()) to_owners_sum += 4.0 * rs.dim0_alltoall_send_elems();
        EXPECT_EQ(sum_over_ranks(a2a), 2 * to_owners_sum) << name;
        if (world > 1) {
          EXPECT_GT(to_owners_sum, 0);
        }
      }
    }
  }
}

TEST(EngineMpi, OptimizerMemoryMatchesThePlansZeroArithmetic) {
  const int rank = g_world->rank();
  for (const char* opt : {"muon", "normuon", "adamw", "lion"}) {
    const Case c{2, proto::SHARD_LAYOUT_OWNED, opt};
    const RunResult got = engine_run(model_with_gate(), c, 1);
    const auto& rs = got.plan.stats().ranks(rank);
    // K bytes per owned parameter plus the fp32 master of my padding elements.
    double expected = rs.optimizer_state_bytes() + 4.0 * rs.padding_elems();
    if (std::string(opt) == "normuon")  // one fp32 row moment per row of each owned matrix
      for (const auto& t : got.plan.tensors())
        if (t.muon() && t.owner() == rank) expected += 4.0 * t.rows();
    EXPECT_EQ(static_cast<double>(got.memory.optimizer_bytes()), expected) << opt;
  }
}

// Every rank computed the same parameters (the all-gather delivered one consistent model).
TEST(EngineMpi, AllRanksHoldIdenticalParameters) {
  const auto specs = model_with_gate();
  const RunResult got = engine_run(specs, {2, proto::SHARD_LAYOUT_DIM0, "normuon"}, 2);
  for (size_t t = 0; t < specs.size(); ++t) {
    std::vector<float> root = got.params[t];
    g_world->broadcast(root.data(), root.size(), DType::kF32, 0)->wait();
    EXPECT_EQ(0, std::memcmp(root.data(), got.params[t].data(), root.size() * sizeof(float))) << specs[t].name();
  }
}

}  // namespace
}  // namespace shardopt::runtime

int main(int argc, char** argv) {
  shardopt::comm::CommOptions options = shardopt::comm::CommOptions::from_env();
  options.checked = true;  // a desync names both sides instead of hanging
  options.timeout = std::chrono::milliseconds(60000);
  return shardopt::test_fixture::run_mpi_suite(argc, argv, "engine MPI suite", options, &shardopt::runtime::g_world);
}
