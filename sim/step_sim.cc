// step_sim: predicts the step time of shardopt's sharded optimizer on a cluster that is not here, by
// running the engine's step schedule on the real MPI backend (comm/mpi_backend.cc) under SimGrid SMPI
// (smpirun) with the compute modelled instead of executed. docs/simulation.md has the model and how
// far it was validated.
//
// What runs for real: the ShardPlan (sharding::make_plan, the same request the Engine makes), the MPI
// backend and its traffic counters, and every collective of Engine::step() in its order with the
// plan's counts: reduce-scatter per bucket, the check all-reduce (one float per tensor + the squared
// norm), the dim0 all-to-all to the Muon owners and back, the all-gather per bucket (stages 1-2), and
// the outer step of runtime/gossip (DiLoCo: all-reduce avg of the master shards on the cross-replica
// communicator; NoLoCo: one sendrecv of them with the partner of a pairing). SMPI simulates the
// messages on the platform file's network with the collective algorithms its selector picks.
// What is modelled (advances simulated time through smpi_execute_flops, nothing is computed):
//   Newton-Schulz of every owned Muon matrix: optim::newton_schulz_flops (the plain-GEMM count) at the
//     host's speed (the platform gives each host the NS rate as its speed);
//   memory-bound passes: bytes × shardopt_flops_per_byte (a host property = NS rate / streaming
//     bandwidth), with the bytes the kernels move: check scan 4 B per owned gradient element, AdamW
//     28 B per owned element-wise element, Muon momentum + apply 20 B per owned Muon element.
// A host with half the speed runs both at half the rate.
//
// Why not Engine::step() itself: the engine allocates full-size parameter and gradient buffers per rank
// and executes its kernels; 1024 simulated ranks of llama-1b share one process here. Buffers are one
// SMPI shared block for all ranks (SMPI_SHARED_MALLOC: SMPI moves no bytes for them), and every rank
// uses one ShardPlan shared by the process (smpi/privatization:0 shares globals among ranks). SMPI is
// told to leave payloads alone (sim/smpi_no_payload.h): the data in the buffers is meaningless.
// sim/smpi_patches.h keeps SMPI's communicator creation at what OpenMPI sends, and every message
// stays below 2 GiB (kSmpiMaxMessageBytes).
//   the local passes around the collectives (MPI's reduction, the kAvg division, the gather's and the dim0
//     exchange's copies) as stream bytes too; with --tokens-per-rank the forward and backward as
//     FLOPs x shardopt_flops_per_model_flop, the backward on a second actor of the host so that each
//     bucket's reduce-scatter overlaps the rest of it.
// Differences from the engine: collectives other than the reduce-scatter, the all-gather and the dim0
// all-to-all are issued blocking in the SimGrid build (the overlap with the backward comes from the
// second actor, not from nonblocking MPI); those three are the backend's own point-to-point messages
// (comm/halving_schedule.h; SparseAllToAll) in both builds, the reduce-scatter's combines charged here; stage 3's on-demand gathers happen outside
// step() and are not counted.
#include <mpi.h>
#include <simgrid/host.h>
#include <simgrid/s4u/Actor.hpp>
#include <simgrid/s4u/Engine.hpp>
#include <simgrid/s4u/Host.hpp>
#include <simgrid/s4u/Link.hpp>
#include <simgrid/s4u/Semaphore.hpp>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/clock.h"
#include "base/error.h"
#include "comm/halving_schedule.h"
#include "comm/mpi_backend.h"
#include "model/transformer.h"
#include "optim/newton_schulz.h"
#include "sharding/layout.h"
#include "sharding/plan_util.h"
#include "sharding/planner.h"
#include "sharding/presets.h"
#include "sharding/zero_math.h"
#include "sim/smpi_no_payload.h"
#include "sim/smpi_patches.h"

