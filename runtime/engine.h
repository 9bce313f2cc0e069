// The Engine: the sharded optimizer a trainer embeds. It owns the parameter, gradient, master and
// optimizer-state buffers of one rank, laid out by a ShardPlan, and runs the synchronous ZeRO step:
//
//   trainer writes grad(t) ... grad_ready(t)   -> each completed bucket is reduced at once (overlap)
//   step():  wait reductions -> non-finite check + global norm (one small all-reduce)
//            -> element-wise update of the owned slices (AdamW/Lion/SGD)
//            -> Muon/NorMuon on owned whole matrices (owned layout: in place; dim0 layout: row shards
//               travel to the owner by all-to-all and the update comes back the same way)
//            -> QK-clip (MuonClip, when the matrix optimizer enables it): per-head max attention logits set
//               by the trainer are max-reduced over ranks (one small all-reduce) and every holder of a
//               piece of W_q / W_k master rows scales them (owned layout: the owner holds the whole matrix;
//               dim0: each rank its row shard, so nothing extra travels)
//            -> all-gather the updated parameters (stages 1-2; stage 3 gathers on demand)
//
// Every stage reduce-scatters gradients and all-gathers parameters (2Ψ(N-1)/N per rank per step).
// Stages 1 and 2 keep full parameters resident; stage 3 keeps only the rank's shard and gathers on
// demand: gather(bucket)/release(bucket) around their use. The trainer-facing gradient buffer is
// full-size in every stage (the trainer writes whole tensors during backward), so stage 2 differs
// from stage 1 only by the persistent shard; freeing bucket gradients during backward is not done.
// Buffers are allocated once at construction; step() allocates nothing.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "optim/config.h"
#include "proto/optim.pb.h"
#include "proto/plan.pb.h"
#include "proto/types.pb.h"
#include "runtime/shard_state.h"
#include "runtime/trace.h"

