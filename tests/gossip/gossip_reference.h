// Shared by the gossip suites (threads and mpirun): the model, the injected fast weights of every
// replica and round, the flat element ids of a rank's master shard, and the plain double-precision
// references of NoLoCo and DiLoCo (docs/algorithms.md, "NoLoCo and DiLoCo").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/engine.h"
#include "runtime/gossip/outer_sync.h"
#include "tests/common/engine_fixture.h"

namespace shardopt::runtime::gossip::test_ref {

using shardopt::test_fixture::spec;

inline std::vector<proto::TensorSpec> mixed_model() {
  return {spec("tok_embed", {13, 10}), spec("layer0.attn_norm", {10}), spec("layer0.w_q", {10, 10}),
          spec("layer0.w_up", {24, 10}), spec("layer0.w_down", {10, 24}), spec("layer1.w_k", {7, 10}),
          spec("lm_head", {13, 10})};
}

inline int64_t numel(const proto::TensorSpec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape()) n *= d;
  return n;
}

inline EngineOptions muon_options(proto::ShardLayout layout = proto::SHARD_LAYOUT_OWNED, int stage = 2) {
  EngineOptions o;
  o.zero_stage = stage;
  o.layout = layout;
  o.bucket_bytes = 600;
  o.matrix_optimizer.set_kind(proto::OPTIMIZER_MUON);
  o.matrix_optimizer.set_lr(0.02);
  o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  return o;
}

inline EngineOptions sgd_options(double lr) {
  EngineOptions o;
  o.bucket_bytes = 600;
  o.elementwise_optimizer.set_kind(proto::OPTIMIZER_SGD);
  o.elementwise_optimizer.set_lr(lr);
  o.elementwise_optimizer.set_momentum(0);
  o.elementwise_optimizer.set_weight_decay(0);
  return o;
}

// Global element ids: tensor t's element i is tensor_base[t] + i.
struct Model {
  std::vector<proto::TensorSpec> specs = mixed_model();
  std::vector<int64_t> base;
  int64_t total = 0;
  Model() {
    for (const auto& s : specs) {
      base.push_back(total);
      total += numel(s);
    }
  }
};

inline double init_value(int64_t gid) { return std::sin(0.37 * static_cast<double>(gid)) * 0.5; }
// "Trained" fast weights of replica r before outer step k (what the inner steps produced).
inline float theta_value(int r, int k, int64_t gid) {
  return static_cast<float>(init_value(gid) + 0.3 * std::sin(1.3 * r + 0.71 * k + 0.11 * static_cast<double>(gid)));
}

inline float theta_at(int r, int k, int64_t id) { return id < 0 ? 0.0f : theta_value(r, k, id); }

// Global id of every element of this rank's flat master shard (bucket order).
inline std::vector<int64_t> flat_ids(Engine& engine, const Model& model) {
  ShardState& st = engine.shard_state();
  std::vector<int64_t> bucket_base(static_cast<size_t>(st.num_buckets()) + 1, 0);
  for (int b = 0; b < st.num_buckets(); ++b) bucket_base[b + 1] = bucket_base[b] + st.my_segment(b).count();
  std::vector<int64_t> ids(static_cast<size_t>(bucket_base.back()), -1);
  for (const LocalPiece& p : st.my_pieces())
    for (int64_t j = 0; j < p.length; ++j)
      ids[static_cast<size_t>(bucket_base[p.bucket] + p.segment_offset + j)] = model.base[p.tensor] + p.tensor_offset + j;
  return ids;  // -1: bucket padding (no tensor; stays 0 through the outer step)
}

// Double reference: per element, per replica scalars.
struct RefNoLoCo {
  double alpha, beta, gamma;
  std::vector<double> phi, m;
  void step(const std::vector<double>& theta, const std::vector<std::vector<int>>& groups) {
    std::vector<double> new_phi = phi;
    for (const auto& g : groups) {
      double d = 0, pb = 0;
      for (int k : g) {
        d += theta[k] - phi[k];
        pb += phi[k];
      }
      d /= static_cast<double>(g.size());
      pb /= static_cast<double>(g.size());
      for (int i : g) {
        m[i] = beta * m[i] + alpha * d + gamma * (pb - phi[i]);
        new_phi[i] = phi[i] + m[i];
      }
    }
    phi = new_phi;
  }
};

