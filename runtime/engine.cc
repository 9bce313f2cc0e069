#include "runtime/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/clock.h"
#include "base/error.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/finite.h"
#include "optim/muon.h"
#include "optim/quant8.h"
#include "proto/dtype_convert.h"
#include "proto/runtime.pb.h"
#include "sharding/plan_util.h"
#include "sharding/planner.h"

namespace shardopt::runtime {

namespace {

using clock::seconds_since;

bool uses_matrix_optimizer(const EngineOptions& o) {
  return o.matrix_optimizer.kind() != proto::OPTIMIZER_KIND_UNSPECIFIED;
}

proto::OptimizerConfig elementwise_config(const EngineOptions& o) {
  proto::OptimizerConfig c = o.elementwise_optimizer;
  if (c.kind() == proto::OPTIMIZER_KIND_UNSPECIFIED) c.set_kind(proto::OPTIMIZER_ADAMW);
  return optim::with_defaults(c);
}

// Stage 1 keeps full gradients: its reduction happens once per step whatever the option says.
bool uses_sharded_grads(const EngineOptions& o) {
  return o.zero_stage >= 2 && o.grad_memory == GradMemory::kSharded;
}

// Everything ranks must agree on, as one message: hashed at init, diffed on mismatch.
proto::EngineConfig engine_config(const proto::PlanRequest& request, const EngineOptions& o) {
  proto::EngineConfig c;
  *c.mutable_plan_request() = request;
  if (uses_matrix_optimizer(o)) *c.mutable_matrix_optimizer() = optim::with_defaults(o.matrix_optimizer);
  *c.mutable_elementwise_optimizer() = elementwise_config(o);
  c.set_max_grad_norm(o.max_grad_norm);
  c.set_grad_accumulation_steps(o.grad_accumulation_steps);
  c.set_sharded_grads(uses_sharded_grads(o));
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
  // State bytes per parameter for the plan's ZeRO arithmetic: fp32 master + state values in their
  // storage dtype (q8: code + absmax share).
  const auto ew = optim::resolve_optimizer_config(elementwise_config(o));
  r.set_elementwise_state_bytes_per_param(4.0 + optim::state_bytes_per_value(ew) * optim::state_values_per_element(ew));
  // q8 element-wise state: shard pieces start on quantization blocks (optim/quant8.h).
  if (ew.state_dtype == proto::STATE_Q8) r.set_state_block_elems(optim::kQ8BlockElems);
  if (matrices) {
    const auto mx = optim::resolve_optimizer_config(o.matrix_optimizer);
    r.set_muon_state_bytes_per_param(4.0 + optim::state_bytes_per_value(mx) * optim::state_values_per_element(mx));
  }
  return r;
}

Engine::Engine(comm::Communicator& comm, std::vector<proto::TensorSpec> params, EngineOptions options)
    : comm_(comm), specs_(std::move(params)), options_(std::move(options)) {
  if (options_.grad_accumulation_steps < 1)
    throw ConfigError("grad_accumulation_steps must be >= 1, got " + std::to_string(options_.grad_accumulation_steps));
  if (!(options_.max_grad_norm >= 0)) throw ConfigError("max_grad_norm must be >= 0");
  if (options_.grad_buckets_in_flight < 1)
    throw ConfigError("grad_buckets_in_flight must be >= 1, got " + std::to_string(options_.grad_buckets_in_flight));
  for (const auto& s : specs_)
    if (s.dtype() != proto::F32)
      throw ConfigError("Engine: tensor '" + s.name() + "' has dtype " + std::string(dtype_name(s.dtype())) +
                        "; the engine's parameter buffers are f32");
  if (uses_matrix_optimizer(options_)) {
    const auto kind = options_.matrix_optimizer.kind();
    if (kind != proto::OPTIMIZER_MUON && kind != proto::OPTIMIZER_NORMUON)
      throw ConfigError("matrix_optimizer must be muon or normuon, got " + optim::optimizer_kind_name(kind));
  }
  backend_ = make_step_backend(options_.memory_space, options_.device);
  if (comm_.device_buffers() != (backend_->space() != MemorySpace::kHost))
    throw ConfigError("Engine: memory space " + std::string(memory_space_name(backend_->space())) +
                      " needs a communicator on " + (comm_.device_buffers() ? "host" : "device") +
                      " buffers, but the '" + std::string(comm_.backend()) + "' communicator moves " +
                      (comm_.device_buffers() ? "device" : "host") + " memory");
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
  GradBuffers grad_buffers;
  grad_buffers.pooled = uses_sharded_grads(options_);
  grad_buffers.slots = options_.grad_buckets_in_flight;
  grad_buffers.reduce_scratch = options_.grad_accumulation_steps > 1;
  state_ = std::make_unique<ShardState>(std::move(plan), comm_.rank(), matrix_params_ ? &*matrix_params_ : nullptr,
                                        elementwise_params_, grad_buffers, *backend_);
  if (options_.threads < 0) {
    throw ConfigError("EngineOptions.threads must be >= 0 (0 = default_thread_count()), found " +
                      std::to_string(options_.threads));
  }
  const int threads = options_.threads == 0 ? default_thread_count() : options_.threads;
  if (threads > 1) pool_ = std::make_unique<ThreadPool>(threads);
  backend_->bind(*state_, elementwise_params_, matrix_params_ ? &*matrix_params_ : nullptr, pool_.get());

  const int nb = state_->num_buckets();
  pending_in_bucket_.assign(nb, 0);
  launches_.assign(nb, 0);
  producer_streams_.assign(nb, {});
  ready_count_.assign(specs_.size(), 0);
  reductions_.assign(nb, nullptr);
  param_gathers_.assign(nb, nullptr);
  in_flight_.reserve(static_cast<size_t>(state_->num_grad_slots()));
  reset_step_bookkeeping();
  check_buffer_.assign(specs_.size() + 1, 0.0f);
  traffic_at_last_step_ = comm_.counters();
}

Engine::~Engine() {
  // Never leave a reduction writing into freed buffers.
  auto quiet_wait = [](comm::WorkPtr& w) {
    if (!w) return;
    try {
      w->wait();
    } catch (...) {
    }
  };
  for (auto& w : reductions_) quiet_wait(w);
  for (auto& f : in_flight_) quiet_wait(f.work);
  for (auto& w : param_gathers_) quiet_wait(w);
}

void Engine::reset_step_bookkeeping() {
  // kSharded launches a bucket every micro-batch; kFull once, after A rounds of grad_ready.
  const int rounds = state_->pooled_grads() ? 1 : options_.grad_accumulation_steps;
  for (int b = 0; b < state_->num_buckets(); ++b) {
    pending_in_bucket_[b] = rounds * plan().buckets(b).tensors_size();
    launches_[b] = 0;
  }
  std::fill(ready_count_.begin(), ready_count_.end(), 0);
}

template <typename Issue>
void Engine::on_comm_memory(void* host, size_t bytes, Issue&& issue) {
  if (!comm_.device_buffers()) {
    issue(host)->wait();
    return;
  }
  void* staged = backend_->staging(bytes);
  backend_->upload(staged, host, bytes);
  issue(staged)->wait();
  backend_->download(host, staged, bytes);
}

MemoryReport Engine::memory() const {
  MemoryReport r = state_->memory();
  r.workspace_bytes += backend_->workspace_bytes();
  return r;
}

void Engine::collective_on_host_values(void* host, size_t bytes, const std::function<comm::WorkPtr(void*)>& issue) {
  on_comm_memory(host, bytes, issue);
}

void Engine::verify_same_config_on_all_ranks() {
  const proto::PlanRequest request = make_engine_plan_request(specs_, comm_.size(), options_);
  const proto::EngineConfig mine = engine_config(request, options_);
  const auto hash = static_cast<int64_t>(sharding::stable_hash(mine));
  const int n = comm_.size();
  std::vector<int64_t> hashes(n, 0);
  std::vector<size_t> ones(n, 1);
  hashes[static_cast<size_t>(comm_.rank())] = hash;
  on_comm_memory(hashes.data(), sizeof(int64_t) * hashes.size(), [&](void* p) {
    auto* h = static_cast<int64_t*>(p);
    return comm_.all_gather(h + comm_.rank(), h, ones, DType::kI64);
  });
  if (std::all_of(hashes.begin(), hashes.end(), [&](int64_t h) { return h == hashes[0]; })) return;

  // Show the difference against rank 0's configuration on every rank.
  std::string bytes = sharding::deterministic_bytes(mine);
  int64_t size = static_cast<int64_t>(bytes.size());
  on_comm_memory(&size, sizeof(size), [&](void* p) { return comm_.broadcast(p, 1, DType::kI64, 0); });
  std::string root(static_cast<size_t>(size), '\0');
  if (comm_.rank() == 0) root = bytes;
  on_comm_memory(root.data(), root.size(), [&](void* p) { return comm_.broadcast(p, root.size(), DType::kU8, 0); });
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
  if (state_->pooled_grads()) {
    const int b = bucket_of(t);
    if (!state_->grad_slot_open(b)) open_grad_bucket(b);
  }
  return state_->grad(t);
}

bool Engine::grad_accumulates(size_t t) const {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  return !state_->pooled_grads() && ready_count_[t] > 0;
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
      backend_->upload(state_->master_shard(p.bucket()) + seg_off, full.data() + p.tensor_offset(),
                       sizeof(float) * static_cast<size_t>(p.length()));
    }
    if (resident) {
      if (state_->dim0()) {
        backend_->upload(state_->param(t), full.data(), sizeof(float) * static_cast<size_t>(plan().tensors(t).numel()));
        for (const auto& p : plan().tensors(static_cast<int>(t)).pieces())
          backend_->upload(state_->bucket_params(p.bucket()) + p.bucket_offset(), full.data() + p.tensor_offset(),
                           sizeof(float) * static_cast<size_t>(p.length()));
      } else {
        backend_->upload(state_->param(t), full.data(), sizeof(float) * static_cast<size_t>(plan().tensors(t).numel()));
      }
    }
  }
}