namespace {

using namespace shardopt;

// Bytes the memory-bound kernels move per element (as docs/benchmarks.md counts them).
constexpr double kCheckBytesPerElem = 4;         // read the reduced gradient
constexpr double kAdamwBytesPerElem = 28;        // read p, g, m, v; write p, m, v
constexpr double kMuonStreamBytesPerElem = 20;   // momentum (read g, m; write m) + apply (read p, write p)
constexpr int kNsSteps = 5;
// Local passes around the collectives, as the engine does them (runtime/engine.cc, shard_state.cc); SMPI
// moves no payload and applies no operator, so without these the simulation charges the wire only.
constexpr double kCopyBytesPerElem = 8;          // a copy: read + write
constexpr double kReduceBytesPerElem = 12;       // the reduce-scatter combine: read incoming + local, write
constexpr double kDecayAddBytesPerElem = 12;     // dim0_apply_updates: read w, delta; write w
constexpr double kFillBytesPerElem = 4;          // dim0_unpack_to_owned zeroes the owner's update matrix
// EngineOptions::grad_buckets_in_flight's default: the backward waits for the oldest reduction when a
// third gradient bucket opens.
constexpr int kGradBucketsInFlight = 2;

struct Options {
  std::string preset = "llama-1b";
  int layers = 0;
  int stage = 2;
  std::string layout = "owned";
  std::string sync = "zero";
  int replicas = 2;
  std::string bucket_mib = "auto";  // MiB, or "auto": bucket_bytes_for_ranks()
  int steps = 1;
  bool json = false;
  std::string slow_host;
  double slow_factor = 1;
  std::string slow_link_host;
  double slow_link_factor = 1;
  int64_t tokens_per_rank = 0;  // > 0: a training step (forward + backward with the reduce-scatters overlapped)
  int64_t seq_len = 0;          // attention term of the forward/backward FLOPs (0: left out)
  int64_t d_model = 128, heads = 4, context = 64;  // --preset reference: the reference transformer's shape
  int64_t collective_bench_bytes = 0;  // > 0: time one all-gather and one reduce-scatter (calibration) and exit
};

// The bucket size a large data-parallel job chooses: Megatron-LM's default for its distributed optimizer,
// max(40M, 1M x data-parallel ranks) elements, so that each rank's segment of a bucket stays >= 1M
// elements (bandwidth-bound ring steps) however many ranks share it. Fixed-size buckets at 1024 ranks
// would mean 25 KiB ring steps and, for llama-1b, ~100 buckets of N^2 simulated messages each.
int64_t bucket_bytes_for_ranks(const std::string& bucket_mib, int ranks) {
  if (bucket_mib == "auto") return 4 * std::max<int64_t>(40'000'000, int64_t{1'000'000} * ranks);
  double mib = 0;
  try {
    mib = std::stod(bucket_mib);
  } catch (const std::exception&) {
    throw ConfigError("--bucket-mib: expected a number of MiB or auto, got '" + bucket_mib + "'");
  }
  if (!(mib > 0)) throw ConfigError("--bucket-mib must be > 0, got '" + bucket_mib + "'");
  return static_cast<int64_t>(mib * (1 << 20));
}

// SMPI 3.32 decides whether to send a message "detached" by comparing its size in bytes, cast to int,
// with smpi/send-is-detached-thresh (Request::start). A message of 2 GiB or more wraps negative and
// is detached: SMPI mallocs a copy of the whole payload, and with payloads off (sim/smpi_no_payload.h)
// never frees it. Measured: llama-1b at 1024 ranks with 4.5 GB buckets, whose butterfly
// reduce-scatter sends half a bucket (2.25 GB) per rank in its first step, grew by ~0.4 GB of
// anonymous memory per second of simulation until it was killed (the 21 GB OOM). The simulation
// therefore keeps every message below 2 GiB.
constexpr int64_t kSmpiMaxMessageBytes = (int64_t{1} << 31) - 1;

// The largest single message a collective on `bucket` can send: the whole bucket (the butterfly
// reduce-scatter at a rank count that is not a power of two sends the whole vector to a neighbour).
int64_t bucket_message_bytes(const proto::Bucket& bucket) { return bucket.numel() * int64_t{sizeof(float)}; }

// One ShardPlan per request for the whole process: with privatization off every simulated rank sees
// this cache, so plan memory does not grow with the number of ranks.
std::shared_ptr<const proto::ShardPlan> shared_plan(const proto::PlanRequest& request) {
  static std::map<uint64_t, std::shared_ptr<const proto::ShardPlan>> cache;
  const uint64_t key = sharding::stable_hash(request);
  auto& slot = cache[key];
  if (!slot) slot = std::make_shared<const proto::ShardPlan>(sharding::make_plan(request));
  return slot;
}

// One SMPI shared block per role for the whole process: the first rank allocates it, every other rank
// uses the same pointer (privatization off), so mappings do not grow with N (each rank's own
// SMPI_SHARED_MALLOC maps the block again, 1 MiB at a time, and 1024 ranks exhaust vm.max_map_count).
// `bytes` must be the same on every rank (a maximum over ranks). Never freed: it lives as long as the
// simulation.
float* shared_block(int role, size_t bytes) {
  static std::map<int, std::pair<float*, size_t>> blocks;
  auto& b = blocks[role];
  if (b.first == nullptr) b = {static_cast<float*>(SMPI_SHARED_MALLOC(std::max<size_t>(bytes, 64))), bytes};
  SHARDOPT_ASSERT(b.second >= bytes, "step_sim: shared block requested with different sizes by different ranks");
  return b.first;
}

double host_property(const char* name, double fallback) {
  const char* v = sg_host_get_property_value(sg_host_self(), name);
  return v ? std::stod(v) : fallback;
}

// --slow-link-host: the host's own links — the first hop of its route to another host and the last
// hop of the route back (one full-duplex link is two, a shared one is one) — run at `factor` x their
// bandwidth from now on. Returns their names. Called by one rank before the first collective.
std::vector<std::string> slow_down_links(const std::string& host_name, double factor) {
  auto* host = simgrid::s4u::Host::by_name_or_null(host_name);
  if (host == nullptr) throw ConfigError("--slow-link: no host '" + host_name + "' in the platform");
  simgrid::s4u::Host* other = nullptr;
  for (auto* h : simgrid::s4u::Engine::get_instance()->get_all_hosts())
    if (h != host) {
      other = h;
      break;
    }
  if (other == nullptr) throw ConfigError("--slow-link: the platform has no host other than '" + host_name + "'");
  std::vector<simgrid::s4u::Link*> out, in;
  double latency = 0;
  host->route_to(other, out, &latency);
  other->route_to(host, in, &latency);
  if (out.empty() || in.empty())
    throw ConfigError("--slow-link: host '" + host_name + "' has no link on its route to '" + other->get_name() + "'");
  std::vector<simgrid::s4u::Link*> own = {out.front()};
  if (in.back() != out.front()) own.push_back(in.back());
  std::vector<std::string> names;
  for (auto* link : own) {
    link->set_bandwidth(link->get_bandwidth() * factor);
    names.push_back(link->get_name());
  }
  return names;
}

// Modelled compute: advances this rank's simulated time, computes nothing. `slowdown` > 1 on a host
// that runs slower than the platform says (--slow-host): its compute takes that much longer.
struct ComputeModel {
  double flops_per_byte = host_property("shardopt_flops_per_byte", 6.25);
  // Host flops charged per FLOP of the model's forward/backward: host speed (the NS rate) / the
  // forward/backward rate measured by bench/model (docs/simulation.md, "Training step").
  double flops_per_model_flop = host_property("shardopt_flops_per_model_flop", 1);
  double slowdown = 1;
  void stream(double bytes) const {
    if (bytes > 0) smpi_execute_flops(bytes * flops_per_byte * slowdown);
  }
  void flops(double f) const {
    if (f > 0) smpi_execute_flops(f * slowdown);
  }
  // Host flops for `model_flops` FLOPs of forward/backward.
  double model_host_flops(double model_flops) const { return model_flops * flops_per_model_flop * slowdown; }
};

// Forward/backward FLOPs of a training step: the forward's FLOPs on this rank's tokens, and the
// backward's (twice the forward's) split over the gradient buckets in proportion to the parameters
// of their tensors that take part in matrix products (not the lookups: input and position
// embeddings). Buckets hold tensors in reverse registration order, which is the order the backward
// produces their gradients: bucket 0 is ready first.
struct TrainingFlops {
  double forward = 0;
  std::vector<double> backward_per_bucket;
  double backward() const {
    double f = 0;
    for (double b : backward_per_bucket) f += b;
    return f;
  }
};

TrainingFlops training_flops(const proto::ShardPlan& plan, double forward_flops,
                             const std::function<bool(int tensor)>& in_products) {
  std::vector<double> product_params(plan.buckets_size(), 0.0);
  double total = 0;
  for (int b = 0; b < plan.buckets_size(); ++b)
    for (int t : plan.buckets(b).tensors())
      if (in_products(t)) product_params[b] += static_cast<double>(plan.tensors(t).numel());
  for (double p : product_params) total += p;
  TrainingFlops f;
  f.forward = forward_flops;
  for (double p : product_params) f.backward_per_bucket.push_back(total > 0 ? 2 * forward_flops * p / total : 0.0);
  return f;
}

// The model the simulated ranks train: a llama preset (sharding/presets.h), or the reference
// transformer `shardopt train` trains (model/transformer.h), so that a simulated training step can be
// compared with a real one.
struct SimModel {
  std::vector<proto::TensorSpec> specs;
  std::function<bool(int tensor)> in_products;          // takes part in matrix products (not a lookup)
  std::function<double(int64_t tokens)> forward_flops;  // per rank, for `tokens` tokens
};

SimModel sim_model(const Options& o) {
  SimModel m;
  if (o.preset == "reference") {
    model::ModelConfig c;
    c.d_model = static_cast<int>(o.d_model);
    c.n_layer = o.layers > 0 ? o.layers : c.n_layer;
    c.n_head = static_cast<int>(o.heads);
    c.context = static_cast<int>(o.seq_len > 0 ? o.seq_len : o.context);
    auto net = std::make_shared<model::Transformer>(c);  // validates the shape (ConfigError)
    // Routed as the trainer routes them (train/trainer.cc): hidden matrices to Muon, the rest to AdamW.
    m.specs = net->tensor_specs(/*route_groups=*/true);
    m.in_products = [net](int t) {
      const auto& p = net->params()[static_cast<size_t>(t)];
      return p.shape.size() == 2 && p.kind != model::ParamKind::kEmbedding;
    };
    m.forward_flops = [net, seq = c.context](int64_t tokens) {
      if (tokens % seq != 0)
        throw ConfigError("--tokens-per-rank " + std::to_string(tokens) + " must be a multiple of the sequence length " +
                          std::to_string(seq) + " (whole sequences per rank)");
      return net->forward_flops(static_cast<int>(tokens / seq), seq);
    };
    return m;
  }
  m.specs = sharding::preset_specs(o.preset, proto::F32, o.layers);
  auto shape = sharding::preset_shape(o.preset);
  if (o.layers > 0) shape.n_layers = std::min<int64_t>(shape.n_layers, o.layers);
  // Every 2-D tensor but the input embedding (a lookup; the LM head is a product unless tied).
  m.in_products = [specs = m.specs, tied = shape.tied_embeddings](int t) {
    return specs[t].shape_size() == 2 && (tied || specs[t].name() != "model.embed_tokens.weight");
  };
  // 2 FLOPs per product parameter per token (the usual 6·P·T with the backward), plus the attention
  // scores and their use, 4·S·d per token and layer over full S×S tiles, when --seq-len S is given
  // (model::Transformer::forward_flops counts the same way).
  double product_params = 0;
  for (int t = 0; t < static_cast<int>(m.specs.size()); ++t)
    if (m.in_products(t)) product_params += static_cast<double>(sharding::tensor_numel(m.specs[t]));
  m.forward_flops = [product_params, shape, seq = o.seq_len](int64_t tokens) {
    const double T = static_cast<double>(tokens);
    return 2 * product_params * T +
           4.0 * static_cast<double>(shape.n_layers) * static_cast<double>(seq) * static_cast<double>(shape.d_model) * T;
  };
  return m;
}

double ns_flops(const proto::TensorPlacement& t) {
  if (t.block_rows_size() == 0) return optim::newton_schulz_flops(t.rows(), t.cols(), kNsSteps);
  double f = 0;
  for (int64_t r : t.block_rows()) f += optim::newton_schulz_flops(r, t.cols(), kNsSteps);
  return f;
}

struct Phases {
  double reduce_scatter = 0, check = 0, elementwise = 0, ns = 0, dim0_exchange = 0, all_gather = 0, outer = 0,
         outer_exchange = 0, outer_all_gather = 0,
         step = 0, compute = 0,
         forward = 0, backward = 0, exposed_reduce_scatter = 0, last_bucket_reduce_scatter = 0, train_step = 0;
};

double max_over(comm::Communicator& c, double v) {
  double out = 0;
  // Nanoseconds as int64: f32 would round simulated seconds.
  int64_t ns = static_cast<int64_t>(v * 1e9), m = 0;
  c.all_reduce(&ns, &m, 1, DType::kI64, comm::ReduceOp::kMax)->wait();
  out = static_cast<double>(m) * 1e-9;
  return out;
}

// Wall time of the simulation itself (real time, not simulated: the cost of running it here).
const auto simulation_started = std::chrono::steady_clock::now();

// kB of this process's resident memory in /proc/self/status field `field` (VmRSS, RssAnon), 0 if absent.
long status_kb(const char* field) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  long kb = 0;
  const size_t len = std::strlen(field);
  while (std::fgets(line, sizeof line, f) != nullptr)
    if (std::strncmp(line, field, len) == 0 && line[len] == ':') kb = std::atol(line + len + 1);
  std::fclose(f);
  return kb;
}

