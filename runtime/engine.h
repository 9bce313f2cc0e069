// The Engine: the sharded optimizer a trainer embeds. It owns the parameter, gradient, master and
// optimizer-state buffers of one rank, laid out by a ShardPlan, and runs the synchronous ZeRO step:
//
//   per micro-batch: trainer writes grad(t) ... grad_ready(t) -> each completed bucket is
//                    reduce-scattered at once (overlap)
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
// demand: gather(bucket)/release(bucket) around their use.
//
// Gradient memory (EngineOptions::grad_memory):
//   stage 1, or GradMemory::kFull: full-size gradient buffers, persistent. Micro-batches accumulate
//     into them locally (the trainer adds; grad_accumulates(t) says when) and each bucket is
//     reduce-scattered once per step, after its tensors' last grad_ready.
//   stages 2-3 with GradMemory::kSharded (the default, ZeRO-2): grad(t) points into a bucket buffer
//     taken from a small pool (grad_buckets_in_flight buffers of the largest bucket's size). When all
//     of a bucket's tensors are grad_ready the bucket is reduce-scattered into this rank's persistent
//     fp32 gradient shard and its buffer returns to the pool once the reduction is done; with
//     accumulation every micro-batch's buckets are reduce-scattered and summed in the shard
//     (grad_accumulation_steps times the gradient collectives of kFull). Gradient memory per rank:
//     the shard (Ψ/N fp32) + the pool (with accumulation each pooled buffer also holds a reduce-
//     scatter output of this rank's largest segment). grad(t) opening a bucket waits for the oldest
//     reduction in flight when the pool is empty; a trainer keeping more buckets open than the pool
//     holds grows it.
//
// Gradient protocol (both modes, what an autograd hook does): for each micro-batch and tensor t,
// take p = grad(t), write (or, when grad_accumulates(t), add) t's gradient into p, then call
// grad_ready(t) once. The pointer is valid until t's bucket is launched (its last tensor's
// grad_ready of that micro-batch); ask grad(t) again in the next micro-batch. Tensors may come in
// any order; ranks must announce them in the same order (bucket launches are collectives).
// Buffers are allocated at construction (the pool grows only as described); step() allocates nothing
// (tests/runtime/step_allocation_test.cc; oneDNN's NS products on several OpenMP threads, i.e.
// threads = 1 with OMP_NUM_THREADS > 1, allocate one small record per product inside oneDNN).
//
// Memory space (EngineOptions::memory_space, runtime/step_backend.h): every buffer above lives in
// host memory (kHost, the CPU kernels of optim/) or in one CUDA device's memory (kCuda, the kernels
// of optim/cuda); param(t) and grad(t) then return pointers into that space. One code path: the
// Engine and ShardState reach memory and step arithmetic only through the StepBackend. The
// communicator must move buffers of the same space (kCuda: NCCL; kHost: threads or MPI); a mismatch
// is a ConfigError at construction. Host-side parts of a step (the skip decision, clipping scale, the
// configuration check) read small values back from the device.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/thread_pool.h"
#include "comm/communicator.h"
#include "optim/config.h"
#include "proto/optim.pb.h"
#include "proto/plan.pb.h"
#include "proto/types.pb.h"
#include "runtime/shard_state.h"
#include "runtime/step_backend.h"
#include "runtime/trace.h"