void Engine::set_optimizer_step(int64_t step) {
  if (step < 0) throw ConfigError("set_optimizer_step: step must be >= 0, got " + std::to_string(step));
  step_ = step;
}

void Engine::grad_ready(size_t t, void* producer_stream) {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  if (backend_->space() != MemorySpace::kHost) {
    auto& streams = producer_streams_[static_cast<size_t>(bucket_of(t))];
    if (std::find(streams.begin(), streams.end(), producer_stream) == streams.end()) streams.push_back(producer_stream);
  }
  grad_ready(t);
}

void Engine::grad_ready(size_t t) {
  SHARDOPT_ASSERT(t < specs_.size(), "tensor index out of range");
  const int b = bucket_of(t);
  if (ready_count_[t] >= options_.grad_accumulation_steps)
    throw ConfigError("grad_ready called " + std::to_string(ready_count_[t] + 1) + " times for tensor '" +
                      specs_[t].name() + "' in one step (grad_accumulation_steps = " +
                      std::to_string(options_.grad_accumulation_steps) + ")");
  if (state_->pooled_grads() && ready_count_[t] > launches_[b])
    throw ConfigError("grad_ready called twice for tensor '" + specs_[t].name() +
                      "' in one micro-batch (its bucket is still waiting for other tensors)");
  ++ready_count_[t];
  // Lets the reductions in flight advance while the backward computes: the MPI backend moves its
  // reduce-scatter steps (and MPI its shared-memory messages) only inside its calls, and one poll
  // advances every pending operation of the communicator.
  if (!in_flight_.empty()) in_flight_.front().work->done();
  if (--pending_in_bucket_[b] > 0) return;
  if (state_->pooled_grads()) {
    launch_reduction(b);
    pending_in_bucket_[b] = plan().buckets(b).tensors_size();
    if (!options_.overlap) finish_oldest_reduction();
  } else if (options_.overlap) {
    launch_reduction(b);
  }
}