// --progress: the cost of the simulation itself, phase by phase, on stderr. Printed by the first and
// the last rank (SMPI runs ranks in turn: the last rank to pass a point is usually the last one).
struct Progress {
  bool on = false;
  int rank = 0, size = 1;
  void operator()(const char* what) const {
    if (!on || (rank != 0 && rank != size - 1)) return;
    std::fprintf(stderr, "step_sim progress: rank %d %-28s wall %8.2f s  simulated %10.6f s  RSS %6ld MB (anon %6ld MB)\n",
                 rank, what,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - simulation_started).count(),
                 MPI_Wtime(), status_kb("VmRSS") / 1024, status_kb("RssAnon") / 1024);
  }
};

// The reduce-scatter of a `counts` vector (kSum): the MPI backend's recursive-halving steps (simulated
// messages; the backend skips the arithmetic in this build) and their combines as modelled compute.
void reduce_scatter_sum(comm::Communicator& g, float* send, float* recv, const std::vector<size_t>& counts,
                        const ComputeModel& model) {
  g.reduce_scatter(send, recv, counts, DType::kF32, comm::ReduceOp::kSum)->wait();
  model.stream(kReduceBytesPerElem * static_cast<double>(comm::halving_schedule(counts, g.rank()).combined_elements));
}

// --collective-bench BYTES: bench/comm's all-gather and reduce-scatter (kSum) of a BYTES buffer per rank
// with counts BYTES/4/N (the last rank takes the remainder), simulated once each, max over ranks: what
// sim/validate.py compares with comm_bench to calibrate the platform's link.
int collective_bench(comm::Communicator& world, int64_t bytes) {
  const int n = world.size(), me = world.rank();
  const size_t elems = std::max<size_t>(1, static_cast<size_t>(bytes) / 4);
  std::vector<size_t> counts(n, elems / n);
  counts[n - 1] += elems % n;
  size_t off = 0;
  for (int r = 0; r < me; ++r) off += counts[r];
  float* send = shared_block(0, sizeof(float) * elems);
  float* recv = shared_block(1, sizeof(float) * elems);
  ComputeModel model;
  world.barrier()->wait();
  std::optional<sim::NoPayload> no_payload(std::in_place);
  auto t0 = clock::now();
  world.all_gather(send + off, recv, counts, DType::kF32)->wait();
  const double all_gather = clock::seconds_since(t0);
  world.barrier()->wait();
  t0 = clock::now();
  reduce_scatter_sum(world, send, recv, counts, model);
  const double reduce_scatter = clock::seconds_since(t0);
  no_payload.reset();
  const double ag = max_over(world, all_gather), rs = max_over(world, reduce_scatter);
  if (me == 0) {
    nlohmann::ordered_json j;
    j["collective_bench_bytes"] = bytes;
    j["ranks"] = n;
    j["predicted_all_gather_seconds"] = ag;
    j["predicted_reduce_scatter_seconds"] = rs;
    std::printf("%s\n", j.dump().c_str());
  }
  return 0;
}

