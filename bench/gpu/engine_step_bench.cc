// engine_step_bench: the Engine's optimizer step on device memory (EngineOptions::memory_space =
// cuda) for a Llama preset on one GPU, one rank or --ranks threads ranks sharing it. Phase times of the best of --steps steps (the
// element-wise and Muon phases end with the backend's stream synchronized, so they are device
// times); the element-wise phase against the device's copy bandwidth and its AdamW-shaped in-place
// RMW stream, both measured in the same run over the same bytes (AdamW moves 7 fp32 values per
// element: reads param, grad, m, v; writes param, m, v); the device memory the engine took
// (cudaMemGetInfo before/after construction, and after the steps, when the Newton–Schulz workspaces
// exist) against its own MemoryReport and the ZeRO formula; and the Muon time one rank would spend
// at --owner-ranks ranks (the plan's owner assignment at that world size, each owned matrix's step
// timed on this GPU).
//
// --shapes-out FILE writes the preset's tensors (name, shape, routed to Muon or not) as JSON, so a
// peer benchmark (bench/gpu/torch_step_reference.py) builds the same parameters.
//
// The ranks are a threads world on the GPU: --exchange mover (default) moves device buffers with the
// threads backend's CUDA mover (device copies and a reduction kernel); --exchange staged goes through
// HostStagedCommunicator (host copies), for comparison. So reduce_wait/gather figures measure those
// exchanges on one GPU, not NCCL. With several ranks, rank 0's figures are reported (every rank runs
// the same step on its share) and the device memory rows are left out (cudaMemGetInfo sees every
// rank's engine).
#include <cuda_runtime.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>

#include "base/error.h"
#include "bench/common/bench_util.h"
#include "bench/gpu/device_ceilings.h"
#include "optim/cuda/muon.h"
#include "comm/cuda_buffer_mover.h"
#include "comm/host_staged_communicator.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"
#include "sharding/presets.h"
#include "sharding/planner.h"

using namespace shardopt;

