#include "runtime/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/muon.h"
#include "proto/dtype_convert.h"
#include "proto/runtime.pb.h"
#include "sharding/plan_util.h"
#include "sharding/planner.h"

namespace shardopt::runtime {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

bool uses_matrix_optimizer(const EngineOptions& o) {
  return o.matrix_optimizer.kind() != proto::OPTIMIZER_KIND_UNSPECIFIED;
}

proto::OptimizerConfig elementwise_config(const EngineOptions& o) {
  proto::OptimizerConfig c = o.elementwise_optimizer;
  if (c.kind() == proto::OPTIMIZER_KIND_UNSPECIFIED) c.set_kind(proto::OPTIMIZER_ADAMW);
  return optim::with_defaults(c);
}

// Everything ranks must agree on, as one message: hashed at init, diffed on mismatch.
proto::EngineConfig engine_config(const proto::PlanRequest& request, const EngineOptions& o) {
  proto::EngineConfig c;
  *c.mutable_plan_request() = request;
  if (uses_matrix_optimizer(o)) *c.mutable_matrix_optimizer() = optim::with_defaults(o.matrix_optimizer);
  *c.mutable_elementwise_optimizer() = elementwise_config(o);
  c.set_max_grad_norm(o.max_grad_norm);
  c.set_grad_accumulation_steps(o.grad_accumulation_steps);
  return c;
}

}  // namespace

proto::PlanRequest make_engine_plan_request(const std::vector<proto::TensorSpec>& params, int world_size,
                                            const EngineOptions& o) {
  proto::PlanRequest r = sharding::make_plan_request(params, world_size, o.zero_stage, o.layout, o.bucket_bytes);
  *r.mutable_routing() = o.routing;
  r.set_memory_cap_bytes(o.memory_cap_bytes);
  const bool matrices = uses_matrix_optimizer(o);
  if (!matrices) r.mutable_routing()->set_elementwise_only(true);
  // State bytes per parameter for the plan's ZeRO arithmetic: fp32 master + fp32 state values.
  const auto ew = optim::resolve_optimizer_config(elementwise_config(o));
  r.set_elementwise_state_bytes_per_param(4.0 + 4.0 * optim::state_values_per_element(ew));
  if (matrices) {
    const auto mx = optim::resolve_optimizer_config(o.matrix_optimizer);
    r.set_muon_state_bytes_per_param(4.0 + 4.0 * optim::state_values_per_element(mx));
  }
  return r;
}

Engine::Engine(comm::Communicator& comm, std::vector<proto::TensorSpec> params, EngineOptions options)
    : comm_(comm), specs_(std::move(params)), options_(std::move(options)) {
  if (options_.grad_accumulation_steps < 1)
    throw ConfigError("grad_accumulation_steps must be >= 1, got " + std::to_string(options_.grad_accumulation_steps));
  if (!(options_.max_grad_norm >= 0)) throw ConfigError("max_grad_norm must be >= 0");
  for (const auto& s : specs_)
    if (s.dtype() != proto::F32)
      throw ConfigError("Engine: tensor '" + s.name() + "' has dtype " + std::string(dtype_name(s.dtype())) +
                        "; the engine's parameter buffers are f32");
  if (uses_matrix_optimizer(options_)) {
    const auto kind = options_.matrix_optimizer.kind();
    if (kind != proto::OPTIMIZER_MUON && kind != proto::OPTIMIZER_NORMUON)
      throw ConfigError("matrix_optimizer must be muon or normuon, got " + optim::optimizer_kind_name(kind));
  }
  verify_same_config_on_all_ranks();

  const proto::PlanRequest request = make_engine_plan_request(specs_, comm_.size(), options_);
  proto::ShardPlan plan = sharding::make_plan(request);
  elementwise_params_ = optim::resolve_optimizer_config(elementwise_config(options_));
  if (elementwise_params_.is_matrix_optimizer())
    throw ConfigError("elementwise_optimizer must be adamw, lion or sgd");
  if (uses_matrix_optimizer(options_)) {
    matrix_params_ = optim::resolve_optimizer_config(options_.matrix_optimizer);
    matrix_params_owner_dim0_ = matrix_params_;
    matrix_params_owner_dim0_->weight_decay = 0;
  }
  state_ = std::make_unique<ShardState>(std::move(plan), comm_.rank(), matrix_params_ ? &*matrix_params_ : nullptr,
                                        elementwise_params_);

  pending_in_bucket_.assign(state_->num_buckets(), 0);
  reductions_.assign(state_->num_buckets(), nullptr);
  for (int b = 0; b < state_->num_buckets(); ++b) pending_in_bucket_[b] = state_->plan().buckets(b).tensors_size();
  check_buffer_.assign(specs_.size() + 1, 0.0f);
  traffic_at_last_step_ = comm_.counters();
}

