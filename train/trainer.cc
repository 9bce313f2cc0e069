#include "train/trainer.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <numbers>
#include <optional>
#include <sstream>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/error.h"
#include "base/thread_pool.h"
#include "comm/flight_recorder.h"
#include "checkpoint/writer.h"
#include "model/generate.h"
#include "runtime/checkpoint_io.h"
#include "runtime/gossip/outer_sync.h"
#include "optim/config.h"
#include "sharding/routing.h"

namespace shardopt::train {
namespace {

using clock::seconds_since;

bool is_matrix_optimizer(const std::string& name) { return name == "muon" || name == "normuon"; }

bool is_replicated(SyncMode mode) { return mode == SyncMode::kNoLoCo || mode == SyncMode::kDiLoCo; }

// What one step's sync did, beyond the engine's report.
struct SyncOutcome {
  runtime::StepReport report;
  bool outer_step = false;
  double consensus_distance = std::numeric_limits<double>::quiet_NaN();
  uint64_t logging_bytes_sent = 0;  // sent to measure the consensus distance: not training traffic
};

// One function per sync mode; sync_step dispatches. Gossip modes keep their state in OuterSync.
SyncOutcome sync_zero(runtime::Engine& engine, float lr_multiplier) { return {engine.step(lr_multiplier)}; }

// Inner ZeRO step in the shard group; every H steps, measure the replicas' consensus distance (before
// averaging: how far the replicas drifted in H inner steps) and run the outer step.
// DiLoCo measures the global consensus distance (a collective across replicas, as its all-reduce is).
// NoLoCo must not join the replicas: it reports this replica's distance to its group's mean, measured
// by the exchange itself and summed over the shard group only (NaN when this round was skipped).
SyncOutcome sync_outer(runtime::Engine& engine, runtime::gossip::OuterSync& outer, int64_t step,
                       float lr_multiplier) {
  SyncOutcome out{engine.step(lr_multiplier)};
  if (step % outer.options().outer_every != 0) return out;
  out.outer_step = true;
  const uint64_t sent_before = engine.comm().counters().total_sent() + outer.outer_traffic().total_sent();
  if (outer.options().mode == runtime::gossip::SyncMode::kDiLoCo) {
    out.consensus_distance = outer.consensus_distance();
    out.logging_bytes_sent =
        engine.comm().counters().total_sent() + outer.outer_traffic().total_sent() - sent_before;
    outer.outer_step();
    return out;
  }
  const runtime::gossip::OuterReport& report = outer.outer_step();
  const uint64_t sent_before_distance = engine.comm().counters().total_sent();
  float sums[2] = {static_cast<float>(report.group_distance_sq), static_cast<float>(report.group_distance_numel)};
  engine.comm().all_reduce(sums, sums, 2, DType::kF32, comm::ReduceOp::kSum)->wait();
  if (sums[1] > 0) out.consensus_distance = std::sqrt(sums[0] / sums[1]);
  out.logging_bytes_sent = engine.comm().counters().total_sent() - sent_before_distance;
  return out;
}

SyncOutcome sync_step(SyncMode mode, runtime::Engine& engine, runtime::gossip::OuterSync* outer, int64_t step,
                      float lr_multiplier) {
  switch (mode) {
    case SyncMode::kZero:
      return sync_zero(engine, lr_multiplier);
    case SyncMode::kNoLoCo:
    case SyncMode::kDiLoCo:
      return sync_outer(engine, *outer, step, lr_multiplier);
  }
  throw ConfigError("sync_step: unknown sync mode " + std::to_string(static_cast<int>(mode)));
}

runtime::gossip::GossipOptions gossip_options(const TrainConfig& c) {
  runtime::gossip::GossipOptions o;
  o.mode = c.sync == SyncMode::kDiLoCo ? runtime::gossip::SyncMode::kDiLoCo : runtime::gossip::SyncMode::kNoLoCo;
  o.outer_every = c.outer_every;
  o.group_size = c.gossip_group;
  o.timeout = std::chrono::milliseconds(c.outer_timeout_ms);
  o.seed = c.seed;
  if (c.outer_lr >= 0) o.alpha = o.diloco_lr = c.outer_lr;
  o.gamma = c.outer_gamma >= 0 ? c.outer_gamma : o.alpha;
  if (c.outer_momentum >= 0) o.beta = o.diloco_momentum = c.outer_momentum;
  return o;
}

runtime::EngineOptions engine_options(const TrainConfig& c) {
  runtime::EngineOptions o;
  o.zero_stage = c.zero_stage;
  o.layout = c.layout;
  o.bucket_bytes = c.bucket_bytes;
  o.max_grad_norm = c.max_grad_norm;
  o.grad_accumulation_steps = c.grad_accumulation;
  o.grad_memory = c.local_grad_accumulation ? runtime::GradMemory::kFull : runtime::GradMemory::kSharded;
  o.overlap = true;
  o.threads = c.threads;
  if (is_matrix_optimizer(c.optimizer)) {
    o.matrix_optimizer.set_kind(optim::parse_optimizer_kind(c.optimizer));
    o.matrix_optimizer.set_lr(c.matrix_lr);
    o.matrix_optimizer.set_weight_decay(c.weight_decay);
    o.matrix_optimizer.set_state_dtype(
        optim::parse_state_dtype(c.matrix_state_dtype.empty() ? c.state_dtype : c.matrix_state_dtype));
    if (c.qk_clip_tau > 0) {
      o.matrix_optimizer.mutable_qk_clip()->set_enabled(true);
      o.matrix_optimizer.mutable_qk_clip()->set_tau(c.qk_clip_tau);
    }
    o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  } else {
    o.elementwise_optimizer.set_kind(optim::parse_optimizer_kind(c.optimizer));
  }
  o.elementwise_optimizer.set_lr(c.elementwise_lr);
  o.elementwise_optimizer.set_weight_decay(c.weight_decay);
  o.elementwise_optimizer.set_state_dtype(optim::parse_state_dtype(c.state_dtype));
  return o;
}

}  // namespace

std::string sync_mode_name(SyncMode mode) {
  switch (mode) {
    case SyncMode::kZero:
      return "zero";
    case SyncMode::kNoLoCo:
      return "noloco";
    case SyncMode::kDiLoCo:
      return "diloco";
  }
  return "unknown";
}

SyncMode parse_sync_mode(const std::string& name) {
  if (name == "zero") return SyncMode::kZero;
  if (name == "noloco") return SyncMode::kNoLoCo;
  if (name == "diloco") return SyncMode::kDiLoCo;
  throw ConfigError("--sync: expected one of {zero, noloco, diloco}, got '" + name + "'");
}

std::string replica_checkpoint_root(const std::string& ckpt_dir, int replica) {
  return (std::filesystem::path(ckpt_dir) / ("replica-" + std::to_string(replica))).string();
}

std::string replica_checkpoint_dir(const std::string& resume_from, int replica) {
  const std::filesystem::path dir(resume_from);
  const std::string parent = dir.parent_path().filename().string();
  if (parent.rfind("replica-", 0) != 0) return resume_from;  // one checkpoint for every replica
  return (dir.parent_path().parent_path() / ("replica-" + std::to_string(replica)) / dir.filename()).string();
}

std::string resolve_resume_dir(const std::string& path, const std::string& ckpt_dir) {
  const std::string root = path.empty() ? ckpt_dir : path;
  if (root.empty()) throw ConfigError("--resume: no folder given and no --ckpt-dir to take the latest checkpoint from");
  if (std::filesystem::exists(std::filesystem::path(root) / "manifest.pb")) return root;  // a checkpoint itself
  if (auto latest = ckpt::latest_checkpoint(root)) return latest->string();
  // A replicated run's root: replica 0's latest names the step every replica resumes from.
  if (auto latest = ckpt::latest_checkpoint(replica_checkpoint_root(root, 0))) return latest->string();
  throw ConfigError("--resume: '" + root + "' is neither a checkpoint folder (no manifest.pb) nor a root holding " +
                    "complete ckpt-<step> checkpoints");
}

void TrainConfig::validate(int world_size) const {
  model.validate();
  auto need = [](bool ok, const std::string& message) {
    if (!ok) throw ConfigError(message);
  };
  need(world_size >= 1, "train: world size must be >= 1, got " + std::to_string(world_size));
  optim::parse_state_dtype(state_dtype);  // ConfigError naming the accepted names
  if (!matrix_state_dtype.empty()) optim::parse_state_dtype(matrix_state_dtype);
  need(steps >= 1, "train: --steps must be >= 1, got " + std::to_string(steps));
  need(model_threads >= 0, "train: --model-threads must be >= 0, got " + std::to_string(model_threads));
  need(grad_accumulation >= 1, "train: --grad-accum must be >= 1, got " + std::to_string(grad_accumulation));
  need(global_batch >= 1 && global_batch % (world_size * grad_accumulation) == 0,
       "train: --batch (global batch, " + std::to_string(global_batch) + " sequences) must be a positive multiple of " +
           "ranks x grad-accum = " + std::to_string(world_size) + " x " + std::to_string(grad_accumulation) + " = " +
           std::to_string(world_size * grad_accumulation));
  need(optimizer == "muon" || optimizer == "normuon" || optimizer == "adamw" || optimizer == "lion",
       "train: --optimizer must be one of muon, normuon, adamw, lion; got '" + optimizer + "'");
  need(matrix_lr > 0 && std::isfinite(matrix_lr), "train: --matrix-lr must be > 0, got " + std::to_string(matrix_lr));
  need(elementwise_lr > 0 && std::isfinite(elementwise_lr),
       "train: --lr must be > 0, got " + std::to_string(elementwise_lr));
  need(weight_decay >= 0, "train: --weight-decay must be >= 0, got " + std::to_string(weight_decay));
  need(warmup_steps >= 0, "train: --warmup must be >= 0, got " + std::to_string(warmup_steps));
  need(min_lr_ratio >= 0 && min_lr_ratio <= 1, "train: --min-lr-ratio must be in [0, 1], got " +
                                                   std::to_string(min_lr_ratio));
  need(max_grad_norm >= 0, "train: --clip must be >= 0 (0 = off), got " + std::to_string(max_grad_norm));
  need(zero_stage >= 1 && zero_stage <= 3, "train: --stage must be 1, 2 or 3, got " + std::to_string(zero_stage));
  need(bucket_bytes > 0, "train: --bucket-bytes must be > 0, got " + std::to_string(bucket_bytes));
  need(eval_every >= 0 && eval_batches >= 1, "train: --eval-every must be >= 0 and --eval-batches >= 1");
  need(log_every >= 0 && trace_steps >= 0 && sample_chars >= 0 && sample_top_k >= 0,
       "train: --log-every, --trace-steps, --sample-chars and --sample-top-k must be >= 0");
  need(std::isfinite(sample_temperature), "train: --sample-temperature must be finite");
  need(qk_clip_tau >= 0 && std::isfinite(qk_clip_tau),
       "train: --qk-clip-tau must be >= 0 (0 = off), got " + std::to_string(qk_clip_tau));
  need(qk_clip_tau == 0 || is_matrix_optimizer(optimizer),
       "train: --qk-clip-tau (MuonClip) needs --optimizer muon or normuon, got '" + optimizer + "'");
  need(replicas >= 1 && world_size % replicas == 0,
       "train: --replicas (" + std::to_string(replicas) + ") must divide the world size (--ranks or mpirun -np, " +
           std::to_string(world_size) + "): world = replicas x shard group");
  const bool replicated = is_replicated(sync);
  need(replicated || replicas == 1, "train: --replicas " + std::to_string(replicas) +
                                        " needs --sync noloco or diloco (zero syncs every rank every step)");
  if (replicated) {
    need(outer_every >= 1, "train: --outer-every must be >= 1, got " + std::to_string(outer_every));
    need(sync == SyncMode::kDiLoCo || (gossip_group >= 1 && gossip_group <= replicas), "train: --gossip-group must be in [1, replicas = " +
                                                            std::to_string(replicas) + "], got " +
                                                            std::to_string(gossip_group));
    runtime::gossip::validate_gossip_options(gossip_options(*this), replicas);
  }
  need(save_every >= 0, "train: --save-every must be >= 0, got " + std::to_string(save_every));
  need(keep_last >= 0, "train: --keep-last must be >= 0, got " + std::to_string(keep_last));
  need(save_every == 0 || !ckpt_dir.empty(), "train: --save-every " + std::to_string(save_every) +
                                                 " needs --ckpt-dir (where to write the checkpoints)");
}

float lr_multiplier(const TrainConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps) return static_cast<float>(step) / c.warmup_steps;
  const int64_t decay_steps = c.steps - c.warmup_steps;
  if (decay_steps <= 0) return 1.0f;
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / decay_steps);
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return static_cast<float>(c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

std::string progress_line(const StepRecord& r, const TrainConfig& c, double tokens_per_second) {
  std::string line = fmt::format("step {:>5}/{}  loss {:.4f}", r.step, c.steps, r.train_loss);
  if (!std::isnan(r.val_loss)) line += fmt::format("  val {:.4f}", r.val_loss);
  line += fmt::format("  lr x{:.3f}  {:.1f}k tok/s  {:.3f} MB sent/rank/step", r.lr_multiplier,
                      tokens_per_second / 1e3, r.bytes_per_rank / 1e6);
  if (r.outer_step)
    line += fmt::format("  outer step: consensus {:.3e}, {} skipped rounds", r.consensus_distance, r.skipped_rounds);
  if (r.slowest_rank >= 0)
    line += fmt::format("  slowest rank {} ({:.2f}x median)", r.slowest_rank, r.slowest_over_median);
  if (!r.applied) line += "  (skipped: non-finite gradients)";
  return line;
}

namespace {
constexpr size_t kFlightRecords = 64;  // operations each communicator of the run remembers
TrainResult train_recorded(comm::FlightRecorder& comm, const model::ByteCorpus& corpus, const TrainConfig& config_in,
                           const TrainHooks& hooks);
}  // namespace

TrainResult train_rank(comm::Communicator& world_comm, const model::ByteCorpus& corpus, const TrainConfig& config,
                       const TrainHooks& hooks) {
  // Every communicator of the run (world, shard group, cross, gossip links) keeps its last 64
  // operations; a communication error writes them all into the run folder, then ends the run.
  comm::FlightRecorder comm(world_comm, kFlightRecords, "world");
  auto report = [&](const std::exception& e) {
    if (hooks.flight_record_dir.empty()) return std::string();
    const std::string path = flight_record_path(hooks.flight_record_dir, comm.rank());
    comm.write_report(path, "rank " + std::to_string(comm.rank()) + " of " + std::to_string(comm.size()) +
                                " ended the run: " + e.what());
    return "\nflight records of every communicator of rank " + std::to_string(comm.rank()) + ": " + path;
  };
  try {
    return train_recorded(comm, corpus, config, hooks);
  } catch (const TimeoutError& e) {
    throw TimeoutError(e.what() + report(e));
  } catch (const DesyncError& e) {
    throw DesyncError(e.what() + report(e));
  } catch (const PeerError& e) {
    throw PeerError(e.what() + report(e));
  }
}

std::string flight_record_path(const std::string& dir, int rank) {
  return (std::filesystem::path(dir) / ("flight_recorder_rank" + std::to_string(rank) + ".txt")).string();
}

namespace {

TrainResult train_recorded(comm::FlightRecorder& comm, const model::ByteCorpus& corpus, const TrainConfig& config_in,
                           const TrainHooks& hooks) {
  const int world = comm.size();
  const int rank = comm.rank();
  config_in.validate(world);
  TrainConfig config = config_in;  // a resume adopts the checkpoint's seed

  // Replicas: the engine runs on this replica's shard group, the outer sync on the cross communicator.
  runtime::gossip::ReplicaGrid grid;
  const bool replicated = is_replicated(config.sync);
  if (replicated) {
    grid = runtime::gossip::split_replica_grid(comm, config.replicas);
    // Named before OuterSync splits its links from the cross communicator (they inherit the name).
    dynamic_cast<comm::FlightRecorder&>(*grid.shard_group).rename("shard group of replica " + std::to_string(grid.replica));
    dynamic_cast<comm::FlightRecorder&>(*grid.cross).rename("cross of shard " + std::to_string(grid.shard));
  }
  comm::Communicator& engine_comm = replicated ? *grid.shard_group : comm;
  // Per-step reporting (loss, validation, straggler) joins the ranks of one replica only: replicas meet
  // at outer steps alone, so a stalled replica cannot hold the others back. The world means are formed
  // once at the end of the run.
  comm::Communicator& step_comm = engine_comm;
  const int step_ranks = step_comm.size();
  const int first_world_rank = replicated ? grid.replica * grid.shards : 0;  // of step_comm's rank 0

  model::Transformer net(config.model);
  std::optional<ThreadPool> model_pool;
  const int model_threads = config.model_threads == 0 ? default_thread_count() : config.model_threads;
  if (model_threads > 1) {
    model_pool.emplace(model_threads);
    net.set_thread_pool(&*model_pool);
  }
  // Route by what a tensor is for, not by its name: the model marks hidden matrices "muon" and the
  // rest "adamw". An element-wise-only run (adamw, lion) takes no groups: everything is element-wise.
  std::vector<proto::TensorSpec> specs = net.tensor_specs(/*route_groups=*/is_matrix_optimizer(config.optimizer));

  runtime::Engine engine(engine_comm, specs, engine_options(config));
  engine.set_params([&](size_t t, float* dst) { net.init_tensor(config.seed, t, dst); });
  const bool stage3 = config.zero_stage == 3;

  TrainResult result;
  int64_t first_step = 1;
  std::unique_ptr<runtime::gossip::OuterSync> outer;
  auto make_outer = [&] {
    outer = std::make_unique<runtime::gossip::OuterSync>(engine, *grid.cross, gossip_options(config));
  };
  // Per-replica checkpoints (replicas diverge between outer steps): <ckpt-dir>/replica-<r>/ckpt-<step>,
  // each with the replica's phi and m as extra states and the outer counters in the trainer state.
  auto outer_states = [&]() -> std::vector<runtime::MasterLikeState> {
    if (!outer) return {};
    return {{runtime::gossip::OuterSync::kPhiState, outer->phi()},
            {runtime::gossip::OuterSync::kMomentumState, outer->momentum()}};
  };
  if (!config.resume_from.empty()) {
    // A failure on one replica must reach every rank (the replicas are joined by the outer step only).
    auto agree_world = [&](std::exception_ptr fault, const std::string& what) {
      int32_t mine = fault ? 1 : 0, any = 0;
      comm.all_reduce(&mine, &any, 1, DType::kI32, comm::ReduceOp::kMax)->wait();
      if (fault) std::rethrow_exception(fault);
      if (any) throw CheckpointError("train: " + what + " failed on another replica (see its error)");
    };
    const std::string dir = replicated ? replica_checkpoint_dir(config.resume_from, grid.replica) : config.resume_from;
    runtime::TrainerState meta;
    std::exception_ptr fault;
    try {
      // Replica 0's manifest first: a replica count that differs from the saved one is named as such
      // rather than as a missing replica-<r> folder.
      meta = runtime::read_trainer_state(replicated ? replica_checkpoint_dir(config.resume_from, 0) : dir);
      if (replicated && meta.extra.count("replicas") && meta.extra.at("replicas") != std::to_string(config.replicas))
        throw ConfigError("train: checkpoint " + config.resume_from + " was written by " + meta.extra.at("replicas") +
                          " replicas; resume it with --replicas " + meta.extra.at("replicas") + " (got " +
                          std::to_string(config.replicas) + ")");
      if (dir != config.resume_from || replicated) meta = runtime::read_trainer_state(dir);
    } catch (...) {
      fault = std::current_exception();
    }
    agree_world(fault, "reading checkpoint " + dir);
    // A checkpoint of a replicated run holds phi, m and the outer counters; one of --sync zero does not
    // (then phi := theta, m := 0 after the load).
    const bool has_outer = replicated && meta.extra.count("outer_steps") > 0;
    // The pairing seed is the run's seed: adopt the saved one before the outer sync is built.
    if (has_outer) {
      config.seed = meta.seed;
      make_outer();
    }
    runtime::TrainerState saved;
    try {
      saved = runtime::load_checkpoint(engine, dir, outer_states());
    } catch (...) {
      fault = std::current_exception();
    }
    agree_world(fault, "loading checkpoint " + dir);
    if (replicated) {  // every replica resumes at the same step
      const int64_t mine[2] = {saved.data_step, -saved.data_step};
      int64_t ext[2] = {0, 0};
      comm.all_reduce(mine, ext, 2, DType::kI64, comm::ReduceOp::kMax)->wait();
      if (ext[0] != -ext[1])
        throw ConfigError("train: the replicas' checkpoints are at different steps (" + std::to_string(-ext[1]) +
                          " to " + std::to_string(ext[0]) + "): resume from a step every replica saved");
    }
    if (has_outer) {
      outer->restore_counters(std::stoll(saved.extra.at("outer_steps")), std::stoll(saved.extra.at("outer_inner_steps")),
                              std::stoll(saved.extra.at("outer_skipped")));
    }
    if (saved.data_step >= config.steps)
      throw ConfigError("train: checkpoint " + config.resume_from + " is at step " + std::to_string(saved.data_step) +
                        ", nothing left to do for --steps " + std::to_string(config.steps));
    config.seed = saved.seed;  // the data order continues where the saved run left it
    first_step = saved.data_step + 1;
    result.resumed_from = config.resume_from;
  }
  // Without saved outer state, constructed after a resume so that phi starts at the loaded theta.
  if (replicated && !outer) make_outer();

  model::SamplerConfig sc;
  sc.global_batch = config.global_batch / config.grad_accumulation;  // one micro-batch over all ranks
  sc.seq_len = config.model.context;
  sc.seed = config.seed;
  sc.rank = rank;
  sc.world = world;
  model::BatchSampler sampler(corpus, sc);
  model::TokenBatch batch = sampler.make_batch();
  model::TokenBatch val_batch = sampler.make_batch();
  net.reserve(batch.batch, batch.seq_len);

  // The model reads parameters through bindings and asks the engine for each gradient's buffer right
  // before writing it (with ZeRO-2 gradients that buffer exists only while its bucket fills).
  std::vector<model::ParamBinding> bindings(specs.size());
  auto bind = [&] {
    for (size_t t = 0; t < specs.size(); ++t) bindings[t] = {engine.param(t), nullptr};
  };
  const model::GradReadyFn announce = [&engine](size_t t) { engine.grad_ready(t); };
  const model::GradBufferFn grad_buffer = [&engine](size_t t) { return engine.grad(t); };

  std::vector<float> my_losses, my_val_losses;  // this rank's own values, for the world means at the end
  auto evaluate = [&]() -> double {
    if (stage3) engine.gather_all();
    bind();
    const double local = model::validation_loss(net, bindings, sampler, config.eval_batches, val_batch);
    if (stage3) engine.release_all();
    // Every rank scores the same number of tokens, so the mean of rank means is the global mean
    // (here over step_comm: this replica's mean with replicas; the world mean is formed at the end).
    float send = static_cast<float>(local), recv = 0;
    my_val_losses.push_back(send);
    step_comm.all_reduce(&send, &recv, 1, DType::kF32, comm::ReduceOp::kAvg)->wait();
    return recv;
  };

  result.world_size = world;
  result.first_step = first_step;
  result.rank = rank;
  result.num_params = net.num_params();
  result.history.reserve(config.steps);
  const int64_t tokens_per_step = int64_t{config.global_batch} * config.model.context;
  const auto run_start = clock::now();
  auto& trace = engine.trace();

  // Bytes this rank sent: the engine's communicator plus, with replicas, the outer step's (cross
  // communicator and links). Counted from step end to step end, so the outer step's parameter refresh
  // (an all-gather in the shard group) belongs to the outer step, not to the next step. The consensus
  // distance's collectives are logging, not training traffic: left out.
  uint64_t logging_bytes_sent = 0;
  auto bytes_sent_so_far = [&] {
    uint64_t sent = engine_comm.counters().total_sent();
    if (outer) sent += outer->outer_traffic().total_sent();
    return sent - logging_bytes_sent;
  };
  uint64_t sent_at_last_step = bytes_sent_so_far();
  std::vector<double> my_step_seconds, seconds_by_rank(static_cast<size_t>(step_ranks));
  std::vector<float> loss_and_seconds(2 * static_cast<size_t>(step_ranks));
  const std::vector<size_t> two_per_rank(static_cast<size_t>(step_ranks), 2);

  // Per layer and head, max attention logit over this step's micro-batches (QK-clip input).
  const int n_layer = config.model.n_layer, n_head = config.model.n_head;
  std::vector<float> step_max_logits(static_cast<size_t>(n_layer * n_head));

  for (int64_t step = first_step; step <= config.steps; ++step) {
    trace.enable(config.trace_steps > 0 && step > config.steps - config.trace_steps);
    const auto step_start = clock::now();
    if (stage3) engine.gather_all();
    bind();
    double loss_sum = 0;
    const auto compute_start = clock::now();
    if (hooks.before_step) hooks.before_step(rank, step);
    for (int k = 0; k < config.grad_accumulation; ++k) {
      sampler.train_batch((step - 1) * config.grad_accumulation + k, batch);
      {
        runtime::TraceRecorder::Span span(trace, "forward", "compute");
        loss_sum += net.forward(bindings, batch.inputs.data(), batch.targets.data(), batch.batch, batch.seq_len);
      }
      const auto logits = net.max_attn_logits();
      for (size_t i = 0; i < step_max_logits.size(); ++i)
        step_max_logits[i] = k == 0 ? logits[i] : std::max(step_max_logits[i], logits[i]);
      runtime::TraceRecorder::Span span(trace, "backward", "compute");
      // Every micro-batch announces its gradients; bucket reductions start while backward continues
      // through earlier layers (full local buffers: in the last micro-batch only). With full
      // buffers, later micro-batches add to what earlier ones left.
      const auto mode = engine.grad_accumulates(0) ? model::GradMode::kAccumulate : model::GradMode::kOverwrite;
      net.backward(bindings, mode, announce, grad_buffer);
    }
    // Forward + backward of this rank, less the time backward blocked on earlier buckets' reductions
    // (ZeRO-2's buffer pool): that wait belongs to the slowest rank, not to this one.
    const double step_compute_seconds = seconds_since(compute_start) - engine.backward_reduce_wait_seconds();
    result.compute_seconds += step_compute_seconds;
    if (stage3) engine.release_all();

    if (engine.qk_clip_enabled())
      for (int l = 0; l < n_layer; ++l) {
        const model::LayerParamIndex li = net.layer_index(l);
        engine.set_attention_max_logits(li.w_q, li.w_k,
                                        std::span<const float>(step_max_logits).subspan(static_cast<size_t>(l * n_head),
                                                                                        static_cast<size_t>(n_head)));
      }

    StepRecord record;
    record.step = step;
    record.lr_multiplier = lr_multiplier(config, step);
    const SyncOutcome synced =
        sync_step(config.sync, engine, outer.get(), step, static_cast<float>(record.lr_multiplier));
    const runtime::StepReport& report = synced.report;
    // One all-gather of [loss, compute seconds]: the mean loss and the straggler report. The straggler
    // signal is forward + backward, the part each rank does alone (the others' wait for a straggler
    // lands in their sync time, which would make every rank look equally slow).
    const float mine[2] = {static_cast<float>(loss_sum / config.grad_accumulation),
                           static_cast<float>(step_compute_seconds)};
    my_step_seconds.push_back(mine[1]);
    my_losses.push_back(mine[0]);
    step_comm.all_gather(mine, loss_and_seconds.data(), two_per_rank, DType::kF32)->wait();
    double loss_total = 0;
    for (int r = 0; r < step_ranks; ++r) {
      loss_total += loss_and_seconds[2 * r];
      seconds_by_rank[r] = loss_and_seconds[2 * r + 1];
    }
    record.train_loss = static_cast<float>(loss_total / step_ranks);
    {
      std::vector<double> sorted = seconds_by_rank;
      std::sort(sorted.begin(), sorted.end());
      const double median = 0.5 * (sorted[(step_ranks - 1) / 2] + sorted[step_ranks / 2]);
      const auto slowest = std::max_element(seconds_by_rank.begin(), seconds_by_rank.end()) - seconds_by_rank.begin();
      if (step_ranks > 1 && median > 0 && seconds_by_rank[slowest] > 1.2 * median) {
        record.slowest_rank = first_world_rank + static_cast<int>(slowest);
        record.slowest_over_median = seconds_by_rank[slowest] / median;
      }
    }
    record.applied = report.applied;
    const std::vector<float>& max_logits =
        report.attention_max_logits.empty() ? step_max_logits : report.attention_max_logits;
    record.max_attention_logit = *std::max_element(max_logits.begin(), max_logits.end());
    record.qk_clipped_heads = report.qk_clipped_heads;
    record.grad_norm = report.grad_norm;
    logging_bytes_sent += synced.logging_bytes_sent;
    const uint64_t sent_now = bytes_sent_so_far();
    record.bytes_per_rank = sent_now - sent_at_last_step;
    sent_at_last_step = sent_now;
    record.outer_step = synced.outer_step;
    record.consensus_distance = synced.consensus_distance;
    if (synced.outer_step) result.final_consensus_distance = synced.consensus_distance;
    record.skipped_rounds = outer ? outer->skipped_rounds() : 0;
    record.tokens = step * tokens_per_step;
    const auto& pt = report.times;
    auto& sum = result.phase_seconds;
    sum.reduce_wait += pt.reduce_wait;
    sum.check += pt.check;
    sum.elementwise += pt.elementwise;
    sum.matrix += pt.matrix;
    sum.dim0_exchange += pt.dim0_exchange;
    sum.gather += pt.gather;
    sum.total += pt.total;
    const bool eval_now = step == config.steps || (config.eval_every > 0 && step % config.eval_every == 0);
    if (eval_now) record.val_loss = evaluate();
    record.seconds = seconds_since(step_start);
    if (config.save_every > 0 && step % config.save_every == 0) {
      runtime::TrainerState state;
      state.seed = config.seed;
      state.data_step = step;
      state.extra["sync"] = sync_mode_name(config.sync);
      std::string root = config.ckpt_dir;
      if (outer) {
        root = replica_checkpoint_root(config.ckpt_dir, grid.replica);
        state.extra["replicas"] = std::to_string(config.replicas);
        state.extra["outer_steps"] = std::to_string(outer->outer_steps());
        state.extra["outer_inner_steps"] = std::to_string(outer->inner_steps_since_outer());
        state.extra["outer_skipped"] = std::to_string(outer->skipped_rounds());
      }
      const auto saved =
          runtime::save_checkpoint(engine, root, state, {.keep_last = config.keep_last}, outer_states());
      if (rank == 0) result.saved_checkpoints.push_back(saved.dir.string());
    }
    result.history.push_back(record);
    trace.keep_last_steps(static_cast<size_t>(config.trace_steps));
    if (rank == 0 && hooks.on_step) hooks.on_step(record, config);
  }
  result.total_seconds = seconds_since(run_start);
  result.tokens_per_second =
      static_cast<double>((config.steps - first_step + 1) * tokens_per_step) / result.total_seconds;
  result.skipped_rounds = outer ? outer->skipped_rounds() : 0;
  if (replicated) {
    // The world means of the per-step losses (each record holds its replica's mean until here): one
    // all-gather of every rank's own train losses and validation losses over the run.
    const size_t steps_run = my_losses.size(), evals = my_val_losses.size();
    std::vector<float> mine(my_losses);
    mine.insert(mine.end(), my_val_losses.begin(), my_val_losses.end());
    std::vector<float> all(mine.size() * static_cast<size_t>(world));
    comm.all_gather(mine.data(), all.data(), std::vector<size_t>(static_cast<size_t>(world), mine.size()), DType::kF32)
        ->wait();
    size_t eval_index = 0;
    for (size_t k = 0; k < steps_run; ++k) {
      StepRecord& rec = result.history[k];
      double total = 0;
      for (int r = 0; r < world; ++r) total += all[static_cast<size_t>(r) * mine.size() + k];
      rec.train_loss = static_cast<float>(total / world);
      if (std::isnan(rec.val_loss)) continue;
      double val = 0;
      for (int r = 0; r < world; ++r) val += all[static_cast<size_t>(r) * mine.size() + steps_run + eval_index];
      rec.val_loss = static_cast<float>(val / world);
      ++eval_index;
    }
    if (eval_index != evals) throw Error("train: validation losses do not match the evaluated steps");
    // NoLoCo's per-round distances are to each group's mean; the run ends with the global one.
    if (outer->options().mode == runtime::gossip::SyncMode::kNoLoCo)
      result.final_consensus_distance = outer->consensus_distance();
  }
  result.final_val_loss = result.history.back().val_loss;
  trace.enable(false);

  // Every rank's per-step compute-time percentiles (nearest rank), all-gathered.
  {
    std::vector<double> sorted = my_step_seconds;
    std::sort(sorted.begin(), sorted.end());
    auto pct = [&](double q) {
      const auto k = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
      return sorted[std::min(sorted.size() - 1, k == 0 ? 0 : k - 1)];
    };
    const float mine[3] = {static_cast<float>(pct(0.5)), static_cast<float>(pct(0.9)), static_cast<float>(sorted.back())};
    std::vector<float> all(3 * static_cast<size_t>(world));
    comm.all_gather(mine, all.data(), std::vector<size_t>(static_cast<size_t>(world), 3), DType::kF32)->wait();
    for (int r = 0; r < world; ++r) result.step_compute_seconds_by_rank.push_back({all[3 * r], all[3 * r + 1], all[3 * r + 2]});
  }

  // Every rank's memory, all-gathered as int64 fields (same layout on every rank).
  result.memory = engine.memory();
  {
    const auto& m = result.memory;
    const int64_t mine[8] = {m.param_bytes,  m.grad_buffer_bytes, m.grad_shard_bytes, m.master_bytes,
                             m.state_bytes,  m.exchange_bytes,    m.workspace_bytes,
                             static_cast<int64_t>(std::llround(m.formula_optimizer_bytes))};
    std::vector<int64_t> all(8 * static_cast<size_t>(world));
    std::vector<size_t> counts(world, 8);
    comm.all_gather(mine, all.data(), counts, DType::kI64)->wait();
    result.memory_by_rank.resize(world);
    for (int r = 0; r < world; ++r) {
      const int64_t* v = all.data() + 8 * r;
      auto& out = result.memory_by_rank[r];
      out.param_bytes = v[0];
      out.grad_buffer_bytes = v[1];
      out.grad_shard_bytes = v[2];
      out.master_bytes = v[3];
      out.state_bytes = v[4];
      out.exchange_bytes = v[5];
      out.workspace_bytes = v[6];
      out.formula_optimizer_bytes = static_cast<double>(v[7]);
    }
  }

  if (config.sample_chars > 0 || hooks.keep_params) {
    if (stage3) engine.gather_all();  // collective: every rank takes part even if only rank 0 samples
    bind();
    if (config.sample_chars > 0 && rank == 0) {
      model::GenerateOptions go;
      go.max_new_tokens = config.sample_chars;
      go.temperature = config.sample_temperature;
      go.top_k = config.sample_top_k;
      go.seed = config.seed;
      result.sample = model::generate(net, bindings, "ROMEO:", go);
    }
    if (hooks.keep_params) {
      result.final_params.resize(specs.size());
      for (size_t t = 0; t < specs.size(); ++t)
        result.final_params[t].assign(engine.param(t), engine.param(t) + net.params()[t].numel());
    }
    if (stage3) engine.release_all();
  }
  result.trace = engine.trace();
  return result;
}

}  // namespace
}  // namespace shardopt::train