namespace {

// Seconds of one Muon step (momentum, NS5, update) on a rows x cols fp32 matrix: median of 5 after a
// warm-up, CUDA events on the default stream.
double muon_step_seconds(int64_t rows, int64_t cols) {
  const size_t n = static_cast<size_t>(rows * cols);
  float *p = nullptr, *g = nullptr, *m = nullptr;
  for (float** b : {&p, &g, &m}) {
    if (cudaMalloc(b, n * sizeof(float)) != cudaSuccess) throw DeviceError("engine_step_bench: cudaMalloc failed");
    cudaMemset(*b, 0, n * sizeof(float));
  }
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = static_cast<float>((i * 29) % 61) / 1024.0f - 0.03f;
  cudaMemcpy(g, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cuda::MuonCuda muon(rows, cols, 1);
  const double seconds = bench::median_event_seconds(
      [&] { muon.step(p, g, DType::kF32, m, nullptr, 1, cuda::MuonHyper{}, nullptr); }, 1, 5);
  for (float* b : {p, g, m}) cudaFree(b);
  return seconds;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt device Engine step benchmark (one GPU)"};
  bool json = false;
  std::string preset = "llama-1b";
  int steps = 3, stage = 2, owner_ranks = 8, ranks = 1;
  std::string shapes_out, exchange = "mover";
  bench::add_json_flag(app, json);
  app.add_option("--preset", preset, "model preset (llama-125m, llama-1b, tiny)")->capture_default_str();
  app.add_option("--steps", steps, "steps; the fastest is reported")->capture_default_str();
  app.add_option("--stage", stage, "ZeRO stage")->capture_default_str();
  app.add_option("--ranks", ranks, "threads ranks sharing the GPU")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--exchange", exchange, "how the ranks exchange device buffers: mover | staged")
      ->check(CLI::IsMember({"mover", "staged"}))
      ->capture_default_str();
  app.add_option("--owner-ranks", owner_ranks, "world size for the per-rank Muon time (0: skip)")->capture_default_str();
  app.add_option("--shapes-out", shapes_out, "write the preset's tensors (name, shape, muon) as JSON to this file");
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

  comm::CommOptions copts;
  copts.timeout = std::chrono::milliseconds(600000);
  comm::run_ranks(ranks, [&](comm::Communicator& world_comm) {
    std::optional<comm::HostStagedCommunicator> staged;
    if (exchange == "staged") staged.emplace(world_comm);
    comm::Communicator& comm = staged ? static_cast<comm::Communicator&>(*staged) : world_comm;
    size_t free_before = 0, free_after = 0, total = 0;
    cudaMemGetInfo(&free_before, &total);
    runtime::Engine engine(comm, specs, o);
    cudaMemGetInfo(&free_after, &total);
    engine.set_params([&](size_t t, float* dst) {
      const int64_t n = sharding::tensor_numel(specs[t]);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>((i * 13 + int64_t(t)) % 97 - 48) / 2048.0f;
    });
    if (!shapes_out.empty() && comm.rank() == 0) {
      nlohmann::json tensors = nlohmann::json::array();
      for (const auto& t : engine.plan().tensors())
        tensors.push_back({{"name", t.name()}, {"shape", std::vector<int64_t>(t.shape().begin(), t.shape().end())},
                           {"muon", t.muon()}});
      std::ofstream(shapes_out) << tensors.dump() << "\n";
    }
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
    size_t free_after_steps = 0;
    cudaMemGetInfo(&free_after_steps, &total);
    comm.barrier()->wait();
    if (comm.rank() != 0) return;
    const auto copy = bench::device_copy_bandwidth(static_cast<size_t>(7 * 4 * elementwise_elems / 2), 5);
    const auto rmw = bench::device_rmw_bandwidth(static_cast<size_t>(elementwise_elems), 5);
    const auto mem = engine.memory();
    const int64_t reported = mem.param_bytes + mem.grad_bytes() + mem.optimizer_bytes() + mem.exchange_bytes;
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    bench::Row row = {{"bench", "device_engine_step"},
                      {"device", prop.name},
                      {"preset", preset},
                      {"stage", stage},
                      {"ranks", ranks},
                      {"exchange", exchange},
                      {"total_params", engine.plan().stats().total_params()},
                      {"elementwise_params", elementwise_elems},
                      {"step_seconds", best.total},
                      {"check_seconds", best.check},
                      {"elementwise_seconds", best.elementwise},
                      {"matrix_seconds", best.matrix},
                      {"reduce_wait_seconds", best.reduce_wait},
                      {"gather_seconds", best.gather},
                      {"elementwise_copy_ceiling_seconds", copy.seconds},
                      {"elementwise_rmw_ceiling_seconds", rmw.seconds},
                      {"elementwise_fraction_of_copy_ceiling", copy.seconds / best.elementwise},
                      {"elementwise_fraction_of_rmw_ceiling", rmw.seconds / best.elementwise},
                      {"engine_reported_buffer_bytes", reported},
                      {"optimizer_bytes", mem.optimizer_bytes()},
                      {"optimizer_formula_bytes", mem.formula_optimizer_bytes}};
    if (ranks == 1) {
      row["device_bytes_taken_by_engine"] = static_cast<int64_t>(free_before - free_after);
      row["device_bytes_taken_after_steps"] = static_cast<int64_t>(free_before - free_after_steps);
    }
    emit(row);

    // The Muon phase of one rank at owner_ranks ranks: the plan's owner assignment at that world size,
    // each owned matrix's step timed once per distinct shape on this GPU (what each GPU would do).
    if (owner_ranks > 0) {
      const auto plan = sharding::make_plan(sharding::make_plan_request(specs, owner_ranks, stage));
      std::map<std::pair<int64_t, int64_t>, double> seconds_of_shape;
      std::vector<double> rank_seconds(static_cast<size_t>(owner_ranks), 0.0);
      for (const auto& t : plan.tensors()) {
        if (!t.muon()) continue;
        auto [it, fresh] = seconds_of_shape.try_emplace({t.rows(), t.cols()}, 0.0);
        if (fresh) it->second = muon_step_seconds(t.rows(), t.cols());
        rank_seconds[static_cast<size_t>(t.owner())] += it->second;
      }
      double sum = 0;
      for (double s : rank_seconds) sum += s;
      const double slowest = *std::max_element(rank_seconds.begin(), rank_seconds.end());
      const double fastest = *std::min_element(rank_seconds.begin(), rank_seconds.end());
      emit({{"bench", "device_muon_per_rank"},
            {"preset", preset},
            {"ranks", owner_ranks},
            {"distinct_shapes", seconds_of_shape.size()},
            {"all_matrices_seconds", sum},
            {"slowest_rank_seconds", slowest},
            {"fastest_rank_seconds", fastest},
            {"speedup_vs_one_rank", sum / slowest},
            {"load_balance_min_over_max", fastest / slowest}});
    }
  }, copts, exchange == "mover" ? comm::cuda_buffer_mover(0) : nullptr);
  return 0;
}
