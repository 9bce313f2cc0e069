// A 2-rank Engine step (threads backend) in a program built against the installed package.
// Checks one AdamW step of an element-wise tensor (gradients averaged over the ranks) against the
// formula computed here in double precision.
#include <cmath>
#include <cstdio>
#include <vector>

#include "comm/thread_backend.h"
#include "proto/types.pb.h"
#include "runtime/engine.h"

namespace so = shardopt;

int main() {
  constexpr int kWorld = 2, kN = 24;
  constexpr double kLr = 0.01, kWd = 0.1, kB1 = 0.9, kB2 = 0.999, kEps = 1e-8;
  auto value = [](int i) { return 0.05 * (i % 7) - 0.1; };
  auto grad_of = [](int rank, int i) { return 0.01 * ((i * 5 + rank * 3) % 11) - 0.04; };

  std::vector<std::vector<float>> result(kWorld);
  so::comm::run_ranks(kWorld, [&](so::comm::Communicator& comm) {
    so::proto::TensorSpec spec;
    spec.set_name("embed.weight");
    spec.add_shape(4);
    spec.add_shape(kN / 4);
    spec.set_dtype(so::proto::F32);
    so::runtime::EngineOptions options;
    options.elementwise_optimizer.set_kind(so::proto::OPTIMIZER_ADAMW);
    options.elementwise_optimizer.set_lr(kLr);
    options.elementwise_optimizer.set_weight_decay(kWd);
    so::runtime::Engine engine(comm, {spec}, options);
    engine.set_params([&](size_t, float* dst) {
      for (int i = 0; i < kN; ++i) dst[i] = static_cast<float>(value(i));
    });
    float* g = engine.grad(0);
    for (int i = 0; i < kN; ++i) g[i] = static_cast<float>(grad_of(comm.rank(), i));
    engine.grad_ready(0);
    engine.step();
    result[comm.rank()].assign(engine.param(0), engine.param(0) + kN);
  });

  int bad = 0;
  for (int i = 0; i < kN; ++i) {
    const double g = (grad_of(0, i) + grad_of(1, i)) / 2;  // gradients are averaged over ranks
    const double m = (1 - kB1) * g, v = (1 - kB2) * g * g;
    const double expected =
        value(i) * (1 - kLr * kWd) - kLr / (1 - kB1) * m / (std::sqrt(v) / std::sqrt(1 - kB2) + kEps);
    for (int r = 0; r < kWorld; ++r) {
      if (std::fabs(result[r][i] - expected) > 1e-6 * std::max(1.0, std::fabs(expected))) {
        std::fprintf(stderr, "rank %d element %d: %.9g, formula %.9g\n", r, i, result[r][i], expected);
        ++bad;
      }
    }
  }
  if (bad) return 1;
  std::printf("consumer: 2-rank AdamW step matches the formula (%d values)\n", kN * kWorld);
  return 0;
}
