// engine_step_bench: the Engine's optimizer step on device memory (EngineOptions::memory_space =
// cuda) for a Llama preset on one GPU, one rank. Phase times of the best of --steps steps (the
// element-wise and Muon phases end with the backend's stream synchronized, so they are device
// times), the element-wise phase against the device's copy bandwidth measured in the same run (AdamW
// moves 7 fp32 values per element: reads param, grad, m, v; writes param, m, v), and the device
// memory the engine took (cudaMemGetInfo before/after construction) against its own MemoryReport and
// the ZeRO formula.
//
// One rank runs on a threads world of size 1 through HostStagedCommunicator: the reduce-scatter and
// all-gather go through host copies, so reduce_wait/gather figures measure that staging, not NCCL.
#include <cuda_runtime.h>

#include <iostream>

#include "base/error.h"
#include "bench/common/bench_util.h"
#include "comm/host_staged_communicator.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"
#include "sharding/presets.h"
#include "sharding/planner.h"

using namespace shardopt;

namespace {

// Seconds of one cudaMemcpy D2D of `bytes` (best of 5): reads and writes `bytes` each.
double copy_seconds(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess)
    throw DeviceError("engine_step_bench: cudaMalloc of the copy ceiling's buffers failed");
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
  const double s = bench::best_seconds(5, [&] {
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
  });
  cudaFree(a);
  cudaFree(b);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt device Engine step benchmark (one GPU)"};
  bool json = false;
  std::string preset = "llama-1b";
  int steps = 3, stage = 2;
  bench::add_json_flag(app, json);
  app.add_option("--preset", preset, "model preset (llama-125m, llama-1b, tiny)")->capture_default_str();
  app.add_option("--steps", steps, "steps; the fastest is reported")->capture_default_str();
  app.add_option("--stage", stage, "ZeRO stage")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  bench::Emitter emit(json);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::cerr << "engine_step_bench: no CUDA device\n";
    return 1;
  }
  const auto specs = sharding::preset_specs(preset, proto::F32);
  runtime::EngineOptions o;
  o.zero_stage = stage;
  o.memory_space = runtime::MemorySpace::kCuda;
  o.bucket_bytes = int64_t{25} << 20;
  o.matrix_optimizer.set_kind(proto::OPTIMIZER_MUON);
  o.matrix_optimizer.set_lr(0.02);
  o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  o.elementwise_optimizer.set_lr(1e-3);

  comm::run_ranks(1, [&](comm::Communicator& host_comm) {
    comm::HostStagedCommunicator comm(host_comm);
    size_t free_before = 0, free_after = 0, total = 0;
    cudaMemGetInfo(&free_before, &total);
    runtime::Engine engine(comm, specs, o);
    cudaMemGetInfo(&free_after, &total);
    engine.set_params([&](size_t t, float* dst) {
      const int64_t n = sharding::tensor_numel(specs[t]);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>((i * 13 + int64_t(t)) % 97 - 48) / 2048.0f;
    });
    std::vector<float> g;
    runtime::PhaseTimes best;
    best.total = 1e30;
    int64_t elementwise_elems = 0;
    for (const auto& t : engine.plan().tensors())
      if (!t.muon()) elementwise_elems += t.numel();
    for (int s = 1; s <= steps; ++s) {
      for (size_t k = specs.size(); k-- > 0;) {
        const int64_t n = sharding::tensor_numel(specs[k]);
        g.resize(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>((i * 29 + int64_t(k) * 7 + s) % 61 - 30) / 1024.0f;
        cudaMemcpy(engine.grad(k), g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice);
        engine.grad_ready(k);
      }
      const auto rep = engine.step();
      if (!rep.applied) throw NumericError("engine_step_bench: step skipped (non-finite gradients)");
      if (rep.times.elementwise + rep.times.matrix < best.elementwise + best.matrix || s == 1) best = rep.times;
    }
    const double adamw_bytes = 7.0 * 4.0 * static_cast<double>(elementwise_elems);
    const double ceiling = copy_seconds(static_cast<size_t>(adamw_bytes / 2));  // a copy reads + writes its size
    const auto mem = engine.memory();
    const int64_t reported = mem.param_bytes + mem.grad_bytes() + mem.optimizer_bytes() + mem.exchange_bytes;
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    bench::Row row = {{"bench", "device_engine_step"},
                      {"device", prop.name},
                      {"preset", preset},
                      {"stage", stage},
                      {"ranks", 1},
                      {"total_params", engine.plan().stats().total_params()},
                      {"elementwise_params", elementwise_elems},
                      {"step_seconds", best.total},
                      {"check_seconds", best.check},
                      {"elementwise_seconds", best.elementwise},
                      {"matrix_seconds", best.matrix},
                      {"staged_reduce_wait_seconds", best.reduce_wait},
                      {"staged_gather_seconds", best.gather},
                      {"elementwise_copy_ceiling_seconds", ceiling},
                      {"elementwise_fraction_of_copy_ceiling", ceiling / best.elementwise},
                      {"device_bytes_taken_by_engine", static_cast<int64_t>(free_before - free_after)},
                      {"engine_reported_buffer_bytes", reported},
                      {"optimizer_bytes", mem.optimizer_bytes()},
                      {"optimizer_formula_bytes", mem.formula_optimizer_bytes}};
    emit(row);
  });
  return 0;
}