Engine::~Engine() {
  // Never leave a reduction writing into freed buffers.
  for (auto& w : reductions_) {
    if (!w) continue;
    try {
      w->wait();
    } catch (...) {
    }
  }
}

void Engine::verify_same_config_on_all_ranks() {
  const proto::PlanRequest request = make_engine_plan_request(specs_, comm_.size(), options_);
  const proto::EngineConfig mine = engine_config(request, options_);
  const auto hash = static_cast<int64_t>(sharding::stable_hash(mine));
  const int n = comm_.size();
  std::vector<int64_t> hashes(n, 0);
  std::vector<size_t> ones(n, 1);
  comm_.all_gather(&hash, hashes.data(), ones, DType::kI64)->wait();
  if (std::all_of(hashes.begin(), hashes.end(), [&](int64_t h) { return h == hashes[0]; })) return;

  // Show the difference against rank 0's configuration on every rank.
  std::string bytes = sharding::deterministic_bytes(mine);
  int64_t size = static_cast<int64_t>(bytes.size());
  comm_.broadcast(&size, 1, DType::kI64, 0)->wait();
  std::string root(static_cast<size_t>(size), '\0');
  if (comm_.rank() == 0) root = bytes;
  comm_.broadcast(root.data(), root.size(), DType::kU8, 0)->wait();
  proto::EngineConfig theirs;
  theirs.ParseFromString(root);
  std::string differing;
  for (int r = 0; r < n; ++r)
    if (hashes[r] != hashes[0]) differing += (differing.empty() ? "" : ",") + std::to_string(r);
  std::string diff = sharding::describe_difference(theirs, mine);
  throw ConfigError("ranks disagree on the engine configuration (ranks differing from rank 0: " + differing +
                    "); rank " + std::to_string(comm_.rank()) + " vs rank 0: " +
                    (diff.empty() ? std::string("same as rank 0") : diff));
}

float* Engine::param(size_t t) {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  return state_->param(t);
}

float* Engine::grad(size_t t) {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  return state_->grad(t);
}

void Engine::set_params(const std::function<void(size_t, float*)>& fill) {
  int64_t largest = 0;
  for (const auto& t : plan().tensors()) largest = std::max(largest, t.numel());
  std::vector<float> full(static_cast<size_t>(largest));
  const bool resident = state_->stage() <= 2;
  for (size_t t = 0; t < specs_.size(); ++t) {
    fill(t, full.data());
    for (const auto& p : plan().tensors(static_cast<int>(t)).pieces()) {
      if (p.rank() != comm_.rank()) continue;
      const int64_t seg_off = p.bucket_offset() - state_->my_segment(p.bucket()).offset();
      std::memcpy(state_->master_shard(p.bucket()) + seg_off, full.data() + p.tensor_offset(),
                  sizeof(float) * static_cast<size_t>(p.length()));
    }
    if (resident) {
      if (state_->dim0()) {
        std::memcpy(state_->param(t), full.data(), sizeof(float) * static_cast<size_t>(plan().tensors(t).numel()));
        for (const auto& p : plan().tensors(static_cast<int>(t)).pieces())
          std::memcpy(state_->bucket_params(p.bucket()) + p.bucket_offset(), full.data() + p.tensor_offset(),
                      sizeof(float) * static_cast<size_t>(p.length()));
      } else {
        std::memcpy(state_->param(t), full.data(), sizeof(float) * static_cast<size_t>(plan().tensors(t).numel()));
      }
    }
  }
}

void Engine::set_optimizer_step(int64_t step) {
  if (step < 0) throw ConfigError("set_optimizer_step: step must be >= 0, got " + std::to_string(step));
  step_ = step;
}

void Engine::grad_ready(size_t t) {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  const int b = bucket_of(t);
  if (--pending_in_bucket_[b] == 0 && options_.overlap) launch_reduction(b);
  if (pending_in_bucket_[b] < 0)
    throw ConfigError("grad_ready called twice for tensor '" + specs_[t].name() + "' in one step");
}

