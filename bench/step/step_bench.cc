// step_bench: the sync ZeRO step with owner-rank Muon on realistic shape sets (Llama presets),
// launched under mpirun (MPI backend; -np 1 works too). Per (shapes, ranks, stage, layout): phase
// times of Engine::step() (max over ranks, best of --steps), NS load balance from the plan, bytes
// sent per rank per step (measured) vs the ZeRO formula, optimizer bytes per rank (measured) vs the
// formula, and two matrix-phase comparisons measured in the same run on the same shapes:
//   ns_phase_speedup_vs_1rank: rank 0 alone runs Muon on every matrix (other ranks idle) / the
//     engine's matrix phase (each owner orthogonalizes its own matrices).
//   speedup_vs_naive_distributed_muon: every rank runs Muon on every matrix at once (what systems
//     without owner ranks do after gathering the gradients) / the engine's matrix phase.
// Full-model fp32 buffers of llama-1b (~4.4 GB each, several per rank) do not fit a small host:
// --layers K keeps the embedding, the first K transformer layers, the final norm and the head
// (the shapes of the run are named "<preset>[:K layers]"); --plan-only prints the pure plan and
// formula figures (no buffers) for the full preset at any world size.
#include <fmt/format.h>

#include <time.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench/common/bench_util.h"
#include "comm/mpi_backend.h"
#include "optim/config.h"
#include "optim/muon.h"
#include "optim/newton_schulz.h"
#include "runtime/engine.h"
#include "sharding/planner.h"
#include "sharding/presets.h"
#include "sharding/zero_math.h"

namespace {

using namespace shardopt;
using bench::Clock;
using bench::seconds_since;

// CPU seconds this thread has run: against wall time it shows whether a rank had a core to itself.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

runtime::EngineOptions engine_options(int stage, proto::ShardLayout layout,
                                      proto::NsDtype ns_dtype = proto::NS_DTYPE_F32) {
  runtime::EngineOptions o;
  o.zero_stage = stage;
  o.layout = layout;
  o.matrix_optimizer.set_kind(proto::OPTIMIZER_MUON);
  o.matrix_optimizer.set_lr(0.02f);
  o.matrix_optimizer.set_ns_dtype(ns_dtype);
  o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  o.elementwise_optimizer.set_lr(1e-3f);
  return o;
}

proto::ShardLayout parse_layout(const std::string& s) {
  return s == "dim0" ? proto::SHARD_LAYOUT_DIM0 : proto::SHARD_LAYOUT_OWNED;
}

double max_over_ranks(comm::Communicator& comm, double v) {
  float x = static_cast<float>(v), out = 0;
  comm.all_reduce(&x, &out, 1, DType::kF32, comm::ReduceOp::kMax)->wait();
  return out;
}

// Every rank's value, in rank order (float seconds: microsecond resolution is plenty here).
std::vector<double> by_rank(comm::Communicator& comm, double v) {
  const float x = static_cast<float>(v);
  std::vector<float> all(static_cast<size_t>(comm.size()));
  const std::vector<size_t> counts(all.size(), 1);
  comm.all_gather(&x, all.data(), counts, DType::kF32)->wait();
  return {all.begin(), all.end()};
}

int64_t max_bytes_over_ranks(comm::Communicator& comm, double bytes) {
  int64_t x = static_cast<int64_t>(bytes), out = 0;
  comm.all_reduce(&x, &out, 1, DType::kI64, comm::ReduceOp::kMax)->wait();
  return out;
}

// Muon on every matrix of `plan` (the naive baseline's work), on buffers of its own.
class AllMatricesMuon {
 public:
  explicit AllMatricesMuon(const proto::ShardPlan& plan, const optim::OptimizerParams& params) : params_(params) {
    for (const auto& t : plan.tensors()) {
      if (!t.muon()) continue;
      shapes_.push_back({t.rows(), t.cols()});
      workspace_.reserve(t.rows(), t.cols());
    }
    for (const auto& [r, c] : shapes_) {
      master_.emplace_back(r * c, 0.01f);
      momentum_.emplace_back(r * c, 0.0f);
      std::vector<float> g(r * c);
      for (int64_t i = 0; i < r * c; ++i) g[i] = static_cast<float>((i * 37) % 101 - 50) / 64.0f;
      grad_.push_back(std::move(g));
    }
  }
  void run() {
    for (size_t k = 0; k < shapes_.size(); ++k) {
      optim::MuonMatrix m;
      m.master = master_[k].data();
      m.grad = grad_[k].data();
      m.momentum = momentum_[k].data();
      m.rows = shapes_[k].first;
      m.cols = shapes_[k].second;
      optim::muon_step(params_, m, params_.lr, workspace_);
    }
  }

