// The fixture's training loop for suites that train an engine for some steps (checkpoints, device
// engines): each step hands every tensor's gradient (common_grad + rank_offset, engine_fixture.h) to
// the engine in reverse registration order, as backward produces them, then steps. Where the
// gradient goes is the caller's: host memory by default, a device copy, a view of poisoned pointers.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "runtime/engine.h"
#include "tests/common/engine_fixture.h"

namespace shardopt::test_fixture {

// Writes tensor k's gradient g into the buffer the engine reads for it.
using GradWriter = std::function<void(runtime::Engine&, size_t k, const std::vector<float>& g)>;

inline void write_host_grad(runtime::Engine& e, size_t k, const std::vector<float>& g) {
  std::copy(g.begin(), g.end(), e.grad(k));
}

// Steps first + 1 .. last; every step must apply (the fixture's gradients are finite).
inline void train_steps(runtime::Engine& e, int first, int last, const GradWriter& write = write_host_grad) {
  const int rank = e.comm().rank(), world = e.comm().size();
  std::vector<float> g;
  for (int step = first + 1; step <= last; ++step) {
    for (size_t k = e.num_tensors(); k-- > 0;) {
      g.resize(static_cast<size_t>(numel(e.spec(k))));
      for (size_t i = 0; i < g.size(); ++i) {
        const auto ii = static_cast<int64_t>(i);
        g[i] = common_grad(step, k, ii) + rank_offset(rank, world, k, ii);
      }
      write(e, k, g);
      e.grad_ready(k);
    }
    ASSERT_TRUE(e.step().applied) << "step " << step;
  }
}

}  // namespace shardopt::test_fixture