void Engine::open_grad_bucket(int b) {
  while (!state_->open_grad_slot(b)) {
    if (in_flight_.empty()) {
      // Every buffer holds an open bucket: the trainer interleaves more buckets than the pool has.
      state_->add_grad_slot();
      in_flight_.reserve(static_cast<size_t>(state_->num_grad_slots()));
    } else {
      finish_oldest_reduction();
    }
  }
}

void Engine::finish_oldest_reduction() {
  InFlight& f = in_flight_.front();
  {
    TraceRecorder::Span span(trace_, "reduce wait b", f.bucket, "comm");
    const auto t0 = clock::now();
    f.work->wait();
    backward_reduce_wait_ += seconds_since(t0);
  }
  if (f.accumulate) {
    backend_->add(state_->grad_shard(f.bucket), state_->slot_reduced(f.slot),
                  static_cast<size_t>(state_->my_segment(f.bucket).count()));
  }
  state_->free_grad_slot(f.slot);
  in_flight_.erase(in_flight_.begin());
}

void Engine::launch_reduction(int b) {
  TraceRecorder::Span span(trace_, "reduce launch b", b, "comm");
  const bool pooled = state_->pooled_grads();
  if (pooled && !state_->grad_slot_open(b)) open_grad_bucket(b);  // no gradient written: zeros
  // Gradients the trainer's kernels may still be writing: whatever reads the bucket first waits for them
  // on the device (dim0: the backend's copy into the exchange layout; otherwise the reduce-scatter).
  for (void* stream : producer_streams_[static_cast<size_t>(b)]) {
    if (state_->dim0()) backend_->wait_stream(stream);
    else comm_.wait_stream(stream);
  }
  producer_streams_[static_cast<size_t>(b)].clear();
  if (state_->dim0()) state_->copy_in_grads(b);
  // Every stage reduce-scatters: only the owner of a segment needs its reduced gradient, and the
  // parameters come back by all-gather (2Ψ(N-1)/N per rank, the ZeRO arithmetic for stages 1-3).
  const float* input = state_->bucket_grads(b);
  if (!pooled) {
    reductions_[b] = comm_.reduce_scatter(input, state_->grad_shard(b), state_->segment_counts(b), DType::kF32,
                                          comm::ReduceOp::kAvg);
    ++launches_[b];
    return;
  }
  // The first micro-batch lands in the shard, later ones beside it and are added when they finish.
  const bool accumulate = launches_[b]++ > 0;
  const int slot = state_->close_grad_slot(b);
  float* output = accumulate ? state_->slot_reduced(slot) : state_->grad_shard(b);
  in_flight_.push_back(InFlight{b, slot, accumulate,
                                comm_.reduce_scatter(input, output, state_->segment_counts(b), DType::kF32,
                                                     comm::ReduceOp::kAvg)});
}

