// A 2-rank Engine step (threads backend) in a program built against the installed package, checked
// against the AdamW formula (adamw_case.h).
#include <cstdio>
#include <vector>

#include "adamw_case.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"

namespace so = shardopt;

int main() {
  constexpr int kWorld = 2;
  std::vector<std::vector<float>> result(kWorld);
  so::comm::run_ranks(kWorld, [&](so::comm::Communicator& comm) {
    so::runtime::Engine engine(comm, {adamw_case::spec()}, adamw_case::options());
    engine.set_params([&](size_t, float* dst) {
      for (int i = 0; i < adamw_case::kN; ++i) dst[i] = static_cast<float>(adamw_case::value(i));
    });
    float* g = engine.grad(0);
    for (int i = 0; i < adamw_case::kN; ++i) g[i] = static_cast<float>(adamw_case::grad_of(comm.rank(), i));
    engine.grad_ready(0);
    engine.step();
    result[comm.rank()].assign(engine.param(0), engine.param(0) + adamw_case::kN);
  });
  if (adamw_case::mismatches(result, kWorld) != 0) return 1;
  std::printf("consumer: 2-rank AdamW step matches the formula (%d values)\n", adamw_case::kN * kWorld);
  return 0;
}