namespace shardopt::runtime {

struct EngineOptions {
  int zero_stage = 2;
  proto::ShardLayout layout = proto::SHARD_LAYOUT_OWNED;
  int64_t bucket_bytes = int64_t{4} << 20;
  // Optimizer of hidden 2-D matrices (muon or normuon). OPTIMIZER_KIND_UNSPECIFIED: every tensor
  // goes to the element-wise optimizer.
  proto::OptimizerConfig matrix_optimizer;
  // Optimizer of embeddings, head, norms, biases (adamw, lion or sgd).
  proto::OptimizerConfig elementwise_optimizer;
  proto::RoutingRules routing;
  int64_t memory_cap_bytes = 0;
  // > 0: gradients are scaled so that their global L2 norm is at most this.
  float max_grad_norm = 0;
  // Micro-batches per step: the reduced gradient is divided by this (the trainer accumulates).
  int grad_accumulation_steps = 1;
  // true: grad_ready() starts a bucket's reduction as soon as the bucket is complete.
  bool overlap = true;
};

// Seconds spent in each phase of the last step, as seen by this rank.
struct PhaseTimes {
  double reduce_wait = 0;   // waiting for gradient reductions still in flight at step()
  double check = 0;         // non-finite scan, norm, their all-reduce, clipping
  double elementwise = 0;   // AdamW/Lion/SGD on owned slices
  double matrix = 0;        // Muon/NorMuon (momentum + Newton-Schulz) on owned matrices
  double dim0_exchange = 0;  // all-to-all of Muon shards to owners and back (dim0 layout)
  double gather = 0;        // parameter all-gather
  double total = 0;         // step() wall time
};

struct StepReport {
  bool applied = true;                         // false: skipped on every rank (non-finite gradients)
  std::vector<std::string> nonfinite_tensors;  // names, when skipped
  double grad_norm = 0;                        // global L2 norm before clipping
  int64_t step = 0;                            // optimizer steps applied so far
  PhaseTimes times;
  // QK-clip (empty when off): per (W_q, W_k) pair in set_attention_max_logits order, the global max
  // logit of each head (max over ranks) this step's clip used, and how many heads it scaled.
  std::vector<float> attention_max_logits;
  int64_t qk_clipped_heads = 0;
  comm::TrafficCounters traffic;  // this rank's traffic since the previous step() returned
};

// What a plan's parameters look like to the engine, from EngineOptions (deterministic).
proto::PlanRequest make_engine_plan_request(const std::vector<proto::TensorSpec>& params, int world_size,
                                            const EngineOptions& options);

class Engine {
 public:
  // Collective: every rank of `comm` constructs its Engine with the same params and options; a
  // difference raises ConfigError on every rank naming the first differing field.
  Engine(comm::Communicator& comm, std::vector<proto::TensorSpec> params, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const proto::ShardPlan& plan() const { return state_->plan(); }
  const EngineOptions& options() const { return options_; }
  comm::Communicator& comm() { return comm_; }
  size_t num_tensors() const { return specs_.size(); }
  const proto::TensorSpec& spec(size_t t) const { return specs_[t]; }
  int64_t optimizer_step() const { return step_; }
  // Checkpoint restore: the step count the optimizers' bias corrections continue from.
  void set_optimizer_step(int64_t step);
  // Resolved optimizer parameters (the matrix one is null when every tensor is element-wise).
  const optim::OptimizerParams& elementwise_params() const { return elementwise_params_; }
  const optim::OptimizerParams* matrix_params() const { return matrix_params_ ? &*matrix_params_ : nullptr; }
  // Collective. After master shards were written directly (checkpoint load): stages 1-2 all-gather
  // the full parameters from the masters; stage 3 drops whatever was gathered (stale).
  void refresh_params() { gather_params_after_step(); }

  // Full fp32 view of tensor t (numel values, row-major). Valid always in stages 1-2; in stage 3
  // only while its bucket is gathered.
  float* param(size_t t);
  // Where the trainer writes tensor t's gradient (numel values). Always valid.
  float* grad(size_t t);

  // Sets every parameter: fill(t, dst) writes tensor t's full value into dst. Called on every rank
  // with the same values (e.g. a seeded init); each rank keeps what the plan gives it.
  void set_params(const std::function<void(size_t, float*)>& fill);

  // The trainer's gradient of tensor t is final for this step (all micro-batches accumulated).
  void grad_ready(size_t t);
  // Applies one optimizer step with learning rates scaled by lr_multiplier (schedules).
  StepReport step(float lr_multiplier = 1.0f);

  // QK-clip input for the coming step(): this rank's per-head max |q.k|/sqrt(d_head) of its forward(s),
  // head h owning rows [h*rows/H, (h+1)*rows/H) of both W_q (tensor_q) and W_k (tensor_k). Call it once
  // per step per attention layer, in the same order on every rank (the first step registers the pairs;
  // step() throws ConfigError if a registered pair was not set again). Used only when the matrix
  // optimizer's qk_clip is enabled (OptimizerConfig.qk_clip); ignored otherwise.
  void set_attention_max_logits(size_t tensor_q, size_t tensor_k, std::span<const float> per_head_max);
  bool qk_clip_enabled() const { return matrix_params_ && matrix_params_->qk_clip; }

  // Stage 3: make bucket b's parameters readable through param(t) / drop them again.
  void gather(int bucket);
  void release(int bucket);
  void gather_all();
  void release_all();
  int bucket_of(size_t t) const { return plan().tensors(static_cast<int>(t)).bucket(); }

  // Bytes this rank holds, by kind, and the ZeRO formula's optimizer-state bytes for comparison.
  MemoryReport memory() const { return state_->memory(); }

  ShardState& shard_state() { return *state_; }
  TraceRecorder& trace() { return trace_; }

 private:
  void verify_same_config_on_all_ranks();
  void launch_reduction(int bucket);
  void wait_reductions();
  bool check_and_clip(StepReport& report);
  void update_matrices_owned(float lr_multiplier);
  void update_matrices_dim0(float lr_multiplier, PhaseTimes& times);
  void gather_params_after_step();
  void apply_qk_clip(StepReport& report);

  comm::Communicator& comm_;
  std::vector<proto::TensorSpec> specs_;
  EngineOptions options_;
  optim::OptimizerParams elementwise_params_;             // resolved once
  std::optional<optim::OptimizerParams> matrix_params_;  // empty: no matrix optimizer
  // dim0: the owner computes the update without weight decay (the shard holders apply it).
  std::optional<optim::OptimizerParams> matrix_params_owner_dim0_;
  std::unique_ptr<ShardState> state_;
  TraceRecorder trace_;

  std::vector<int> pending_in_bucket_;      // tensors not yet grad_ready, per bucket
  std::vector<comm::WorkPtr> reductions_;   // in-flight gradient reduction per bucket
  std::vector<float> check_buffer_;         // per-tensor non-finite counts + squared norm
  comm::TrafficCounters traffic_at_last_step_;
  // QK-clip: registered (W_q, W_k) pairs and their heads' max logits, concatenated in pair order.
  struct QkPair {
    size_t tensor_q, tensor_k;
    size_t offset, heads;  // into qk_logits_
    bool set_this_step;
  };
  std::vector<QkPair> qk_pairs_;
  std::vector<float> qk_logits_, qk_q_factors_, qk_k_factors_;
  int64_t step_ = 0;
};

}  // namespace shardopt::runtime