void Engine::launch_reduction(int b) {
  TraceRecorder::Span span(trace_, "reduce launch b" + std::to_string(b), "comm");
  if (state_->dim0()) state_->copy_in_grads(b);
  // Every stage reduce-scatters: only the owner of a segment needs its reduced gradient, and the
  // parameters come back by all-gather (2Ψ(N-1)/N per rank, the ZeRO arithmetic for stages 1-3).
  reductions_[b] = comm_.reduce_scatter(state_->bucket_grads(b), state_->grad_shard(b), state_->segment_counts(b),
                                        DType::kF32, comm::ReduceOp::kAvg);
}

void Engine::wait_reductions() {
  // Buckets whose tensors were never announced (no overlap, or a trainer that skips grad_ready)
  // are reduced now, in bucket order, the same on every rank.
  for (int b = 0; b < state_->num_buckets(); ++b)
    if (!reductions_[b]) launch_reduction(b);
  for (int b = 0; b < state_->num_buckets(); ++b) {
    TraceRecorder::Span span(trace_, "reduce wait b" + std::to_string(b), "comm");
    reductions_[b]->wait();
    reductions_[b].reset();
    pending_in_bucket_[b] = plan().buckets(b).tensors_size();
  }
}

// Counts non-finite values per tensor and the squared norm over my pieces, combines them across
// ranks with one all-reduce, then clips. Returns false (step skipped everywhere) on NaN/Inf.
bool Engine::check_and_clip(StepReport& report) {
  TraceRecorder::Span span(trace_, "check+clip", "compute");
  std::fill(check_buffer_.begin(), check_buffer_.end(), 0.0f);
  double sumsq = 0;
  for (const LocalPiece& p : state_->my_pieces()) {
    const float* g = state_->grad_shard(p.bucket) + p.segment_offset;
    int64_t bad = 0;
    double s = 0;
    for (int64_t i = 0; i < p.length; ++i) {
      const float v = g[i];
      if (!std::isfinite(v)) ++bad;
      else s += static_cast<double>(v) * v;
    }
    if (bad) check_buffer_[static_cast<size_t>(p.tensor)] += 1.0f;
    sumsq += s;
  }
  check_buffer_.back() = static_cast<float>(sumsq);
  comm_.all_reduce(check_buffer_.data(), check_buffer_.data(), check_buffer_.size(), DType::kF32,
                   comm::ReduceOp::kSum)
      ->wait();
  for (size_t t = 0; t < specs_.size(); ++t)
    if (check_buffer_[t] != 0.0f) report.nonfinite_tensors.push_back(specs_[t].name());
  if (!report.nonfinite_tensors.empty()) return false;

  const double divisor = options_.grad_accumulation_steps;
  report.grad_norm = std::sqrt(static_cast<double>(check_buffer_.back())) / divisor;
  double scale = 1.0 / divisor;
  if (options_.max_grad_norm > 0 && report.grad_norm > options_.max_grad_norm)
    scale *= options_.max_grad_norm / (report.grad_norm + 1e-6);
  if (scale != 1.0) {
    const auto s = static_cast<float>(scale);
    for (int b = 0; b < state_->num_buckets(); ++b) {
      float* g = state_->grad_shard(b);
      const int64_t n = state_->my_segment(b).count();
      for (int64_t i = 0; i < n; ++i) g[i] *= s;
    }
  }
  return true;
}

void Engine::update_matrices_owned(float lr_multiplier) {
  const optim::OptimizerParams& mx = *matrix_params_;
  for (OwnedMatrix& om : state_->owned_matrices()) {
    TraceRecorder::Span span(trace_, "muon " + specs_[static_cast<size_t>(om.tensor)].name(), "compute");
    optim::muon_step(mx, om.matrix, mx.lr * lr_multiplier, state_->muon_workspace());
  }
}

