// Byte-level data pipeline: a text file as bytes, a train/validation split, and batches that
// are pure functions of (seed, step) so every rank can cut its own slice with no communication.
//
// Global batch of step s: B sequences; sequence i starts at hash(seed, s, i) in the train split.
// Rank r of N takes sequences [r·B/N, (r+1)·B/N). The concatenation of all ranks' slices is the
// 1-rank batch, so 1-rank training on B equals N-rank training with averaged gradients.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "model/transformer.h"

namespace shardopt::model {

// inputs[b][t] = text[start_b + t], targets[b][t] = text[start_b + t + 1].
struct TokenBatch {
  int batch = 0;
  int seq_len = 0;
  std::vector<uint8_t> inputs, targets;  // [batch * seq_len]
};

class ByteCorpus {
 public:
  // The last validation_fraction of the bytes (rounded down) is the validation split.
  explicit ByteCorpus(std::vector<uint8_t> bytes, double validation_fraction = 0.1);
  // Throws ConfigError when the file cannot be read.
  static ByteCorpus load(const std::string& path, double validation_fraction = 0.1);

  std::span<const uint8_t> train() const { return {bytes_.data(), split_}; }
  std::span<const uint8_t> validation() const { return {bytes_.data() + split_, bytes_.size() - split_}; }
  std::size_t size() const { return bytes_.size(); }

 private:
  std::vector<uint8_t> bytes_;
  std::size_t split_ = 0;
};

struct SamplerConfig {
  int global_batch = 16;  // B, sequences per step over all ranks
  int seq_len = 64;
  uint64_t seed = 0;
  int rank = 0;
  int world = 1;  // N; must divide global_batch
};

class BatchSampler {
 public:
  // Throws ConfigError for B not divisible by N, a rank outside [0, N), or a split shorter
  // than seq_len + 1 bytes.
  BatchSampler(const ByteCorpus& corpus, const SamplerConfig& config);

  const SamplerConfig& config() const { return config_; }
  int local_batch() const { return config_.global_batch / config_.world; }
  // A batch sized for this rank's slice; reuse it every step (sampling does not allocate).
  TokenBatch make_batch() const;

  // Offset into the train split of sequence global_index of step's global batch.
  int64_t train_offset(int64_t step, int global_index) const;
  // This rank's slice of step's global batch.
  void train_batch(int64_t step, TokenBatch& out) const;

  // The fixed validation set: batch batch_index, sequence global_index. Independent of the
  // training seed so runs with different seeds are scored on the same text.
  int64_t validation_offset(int batch_index, int global_index) const;
  void validation_batch(int batch_index, TokenBatch& out) const;

 private:
  void fill(std::span<const uint8_t> split, int64_t offset, int local_index, TokenBatch& out) const;
  void check_batch(const TokenBatch& out, const char* where) const;

  const ByteCorpus* corpus_;  // not owned; must outlive the sampler
  SamplerConfig config_;
};

// Mean loss over this rank's slices of validation batches [0, num_batches). Every rank holds
// the same number of tokens, so the mean over ranks of this value is the global validation loss.
double validation_loss(Transformer& model, std::span<const ParamBinding> params, const BatchSampler& sampler,
                       int num_batches, TokenBatch& scratch);

}  // namespace shardopt::model