namespace shardopt::runtime {

enum class GradMemory {
  kSharded,  // ZeRO-2: pooled bucket buffers reduce-scattered per micro-batch into the gradient shard
  kFull,     // full-size buffers accumulated locally, reduce-scattered once per step (fewer collectives)
};

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
  // Micro-batches per step: every tensor gets grad_accumulation_steps grad_ready() calls per step;
  // the summed gradient is divided by this.
  int grad_accumulation_steps = 1;
  // Stages 2-3 (stage 1 always keeps full buffers); see the file comment.
  GradMemory grad_memory = GradMemory::kSharded;
  // kSharded: bucket buffers in the pool (>= 1): bounds the reductions in flight during backward.
  int grad_buckets_in_flight = 2;
  // true: grad_ready() starts a bucket's reduction as soon as the bucket is complete. false: kFull
  // reduces everything in step(); kSharded reduces each bucket when complete and waits for it there.
  bool overlap = true;
  // Compute threads of this rank's optimizer step (a ThreadPool: element-wise kernels in chunks,
  // owned Muon matrices concurrently with one BLAS thread each). 1 = the calling thread only, with
  // NS products' threads as OMP_NUM_THREADS says (oneDNN); 0 = default_thread_count() (the affinity mask's
  // CPUs divided by the ranks on this host, or SHARDOPT_NUM_THREADS). Results do not depend on it.
  int threads = 1;
  // Where the buffers live and which kernels run the step (see the file comment). kCuda needs a
  // program linked with shardopt_runtime_cuda, a CUDA device and a communicator on device buffers.
  MemorySpace memory_space = MemorySpace::kHost;
  // kCuda: the CUDA device (< 0: the current device, e.g. the one the NCCL communicator uses).
  int device = -1;
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
  MemorySpace memory_space() const { return backend_->space(); }
  StepBackend& step_backend() { return *backend_; }
  // ConfigError naming `what` unless the buffers are in host memory (for code that reads them from
  // the host directly: checkpoint I/O, gossip's outer sync).
  void require_host_memory(const char* what) const;
  // Clipping threshold of the coming steps (EngineOptions.max_grad_norm; 0 = off). Local: ranks must
  // set the same value before the same step (the norm is global, the threshold is not exchanged).
  void set_max_grad_norm(float max_grad_norm);
  comm::Communicator& comm() { return comm_; }
  size_t num_tensors() const { return specs_.size(); }
  const proto::TensorSpec& spec(size_t t) const { return specs_[t]; }
  int64_t optimizer_step() const { return step_; }
  // Seconds grad()/grad_ready() blocked on earlier buckets' reductions since the last step() (ZeRO-2:
  // waiting for a free gradient buffer). Communication, not compute: a trainer subtracts it when it
  // times its backward (e.g. to compare ranks' compute).
  double backward_reduce_wait_seconds() const { return backward_reduce_wait_; }
  // Checkpoint restore: the step count the optimizers' bias corrections continue from.
  void set_optimizer_step(int64_t step);
  // Resolved optimizer parameters (the matrix one is null when every tensor is element-wise).
  const optim::OptimizerParams& elementwise_params() const { return elementwise_params_; }
  const optim::OptimizerParams* matrix_params() const { return matrix_params_ ? &*matrix_params_ : nullptr; }
  // Collective. After master shards changed (an optimizer step, a checkpoint load, an outer sync):
  // stages 1-2 all-gather the full parameters from the masters; stage 3 drops whatever was gathered
  // (stale).
  void refresh_params();

  // Full fp32 view of tensor t (numel values, row-major). Valid always in stages 1-2; in stage 3
  // only while its bucket is gathered.
  float* param(size_t t);
  // Where the trainer writes tensor t's gradient for the current micro-batch (numel values). kFull /
  // stage 1: always valid, persistent. kSharded: opens t's bucket buffer (zero-filled) if it is not
  // open, possibly waiting for the oldest reduction in flight; valid until t's bucket is launched.
  float* grad(size_t t);
  // True when grad(t) already holds t's gradient of earlier micro-batches of this step, so the
  // trainer must add to it (kFull / stage 1 after t's first grad_ready of the step); false: write it
  // (a kSharded buffer starts zeroed each micro-batch, so adding is also right).
  bool grad_accumulates(size_t t) const;
  // True when gradients live in pooled bucket buffers (stages 2-3 with GradMemory::kSharded).
  bool sharded_grads() const { return state_->pooled_grads(); }

  // Sets every parameter: fill(t, dst) writes tensor t's full value into dst. Called on every rank
  // with the same values (e.g. a seeded init); each rank keeps what the plan gives it.
  void set_params(const std::function<void(size_t, float*)>& fill);

