// Gossip (NoLoCo) vs DiLoCo evidence on the threads backend.
//
//   gossip_bench scaling [--replicas 2,4,...] [--shard-elems N] [--rounds K] [--json]
//     Outer step only, one shard per replica, fixed shard size: bytes per rank per outer step and
//     outer-step latency (best over rounds of the slowest rank) for NoLoCo and DiLoCo.
//   gossip_bench train --replicas R [--steps S] [--outer-every H] [--json]
//     Reference byte-level transformer on tinyshakespeare: synchronous ZeRO over R ranks vs DiLoCo and
//     NoLoCo with R replicas (1 shard each); train loss per step (mean over replicas), consensus
//     distance at each outer step, bytes per rank per step, final validation loss.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "bench/common/bench_util.h"
#include "comm/thread_backend.h"
#include "model/data.h"
#include "model/transformer.h"
#include "runtime/gossip/outer_sync.h"

using namespace shardopt;
using runtime::gossip::GossipOptions;
using runtime::gossip::OuterSync;
using runtime::gossip::SyncMode;

namespace {

bench::Emitter emit(false);  // set from --json in main

const char* mode_name(SyncMode m) { return m == SyncMode::kNoLoCo ? "noloco" : "diloco"; }

void scaling(const std::vector<int>& replica_counts, int64_t shard_elems, int rounds) {
  for (SyncMode mode : {SyncMode::kNoLoCo, SyncMode::kDiLoCo}) {
    for (int replicas : replica_counts) {
      std::vector<double> slowest(static_cast<size_t>(rounds), 0.0), slowest_exchange(static_cast<size_t>(rounds), 0.0);
      uint64_t max_sent = 0, max_received = 0;
      std::mutex mu;
      comm::run_ranks(replicas, [&](comm::Communicator& world) {
        auto grid = runtime::gossip::split_replica_grid(world, replicas);
        proto::TensorSpec spec;
        spec.set_name("w");
        spec.add_shape(shard_elems);
        spec.set_dtype(proto::F32);
        runtime::EngineOptions eo;
        eo.elementwise_optimizer.set_kind(proto::OPTIMIZER_SGD);
        runtime::Engine engine(*grid.shard_group, {spec}, eo);
        GossipOptions go;
        go.mode = mode;
        OuterSync sync(engine, *grid.cross, go);
        for (int k = 0; k < rounds; ++k) {
          world.barrier()->wait();  // rounds start together: latency of the step itself
          const auto& rep = sync.outer_step();
          std::lock_guard lock(mu);
          slowest[static_cast<size_t>(k)] = std::max(slowest[static_cast<size_t>(k)], rep.seconds);
          slowest_exchange[static_cast<size_t>(k)] =
              std::max(slowest_exchange[static_cast<size_t>(k)], rep.exchange_seconds);
          max_sent = std::max<uint64_t>(max_sent, rep.bytes_sent);
          max_received = std::max<uint64_t>(max_received, rep.bytes_received);
        }
      });
      emit({{"bench", "outer_step_scaling"},
            {"mode", mode_name(mode)},
            {"replicas", replicas},
            {"shard_elems", shard_elems},
            {"shard_mbytes", 4.0 * static_cast<double>(shard_elems) / 1e6},
            {"bytes_sent_per_rank_per_outer_step", max_sent},
            {"bytes_received_per_rank_per_outer_step", max_received},
            {"outer_step_seconds_best", *std::min_element(slowest.begin(), slowest.end())},
            {"exchange_seconds_best", *std::min_element(slowest_exchange.begin(), slowest_exchange.end())},
            {"rounds", rounds},
            // Sequential message hops on the critical path: one exchange with the partner vs a ring
            // all-reduce's 2(N-1) steps (the threads backend's wall time is bound by 2 shared cores).
            {"latency_hops", mode == SyncMode::kNoLoCo ? 1 : 2 * (replicas - 1)}});
    }
  }
}

enum class TrainMode { kSync, kDiLoCo, kNoLoCo };
const char* train_mode_name(TrainMode m) {
  return m == TrainMode::kSync ? "sync_zero" : m == TrainMode::kDiLoCo ? "diloco" : "noloco";
}

void train(TrainMode mode, int replicas, int steps, int outer_every, int batch_per_replica, int log_every,
           const std::string& data_path) {
  model::ModelConfig mc;
  mc.d_model = 64;
  mc.n_layer = 2;
  mc.n_head = 4;
  mc.context = 32;
  const int seq_len = 32;
  const auto corpus = model::ByteCorpus::load(data_path);
  std::vector<double> loss_sum(static_cast<size_t>(steps), 0.0);
  std::vector<std::pair<int, double>> consensus;
  double val_sum = 0, seconds = 0;
  uint64_t bytes_max = 0;
  int64_t skipped = 0;
  std::mutex mu;
  const auto t0 = bench::Clock::now();
  comm::run_ranks(replicas, [&](comm::Communicator& world) {
    // Sync ZeRO: one shard group of all ranks. DiLoCo/NoLoCo: R replicas of 1 shard.
    const bool sync_mode = mode == TrainMode::kSync;
    auto grid = runtime::gossip::split_replica_grid(world, sync_mode ? 1 : replicas);
    model::Transformer net(mc);
    runtime::EngineOptions eo;
    eo.matrix_optimizer.set_kind(proto::OPTIMIZER_MUON);
    eo.matrix_optimizer.set_lr(0.02);
    eo.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
    eo.elementwise_optimizer.set_lr(3e-3);
    runtime::Engine engine(*grid.shard_group, net.tensor_specs(), eo);
    engine.set_params([&](size_t t, float* dst) { net.init_tensor(1, t, dst); });
    std::unique_ptr<OuterSync> sync;
    if (!sync_mode) {
      GossipOptions go;
      go.mode = mode == TrainMode::kDiLoCo ? SyncMode::kDiLoCo : SyncMode::kNoLoCo;
      go.outer_every = outer_every;
      sync = std::make_unique<OuterSync>(engine, *grid.cross, go);
    }
    model::SamplerConfig sc;
    sc.global_batch = batch_per_replica * replicas;
    sc.seq_len = seq_len;
    sc.seed = 3;
    sc.rank = world.rank();
    sc.world = replicas;
    model::BatchSampler sampler(corpus, sc);
    auto batch = sampler.make_batch();
    std::vector<model::ParamBinding> bind(engine.num_tensors());
    uint64_t outer_bytes = 0;  // outer steps only (the consensus metric's collectives excluded)
    for (int s = 0; s < steps; ++s) {
      for (size_t t = 0; t < bind.size(); ++t) bind[t] = {engine.param(t), nullptr};
      sampler.train_batch(s, batch);
      const float loss = net.forward(bind, batch.inputs.data(), batch.targets.data(), batch.batch, batch.seq_len);
      net.backward(bind, model::GradMode::kOverwrite, [&](size_t t) { engine.grad_ready(t); },
                   [&](size_t t) { return engine.grad(t); });
      engine.step();
      {
        std::lock_guard lock(mu);
        loss_sum[static_cast<size_t>(s)] += loss;
      }
      if (sync && sync->after_inner_step()) {
        outer_bytes += sync->last_report().bytes_sent;
        const double xi = sync->consensus_distance();
        if (world.rank() == 0) {
          std::lock_guard lock(mu);
          consensus.emplace_back(s + 1, xi);
        }
      }
    }
    // Sync ZeRO: the engine's reduce-scatter + all-gather (+ its small norm all-reduce); DiLoCo/NoLoCo:
    // the outer steps (1-rank shard groups move nothing).
    const uint64_t bytes = sync_mode ? grid.shard_group->counters().total_sent() : outer_bytes;
    model::TokenBatch scratch = sampler.make_batch();
    for (size_t t = 0; t < bind.size(); ++t) bind[t] = {engine.param(t), nullptr};
    const double val = model::validation_loss(net, bind, sampler, 4, scratch);
    std::lock_guard lock(mu);
    val_sum += val;
    bytes_max = std::max(bytes_max, bytes);
    if (sync) skipped += sync->skipped_rounds();
  });
  seconds = bench::seconds_since(t0);
  for (int s = 0; s < steps; ++s)
    if ((s + 1) % log_every == 0 || s == 0)
      emit({{"bench", "train_curve"},
            {"mode", train_mode_name(mode)},
            {"replicas", replicas},
            {"step", s + 1},
            {"train_loss", loss_sum[static_cast<size_t>(s)] / replicas}});
  for (auto [s, xi] : consensus)
    emit({{"bench", "consensus"}, {"mode", train_mode_name(mode)}, {"replicas", replicas}, {"step", s},
          {"consensus_distance", xi}});
  emit({{"bench", "train_summary"},
        {"mode", train_mode_name(mode)},
        {"replicas", replicas},
        {"steps", steps},
        {"outer_every", outer_every},
        {"final_train_loss_mean_last10",
         [&] {
           double a = 0;
           const int n = std::min(10, steps);
           for (int s = steps - n; s < steps; ++s) a += loss_sum[static_cast<size_t>(s)] / replicas;
           return a / n;
         }()},
        {"validation_loss", val_sum / replicas},
        {"bytes_sent_per_rank_per_step", static_cast<double>(bytes_max) / steps},
        {"skipped_rounds", skipped},
        {"seconds", seconds}});
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"NoLoCo gossip vs DiLoCo benchmarks"};
  bool json = false;
  bench::add_json_flag(app, json);
  app.require_subcommand(1);
  auto* sc = app.add_subcommand("scaling", "outer-step traffic and latency vs replica count");
  std::vector<int> replica_counts{2, 4, 8, 16, 32, 64};
  int64_t shard_elems = 1 << 20;
  int rounds = 5;
  sc->add_option("--replicas", replica_counts)->delimiter(',');
  sc->add_option("--shard-elems", shard_elems);
  bench::add_repeat_option(*sc, rounds, "--rounds");
  auto* tr = app.add_subcommand("train", "loss vs steps: sync ZeRO, DiLoCo, NoLoCo");
  int replicas = 4, steps = 200, outer_every = 20, batch = 8, log_every = 10;
  std::string modes = "sync,diloco,noloco";
  std::string data = std::string(SHARDOPT_DATA_DIR) + "/tinyshakespeare.txt";
  tr->add_option("--replicas", replicas);
  tr->add_option("--steps", steps);
  tr->add_option("--outer-every", outer_every);
  tr->add_option("--batch-per-replica", batch);
  tr->add_option("--log-every", log_every);
  tr->add_option("--modes", modes);
  tr->add_option("--data", data);
  CLI11_PARSE(app, argc, argv);
  emit = bench::Emitter(json);
  if (sc->parsed()) scaling(replica_counts, shard_elems, rounds);
  if (tr->parsed()) {
    for (const auto& [name, m] : {std::pair{"sync", TrainMode::kSync}, {"diloco", TrainMode::kDiLoCo},
                                  {"noloco", TrainMode::kNoLoCo}})
      if (modes.find(name) != std::string::npos) train(m, replicas, steps, outer_every, batch, log_every, data);
  }
  return 0;
}
