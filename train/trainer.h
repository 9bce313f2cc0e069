// The reference training job: the byte-level transformer of model/ trained on a text corpus with the
// sharded optimizer of runtime/engine.h. One call of train_rank() runs on every rank of any
// Communicator (threads backend, MPI): each rank computes forward/backward on its own slice of every
// global batch, announces each gradient to the Engine from the model's on_grad_ready callback (the
// bucket reductions overlap the rest of backward), and the sync mode applies the step.
//
// Routing: hidden matrices -> the matrix optimizer (Muon/NorMuon) when one is chosen; embeddings,
// norms and the output head -> the element-wise optimizer (AdamW/Lion), set per tensor by ParamKind.
// Stage 3: the trainer gathers every bucket before forward (gather_all) and releases them after
// backward (release_all), then steps; validation and sampling gather around their use too.
// Determinism: data order, init and sampling are pure functions of the seed; with the same world
// size, two runs give bit-identical losses.
//
// Replicas (--sync noloco|diloco): world = replicas x shard group (runtime/gossip/outer_sync.h). Each
// replica's Engine runs on its shard-group communicator, OuterSync on the cross-replica one. The global
// batch is still split across ALL world ranks (each rank its own slice), so each replica trains on its
// own data and gradients are averaged only inside the shard group; replicas meet only at outer steps.
// Reported train/val losses are means over all world ranks (= over replicas). During the run, per-step
// reporting (the loss/step-time all-gather, validation, the straggler report) stays inside the replica's
// shard group, so that a stalled replica holds back only its own shard group and its gossip partners
// (TrainHooks::on_step sees replica 0's means); the history's world means are formed by one all-gather
// at the end. NoLoCo's per-outer-step consensus distance is this replica's distance to its group's mean
// (from the exchange; NaN when the round was skipped) and final_consensus_distance the global one at
// the end; DiLoCo measures the global one at every outer step (its all-reduce joins every replica anyway).
//
// Flight recorder: every communicator of the run keeps its last 64 operations (comm/flight_recorder.h);
// a communication error writes them into TrainHooks::flight_record_dir and names the file in the error.
//
// Checkpoints: save_every / ckpt_dir save the engine (fp32 masters + optimizer states) and the trainer
// state (seed, data step) through runtime/checkpoint_io.h; resume_from loads one at any world size,
// stage or layout and continues at the next step with the saved seed. Replicated runs save per replica
// with phi, m and the outer counters (replica_checkpoint_root). Resuming INTO noloco/diloco from a
// checkpoint of --sync zero starts the outer loop afresh (phi := theta, m := 0).
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/data.h"
#include "model/transformer.h"
#include "runtime/engine.h"
#include "runtime/trace.h"

