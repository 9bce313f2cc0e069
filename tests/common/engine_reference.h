// The single-process reference of the engine suites: optim/ applied to whole tensors with the
// averaged (common) gradient of tests/common/engine_fixture.h, routed by the suites' own rule
// (reference_uses_muon below, not sharding/'s router, so a routing bug shows as a mismatch), and
// the engine options the suites use per optimizer name.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/muon.h"
#include "runtime/engine.h"
#include "tests/common/engine_fixture.h"

namespace shardopt::test_fixture {

// optimizer: "muon" / "normuon" (hidden matrices; AdamW elsewhere), "adamw" or "lion" (everything).
inline runtime::EngineOptions engine_options(int stage, proto::ShardLayout layout, const std::string& optimizer) {
  runtime::EngineOptions o;
  o.zero_stage = stage;
  o.layout = layout;
  o.bucket_bytes = 600;  // several buckets, some tensors larger than a bucket
  if (optimizer == "muon" || optimizer == "normuon") {
    o.matrix_optimizer.set_kind(optimizer == "muon" ? proto::OPTIMIZER_MUON : proto::OPTIMIZER_NORMUON);
    o.matrix_optimizer.set_lr(0.02f);
    o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  } else {
    o.elementwise_optimizer.set_kind(optimizer == "lion" ? proto::OPTIMIZER_LION : proto::OPTIMIZER_ADAMW);
  }
  o.elementwise_optimizer.set_lr(0.01f);
  return o;
}

// The suites' routing rule, written out for the models of engine_fixture.h: with a matrix optimizer,
// a 2-D hidden matrix (every 2-D tensor but the token embedding and the output head) is updated by
// Muon/NorMuon as a whole; everything else (embedding, head, norms) element-wise.
inline bool reference_uses_muon(const proto::TensorSpec& spec, const runtime::EngineOptions& o) {
  if (o.matrix_optimizer.kind() == proto::OPTIMIZER_KIND_UNSPECIFIED) return false;
  const std::string& name = spec.name();
  const bool embedding_or_head = name == "tok_embed" || name == "lm_head";
  return spec.shape_size() == 2 && !embedding_or_head;
}

// Parameters after `steps` steps of the reference, starting from initial_value and fed common_grad.
// With o.grad_accumulation_steps = A the engine sums A micro-batches (exactly A * common_grad, see
// micro_offset) and scales by the float 1/A: the reference feeds that same value.
inline std::vector<std::vector<float>> reference_run(const std::vector<proto::TensorSpec>& specs,
                                                     const runtime::EngineOptions& o, int steps) {
  const int accumulation = o.grad_accumulation_steps;
  const auto inv_accumulation = static_cast<float>(1.0 / accumulation);
  const auto ew = optim::resolve_optimizer_config(o.elementwise_optimizer);
  std::optional<optim::OptimizerParams> mx;
  if (o.matrix_optimizer.kind() != proto::OPTIMIZER_KIND_UNSPECIFIED)
    mx = optim::resolve_optimizer_config(o.matrix_optimizer);
  const size_t n_t = specs.size();
  std::vector<std::vector<float>> w(n_t), g(n_t), s0(n_t), s1(n_t), rows(n_t);
  optim::MuonWorkspace ws;
  for (size_t t = 0; t < n_t; ++t) {
    const int64_t n = numel(specs[t]);
    w[t].resize(n);
    for (int64_t i = 0; i < n; ++i) w[t][i] = initial_value(t, i);
    g[t].resize(n);
    s0[t].assign(n, 0.0f);
    s1[t].assign(n, 0.0f);
    rows[t].assign(specs[t].shape(0), 0.0f);
    if (specs[t].shape_size() == 2) ws.reserve(specs[t].shape(0), specs[t].shape(1));
  }
  for (int step = 1; step <= steps; ++step) {
    for (size_t t = 0; t < n_t; ++t) {
      for (int64_t i = 0; i < numel(specs[t]); ++i) {
        const float c = common_grad(step, t, i);
        g[t][i] = accumulation == 1 ? c : (static_cast<float>(accumulation) * c) * inv_accumulation;
      }
      if (reference_uses_muon(specs[t], o)) {
        optim::MuonMatrix m;
        m.master = w[t].data();
        m.grad = g[t].data();
        m.momentum = s0[t].data();
        m.row_second_moment = rows[t].data();
        m.rows = specs[t].shape(0);
        m.cols = specs[t].shape(1);
        optim::muon_step(*mx, m, mx->lr, ws);
      } else {
        optim::ElementwiseSlice sl;
        sl.master = w[t].data();
        sl.grad = g[t].data();
        sl.state[0] = s0[t].data();
        sl.state[1] = s1[t].data();
        sl.count = w[t].size();
        optim::elementwise_step(ew, std::span(&sl, 1), ew.lr, step);
      }
    }
  }
  return w;
}

}  // namespace shardopt::test_fixture