// Row shards of every Muon gradient go to the owner (all-to-all); the owner computes the update
// -lr*s*O on the whole matrix (weight decay 0 there) and sends row shards of it back; every rank
// then applies W = W(1 - lr wd) + delta to its own rows.
void Engine::update_matrices_dim0(float lr_multiplier, PhaseTimes& times) {
  const optim::OptimizerParams& mx = *matrix_params_owner_dim0_;
  const float lr = matrix_params_->lr * lr_multiplier;
  const float wd = matrix_params_->weight_decay;
  const auto& send_counts = state_->dim0_send_counts();
  const auto& recv_counts = state_->dim0_recv_counts();

  auto t0 = Clock::now();
  state_->dim0_pack_grads();
  comm_.all_to_all(state_->dim0_send_buffer(), send_counts, state_->dim0_recv_buffer(), recv_counts, DType::kF32)->wait();
  state_->dim0_unpack_to_owned();
  times.dim0_exchange += seconds_since(t0);

  t0 = Clock::now();
  for (OwnedMatrix& om : state_->owned_matrices()) {
    TraceRecorder::Span span(trace_, "muon " + specs_[static_cast<size_t>(om.tensor)].name(), "compute");
    optim::muon_step(mx, om.matrix, lr, state_->muon_workspace());
  }
  times.matrix += seconds_since(t0);

  t0 = Clock::now();
  state_->dim0_pack_updates();
  comm_.all_to_all(state_->dim0_recv_buffer(), recv_counts, state_->dim0_send_buffer(), send_counts, DType::kF32)->wait();
  state_->dim0_apply_updates(lr, wd);
  times.dim0_exchange += seconds_since(t0);
}

void Engine::set_attention_max_logits(size_t tensor_q, size_t tensor_k, std::span<const float> per_head_max) {
  SHARDOPT_ASSERT(tensor_q < specs_.size() && tensor_k < specs_.size(), "tensor index out of range");
  for (size_t t : {tensor_q, tensor_k}) {
    const auto& s = specs_[t];
    if (s.shape_size() != 2 || per_head_max.empty() || s.shape(0) % static_cast<int64_t>(per_head_max.size()) != 0)
      throw ConfigError("set_attention_max_logits: tensor '" + s.name() + "' must be 2-D with rows divisible by " +
                        std::to_string(per_head_max.size()) + " heads");
  }
  auto it = std::find_if(qk_pairs_.begin(), qk_pairs_.end(),
                         [&](const QkPair& p) { return p.tensor_q == tensor_q && p.tensor_k == tensor_k; });
  if (it == qk_pairs_.end()) {
    qk_pairs_.push_back({tensor_q, tensor_k, qk_logits_.size(), per_head_max.size(), false});
    qk_logits_.resize(qk_logits_.size() + per_head_max.size());
    qk_q_factors_.resize(qk_logits_.size());
    qk_k_factors_.resize(qk_logits_.size());
    it = qk_pairs_.end() - 1;
  }
  if (it->heads != per_head_max.size())
    throw ConfigError("set_attention_max_logits: pair ('" + specs_[tensor_q].name() + "', '" + specs_[tensor_k].name() +
                      "') was registered with " + std::to_string(it->heads) + " heads, now " +
                      std::to_string(per_head_max.size()));
  std::copy(per_head_max.begin(), per_head_max.end(), qk_logits_.begin() + static_cast<std::ptrdiff_t>(it->offset));
  it->set_this_step = true;
}

// After the optimizer updates, before the parameter gather: the clip scales fp32 master rows, and
// every rank scales the pieces of W_q / W_k it holds (owned layout: the owner's whole matrix; dim0:
// each holder's rows, so the owner's update and the clip reach every row without extra traffic).
void Engine::apply_qk_clip(StepReport& report) {
  TraceRecorder::Span span(trace_, "qk-clip", "compute");
  comm_.all_reduce(qk_logits_.data(), qk_logits_.data(), qk_logits_.size(), DType::kF32, comm::ReduceOp::kMax)->wait();
  report.attention_max_logits = qk_logits_;
  const auto tau = static_cast<float>(matrix_params_->qk_clip_tau);
  const auto alpha = static_cast<float>(matrix_params_->qk_clip_alpha);
  optim::qk_clip_factors(qk_logits_, tau, alpha, qk_q_factors_, qk_k_factors_);
  for (float s : qk_logits_) report.qk_clipped_heads += s > tau ? 1 : 0;
  for (const QkPair& pair : qk_pairs_) {
    const std::span<const float> q_f(qk_q_factors_.data() + pair.offset, pair.heads);
    const std::span<const float> k_f(qk_k_factors_.data() + pair.offset, pair.heads);
    for (const LocalPiece& p : state_->my_pieces()) {
      const auto t = static_cast<size_t>(p.tensor);
      if (t != pair.tensor_q && t != pair.tensor_k) continue;
      const int64_t rows = specs_[t].shape(0), cols = specs_[t].shape(1);
      optim::qk_clip_piece(state_->master_shard(p.bucket) + p.segment_offset, p.tensor_offset, p.length,
                           rows / static_cast<int64_t>(pair.heads), cols, t == pair.tensor_q ? q_f : k_f);
    }
  }
}

