#include "runtime/train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>
#include <sstream>

#include <fmt/format.h>

#include "base/error.h"
#include "model/generate.h"
#include "optim/config.h"
#include "sharding/routing.h"

namespace shardopt::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool is_matrix_optimizer(const std::string& name) { return name == "muon" || name == "normuon"; }

// One function per sync mode; sync_step dispatches. A gossip mode would keep its own state here.
runtime::StepReport sync_zero(runtime::Engine& engine, float lr_multiplier) { return engine.step(lr_multiplier); }

runtime::StepReport sync_step(SyncMode mode, runtime::Engine& engine, float lr_multiplier) {
  switch (mode) {
    case SyncMode::kZero:
      return sync_zero(engine, lr_multiplier);
  }
  throw ConfigError("sync_step: unknown sync mode " + std::to_string(static_cast<int>(mode)));
}

runtime::EngineOptions engine_options(const TrainConfig& c) {
  runtime::EngineOptions o;
  o.zero_stage = c.zero_stage;
  o.layout = c.layout;
  o.bucket_bytes = c.bucket_bytes;
  o.max_grad_norm = c.max_grad_norm;
  o.grad_accumulation_steps = c.grad_accumulation;
  o.overlap = true;
  if (is_matrix_optimizer(c.optimizer)) {
    o.matrix_optimizer.set_kind(optim::parse_optimizer_kind(c.optimizer));
    o.matrix_optimizer.set_lr(c.matrix_lr);
    o.matrix_optimizer.set_weight_decay(c.weight_decay);
    o.elementwise_optimizer.set_kind(proto::OPTIMIZER_ADAMW);
  } else {
    o.elementwise_optimizer.set_kind(optim::parse_optimizer_kind(c.optimizer));
  }
  o.elementwise_optimizer.set_lr(c.elementwise_lr);
  o.elementwise_optimizer.set_weight_decay(c.weight_decay);
  return o;
}

}  // namespace

std::string sync_mode_name(SyncMode mode) {
  switch (mode) {
    case SyncMode::kZero:
      return "zero";
  }
  return "unknown";
}

SyncMode parse_sync_mode(const std::string& name) {
  if (name == "zero") return SyncMode::kZero;
  throw ConfigError("--sync: expected one of {zero}, got '" + name + "'");
}

void TrainConfig::validate(int world_size) const {
  model.validate();
  auto need = [](bool ok, const std::string& message) {
    if (!ok) throw ConfigError(message);
  };
  need(world_size >= 1, "train: world size must be >= 1, got " + std::to_string(world_size));
  need(steps >= 1, "train: --steps must be >= 1, got " + std::to_string(steps));
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
  need(log_every >= 0 && trace_steps >= 0 && sample_tokens >= 0,
       "train: --log-every, --trace-steps and --sample-tokens must be >= 0");
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
  if (!r.applied) line += "  (skipped: non-finite gradients)";
  return line;
}

