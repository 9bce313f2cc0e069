#include "sharding/presets.h"

#include <gtest/gtest.h>

#include "base/error.h"
#include "plan_checker.h"
#include "sharding/planner.h"

namespace shardopt::sharding {
namespace {

// Independent parameter count of a Llama-style model with untied head.
int64_t llama_count(int64_t d, int64_t layers, int64_t ffn, int64_t vocab, int64_t kv_dim) {
  const int64_t per_layer = 2 * d * d + 2 * kv_dim * d + 3 * d * ffn + 2 * d;
  return 2 * vocab * d + layers * per_layer + d;
}

int64_t count(const std::vector<proto::TensorSpec>& specs) {
  int64_t n = 0;
  for (const auto& s : specs) n += testing::numel_of(s);
  return n;
}

TEST(Presets, ParameterCounts) {
  EXPECT_EQ(count(preset_specs("llama-125m")), llama_count(768, 12, 2048, 32000, 768));
  EXPECT_EQ(count(preset_specs("llama-125m")), 134105856);
  // 1.1B: the published TinyLlama figure, 1,100,048,384.
  EXPECT_EQ(count(preset_specs("llama-1b")), llama_count(2048, 22, 5632, 32000, 256));
  EXPECT_EQ(count(preset_specs("llama-1b")), 1100048384);
  EXPECT_EQ(preset_specs("llama-125m").size(), 1u + 12 * 9 + 2);
  EXPECT_THROW(preset_specs("gpt-5"), ConfigError);
}

// A slice of the first layers: the full list without the later layers' tensors, in the same order.
TEST(Presets, FirstLayersAreTheFullListWithoutTheLaterLayers) {
  const auto all = preset_specs("llama-1b", proto::F32);
  for (int layers : {1, 2, 21}) {
    std::vector<std::string> want;
    for (const auto& s : all) {
      const std::string prefix = "model.layers.";
      if (s.name().rfind(prefix, 0) == 0 && std::stoi(s.name().substr(prefix.size())) >= layers) continue;
      want.push_back(s.name());
    }
    std::vector<std::string> got;
    for (const auto& s : preset_specs("llama-1b", proto::F32, layers)) got.push_back(s.name());
    EXPECT_EQ(got, want) << layers << " layers";
  }
  EXPECT_EQ(preset_specs("llama-1b", proto::F32, 0).size(), all.size());
  EXPECT_EQ(preset_specs("llama-1b", proto::F32, 99).size(), all.size());  // more than the model has: all
  EXPECT_EQ(count(preset_specs("llama-125m", proto::BF16, 3)), llama_count(768, 3, 2048, 32000, 768));
}

TEST(Presets, RoutingSendsSevenMatricesPerLayerToMuon) {
  for (const char* name : {"llama-125m", "llama-1b"}) {
    const auto specs = preset_specs(name);
    const auto shape = preset_shape(name);
    auto req = make_plan_request(specs, 8, 2);
    const auto plan = make_plan(req);
    EXPECT_EQ(plan.stats().muon_matrices(), 7 * shape.n_layers) << name;
    const int64_t embed = shape.vocab * shape.d_model;
    EXPECT_EQ(plan.stats().elementwise_params(), 2 * embed + (2 * shape.n_layers + 1) * shape.d_model) << name;
    // All layers have the same matrices: LPT gets within a few percent of the lower bound.
    EXPECT_LT(plan.stats().ns_balance_ratio(), 1.1) << name;
    // lm_head (the last registered tensor) is in the first bucket.
    EXPECT_EQ(plan.tensors(plan.tensors_size() - 1).bucket(), 0);
  }
}

TEST(Presets, LargePlansHoldTheInvariants) {
  const auto specs = preset_specs("llama-125m");
  for (int world : {3, 8})
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) {
      auto req = make_plan_request(specs, world, 2, layout, 25 << 20);
      const auto plan = make_plan(req);
      // Element-level coverage on 134M elements is too slow for a unit test; check pieces per tensor.
      for (const auto& t : plan.tensors()) {
        int64_t sum = 0;
        for (const auto& p : t.pieces()) sum += p.length();
        ASSERT_EQ(sum, t.numel()) << t.name();
      }
      int64_t payload = 0;
      for (const auto& b : plan.buckets()) payload += b.payload_elems();
      EXPECT_EQ(payload, 134105856);
    }
}

}  // namespace
}  // namespace shardopt::sharding
