// Helpers of the device Engine suites (engine_cuda_test.cc, engine_streams_test.cc): the fixture's
// initial parameters, and an engine's full parameters read from device memory for a device engine.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "runtime/engine.h"
#include "tests/common/engine_fixture.h"

namespace shardopt::runtime {

using Params = std::vector<std::vector<float>>;  // per tensor

inline void init_params(Engine& engine) {
  engine.set_params([&](size_t t, float* dst) {
    for (int64_t i = 0; i < test_fixture::numel(engine.spec(t)); ++i) dst[i] = test_fixture::initial_value(t, i);
  });
}

inline Params full_params(Engine& engine) {
  const bool device = engine.memory_space() == MemorySpace::kCuda;
  engine.gather_all();
  Params out(engine.num_tensors());
  for (size_t t = 0; t < engine.num_tensors(); ++t) {
    out[t].resize(static_cast<size_t>(test_fixture::numel(engine.spec(t))));
    if (device)
      EXPECT_EQ(cudaMemcpy(out[t].data(), engine.param(t), out[t].size() * sizeof(float), cudaMemcpyDeviceToHost),
                cudaSuccess);
    else
      std::memcpy(out[t].data(), engine.param(t), out[t].size() * sizeof(float));
  }
  engine.release_all();
  return out;
}

}  // namespace shardopt::runtime