TrainResult train_rank(comm::Communicator& comm, const model::ByteCorpus& corpus, const TrainConfig& config,
                       const TrainHooks& hooks) {
  const int world = comm.size();
  const int rank = comm.rank();
  config.validate(world);

  model::Transformer net(config.model);
  // Route by what a tensor is for, not by its name: the model marks hidden matrices "muon" and the
  // rest "adamw". An element-wise-only run (adamw, lion) takes no groups: everything is element-wise.
  const bool matrix_optimizer = config.optimizer == "muon" || config.optimizer == "normuon";
  std::vector<proto::TensorSpec> specs = net.tensor_specs(/*route_groups=*/matrix_optimizer);

  runtime::Engine engine(comm, specs, engine_options(config));
  engine.set_params([&](size_t t, float* dst) { net.init_tensor(config.seed, t, dst); });
  const bool stage3 = config.zero_stage == 3;

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

  std::vector<model::ParamBinding> bindings(specs.size());
  auto bind = [&] {
    for (size_t t = 0; t < specs.size(); ++t) bindings[t] = {engine.param(t), engine.grad(t)};
  };
  const model::GradReadyFn announce = [&engine](size_t t) { engine.grad_ready(t); };

  auto evaluate = [&]() -> double {
    if (stage3) engine.gather_all();
    bind();
    const double local = model::validation_loss(net, bindings, sampler, config.eval_batches, val_batch);
    if (stage3) engine.release_all();
    // Every rank scores the same number of tokens, so the mean of rank means is the global mean.
    float send = static_cast<float>(local), recv = 0;
    comm.all_reduce(&send, &recv, 1, proto::F32, comm::ReduceOp::kAvg)->wait();
    return recv;
  };

  TrainResult result;
  result.world_size = world;
  result.rank = rank;
  result.num_params = net.num_params();
  result.history.reserve(config.steps);
  const int64_t tokens_per_step = int64_t{config.global_batch} * config.model.context;
  const auto run_start = Clock::now();
  auto& trace = engine.trace();

  for (int64_t step = 1; step <= config.steps; ++step) {
    trace.enable(config.trace_steps > 0 && step > config.steps - config.trace_steps);
    const auto step_start = Clock::now();
    if (stage3) engine.gather_all();
    bind();
    double loss_sum = 0;
    const auto compute_start = Clock::now();
    for (int k = 0; k < config.grad_accumulation; ++k) {
      sampler.train_batch((step - 1) * config.grad_accumulation + k, batch);
      {
        runtime::TraceRecorder::Span span(trace, "forward", "compute");
        loss_sum += net.forward(bindings, batch.inputs.data(), batch.targets.data(), batch.batch, batch.seq_len);
      }
      const bool last = k + 1 == config.grad_accumulation;
      runtime::TraceRecorder::Span span(trace, "backward", "compute");
      // Only the last micro-batch's gradients are final: announce those (bucket reductions start
      // while backward continues through earlier layers).
      net.backward(bindings, k == 0 ? model::GradMode::kOverwrite : model::GradMode::kAccumulate,
                   last ? announce : model::GradReadyFn{});
    }
    result.compute_seconds += seconds_since(compute_start);
    if (stage3) engine.release_all();

    StepRecord record;
    record.step = step;
    record.lr_multiplier = lr_multiplier(config, step);
    const runtime::StepReport report = sync_step(config.sync, engine, static_cast<float>(record.lr_multiplier));
    float local_loss = static_cast<float>(loss_sum / config.grad_accumulation), mean_loss = 0;
    comm.all_reduce(&local_loss, &mean_loss, 1, proto::F32, comm::ReduceOp::kAvg)->wait();
    record.train_loss = mean_loss;
    record.applied = report.applied;
    record.grad_norm = report.grad_norm;
    record.bytes_per_rank = report.traffic.total_sent();
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
    result.history.push_back(record);
    trace.keep_last_steps(static_cast<size_t>(config.trace_steps));
    if (rank == 0 && hooks.on_step) hooks.on_step(record, config);
  }
  result.total_seconds = seconds_since(run_start);
  result.tokens_per_second = static_cast<double>(config.steps * tokens_per_step) / result.total_seconds;
  result.final_val_loss = result.history.back().val_loss;
  trace.enable(false);

  // Every rank's memory, all-gathered as int64 fields (same layout on every rank).
  result.memory = engine.memory();
  {
    const auto& m = result.memory;
    const int64_t mine[8] = {m.param_bytes,  m.grad_buffer_bytes, m.grad_shard_bytes, m.master_bytes,
                             m.state_bytes,  m.exchange_bytes,    m.workspace_bytes,
                             static_cast<int64_t>(std::llround(m.formula_optimizer_bytes))};
    std::vector<int64_t> all(8 * static_cast<size_t>(world));
    std::vector<size_t> counts(world, 8);
    comm.all_gather(mine, all.data(), counts, proto::I64)->wait();
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

  if (config.sample_tokens > 0 || hooks.keep_params) {
    if (stage3) engine.gather_all();  // collective: every rank takes part even if only rank 0 samples
    bind();
    if (config.sample_tokens > 0 && rank == 0) {
      model::GenerateOptions go;
      go.max_new_tokens = config.sample_tokens;
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

}  // namespace shardopt::train
