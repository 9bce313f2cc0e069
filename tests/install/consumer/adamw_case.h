// The step both consumer programs check: one AdamW step of an element-wise tensor whose gradients
// are averaged over the ranks, against the formula computed here in double precision.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "proto/types.pb.h"
#include "runtime/engine.h"

namespace adamw_case {

constexpr int kN = 24;
constexpr double kLr = 0.01, kWd = 0.1, kB1 = 0.9, kB2 = 0.999, kEps = 1e-8;

inline double value(int i) { return 0.05 * (i % 7) - 0.1; }
inline double grad_of(int rank, int i) { return 0.01 * ((i * 5 + rank * 3) % 11) - 0.04; }

inline shardopt::proto::TensorSpec spec() {
  shardopt::proto::TensorSpec s;
  s.set_name("embed.weight");
  s.add_shape(4);
  s.add_shape(kN / 4);
  s.set_dtype(shardopt::proto::F32);
  return s;
}

inline shardopt::runtime::EngineOptions options() {
  shardopt::runtime::EngineOptions o;
  o.elementwise_optimizer.set_kind(shardopt::proto::OPTIMIZER_ADAMW);
  o.elementwise_optimizer.set_lr(kLr);
  o.elementwise_optimizer.set_weight_decay(kWd);
  return o;
}

// Counts (and prints) the values of `result` (per rank) that miss the formula for `world` ranks.
inline int mismatches(const std::vector<std::vector<float>>& result, int world) {
  int bad = 0;
  for (int i = 0; i < kN; ++i) {
    double g = 0;
    for (int r = 0; r < world; ++r) g += grad_of(r, i) / world;  // gradients are averaged over ranks
    const double m = (1 - kB1) * g, v = (1 - kB2) * g * g;
    const double expected =
        value(i) * (1 - kLr * kWd) - kLr / (1 - kB1) * m / (std::sqrt(v) / std::sqrt(1 - kB2) + kEps);
    for (int r = 0; r < world; ++r) {
      if (result[r].size() != static_cast<size_t>(kN) ||
          std::fabs(result[r][i] - expected) > 1e-6 * std::max(1.0, std::fabs(expected))) {
        std::fprintf(stderr, "rank %d element %d: %.9g, formula %.9g\n", r, i,
                     result[r].size() == static_cast<size_t>(kN) ? result[r][i] : NAN, expected);
        ++bad;
      }
    }
  }
  return bad;
}

}  // namespace adamw_case