int run(int argc, char** argv) {
  Options o;
  CLI::App app{"step_sim: shardopt's step on a simulated platform (run under smpirun; see docs/simulation.md)"};
  app.add_option("--preset", o.preset, "model preset (" + [] {
    std::string s;
    for (auto& n : sharding::preset_names()) s += (s.empty() ? "" : ", ") + n;
    return s;
  }() + ", or reference: the transformer shardopt train trains, shaped by --d-model --layers --heads --context)");
  app.add_option("--layers", o.layers, "keep only the first K transformer layers (0 = all); reference: its layers (0 = 4)");
  app.add_option("--d-model", o.d_model, "reference: model width")->check(CLI::PositiveNumber);
  app.add_option("--heads", o.heads, "reference: attention heads")->check(CLI::PositiveNumber);
  app.add_option("--context", o.context, "reference: sequence length (--seq-len, when given, takes precedence)")
      ->check(CLI::PositiveNumber);
  app.add_option("--stage", o.stage, "ZeRO stage 1-3")->check(CLI::Range(1, 3));
  app.add_option("--layout", o.layout, "owned | dim0");
  app.add_option("--sync", o.sync, "zero (one ZeRO group) | diloco | noloco (replicas x shard groups)")
      ->check(CLI::IsMember({"zero", "diloco", "noloco"}));
  app.add_option("--replicas", o.replicas, "replicas for diloco/noloco (ranks must be a multiple)");
  app.add_option("--bucket-mib", o.bucket_mib,
                 "bucket size in MiB, or auto (default): max(40M, 1M x ranks) fp32 elements, as Megatron-LM sizes "
                 "its data-parallel buckets");
  app.add_option("--steps", o.steps, "steps to simulate (the last one is reported)");
  app.add_flag("--json", o.json, "one JSON object on stdout");
  bool progress_on = false;
  app.add_flag("--progress", progress_on, "print the simulation's own wall time and memory per phase on stderr");
  app.add_option("--slow-host", o.slow_host, "platform host whose ranks compute at --slow-factor x speed");
  app.add_option("--slow-factor", o.slow_factor, "speed factor of --slow-host (e.g. 0.5)")->check(CLI::PositiveNumber);
  app.add_option("--slow-link-host", o.slow_link_host,
                 "platform host whose own links (first hop out, last hop in) run at --slow-link-factor x bandwidth");
  app.add_option("--slow-link-factor", o.slow_link_factor, "bandwidth factor of --slow-link-host's links (e.g. 0.5)")
      ->check(CLI::PositiveNumber);
  app.add_option("--tokens-per-rank", o.tokens_per_rank,
                 "tokens each rank trains on per step: > 0 simulates a training step (forward and backward modelled, "
                 "each bucket's reduce-scatter started when the backward has produced it); 0 = the optimizer step only")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seq-len", o.seq_len, "sequence length for the attention term of forward/backward (0 = left out)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--collective-bench", o.collective_bench_bytes,
                 "time one all-gather and one reduce-scatter of a BYTES buffer per rank (bench/comm's sizes) and exit")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  comm::MpiRuntime mpi(&argc, &argv);
  Progress progress{progress_on, mpi.world_rank(), mpi.world_size()};
  progress("MPI_Init");
  sim::install_smpi_patches();  // before the first communicator (sim/smpi_patches.h)
  // Before the world communicator, whose creation no rank can finish before rank 0 joins it.
  std::vector<std::string> slow_links;
  if (!o.slow_link_host.empty() && mpi.world_rank() == 0) slow_links = slow_down_links(o.slow_link_host, o.slow_link_factor);
  auto world = mpi.world();
  const int n_world = world->size();
  progress("world communicator");
  if (o.collective_bench_bytes > 0) return collective_bench(*world, o.collective_bench_bytes);
  const bool outer = o.sync != "zero";
  const int replicas = outer ? o.replicas : 1;
  if (replicas < 1 || n_world % replicas != 0)
    throw ConfigError("--replicas " + std::to_string(replicas) + " must divide the rank count " +
                      std::to_string(n_world));
  if (o.sync == "noloco" && replicas % 2 != 0)
    throw ConfigError("--sync noloco pairs replicas: --replicas must be even, got " + std::to_string(replicas));
  const int shards = n_world / replicas;
  const int replica = world->rank() / shards, shard = world->rank() % shards;
  std::unique_ptr<comm::Communicator> group_owner, cross;
  comm::Communicator* group = world.get();
  if (outer) {
    group_owner = world->split(replica, shard);
    cross = world->split(shard, replica);
    group = group_owner.get();
    progress("replica/cross splits");
  }
  const int n = group->size(), rank = group->rank();

  const SimModel trained = sim_model(o);
  const std::vector<proto::TensorSpec>& specs = trained.specs;
  const proto::ShardLayout layout = sharding::parse_layout(o.layout);
  // Auto buckets: Megatron-LM's size, halved until every bucket buffer (payload + the layout's
  // padding) is a message SMPI handles (< 2 GiB; see kSmpiMaxMessageBytes). llama-1b in dim0: from 2
  // to 512 ranks Megatron's size already fits; at 1024 ranks 1.02 GB instead of 4.1 GB.
  auto request = sharding::make_plan_request(specs, n, o.stage, layout, bucket_bytes_for_ranks(o.bucket_mib, n));
  auto plan_ptr = shared_plan(request);
  auto largest_bucket_message = [&] {
    int64_t m = 0;
    for (const auto& b : plan_ptr->buckets()) m = std::max(m, bucket_message_bytes(b));
    return m;
  };
  while (o.bucket_mib == "auto" && largest_bucket_message() > kSmpiMaxMessageBytes &&
         request.bucket_bytes() > (int64_t{64} << 20)) {
    request.set_bucket_bytes(request.bucket_bytes() / 2);
    plan_ptr = shared_plan(request);
  }
  if (largest_bucket_message() > kSmpiMaxMessageBytes)
    throw ConfigError("a bucket of " + std::to_string(largest_bucket_message()) +
                      " bytes (payload + padding) is a message of 2 GiB or more, which SimGrid 3.32's SMPI copies "
                      "and never frees: use a smaller --bucket-mib (or auto)");
  const proto::ShardPlan& plan = *plan_ptr;
  progress("plan");
  const bool dim0 = layout == proto::SHARD_LAYOUT_DIM0;

  // What this rank owns, from the plan.
  int64_t max_bucket = 0, max_segment = 0, owned_elems = 0, owned_ew = 0, owned_muon = 0;
  for (const auto& b : plan.buckets()) {
    max_bucket = std::max(max_bucket, b.numel());
    max_segment = std::max(max_segment, b.segments(rank).count());
    owned_elems += b.segments(rank).count();
  }
  double my_ns_flops = 0;
  int64_t muon_params = 0, dim0_send = 0, dim0_recv = 0;
  std::vector<size_t> a2a_send(n, 0), a2a_recv(n, 0);
  for (const auto& t : plan.tensors()) {
    if (t.muon()) muon_params += t.numel();
    if (t.muon() && t.owner() == rank) {
      my_ns_flops += ns_flops(t);
      owned_muon += t.numel();
    }
    for (const auto& p : t.pieces()) {
      if (p.rank() != rank) continue;
      if (!t.muon()) owned_ew += p.length();
      if (t.muon() && dim0) a2a_send[t.owner()] += static_cast<size_t>(p.length());
    }
    if (t.muon() && dim0 && t.owner() == rank)
      for (const auto& p : t.pieces()) a2a_recv[p.rank()] += static_cast<size_t>(p.length());
  }
  for (int p = 0; p < n; ++p) dim0_send += a2a_send[p], dim0_recv += a2a_recv[p];

  // Buffers: one shared block per role for all ranks (contents are meaningless), sized by the maximum
  // over ranks.
  int64_t sizes[3] = {max_segment, std::max(dim0_send, dim0_recv), owned_elems}, max_sizes[3] = {};
  world->all_reduce(sizes, max_sizes, 3, DType::kI64, comm::ReduceOp::kMax)->wait();
  // The other large messages (checked on maxima over ranks, so every rank stops alike): a rank's dim0
  // exchange (all its messages together, a bound on each) and the outer step's one message of the
  // rank's master shards (DiLoCo's all-reduce, NoLoCo's sendrecv).
  if (max_sizes[1] * int64_t{sizeof(float)} > kSmpiMaxMessageBytes)
    throw ConfigError("a rank's dim0 exchange moves " + std::to_string(max_sizes[1] * int64_t{sizeof(float)}) +
                      " bytes, possibly as one message of 2 GiB or more, which SimGrid 3.32's SMPI copies and never "
                      "frees: use more ranks");
  if (outer && max_sizes[2] * int64_t{sizeof(float)} > kSmpiMaxMessageBytes)
    throw ConfigError("the outer step's message (" + std::to_string(max_sizes[2] * int64_t{sizeof(float)}) +
                      " bytes of master shards) is 2 GiB or more, which SimGrid 3.32's SMPI copies and never frees: "
                      "use more ranks per replica");
  float* bucket_buf = shared_block(0, sizeof(float) * static_cast<size_t>(max_bucket));
  float* shard_buf = shared_block(1, sizeof(float) * static_cast<size_t>(max_sizes[0]));
  float* a2a_send_buf = shared_block(2, sizeof(float) * static_cast<size_t>(max_sizes[1]));
  float* a2a_recv_buf = shared_block(3, sizeof(float) * static_cast<size_t>(max_sizes[1]));
  float* outer_send = shared_block(4, sizeof(float) * static_cast<size_t>(max_sizes[2]));
  float* outer_recv = shared_block(5, sizeof(float) * static_cast<size_t>(max_sizes[2]));
  std::vector<float> check(specs.size() + 1, 0.0f);
  std::vector<size_t> counts(n);
  progress("buffers");

  // Elements of the tensors in each bucket (the buffer without its padding): what copy_in_grads and
  // copy_out_params move in dim0.
  std::vector<double> bucket_payload(plan.buckets_size(), 0.0);
  for (int b = 0; b < plan.buckets_size(); ++b)
    for (int t : plan.buckets(b).tensors()) bucket_payload[b] += static_cast<double>(plan.tensors(t).numel());
  const bool training = o.tokens_per_rank > 0;
  const TrainingFlops train_flops =
      training ? training_flops(plan, trained.forward_flops(o.tokens_per_rank), trained.in_products) : TrainingFlops{};

  ComputeModel model;
  if (!o.slow_host.empty() && o.slow_host == sg_host_get_name(sg_host_self())) model.slowdown = 1 / o.slow_factor;
  Phases ph;
  comm::TrafficCounters step_traffic, outer_traffic;
  for (int s = 0; s < o.steps; ++s) {
    group->barrier()->wait();
    if (cross) cross->barrier()->wait();
    ph = Phases{};
    const auto before = group->counters();
    double compute = 0;
    auto timed_compute = [&](auto&& f) {
      const auto t0 = clock::now();
      f();
      const double dt = clock::seconds_since(t0);
      compute += dt;
      return dt;
    };
    std::optional<sim::NoPayload> no_payload(std::in_place);
    // One bucket's reduce-scatter as Engine::launch_reduction + the wait do it: the collective, MPI's
    // reduction arithmetic and the kAvg division (modelled), in dim0 after copy_in_grads (training only:
    // step_bench's gradient fill does it outside every phase it times).
    auto reduce_scatter_bucket = [&](int b) {
      const auto& bk = plan.buckets(b);
      for (int r = 0; r < n; ++r) counts[r] = static_cast<size_t>(bk.segments(r).count());
      if (training && dim0) model.stream(kCopyBytesPerElem * bucket_payload[b]);
      // kSum, not the engine's kAvg: the same MPI_SUM on the wire, without the backend's real division
      // pass over the (meaningless) shard in this process; the division is charged below.
      reduce_scatter_sum(*group, bucket_buf, shard_buf, counts, model);
      model.stream(kCopyBytesPerElem * static_cast<double>(bk.segments(rank).count()));
    };
    double train_start = 0;
    if (training) {
      // Forward, then the backward on a second actor of this host (the compute stream) while this rank
      // reduce-scatters each bucket as soon as the backward has produced it (the communication stream),
      // with at most kGradBucketsInFlight buckets open: the backward waits for the oldest reduction first.
      namespace s4u = simgrid::s4u;
      train_start = s4u::Engine::get_clock();
      if (train_flops.forward > 0) s4u::this_actor::execute(model.model_host_flops(train_flops.forward));
      const double backward_start = s4u::Engine::get_clock();
      ph.forward = backward_start - train_start;
      auto ready = s4u::Semaphore::create(0), slots = s4u::Semaphore::create(kGradBucketsInFlight);
      auto backward_end = std::make_shared<double>(0);
      std::vector<double> chunks;
      for (double f : train_flops.backward_per_bucket) chunks.push_back(model.model_host_flops(f));
      auto backward = s4u::Actor::create("backward", s4u::Host::current(), [chunks, ready, slots, backward_end] {
        for (double f : chunks) {
          slots->acquire();
          if (f > 0) s4u::this_actor::execute(f);
          ready->release();
        }
        *backward_end = s4u::Engine::get_clock();
      });
      for (int b = 0; b < plan.buckets_size(); ++b) {
        ready->acquire();
        const double t_rs = s4u::Engine::get_clock();
        reduce_scatter_bucket(b);
        const double dt = s4u::Engine::get_clock() - t_rs;
        ph.reduce_scatter += dt;
        if (b + 1 == plan.buckets_size()) ph.last_bucket_reduce_scatter = dt;
        slots->release();
      }
      backward->join();
      ph.backward = *backward_end - backward_start;
      ph.exposed_reduce_scatter = s4u::Engine::get_clock() - *backward_end;
      compute += ph.forward + ph.backward;
    }
    // The optimizer step (Engine::step()): with a training step its reduce_wait is the exposed part.
    const auto start = clock::now();
    auto t0 = clock::now();
    if (!training) {
      for (int b = 0; b < plan.buckets_size(); ++b) reduce_scatter_bucket(b);
      ph.reduce_scatter = clock::seconds_since(t0);
    }
    progress("reduce-scatter");

    t0 = clock::now();
    timed_compute([&] { model.stream(kCheckBytesPerElem * static_cast<double>(owned_elems)); });
    group->all_reduce(check.data(), check.data(), check.size(), DType::kF32, comm::ReduceOp::kSum)->wait();
    ph.check = clock::seconds_since(t0);

    ph.elementwise = timed_compute([&] { model.stream(kAdamwBytesPerElem * static_cast<double>(owned_ew)); });

    // dim0's local passes (shard_state.cc): pack the gradient rows, unpack them into the owned matrices
    // and zero the update matrix; pack the update rows, apply them (decay_add) to the master rows.
    const double d0_send = static_cast<double>(dim0_send), d0_recv = static_cast<double>(dim0_recv);
    if (dim0) {
      t0 = clock::now();
      model.stream(kCopyBytesPerElem * d0_send);
      group->all_to_all(a2a_send_buf, a2a_send, a2a_recv_buf, a2a_recv, DType::kF32)->wait();
      model.stream(kCopyBytesPerElem * d0_recv + kFillBytesPerElem * static_cast<double>(owned_muon));
      ph.dim0_exchange = clock::seconds_since(t0);
      progress("dim0 exchange out");
    }
    ph.ns = timed_compute([&] {
      model.flops(my_ns_flops);
      model.stream(kMuonStreamBytesPerElem * static_cast<double>(owned_muon));
    });
    if (dim0) {
      t0 = clock::now();
      model.stream(kCopyBytesPerElem * d0_recv);
      group->all_to_all(a2a_recv_buf, a2a_recv, a2a_send_buf, a2a_send, DType::kF32)->wait();
      model.stream(kDecayAddBytesPerElem * d0_send);
      ph.dim0_exchange += clock::seconds_since(t0);
    }

    t0 = clock::now();
    if (o.stage <= 2) {
      for (int b = 0; b < plan.buckets_size(); ++b) {
        const auto& bk = plan.buckets(b);
        for (int r = 0; r < n; ++r) counts[r] = static_cast<size_t>(bk.segments(r).count());
        float* full = bucket_buf;
        // start_param_gather copies the master shard into the bucket; dim0 copies the gathered rows out
        // into the tensors (copy_out_params).
        model.stream(kCopyBytesPerElem * static_cast<double>(bk.segments(rank).count()));
        group->all_gather(full + bk.segments(rank).offset(), full, counts, DType::kF32)->wait();
        if (dim0) model.stream(kCopyBytesPerElem * bucket_payload[b]);
      }
    }
    ph.all_gather = clock::seconds_since(t0);
    progress("all-gather");
    no_payload.reset();
    ph.step = clock::seconds_since(start) + ph.exposed_reduce_scatter;
    if (training) ph.train_step = simgrid::s4u::Engine::get_clock() - train_start;
    ph.compute = compute;
    step_traffic = group->counters() - before;

    // The outer step (runtime/gossip/outer_sync.h), on this rank's master shards.
    if (outer) {
      cross->barrier()->wait();
      const auto cross_before = cross->counters();
      t0 = clock::now();
      no_payload.emplace();
      const size_t count = static_cast<size_t>(owned_elems);
      if (o.sync == "diloco") {
        cross->all_reduce(outer_send, outer_send, count, DType::kF32, comm::ReduceOp::kSum)->wait();  // see kSum above
      } else {
        // A pairing that changes every outer step, as NoLoCo's permuted groups of two do (a stride pattern,
        // not outer_groups' seeded permutation: on a non-blocking network any pairing of disjoint pairs
        // costs the same). One sendrecv on the shared cross-replica communicator, as OuterSync does with
        // GossipOptions::private_links off: no per-pair communicators at any scale.
        const int stride = 1 + (s % std::max(1, replicas / 2));
        const int base = replica % (2 * stride) < stride ? replica : replica - stride;
        const int partner = replica % (2 * stride) < stride ? base + stride : base;
        const int peer = partner < replicas ? partner : replica;
        if (peer != replica)
          cross->sendrecv(outer_send, count, peer, outer_recv, count, peer, DType::kF32, 7)->wait();
      }
      ph.outer_exchange = clock::seconds_since(t0);
      // Outer update: read theta, phi, m; write phi, m, theta (as in OuterSync).
      model.stream(24.0 * static_cast<double>(count));
      const auto t_gather = clock::now();
      if (o.stage <= 2) {
        for (int b = 0; b < plan.buckets_size(); ++b) {
          const auto& bk = plan.buckets(b);
          for (int r = 0; r < n; ++r) counts[r] = static_cast<size_t>(bk.segments(r).count());
          group->all_gather(bucket_buf + bk.segments(rank).offset(), bucket_buf, counts, DType::kF32)->wait();
        }
      }
      no_payload.reset();
      ph.outer_all_gather = clock::seconds_since(t_gather);
      ph.outer = clock::seconds_since(t0);
      outer_traffic = cross->counters() - cross_before;
    }
  }

  progress("steps done");
  // The slowest rank sets the step time; per-rank step and compute times show slow hosts.
  const double my_step = ph.step, my_compute = ph.compute;
  Phases m;
  m.reduce_scatter = max_over(*world, ph.reduce_scatter);
  m.check = max_over(*world, ph.check);
  m.elementwise = max_over(*world, ph.elementwise);
  m.ns = max_over(*world, ph.ns);
  m.dim0_exchange = max_over(*world, ph.dim0_exchange);
  // The phases that wait for other ranks' NS (the dim0 exchange back; the owned layout's all-gather,
  // which waits for the owners) taken at the rank whose NS took longest (the lowest such rank): their
  // own time, without the others' waits for that NS, which the NS phase's maximum already counts.
  const int critical_rank = [&] {
    const int64_t mine = static_cast<int64_t>(ph.ns * 1e9), top = static_cast<int64_t>(m.ns * 1e9 + 0.5);
    int64_t candidate = mine == top ? world->rank() : n_world, lowest = 0;
    world->all_reduce(&candidate, &lowest, 1, DType::kI64, comm::ReduceOp::kMin)->wait();
    return static_cast<int>(lowest);
  }();
  const double dim0_exchange_critical = max_over(*world, world->rank() == critical_rank ? ph.dim0_exchange : 0.0);
  const double all_gather_critical = max_over(*world, world->rank() == critical_rank ? ph.all_gather : 0.0);
  m.all_gather = max_over(*world, ph.all_gather);
  m.outer = max_over(*world, ph.outer);
  m.outer_exchange = max_over(*world, ph.outer_exchange);
  m.outer_all_gather = max_over(*world, ph.outer_all_gather);
  m.step = max_over(*world, ph.step);
  m.forward = max_over(*world, ph.forward);
  m.backward = max_over(*world, ph.backward);
  m.exposed_reduce_scatter = max_over(*world, ph.exposed_reduce_scatter);
  m.last_bucket_reduce_scatter = max_over(*world, ph.last_bucket_reduce_scatter);
  m.train_step = max_over(*world, ph.train_step);
  std::vector<double> per_rank_compute(n_world, 0.0), per_rank_step(n_world, 0.0);
  std::vector<size_t> ones(n_world, 1);
  world->all_gather(&my_compute, per_rank_compute.data(), ones, DType::kI64)->wait();  // 8 bytes, bit copy
  world->all_gather(&my_step, per_rank_step.data(), ones, DType::kI64)->wait();
  int64_t sent = static_cast<int64_t>(step_traffic.total_sent()), max_sent = 0, sum_sent = 0;
  world->all_reduce(&sent, &max_sent, 1, DType::kI64, comm::ReduceOp::kMax)->wait();
  world->all_reduce(&sent, &sum_sent, 1, DType::kI64, comm::ReduceOp::kSum)->wait();
  int64_t osent = static_cast<int64_t>(outer_traffic.total_sent()), max_osent = 0;
  world->all_reduce(&osent, &max_osent, 1, DType::kI64, comm::ReduceOp::kMax)->wait();

  if (world->rank() != 0) return 0;

  double total_params = 0, bucket_elems = 0;
  for (const auto& t : plan.tensors()) total_params += static_cast<double>(t.numel());
  for (const auto& b : plan.buckets()) bucket_elems += static_cast<double>(b.numel());
  // The step's own collectives on the plan's bucket buffers (Ψ' = parameters + alignment padding):
  // stages 1-2 reduce-scatter + all-gather (2Ψ'(N-1)/N, fp32 here); stage 3 only reduce-scatters in
  // step() (Ψ'(N-1)/N). The formula is the mean over ranks: in the owned layout segments differ, and a
  // rank with a small segment sends more (B - B_own).
  const double zero_bytes = o.stage <= 2 ? sharding::zero_traffic_per_rank(o.stage, bucket_elems, n, 4).bytes
                                         : bucket_elems * 4 * (n - 1) / n;
  const double mean_sent = static_cast<double>(sum_sent) / n_world;
  const auto slowest = std::max_element(per_rank_compute.begin(), per_rank_compute.end()) - per_rank_compute.begin();
  const auto fastest = std::min_element(per_rank_compute.begin(), per_rank_compute.end()) - per_rank_compute.begin();
  nlohmann::ordered_json j;
  j["preset"] = o.preset;
  j["layers"] = o.layers;
  j["ranks"] = n_world;
  j["replicas"] = replicas;
  j["shard_group_ranks"] = n;
  j["stage"] = o.stage;
  j["layout"] = o.layout;
  j["sync"] = o.sync;
  j["bucket_bytes"] = request.bucket_bytes();
  j["buckets"] = plan.buckets_size();
  j["total_params"] = total_params;
  j["predicted_step_seconds"] = m.step;
  j["predicted_reduce_scatter_seconds"] = m.reduce_scatter;
  j["predicted_check_seconds"] = m.check;
  j["predicted_elementwise_seconds"] = m.elementwise;
  j["predicted_ns_seconds"] = m.ns;
  j["predicted_dim0_exchange_seconds"] = m.dim0_exchange;
  j["predicted_dim0_exchange_critical_seconds"] = dim0_exchange_critical;  // at the slowest NS rank
  j["predicted_all_gather_critical_seconds"] = all_gather_critical;
  j["predicted_all_gather_seconds"] = m.all_gather;
  j["predicted_outer_step_seconds"] = m.outer;
  j["predicted_outer_exchange_seconds"] = m.outer_exchange;      // DiLoCo all-reduce / NoLoCo sendrecv
  j["predicted_outer_all_gather_seconds"] = m.outer_all_gather;  // parameter refresh in the shard group
  if (training) {
    j["tokens_per_rank"] = o.tokens_per_rank;
    j["seq_len"] = o.seq_len;
    j["forward_flops_per_rank"] = train_flops.forward;
    j["backward_flops_per_rank"] = train_flops.backward();
    j["predicted_train_step_seconds"] = m.train_step;  // forward + backward + exposed reduce-scatter + the rest
    j["predicted_forward_seconds"] = m.forward;
    j["predicted_backward_seconds"] = m.backward;      // includes waits for a free gradient bucket
    j["predicted_exposed_reduce_scatter_seconds"] = m.exposed_reduce_scatter;  // after the backward ended
    j["predicted_last_bucket_reduce_scatter_seconds"] = m.last_bucket_reduce_scatter;
  }
  j["bytes_sent_per_rank_max"] = max_sent;
  j["bytes_sent_per_rank_mean"] = mean_sent;
  j["check_allreduce_bytes_per_rank"] = sharding::zero_traffic_per_rank(0, static_cast<double>(specs.size() + 1), n, 4).bytes;
  j["zero_formula_bytes_per_rank"] = zero_bytes;
  j["dim0_extra_formula_bytes_per_rank"] =
      dim0 ? sharding::dim0_muon_extra_traffic_per_rank(static_cast<double>(muon_params), n, 4).bytes : 0.0;
  j["outer_bytes_sent_per_rank"] = max_osent;
  if (!slow_links.empty()) {
    j["slow_links"] = slow_links;
    j["slow_link_factor"] = o.slow_link_factor;
  }
  j["slowest_compute_rank"] = slowest;
  j["slowest_compute_seconds"] = per_rank_compute[slowest];
  j["fastest_compute_rank"] = fastest;
  j["fastest_compute_seconds"] = per_rank_compute[fastest];
  j["min_rank_step_seconds"] = *std::min_element(per_rank_step.begin(), per_rank_step.end());
  if (n_world <= 64) {  // per-rank figures for small runs (slow hosts show here)
    j["per_rank_compute_seconds"] = per_rank_compute;
    j["per_rank_step_seconds"] = per_rank_step;
  }
  j["simulated_seconds_total"] = MPI_Wtime();
  j["simulation_wall_seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - simulation_started).count();
  if (o.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s on %d ranks (%d replicas x %d), stage %d, layout %s, sync %s, %d buckets of <= %.0f MiB\n",
                o.preset.c_str(), n_world, replicas, n, o.stage, o.layout.c_str(), o.sync.c_str(),
                plan.buckets_size(), static_cast<double>(request.bucket_bytes()) / (1 << 20));
    if (training) {
      std::printf("predicted training step %9.4f s (%lld tokens per rank)\n", m.train_step,
                  static_cast<long long>(o.tokens_per_rank));
      std::printf("  forward              %10.4f s\n", m.forward);
      std::printf("  backward             %10.4f s\n", m.backward);
      std::printf("  exposed reduce-scatter %8.4f s (of %.4f s reduce-scatter overlapped with the backward)\n",
                  m.exposed_reduce_scatter, m.reduce_scatter);
    }
    std::printf("predicted step         %10.4f s\n", m.step);
    std::printf("  reduce-scatter       %10.4f s\n", m.reduce_scatter);
    std::printf("  check all-reduce     %10.4f s\n", m.check);
    std::printf("  element-wise         %10.4f s\n", m.elementwise);
    std::printf("  NS (Muon)            %10.4f s\n", m.ns);
    std::printf("  dim0 exchange        %10.4f s\n", m.dim0_exchange);
    std::printf("  all-gather           %10.4f s\n", m.all_gather);
    if (outer) {
      std::printf("outer step (%s)     %10.4f s, %lld bytes sent per rank\n", o.sync.c_str(), m.outer,
                  static_cast<long long>(max_osent));
      std::printf("  %-20s %10.4f s\n", o.sync == "diloco" ? "all-reduce" : "pair exchange", m.outer_exchange);
      std::printf("  all-gather           %10.4f s\n", m.outer_all_gather);
    }
    std::printf("bytes sent per rank    mean %.0f (ZeRO formula %.0f), max %lld\n", mean_sent, zero_bytes,
                static_cast<long long>(max_sent));
    std::printf("compute per rank       %.4f s (rank %lld) .. %.4f s (rank %lld)\n", per_rank_compute[fastest],
                static_cast<long long>(fastest), per_rank_compute[slowest], static_cast<long long>(slowest));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "step_sim: %s\n", e.what());
    return 2;
  }
}