namespace shardopt::train {

// How ranks agree on the model each step. Extension point: a new mode adds an enumerator, a name in
// sync_mode_name/parse_sync_mode and one function in trainer.cc's sync_step dispatch.
enum class SyncMode {
  kZero,    // synchronous ZeRO step: reduce-scatter gradients, sharded update, all-gather parameters
  kNoLoCo,  // ZeRO step inside each replica's shard group + NoLoCo gossip outer step every outer_every
  kDiLoCo,  // ZeRO step inside each replica's shard group + DiLoCo all-reduce outer step every outer_every
};
std::string sync_mode_name(SyncMode mode);
SyncMode parse_sync_mode(const std::string& name);  // ConfigError naming the known modes

struct TrainConfig {
  model::ModelConfig model;
  int global_batch = 32;  // sequences per optimizer step over all ranks (and all micro-batches)
  int steps = 200;
  int grad_accumulation = 1;  // micro-batches per step; global_batch % (ranks * grad_accumulation) == 0
  // Stages 2-3: accumulate micro-batches in full-size local gradient buffers (one reduction per
  // step) instead of reduce-scattering every micro-batch into the gradient shard (ZeRO-2 memory).
  bool local_grad_accumulation = false;
  // Threads of each rank's model forward/backward (a ThreadPool per rank); 0 = default_thread_count().
  int model_threads = 1;
  std::string optimizer = "muon";  // muon | normuon (hidden matrices; AdamW for the rest) | adamw | lion
  float matrix_lr = 0.02f;         // Muon/NorMuon learning rate
  float elementwise_lr = 3e-3f;    // AdamW/Lion learning rate (every tensor when optimizer is adamw/lion)
  float weight_decay = 0.0f;       // both groups
  std::string state_dtype = "f32";      // moment storage f32 | bf16 | q8 (element-wise group; and matrix by default)
  std::string matrix_state_dtype;       // Muon/NorMuon momentum storage; empty = state_dtype
  int warmup_steps = 20;           // linear warmup to lr, then cosine decay to min_lr_ratio * lr
  float min_lr_ratio = 0.1f;
  float max_grad_norm = 1.0f;  // 0 = no clipping
  int zero_stage = 2;
  int threads = 1;  // compute threads per rank for the optimizer step (EngineOptions.threads; 0 = automatic)
  proto::ShardLayout layout = proto::SHARD_LAYOUT_OWNED;
  int64_t bucket_bytes = int64_t{1} << 20;
  SyncMode sync = SyncMode::kZero;
  uint64_t seed = 1;
  // Replicas (noloco / diloco only): world = replicas x shard group.
  int replicas = 1;
  int outer_every = 50;         // H: inner steps per outer step
  double outer_lr = -1;         // alpha (NoLoCo) / outer lr (DiLoCo); < 0: the mode's default (0.7)
  double outer_momentum = -1;   // beta (NoLoCo, default 0.5) / outer momentum (DiLoCo, default 0.9); < 0: default
  double outer_gamma = -1;      // NoLoCo gamma (pull toward the group's phi); < 0: = alpha
  int gossip_group = 2;         // NoLoCo group size n
  int64_t outer_timeout_ms = 60000;  // longest wait in an outer step (GossipOptions::timeout)
  // Checkpoints (runtime/checkpoint_io.h).
  int save_every = 0;           // steps between saves into ckpt_dir (0 = never)
  std::string ckpt_dir;         // root of ckpt-<step> folders
  int keep_last = 0;            // checkpoints kept under ckpt_dir (0 = all)
  std::string resume_from;      // checkpoint folder to resume from (empty = fresh start)
  int eval_every = 50;   // steps between validation evaluations (and always at the last step); 0 = last only
  int eval_batches = 4;  // validation batches (of global_batch sequences) per evaluation
  int log_every = 10;    // progress line period (rank 0); 0 = silent
  int trace_steps = 3;   // the last steps recorded in the Chrome trace; 0 = none
  int sample_chars = 500;           // bytes of generated text at the end (prompt "ROMEO:"); 0 = none
  float sample_temperature = 0.8f;  // <= 0: greedy argmax
  int sample_top_k = 20;            // sample among the top_k most likely bytes; 0 = all
  // MuonClip: > 0 clips every layer's W_q/W_k heads whose max attention logit (global over ranks'
  // batches) exceeds tau, after the Muon step (needs muon/normuon); 0 = off.
  float qk_clip_tau = 0.0f;