void Engine::wait_reductions() {
  if (state_->pooled_grads()) {
    // Buckets still open (tensors never announced), or never written this step (zero gradient),
    // are reduced now, in bucket order, the same on every rank.
    for (int b = 0; b < state_->num_buckets(); ++b)
      if (state_->grad_slot_open(b) || launches_[b] == 0) launch_reduction(b);
    while (!in_flight_.empty()) finish_oldest_reduction();
  } else {
    // Buckets whose tensors were not all announced (no overlap, or a trainer that skips
    // grad_ready) are reduced now, in bucket order, the same on every rank.
    for (int b = 0; b < state_->num_buckets(); ++b)
      if (!reductions_[b]) launch_reduction(b);
    for (int b = 0; b < state_->num_buckets(); ++b) {
      TraceRecorder::Span span(trace_, "reduce wait b", b, "comm");
      reductions_[b]->wait();
      reductions_[b].reset();
    }
  }
  reset_step_bookkeeping();
}

void Engine::require_host_memory(const char* what) const {
  if (backend_->space() != MemorySpace::kHost)
    throw ConfigError(std::string(what) + " reads the engine's buffers from host memory; this engine's memory space is " +
                      std::string(memory_space_name(backend_->space())));
}

void Engine::set_max_grad_norm(float max_grad_norm) {
  if (!(max_grad_norm >= 0)) throw ConfigError("max_grad_norm must be >= 0, got " + std::to_string(max_grad_norm));
  options_.max_grad_norm = max_grad_norm;
}

// Counts non-finite values per tensor and the squared norm over my pieces, combines them across
// ranks with one all-reduce, then clips. Returns false (step skipped everywhere) on NaN/Inf.
bool Engine::check_and_clip(StepReport& report) {
  TraceRecorder::Span span(trace_, "check+clip", "compute");
  std::fill(check_buffer_.begin(), check_buffer_.end(), 0.0f);
  backend_->check_gradients(*state_, check_buffer_);
  on_comm_memory(check_buffer_.data(), sizeof(float) * check_buffer_.size(), [&](void* p) {
    return comm_.all_reduce(p, p, check_buffer_.size(), DType::kF32, comm::ReduceOp::kSum);
  });
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
    for (int b = 0; b < state_->num_buckets(); ++b)
      backend_->scale(state_->grad_shard(b), s, static_cast<size_t>(state_->my_segment(b).count()));
  }
  return true;
}