 private:
  optim::OptimizerParams params_;
  std::vector<std::pair<int64_t, int64_t>> shapes_;
  std::vector<std::vector<float>> master_, momentum_, grad_;
  optim::MuonWorkspace workspace_;
};

struct Baselines {
  double one_rank_seconds = 0;  // rank 0 alone, every matrix
  double naive_seconds = 0;     // every rank, every matrix, at once (max over ranks)
  // min over ranks of CPU time / wall time of the naive run: ~1 when every rank had a core,
  // ~1/2 when two ranks shared one (the host's other load decides; figures are then contended).
  double naive_cpu_share = 0;
};

// A barrier whose waiters sleep between polls: a rank that spins or yields while it waits keeps a
// core busy, which on a small host slows the rank being timed.
void quiet_barrier(comm::Communicator& comm) {
  auto work = comm.barrier();
  while (!work->done()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  work->wait();  // rethrows a failure
}

Baselines measure_baselines(comm::Communicator& comm, const std::vector<proto::TensorSpec>& specs) {
  const auto options = engine_options(2, proto::SHARD_LAYOUT_OWNED);
  const auto plan = sharding::make_plan(runtime::make_engine_plan_request(specs, comm.size(), options));
  AllMatricesMuon work(plan, optim::resolve_optimizer_config(options.matrix_optimizer));
  Baselines b;
  quiet_barrier(comm);
  auto t0 = clock::now();
  const double cpu0 = thread_cpu_seconds();
  work.run();
  const double wall = seconds_since(t0), share = (thread_cpu_seconds() - cpu0) / wall;
  b.naive_seconds = max_over_ranks(comm, wall);
  b.naive_cpu_share = -max_over_ranks(comm, -share);
  quiet_barrier(comm);
  if (comm.rank() == 0) {
    t0 = clock::now();
    work.run();
    b.one_rank_seconds = seconds_since(t0);
  }
  quiet_barrier(comm);
  comm.broadcast(&b.one_rank_seconds, 1, DType::kI64, 0)->wait();  // 8 bytes, bit-exact
  return b;
}

bench::Row plan_figures(const proto::ShardPlan& plan, int stage, int world) {
  double buffer_elems = 0, max_opt = 0;
  for (const auto& b : plan.buckets()) buffer_elems += static_cast<double>(b.numel());
  for (const auto& r : plan.stats().ranks()) max_opt = std::max(max_opt, r.optimizer_state_bytes());
  const auto& st = plan.stats();
  return {{"total_params", st.total_params()},
          {"muon_matrices", st.muon_matrices()},
          {"ns_balance_max_over_lower_bound", st.ns_balance_ratio()},
          {"zero_formula_bytes_per_rank", sharding::zero_traffic_per_rank(stage, buffer_elems, world, 4).bytes},
          {"optimizer_formula_bytes_per_rank_max", max_opt},
          {"optimizer_formula_bytes_per_rank_mean",
           static_cast<double>(st.muon_params()) * sharding::kMuonStateBytes / world +
               static_cast<double>(st.elementwise_params()) * sharding::kAdamStateBytes / world}};
}

}  // namespace

int main(int argc, char** argv) {
  comm::MpiRuntime mpi(&argc, &argv);
  CLI::App app{"shardopt ZeRO step benchmark (run under mpirun)"};
  bool json = false, plan_only = false, no_baselines = false;
  std::string ns_dtype = "f32";
  std::string shapes = "llama-125m", stages = "2", layouts = "owned", plan_worlds = "8,64,512,4096";
  int layers = 0, steps = 2;
  bench::add_json_flag(app, json);
  app.add_option("--shapes", shapes, "comma-separated presets (llama-125m, llama-1b, tiny)");
  app.add_option("--layers", layers, "keep only the first K transformer layers (0 = all)");
  app.add_option("--stages", stages, "comma-separated ZeRO stages");
  app.add_option("--layouts", layouts, "comma-separated layouts (owned, dim0)");
  bench::add_repeat_option(app, steps, "--steps");
  app.add_option("--ns-dtype", ns_dtype, "precision of the Muon Newton-Schulz products (f32, bf16)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_flag("--no-baselines", no_baselines,
               "skip the 1-rank and naive all-matrices baselines (and their ratios)");
  app.add_flag("--plan-only", plan_only, "plan and formula figures only, for --plan-worlds (no buffers)");
  app.add_option("--plan-worlds", plan_worlds, "world sizes for --plan-only");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto comm = mpi.world();
  const int world = comm->size(), rank = comm->rank();
  const bench::Emitter emit(json, rank == 0);

  if (plan_only) {
    for (const auto& preset : split_list(shapes)) {
      const auto specs = sharding::preset_specs(preset, proto::F32, layers);
      for (const auto& n : split_list(plan_worlds)) {
        const int w = std::stoi(n);
        for (const auto& st : split_list(stages)) {
          const int stage = std::stoi(st);
          const auto t0 = clock::now();
          const auto plan = sharding::make_plan(
              runtime::make_engine_plan_request(specs, w, engine_options(stage, proto::SHARD_LAYOUT_OWNED)));
          bench::Row row = {{"mode", "plan_only"}, {"shapes", preset}, {"ranks", w}, {"stage", stage},
                            {"layout", "owned"}};
          row.update(plan_figures(plan, stage, w));
          row["plan_seconds"] = seconds_since(t0);
          emit(row);
        }
      }
    }
    return 0;
  }

  for (const auto& preset : split_list(shapes)) {
    const auto specs = sharding::preset_specs(preset, proto::F32, layers);
    const std::string shape_name = layers > 0 ? fmt::format("{}:{} layers", preset, layers) : preset;
    const Baselines base = no_baselines ? Baselines{} : measure_baselines(*comm, specs);
    for (const auto& st : split_list(stages)) {
      for (const auto& lay : split_list(layouts)) {
        const int stage = std::stoi(st);
        runtime::Engine engine(*comm, specs,
                               engine_options(stage, parse_layout(lay),
                                              ns_dtype == "bf16" ? proto::NS_DTYPE_BF16 : proto::NS_DTYPE_F32));
        engine.set_params([&](size_t t, float* dst) {
          const int64_t n = sharding::tensor_numel(specs[t]);
          const int64_t tt = static_cast<int64_t>(t);  // signed: size_t operands would wrap "% 97 - 48"
          for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>((i * 13 + tt) % 97 - 48) / 2048.0f;
        });
        runtime::StepReport best;
        best.times.total = 1e30;
        double best_fill_reduce_wait = 0;
        std::vector<double> best_matrix_by_rank, best_exchange_by_rank, best_gather_by_rank;
        for (int s = 1; s <= steps; ++s) {
          for (size_t k = specs.size(); k-- > 0;) {
            float* g = engine.grad(k);
            const int64_t n = sharding::tensor_numel(specs[k]);
            const int64_t kk = static_cast<int64_t>(k);
            for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>((i * 29 + kk * 7 + s) % 61 - 30) / 1024.0f;
            engine.grad_ready(k);
          }
          // Reductions the gradient fill already waited for (the pool of grad_buckets_in_flight buffers ran
          // out): the rest of the step's reduce-scatter time, outside reduce_wait; step() resets it.
          const double fill_reduce_wait = engine.backward_reduce_wait_seconds();
          const auto rep = engine.step();
          if (!rep.applied) throw std::runtime_error("step_bench: step skipped (non-finite gradients)");
          // The slowest rank sets the step time: compare maxima over ranks.
          runtime::PhaseTimes m;
          m.reduce_wait = max_over_ranks(*comm, rep.times.reduce_wait);
          m.check = max_over_ranks(*comm, rep.times.check);
          m.elementwise = max_over_ranks(*comm, rep.times.elementwise);
          m.matrix = max_over_ranks(*comm, rep.times.matrix);
          m.dim0_exchange = max_over_ranks(*comm, rep.times.dim0_exchange);
          m.gather = max_over_ranks(*comm, rep.times.gather);
          m.total = max_over_ranks(*comm, rep.times.total);
          const double fill_wait = max_over_ranks(*comm, fill_reduce_wait);
          // Per rank too: a phase's maximum can be one rank's wait for another (the dim0 exchange back
          // waits for the slowest owner's NS).
          const auto matrix_by_rank = by_rank(*comm, rep.times.matrix);
          const auto exchange_by_rank = by_rank(*comm, rep.times.dim0_exchange);
          const auto gather_by_rank = by_rank(*comm, rep.times.gather);
          if (m.total < best.times.total) {
            best = rep;
            best.times = m;
            best_fill_reduce_wait = fill_wait;
            best_matrix_by_rank = matrix_by_rank;
            best_exchange_by_rank = exchange_by_rank;
            best_gather_by_rank = gather_by_rank;
          }
        }
        const auto mem = engine.memory();
        const size_t critical = static_cast<size_t>(
            std::max_element(best_matrix_by_rank.begin(), best_matrix_by_rank.end()) - best_matrix_by_rank.begin());
        bench::Row row = {{"mode", "step"},
                          {"shapes", shape_name},
                          {"ranks", world},
                          {"stage", stage},
                          {"layout", lay},
                          {"threads", 1},
                          {"dtype", ns_dtype},
                          {"grad_dtype", "f32"},
                          {"step_seconds", best.times.total},
                          {"reduce_wait_seconds", best.times.reduce_wait},
                          {"fill_reduce_wait_seconds", best_fill_reduce_wait},
                          {"check_seconds", best.times.check},
                          {"elementwise_seconds", best.times.elementwise},
                          {"matrix_seconds", best.times.matrix},
                          {"dim0_exchange_seconds", best.times.dim0_exchange},
                          {"matrix_seconds_by_rank", best_matrix_by_rank},
                          {"dim0_exchange_seconds_by_rank", best_exchange_by_rank},
                          {"gather_seconds_by_rank", best_gather_by_rank},
                          // The phases that wait for other ranks' NS (the dim0 exchange back, the owned
                          // all-gather) at the rank whose NS took longest: their own time, without the
                          // other ranks' waits for that NS (which matrix_seconds, a maximum, counts).
                          {"dim0_exchange_critical_seconds", best_exchange_by_rank[critical]},
                          {"gather_critical_seconds", best_gather_by_rank[critical]},
                          {"gather_seconds", best.times.gather},
                          {"bytes_sent_per_rank", max_bytes_over_ranks(*comm, static_cast<double>(best.traffic.total_sent()))},
                          {"optimizer_bytes_per_rank", max_bytes_over_ranks(*comm, static_cast<double>(mem.optimizer_bytes()))},
                          {"optimizer_formula_bytes_per_rank", max_bytes_over_ranks(*comm, mem.formula_optimizer_bytes)}};
        if (!no_baselines) {
          row["one_rank_all_matrices_seconds"] = base.one_rank_seconds;
          row["naive_all_matrices_seconds"] = base.naive_seconds;
          row["naive_cpu_share_min_over_ranks"] = base.naive_cpu_share;
          row["ns_phase_speedup_vs_1rank"] = base.one_rank_seconds / best.times.matrix;
          row["speedup_vs_naive_distributed_muon"] = base.naive_seconds / best.times.matrix;
        }
        if (ns_dtype == "bf16") row["bf16_gemm"] = optim::to_string(optim::default_bf16_gemm_kernel());
        const auto figures = plan_figures(engine.plan(), stage, world);
        row["total_params"] = figures["total_params"];
        row["muon_matrices"] = figures["muon_matrices"];
        row["ns_balance_max_over_lower_bound"] = figures["ns_balance_max_over_lower_bound"];
        row["zero_formula_bytes_per_rank"] = figures["zero_formula_bytes_per_rank"];
        // dim0 adds the Muon shard all-to-all, 2Ψ_muon(N-1)/N² per rank on average.
        row["dim0_extra_formula_bytes_per_rank"] =
            lay == "dim0" ? sharding::dim0_muon_extra_traffic_per_rank(
                                static_cast<double>(engine.plan().stats().muon_params()), world, 4)
                                .bytes
                          : 0.0;
        emit(row);
      }
    }
  }
  return 0;
}