  // ConfigError naming the field, what was expected and what was found.
  void validate(int world_size) const;
};

// The learning-rate multiplier of step s (1-based): linear warmup, then cosine to min_lr_ratio.
float lr_multiplier(const TrainConfig& config, int64_t step);

struct StepRecord {
  int64_t step = 0;
  double train_loss = 0;  // mean over ranks of each rank's mean token loss (= global mean: equal tokens)
  double val_loss = std::numeric_limits<double>::quiet_NaN();  // NaN when not evaluated at this step
  double lr_multiplier = 0;
  int64_t tokens = 0;          // tokens seen so far, all ranks
  uint64_t bytes_per_rank = 0;  // bytes this rank sent during the step (engine + loss/time all-gather)
  double seconds = 0;           // wall time of the step on this rank
  double grad_norm = 0;
  bool applied = true;
  bool outer_step = false;  // an outer step (noloco/diloco) ran after this step
  // Consensus distance of the replicas' fast weights just before the outer step (NaN when none ran).
  double consensus_distance = std::numeric_limits<double>::quiet_NaN();
  int64_t skipped_rounds = 0;  // outer rounds skipped so far (this rank)
  // Max |q.k|/sqrt(d_head) over layers and heads of this step's forward: over all ranks' batches with
  // QK-clip on (the value the clip used), rank 0's batch otherwise. Before this step's clip.
  double max_attention_logit = 0;
  int64_t qk_clipped_heads = 0;  // heads scaled by QK-clip after this step
  // Straggler: the rank whose forward + backward of this step took longest, when that is > 1.2 x the
  // median rank's (-1: none); and that ratio. World ranks; with replicas, among this replica's shard
  // group only (the per-step report does not join replicas). (Compute time, not step time: in a synchronous step the
  // other ranks' wait for a straggler shows as their sync time.)
  int slowest_rank = -1;
  double slowest_over_median = 0;
};

// One rank's per-step forward + backward seconds over the run: percentiles by nearest rank.
struct StepTimeStats {
  double p50 = 0, p90 = 0, max = 0;
};

struct TrainResult {
  std::vector<StepRecord> history;
  double final_val_loss = 0;
  double total_seconds = 0;
  double tokens_per_second = 0;
  runtime::PhaseTimes phase_seconds;  // summed over steps (this rank)
  double compute_seconds = 0;         // forward + backward, summed (this rank)
  runtime::MemoryReport memory;       // this rank
  std::vector<runtime::MemoryReport> memory_by_rank;  // every rank's (all-gathered)
  std::vector<StepTimeStats> step_compute_seconds_by_rank;  // every rank's (all-gathered)
  std::string sample;                                 // generated text (rank 0)
  runtime::TraceRecorder trace;                       // this rank's last trace_steps steps
  std::vector<std::vector<float>> final_params;       // full parameters (only with keep_params)
  int64_t num_params = 0;
  int world_size = 1;
  int rank = 0;
  int64_t first_step = 1;       // > 1 when resumed
  std::string resumed_from;     // checkpoint folder loaded ("" = fresh start)
  std::vector<std::string> saved_checkpoints;  // folders written (rank 0)
  int64_t skipped_rounds = 0;   // outer rounds skipped (this rank)
  double final_consensus_distance = std::numeric_limits<double>::quiet_NaN();  // last measured
};

struct TrainHooks {
  // Called on rank 0 after each step (progress display).
  std::function<void(const StepRecord&, const TrainConfig&)> on_step;
  // Called on every rank before each step's forward pass (tests: inject a straggler).
  std::function<void(int rank, int64_t step)> before_step;
  bool keep_params = false;  // fill TrainResult::final_params (tests)
  // Where each rank writes its flight record (flight_record_path) when a communication error
  // (TimeoutError, DesyncError, PeerError) ends the run; "" = nowhere (the error still carries the
  // failing communicator's record). The CLI passes the run folder.
  std::string flight_record_dir;
};

// <dir>/flight_recorder_rank<rank>.txt: every communicator of the rank (world, shard group, cross,
// gossip links) with its last 64 operations, headed by the error and by where each one stopped.
std::string flight_record_path(const std::string& dir, int rank);

// The checkpoint folder named by --resume: `path` itself when it is a checkpoint, else the latest
// checkpoint under it (for a replicated run's root: the latest of replica-0/); an empty path means the
// latest under ckpt_dir. ConfigError when none exists.
std::string resolve_resume_dir(const std::string& path, const std::string& ckpt_dir);
// Replicated runs (--sync noloco|diloco) save per replica (replicas differ between outer steps):
// <ckpt-dir>/replica-<r>/ckpt-<step>, with phi and m as extra states and the outer counters.
std::string replica_checkpoint_root(const std::string& ckpt_dir, int replica);
// The checkpoint replica `replica` resumes from, given replica 0's (.../replica-0/ckpt-<step>): its
// sibling .../replica-<replica>/ckpt-<step>; any other folder is shared by every replica.
std::string replica_checkpoint_dir(const std::string& resume_from, int replica);

// Collective: every rank of `comm` calls it with the same corpus and config.
TrainResult train_rank(comm::Communicator& comm, const model::ByteCorpus& corpus, const TrainConfig& config,
                       const TrainHooks& hooks = {});

// The default progress line: "step 40/300  loss 2.3141  lr x0.98  12.3k tok/s  1.23 MB sent/rank/step".
std::string progress_line(const StepRecord& record, const TrainConfig& config, double tokens_per_second);

}  // namespace shardopt::train