void Engine::gather_params_after_step() {
  if (state_->stage() == 3) {
    // Stage 3 keeps parameters sharded: whatever was gathered is stale now.
    release_all();
    return;
  }
  std::vector<comm::WorkPtr> works(state_->num_buckets());
  for (int b = 0; b < state_->num_buckets(); ++b) {
    const auto& seg = state_->my_segment(b);
    float* full = state_->bucket_params(b);
    std::memcpy(full + seg.offset(), state_->master_shard(b), sizeof(float) * static_cast<size_t>(seg.count()));
    works[b] = comm_.all_gather(full + seg.offset(), full, state_->segment_counts(b), DType::kF32);
  }
  for (int b = 0; b < state_->num_buckets(); ++b) {
    TraceRecorder::Span span(trace_, "all_gather b" + std::to_string(b), "comm");
    works[b]->wait();
    if (state_->dim0()) state_->copy_out_params(b);
  }
}

StepReport Engine::step(float lr_multiplier) {
  if (!(lr_multiplier >= 0) || !std::isfinite(lr_multiplier))
    throw ConfigError("step: lr_multiplier must be finite and >= 0, got " + std::to_string(lr_multiplier));
  trace_.begin_step();
  StepReport report;
  const auto start = Clock::now();

  auto t0 = Clock::now();
  wait_reductions();
  report.times.reduce_wait = seconds_since(t0);

  t0 = Clock::now();
  const bool finite = check_and_clip(report);
  report.times.check = seconds_since(t0);
  const bool qk_clip = qk_clip_enabled() && !qk_pairs_.empty();
  if (qk_clip) {
    for (QkPair& p : qk_pairs_) {
      if (!p.set_this_step)
        throw ConfigError("step: QK-clip pair ('" + specs_[p.tensor_q].name() + "', '" + specs_[p.tensor_k].name() +
                          "') got no set_attention_max_logits since the previous step");
      p.set_this_step = false;
    }
  }

  if (finite) {
    ++step_;
    t0 = Clock::now();
    {
      TraceRecorder::Span span(trace_, "elementwise update", "compute");
      optim::elementwise_step(elementwise_params_, state_->elementwise_slices(),
                              elementwise_params_.lr * lr_multiplier, step_);
    }
    report.times.elementwise = seconds_since(t0);
    if (uses_matrix_optimizer(options_)) {
      if (state_->dim0()) {
        update_matrices_dim0(lr_multiplier, report.times);
      } else {
        t0 = Clock::now();
        update_matrices_owned(lr_multiplier);
        report.times.matrix = seconds_since(t0);
      }
    }
    if (qk_clip) apply_qk_clip(report);
    t0 = Clock::now();
    gather_params_after_step();
    report.times.gather = seconds_since(t0);
  } else {
    report.applied = false;
    if (state_->stage() == 3) release_all();
  }
  report.step = step_;
  report.times.total = seconds_since(start);
  report.traffic = comm_.counters() - traffic_at_last_step_;
  traffic_at_last_step_ = comm_.counters();
  return report;
}

void Engine::gather(int b) {
  if (state_->params_resident(b)) return;
  TraceRecorder::Span span(trace_, "gather b" + std::to_string(b), "comm");
  state_->acquire_params(b);
  const auto& seg = state_->my_segment(b);
  float* full = state_->bucket_params(b);
  std::memcpy(full + seg.offset(), state_->master_shard(b), sizeof(float) * static_cast<size_t>(seg.count()));
  comm_.all_gather(full + seg.offset(), full, state_->segment_counts(b), DType::kF32)->wait();
  if (state_->dim0()) state_->copy_out_params(b);
}

void Engine::release(int b) {
  if (state_->stage() <= 2) return;  // stages 1-2 keep full parameters resident
  state_->drop_params(b);
}

void Engine::gather_all() {
  for (int b = 0; b < state_->num_buckets(); ++b) gather(b);
}

void Engine::release_all() {
  for (int b = 0; b < state_->num_buckets(); ++b) release(b);
}

}  // namespace shardopt::runtime
