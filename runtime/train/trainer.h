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
  kZero,  // synchronous ZeRO step: reduce-scatter gradients, sharded update, all-gather parameters
};
std::string sync_mode_name(SyncMode mode);
SyncMode parse_sync_mode(const std::string& name);  // ConfigError naming the known modes

struct TrainConfig {
  model::ModelConfig model;
  int global_batch = 32;  // sequences per optimizer step over all ranks (and all micro-batches)
  int steps = 200;
  int grad_accumulation = 1;  // micro-batches per step; global_batch % (ranks * grad_accumulation) == 0
  std::string optimizer = "muon";  // muon | normuon (hidden matrices; AdamW for the rest) | adamw | lion
  float matrix_lr = 0.02f;         // Muon/NorMuon learning rate
  float elementwise_lr = 3e-3f;    // AdamW/Lion learning rate (every tensor when optimizer is adamw/lion)
  float weight_decay = 0.0f;       // both groups
  int warmup_steps = 20;           // linear warmup to lr, then cosine decay to min_lr_ratio * lr
  float min_lr_ratio = 0.1f;
  float max_grad_norm = 1.0f;  // 0 = no clipping
  int zero_stage = 2;
  proto::ShardLayout layout = proto::SHARD_LAYOUT_OWNED;
  int64_t bucket_bytes = int64_t{1} << 20;
  SyncMode sync = SyncMode::kZero;
  uint64_t seed = 1;
  int eval_every = 50;   // steps between validation evaluations (and always at the last step); 0 = last only
  int eval_batches = 4;  // validation batches (of global_batch sequences) per evaluation
  int log_every = 10;    // progress line period (rank 0); 0 = silent
  int trace_steps = 3;   // the last steps recorded in the Chrome trace; 0 = none
  int sample_tokens = 200;  // generated text at the end (greedy); 0 = none

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
  uint64_t bytes_per_rank = 0;  // bytes this rank sent during the step (engine + loss all-reduce)
  double seconds = 0;           // wall time of the step on this rank
  double grad_norm = 0;
  bool applied = true;
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
  std::string sample;                                 // generated text (rank 0)
  runtime::TraceRecorder trace;                       // this rank's last trace_steps steps
  std::vector<std::vector<float>> final_params;       // full parameters (only with keep_params)
  int64_t num_params = 0;
  int world_size = 1;
  int rank = 0;
};

struct TrainHooks {
  // Called on rank 0 after each step (progress display).
  std::function<void(const StepRecord&, const TrainConfig&)> on_step;
  bool keep_params = false;  // fill TrainResult::final_params (tests)
};

// Collective: every rank of `comm` calls it with the same corpus and config.
TrainResult train_rank(comm::Communicator& comm, const model::ByteCorpus& corpus, const TrainConfig& config,
                       const TrainHooks& hooks = {});

// The default progress line: "step 40/300  loss 2.3141  lr x0.98  12.3k tok/s  1.23 MB sent/rank/step".
std::string progress_line(const StepRecord& record, const TrainConfig& config, double tokens_per_second);

}  // namespace shardopt::train