void Engine::update_matrices_owned(float lr_multiplier) {
  const optim::OptimizerParams& mx = *matrix_params_;
  backend_->matrix_step(*state_, mx, static_cast<float>(mx.lr * lr_multiplier), trace_);
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

  auto t0 = clock::now();
  state_->dim0_pack_grads();
  comm_.all_to_all(state_->dim0_send_buffer(), send_counts, state_->dim0_recv_buffer(), recv_counts, DType::kF32)->wait();
  state_->dim0_unpack_to_owned();
  times.dim0_exchange += seconds_since(t0);

  t0 = clock::now();
  backend_->matrix_step(*state_, mx, lr, trace_);
  times.matrix += seconds_since(t0);

  t0 = clock::now();
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
  on_comm_memory(qk_logits_.data(), sizeof(float) * qk_logits_.size(), [&](void* p) {
    return comm_.all_reduce(p, p, qk_logits_.size(), DType::kF32, comm::ReduceOp::kMax);
  });
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


comm::WorkPtr Engine::start_param_gather(int b) {
  const auto& seg = state_->my_segment(b);
  float* full = state_->bucket_params(b);
  backend_->copy(full + seg.offset(), state_->master_shard(b), static_cast<size_t>(seg.count()));
  return comm_.all_gather(full + seg.offset(), full, state_->segment_counts(b), DType::kF32);
}

void Engine::refresh_params() {
  if (state_->stage() == 3) {
    // Stage 3 keeps parameters sharded: whatever was gathered is stale now.
    release_all();
    return;
  }
  for (int b = 0; b < state_->num_buckets(); ++b) param_gathers_[b] = start_param_gather(b);
  for (int b = 0; b < state_->num_buckets(); ++b) {
    TraceRecorder::Span span(trace_, "all_gather b", b, "comm");
    param_gathers_[b]->wait();
    param_gathers_[b].reset();
    if (state_->dim0()) state_->copy_out_params(b);
  }
}

StepReport Engine::step(float lr_multiplier) {
  if (!(lr_multiplier >= 0) || !std::isfinite(lr_multiplier))
    throw ConfigError("step: lr_multiplier must be finite and >= 0, got " + std::to_string(lr_multiplier));
  trace_.begin_step();
  StepReport report;
  const auto start = clock::now();

  auto t0 = clock::now();
  wait_reductions();
  report.times.reduce_wait = seconds_since(t0);

  t0 = clock::now();
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
    t0 = clock::now();
    {
      TraceRecorder::Span span(trace_, "elementwise update", "compute");
      backend_->elementwise_step(*state_, elementwise_params_,
                                 static_cast<float>(elementwise_params_.lr * lr_multiplier), step_);
    }
    report.times.elementwise = seconds_since(t0);
    if (uses_matrix_optimizer(options_)) {
      if (state_->dim0()) {
        update_matrices_dim0(lr_multiplier, report.times);
      } else {
        t0 = clock::now();
        update_matrices_owned(lr_multiplier);
        report.times.matrix = seconds_since(t0);
      }
    }
    if (qk_clip) apply_qk_clip(report);
    t0 = clock::now();
    refresh_params();
    report.times.gather = seconds_since(t0);
  } else {
    report.applied = false;
    if (state_->stage() == 3) release_all();
  }
  report.step = step_;
  report.times.total = seconds_since(start);
  backward_reduce_wait_ = 0;  // step() drained what was in flight; the next backward starts afresh
  report.traffic = comm_.counters() - traffic_at_last_step_;
  traffic_at_last_step_ = comm_.counters();
  return report;
}

void Engine::gather(int b) {
  if (state_->params_resident(b)) return;
  TraceRecorder::Span span(trace_, "gather b", b, "comm");
  state_->acquire_params(b);
  start_param_gather(b)->wait();
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