  // Tensor t's gradient of the current micro-batch is written; once per tensor per micro-batch
  // (grad_accumulation_steps times per step, ConfigError beyond). The bucket's reduction starts when
  // its last tensor is ready (kSharded: every micro-batch; kFull: in the last one). Every call also
  // polls the reductions in flight, so that backends which progress only inside their calls (MPI)
  // advance them while the backward computes.
  void grad_ready(size_t t);
  // grad_ready(t) for a gradient written by kernels on CUDA stream `producer_stream` (a cudaStream_t,
  // opaque here) that may still be running; this call does not wait for them. What reads t's bucket
  // first waits for the work enqueued on that stream so far: the reduce-scatter
  // (Communicator::wait_stream: on the device with NCCL, the host synchronizing the stream once per
  // bucket with the threads backend or host staging), or, in the dim0 layout, the step backend's copy
  // into the exchange layout. A bucket whose tensors came from several streams waits for each. Host
  // engines: grad_ready(t).
  void grad_ready(size_t t, void* producer_stream);
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
  // workspace_bytes includes the step backend's own (StepBackend::workspace_bytes: device NS workspaces).
  MemoryReport memory() const;

  ShardState& shard_state() { return *state_; }
  TraceRecorder& trace() { return trace_; }

  // Runs a collective on `bytes` of host memory for code around the engine (checkpoint I/O's small
  // control values): issue(p) starts it on p, and p is `host` itself on a host communicator, the
  // step backend's scratch holding a copy of it when the communicator moves device memory (copied
  // back after the wait). Collective as the operation issue() starts.
  void collective_on_host_values(void* host, size_t bytes, const std::function<comm::WorkPtr(void*)>& issue);

 private:
  void verify_same_config_on_all_ranks();
  void launch_reduction(int bucket);
  void wait_reductions();
  void reset_step_bookkeeping();
  // kSharded: binds a pooled buffer to bucket b, finishing the oldest reduction when none is free.
  void open_grad_bucket(int bucket);
  // kSharded: waits for the oldest reduction in flight, adds it into the shard (later micro-batches)
  // and returns its buffer to the pool.
  void finish_oldest_reduction();
  // Starts the all-gather of bucket b's full parameters from my master segment.
  comm::WorkPtr start_param_gather(int bucket);
  bool check_and_clip(StepReport& report);
  void update_matrices_owned(float lr_multiplier);
  void update_matrices_dim0(float lr_multiplier, PhaseTimes& times);
  void apply_qk_clip(StepReport& report);
  // Runs a collective on `bytes` of host memory: in place on a host communicator, staged through the
  // backend's scratch when the communicator moves device memory. issue(p) starts it on p.
  template <typename Issue>
  void on_comm_memory(void* host, size_t bytes, Issue&& issue);

  comm::Communicator& comm_;
  std::vector<proto::TensorSpec> specs_;
  EngineOptions options_;
  optim::OptimizerParams elementwise_params_;             // resolved once
  std::optional<optim::OptimizerParams> matrix_params_;  // empty: no matrix optimizer
  // dim0: the owner computes the update without weight decay (the shard holders apply it).
  std::optional<optim::OptimizerParams> matrix_params_owner_dim0_;
  std::unique_ptr<StepBackend> backend_;  // before state_: its buffers are the backend's memory
  std::unique_ptr<ShardState> state_;
  TraceRecorder trace_;
  std::unique_ptr<ThreadPool> pool_;                     // null when options_.threads resolves to 1

  // Step bookkeeping, reset by step().
  std::vector<int> pending_in_bucket_;  // grad_ready calls missing before the bucket's next launch
  std::vector<int> ready_count_;        // per tensor: grad_ready calls this step
  std::vector<int> launches_;           // per bucket: reductions launched this step
  // per bucket: the trainer's CUDA streams of its gradients since its last launch (distinct)
  std::vector<std::vector<void*>> producer_streams_;
  std::vector<comm::WorkPtr> reductions_;  // kFull: in-flight gradient reduction per bucket
  struct InFlight {
    int bucket = 0;
    int slot = 0;
    bool accumulate = false;  // a later micro-batch: its output is added into the shard
    comm::WorkPtr work;
  };
  std::vector<InFlight> in_flight_;   // kSharded: oldest first
  std::vector<comm::WorkPtr> param_gathers_;  // per bucket, reused by every refresh
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
  double backward_reduce_wait_ = 0;  // seconds blocked on reductions outside step() since the last step
};

}  // namespace shardopt::runtime