struct RefDiLoCo {
  double lr, mu;
  bool nesterov;
  double phi, buf = 0;
  void step(const std::vector<double>& theta) {
    double mean = 0;
    for (double t : theta) mean += t;
    mean /= static_cast<double>(theta.size());
    const double g = phi - mean;
    buf = mu * buf + g;
    phi -= lr * (nesterov ? g + mu * buf : buf);
  }
};


// Groups actually averaged in round k when the replica pairs in `broken` stopped talking before it:
// a group holding a broken pair falls apart into singletons (each applies its own update).
inline std::vector<std::vector<int>> groups_with_broken_links(std::vector<std::vector<int>> groups,
                                                              const std::vector<std::pair<int, int>>& broken) {
  std::vector<std::vector<int>> out;
  for (auto& g : groups) {
    bool split = false;
    for (auto [a, b] : broken)
      split |= std::find(g.begin(), g.end(), a) != g.end() && std::find(g.begin(), g.end(), b) != g.end();
    if (!split) {
      out.push_back(g);
      continue;
    }
    for (int r : g) out.push_back({r});
  }
  return out;
}

// One rank's record of a run: phi and m of its flat master shard after each round, and the reports.
struct RankRecord {
  std::vector<int64_t> ids;
  std::vector<std::vector<float>> phi, m;
  std::vector<OuterReport> reports;
};

// Checks one replica's recorded phi / m against RefNoLoCo run over `groups_by_round` (every element).
inline void expect_rank_matches_reference(const RankRecord& rec, int replica, int replicas, const GossipOptions& o,
                                          const std::vector<std::vector<std::vector<int>>>& groups_by_round,
                                          double tol = 2e-6) {
  for (size_t i = 0; i < rec.ids.size(); ++i) {
    const int64_t gid = rec.ids[i];
    if (gid < 0) continue;
    RefNoLoCo ref{o.alpha, o.beta, o.gamma, std::vector<double>(static_cast<size_t>(replicas), init_value(gid)),
                  std::vector<double>(static_cast<size_t>(replicas), 0.0)};
    for (size_t k = 0; k < rec.phi.size(); ++k) {
      std::vector<double> theta(static_cast<size_t>(replicas));
      for (int r = 0; r < replicas; ++r) theta[static_cast<size_t>(r)] = theta_value(r, static_cast<int>(k), gid);
      ref.step(theta, groups_by_round[k]);
      ASSERT_NEAR(rec.phi[k][i], ref.phi[static_cast<size_t>(replica)], tol)
          << "phi, round " << k << " replica " << replica << " element " << gid;
      ASSERT_NEAR(rec.m[k][i], ref.m[static_cast<size_t>(replica)], tol)
          << "m, round " << k << " replica " << replica << " element " << gid;
    }
  }
}

// Runs `rounds` outer steps on this rank: the engine runs on grid.shard_group, OuterSync on `cross`
// (grid.cross or a wrapper of it). Before round k theta = theta_value(replica, k, .); `before(k, sync)`
// runs first and `after(k, sync)` after the round (stalls, barriers, checks).
inline RankRecord run_rounds(ReplicaGrid& grid, comm::Communicator& cross, const GossipOptions& options, int rounds,
                             const std::function<void(int, OuterSync&)>& before = {},
                             const std::function<void(int, OuterSync&)>& after = {},
                             const EngineOptions& engine_options = muon_options()) {
  const Model model;
  Engine engine(*grid.shard_group, model.specs, engine_options);
  engine.set_params([&](size_t t, float* dst) {
    for (int64_t i = 0; i < numel(model.specs[t]); ++i) dst[i] = static_cast<float>(init_value(model.base[t] + i));
  });
  OuterSync sync(engine, cross, options);
  RankRecord rec;
  rec.ids = flat_ids(engine, model);
  std::vector<float> theta(rec.ids.size());
  for (int k = 0; k < rounds; ++k) {
    if (before) before(k, sync);
    for (size_t i = 0; i < rec.ids.size(); ++i) theta[i] = theta_at(grid.replica, k, rec.ids[i]);
    sync.write_theta(theta.data());
    rec.reports.push_back(sync.outer_step());
    rec.phi.emplace_back(sync.phi(), sync.phi() + rec.ids.size());
    rec.m.emplace_back(sync.momentum(), sync.momentum() + rec.ids.size());
    if (after) after(k, sync);
  }
  return rec;
}

}  // namespace shardopt::runtime::gossip::test_ref
