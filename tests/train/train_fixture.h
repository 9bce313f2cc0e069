// Shared by the train suites: the corpus, a small fast configuration, and a threads-backend run.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "comm/thread_backend.h"
#include "model/data.h"
#include "train/trainer.h"

namespace shardopt::train::test_fixture {

inline const model::ByteCorpus& corpus() {
  static const model::ByteCorpus c = model::ByteCorpus::load(SHARDOPT_SOURCE_DIR "/data/tinyshakespeare.txt");
  return c;
}

// d_model 32, 2 layers, context 16, global batch 8, several buckets, no evaluation/logging/trace.
inline TrainConfig small_config(const std::string& optimizer, int steps) {
  TrainConfig c;
  c.model.d_model = 32;
  c.model.n_layer = 2;
  c.model.n_head = 2;
  c.model.context = 16;
  c.global_batch = 8;
  c.steps = steps;
  c.optimizer = optimizer;
  c.matrix_lr = 0.02f;
  c.elementwise_lr = 3e-3f;
  c.warmup_steps = 2;
  c.eval_every = 0;
  c.eval_batches = 1;
  c.log_every = 0;
  c.trace_steps = 0;
  c.sample_chars = 0;
  c.bucket_bytes = 8192;
  return c;
}

// Every rank's result (with final parameters) of one run on `ranks` thread ranks.
inline std::vector<TrainResult> run(int ranks, const TrainConfig& c) {
  std::vector<TrainResult> out(ranks);
  std::mutex mu;
  TrainHooks hooks;
  hooks.keep_params = true;
  comm::run_ranks(ranks, [&](comm::Communicator& comm) {
    auto r = train_rank(comm, corpus(), c, hooks);
    std::lock_guard<std::mutex> lock(mu);
    out[comm.rank()] = std::move(r);
  });
  return out;
}

}  // namespace shardopt::train::test_fixture
