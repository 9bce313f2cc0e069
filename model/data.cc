#include "model/data.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>

#include "base/error.h"
#include "model/rng.h"

namespace shardopt::model {
namespace {
// Salt for the validation offsets, fixed so the validation set does not depend on the seed.
constexpr uint64_t kValidationSalt = 0x76616C6964617465ull;
}  // namespace

ByteCorpus::ByteCorpus(std::vector<uint8_t> bytes, double validation_fraction) : bytes_(std::move(bytes)) {
  if (!(validation_fraction > 0.0 && validation_fraction < 1.0))
    throw ConfigError("ByteCorpus: validation_fraction must be in (0, 1), got " + std::to_string(validation_fraction));
  const auto val = static_cast<std::size_t>(std::floor(static_cast<double>(bytes_.size()) * validation_fraction));
  split_ = bytes_.size() - val;
}

ByteCorpus ByteCorpus::load(const std::string& path, double validation_fraction) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("ByteCorpus::load: cannot open data file '" + path + "'");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw ConfigError("ByteCorpus::load: read error in '" + path + "'");
  return ByteCorpus(std::move(bytes), validation_fraction);
}

BatchSampler::BatchSampler(const ByteCorpus& corpus, const SamplerConfig& config) : corpus_(&corpus), config_(config) {
  const auto& c = config_;
  if (c.world <= 0) throw ConfigError("BatchSampler: world size must be > 0, got " + std::to_string(c.world));
  if (c.rank < 0 || c.rank >= c.world)
    throw ConfigError("BatchSampler: rank must be in [0, " + std::to_string(c.world) + "), got " +
                      std::to_string(c.rank));
  if (c.global_batch <= 0 || c.global_batch % c.world != 0)
    throw ConfigError("BatchSampler: global batch size must be a positive multiple of the world size " +
                      std::to_string(c.world) + ", got " + std::to_string(c.global_batch));
  if (c.seq_len <= 0) throw ConfigError("BatchSampler: seq_len must be > 0, got " + std::to_string(c.seq_len));
  const auto need = static_cast<std::size_t>(c.seq_len) + 1;
  if (corpus.train().size() < need || corpus.validation().size() < need)
    throw ConfigError("BatchSampler: train and validation splits need at least seq_len + 1 = " +
                      std::to_string(need) + " bytes, got " + std::to_string(corpus.train().size()) + " and " +
                      std::to_string(corpus.validation().size()));
}

TokenBatch BatchSampler::make_batch() const {
  TokenBatch b;
  b.batch = local_batch();
  b.seq_len = config_.seq_len;
  b.inputs.resize(static_cast<std::size_t>(b.batch) * b.seq_len);
  b.targets.resize(b.inputs.size());
  return b;
}

int64_t BatchSampler::train_offset(int64_t step, int global_index) const {
  const uint64_t starts = corpus_->train().size() - static_cast<uint64_t>(config_.seq_len);  // >= 1
  return static_cast<int64_t>(
      hash_combine(config_.seed, static_cast<uint64_t>(step), static_cast<uint64_t>(global_index)) % starts);
}

int64_t BatchSampler::validation_offset(int batch_index, int global_index) const {
  const uint64_t starts = corpus_->validation().size() - static_cast<uint64_t>(config_.seq_len);
  return static_cast<int64_t>(
      hash_combine(kValidationSalt, static_cast<uint64_t>(batch_index), static_cast<uint64_t>(global_index)) % starts);
}

void BatchSampler::check_batch(const TokenBatch& out, const char* where) const {
  const auto n = static_cast<std::size_t>(local_batch()) * config_.seq_len;
  if (out.batch != local_batch() || out.seq_len != config_.seq_len || out.inputs.size() != n ||
      out.targets.size() != n)
    throw ConfigError(std::string("BatchSampler::") + where + ": batch must be " + std::to_string(local_batch()) +
                      "x" + std::to_string(config_.seq_len) + " (use make_batch()), got " + std::to_string(out.batch) +
                      "x" + std::to_string(out.seq_len) + " with " + std::to_string(out.inputs.size()) + " inputs");
}

void BatchSampler::fill(std::span<const uint8_t> split, int64_t offset, int local_index, TokenBatch& out) const {
  const int T = config_.seq_len;
  const uint8_t* src = split.data() + offset;
  std::copy(src, src + T, out.inputs.begin() + static_cast<std::ptrdiff_t>(local_index) * T);
  std::copy(src + 1, src + T + 1, out.targets.begin() + static_cast<std::ptrdiff_t>(local_index) * T);
}

void BatchSampler::train_batch(int64_t step, TokenBatch& out) const {
  check_batch(out, "train_batch");
  const int first = config_.rank * local_batch();
  for (int i = 0; i < local_batch(); ++i) fill(corpus_->train(), train_offset(step, first + i), i, out);
}

void BatchSampler::validation_batch(int batch_index, TokenBatch& out) const {
  check_batch(out, "validation_batch");
  const int first = config_.rank * local_batch();
  for (int i = 0; i < local_batch(); ++i)
    fill(corpus_->validation(), validation_offset(batch_index, first + i), i, out);
}

double validation_loss(Transformer& model, std::span<const ParamBinding> params, const BatchSampler& sampler,
                       int num_batches, TokenBatch& scratch) {
  if (num_batches <= 0)
    throw ConfigError("validation_loss: num_batches must be > 0, got " + std::to_string(num_batches));
  double total = 0.0;
  for (int k = 0; k < num_batches; ++k) {
    sampler.validation_batch(k, scratch);
    total += model.forward(params, scratch.inputs.data(), scratch.targets.data(), scratch.batch, scratch.seq_len);
  }
  return total / num_batches;
}

}  // namespace shardopt::model
