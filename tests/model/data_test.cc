// Data split, deterministic batch sampling, rank slicing, and text generation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "base/error.h"
#include "model/data.h"
#include "model/generate.h"
#include "tests/model/reference_model.h"

namespace shardopt::model {
namespace {

std::vector<uint8_t> ramp_text(std::size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> v(n);
  for (auto& c : v) c = static_cast<uint8_t>(gen() % 256);
  return v;
}

TEST(ByteCorpus, LastTenPercentIsValidation) {
  const auto bytes = ramp_text(1005, 1);
  ByteCorpus c(bytes);
  EXPECT_EQ(c.size(), 1005u);
  EXPECT_EQ(c.validation().size(), 100u);  // floor(100.5)
  EXPECT_EQ(c.train().size(), 905u);
  EXPECT_TRUE(std::equal(c.train().begin(), c.train().end(), bytes.begin()));
  EXPECT_TRUE(std::equal(c.validation().begin(), c.validation().end(), bytes.begin() + 905));
  ByteCorpus quarter(bytes, 0.25);
  EXPECT_EQ(quarter.validation().size(), 251u);
  EXPECT_THROW(ByteCorpus(bytes, 0.0), ConfigError);
  EXPECT_THROW(ByteCorpus(bytes, 1.0), ConfigError);
}

TEST(ByteCorpus, LoadsTinyShakespeareAsBytes) {
  const std::string path = std::string(SHARDOPT_DATA_DIR) + "/tinyshakespeare.txt";
  const auto file_size = std::filesystem::file_size(path);
  ByteCorpus c = ByteCorpus::load(path);
  EXPECT_EQ(c.size(), file_size);
  EXPECT_EQ(c.validation().size(), file_size / 10);
  std::ifstream in(path, std::ios::binary);
  std::string head(32, '\0');
  in.read(head.data(), 32);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), c.train().begin()));
  EXPECT_THROW(ByteCorpus::load("/nonexistent/shardopt_data.txt"), ConfigError);
}

class Sampler : public ::testing::Test {
 protected:
  std::vector<uint8_t> bytes = ramp_text(20000, 2);
  ByteCorpus corpus{bytes};
  SamplerConfig cfg(int B, int world, int rank, uint64_t seed = 5) {
    SamplerConfig c;
    c.global_batch = B;
    c.seq_len = 16;
    c.seed = seed;
    c.world = world;
    c.rank = rank;
    return c;
  }
};

TEST_F(Sampler, BatchesAreContiguousTextWithShiftedTargets) {
  BatchSampler s(corpus, cfg(4, 1, 0));
  TokenBatch b = s.make_batch();
  for (int64_t step : {0, 1, 77}) {
    s.train_batch(step, b);
    for (int i = 0; i < 4; ++i) {
      const int64_t off = s.train_offset(step, i);
      ASSERT_GE(off, 0);
      ASSERT_LE(off + 17, int64_t(corpus.train().size()));
      for (int t = 0; t < 16; ++t) {
        ASSERT_EQ(b.inputs[i * 16 + t], bytes[off + t]);
        ASSERT_EQ(b.targets[i * 16 + t], bytes[off + t + 1]);
      }
    }
  }
  s.validation_batch(3, b);
  for (int i = 0; i < 4; ++i) {
    const int64_t off = s.validation_offset(3, i);
    const std::size_t base = corpus.train().size();
    ASSERT_LE(off + 17, int64_t(corpus.validation().size()));
    for (int t = 0; t < 16; ++t) ASSERT_EQ(b.inputs[i * 16 + t], bytes[base + off + t]);
  }
}

TEST_F(Sampler, SameSeedAndStepGiveSameBatchOthersDiffer) {
  BatchSampler a(corpus, cfg(8, 1, 0)), again(corpus, cfg(8, 1, 0)), other_seed(corpus, cfg(8, 1, 0, 6));
  TokenBatch x = a.make_batch(), y = a.make_batch(), z = a.make_batch();
  a.train_batch(10, x);
  again.train_batch(10, y);
  EXPECT_EQ(x.inputs, y.inputs);
  EXPECT_EQ(x.targets, y.targets);
  again.train_batch(11, y);
  EXPECT_NE(x.inputs, y.inputs);
  other_seed.train_batch(10, z);
  EXPECT_NE(x.inputs, z.inputs);
  // The validation set does not depend on the training seed.
  a.validation_batch(0, x);
  other_seed.validation_batch(0, z);
  EXPECT_EQ(x.inputs, z.inputs);
}

TEST_F(Sampler, OffsetsCoverTheTrainSplit) {
  BatchSampler s(corpus, cfg(16, 1, 0));
  const int64_t starts = int64_t(corpus.train().size()) - 16;
  int64_t lo = starts, hi = 0;
  std::set<int64_t> distinct;
  for (int step = 0; step < 200; ++step)
    for (int i = 0; i < 16; ++i) {
      const int64_t o = s.train_offset(step, i);
      lo = std::min(lo, o);
      hi = std::max(hi, o);
      distinct.insert(o);
    }
  EXPECT_LT(lo, starts / 50);
  EXPECT_GT(hi, starts - starts / 50);
  EXPECT_GT(distinct.size(), 2800u);  // 3200 draws from ~18000 starts: few collisions
}

TEST_F(Sampler, RankSlicesConcatenateToTheOneRankBatch) {
  const int B = 12;
  BatchSampler one(corpus, cfg(B, 1, 0));
  TokenBatch whole = one.make_batch();
  for (int world : {1, 2, 3, 4, 6, 12}) {
    for (int64_t step : {0, 5, 1234}) {
      one.train_batch(step, whole);
      std::vector<uint8_t> in, tg;
      for (int r = 0; r < world; ++r) {
        BatchSampler s(corpus, cfg(B, world, r));
        TokenBatch part = s.make_batch();
        ASSERT_EQ(part.batch, B / world);
        s.train_batch(step, part);
        in.insert(in.end(), part.inputs.begin(), part.inputs.end());
        tg.insert(tg.end(), part.targets.begin(), part.targets.end());
      }
      EXPECT_EQ(in, whole.inputs) << "world " << world << " step " << step;
      EXPECT_EQ(tg, whole.targets) << "world " << world << " step " << step;
    }
    one.validation_batch(2, whole);
    std::vector<uint8_t> in;
    for (int r = 0; r < world; ++r) {
      BatchSampler s(corpus, cfg(B, world, r));
      TokenBatch part = s.make_batch();
      s.validation_batch(2, part);
      in.insert(in.end(), part.inputs.begin(), part.inputs.end());
    }
    EXPECT_EQ(in, whole.inputs) << "validation, world " << world;
  }
}

TEST_F(Sampler, RejectsBadConfigs) {
  EXPECT_THROW(BatchSampler(corpus, cfg(10, 4, 0)), ConfigError);  // 10 % 4 != 0
  EXPECT_THROW(BatchSampler(corpus, cfg(8, 4, 4)), ConfigError);   // rank out of range
  EXPECT_THROW(BatchSampler(corpus, cfg(8, 0, 0)), ConfigError);
  EXPECT_THROW(BatchSampler(corpus, cfg(0, 1, 0)), ConfigError);
  ByteCorpus tiny(ramp_text(100, 3));  // validation split: 10 bytes < seq_len + 1
  EXPECT_THROW(BatchSampler(tiny, cfg(2, 1, 0)), ConfigError);
  BatchSampler s(corpus, cfg(8, 2, 1));
  TokenBatch wrong;
  EXPECT_THROW(s.train_batch(0, wrong), ConfigError);
  try {
    BatchSampler(corpus, cfg(10, 4, 0));
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("world size 4"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("got 10"), std::string::npos) << e.what();
  }
}

ModelConfig tiny_model() {
  ModelConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.context = 16;
  return c;
}

struct Weights {
  std::vector<std::vector<float>> value;
  std::vector<ParamBinding> bindings;
  Weights(const Transformer& m, uint32_t seed) {
    std::mt19937 gen(seed);
    for (const auto& p : m.params()) {
      value.emplace_back(static_cast<std::size_t>(p.numel()));
      std::normal_distribution<float> n(p.kind == ParamKind::kNormGain ? 1.0f : 0.0f, 0.5f);
      for (float& v : value.back()) v = n(gen);
    }
    for (auto& v : value) bindings.push_back({v.data(), nullptr});
  }
};

TEST_F(Sampler, ValidationLossAveragesOverRanksToTheOneRankValue) {
  Transformer m(tiny_model());
  Weights w(m, 4);
  BatchSampler one(corpus, cfg(4, 1, 0));
  TokenBatch scratch = one.make_batch();
  const double whole = validation_loss(m, w.bindings, one, 3, scratch);
  double sum = 0;
  for (int r = 0; r < 2; ++r) {
    BatchSampler s(corpus, cfg(4, 2, r));
    TokenBatch part = s.make_batch();
    sum += validation_loss(m, w.bindings, s, 3, part);
  }
  EXPECT_NEAR(sum / 2, whole, 1e-5 * whole);
  EXPECT_GT(whole, 0.0);
}

TEST(Generate, PickTokenFollowsTheTemperedSoftmax) {
  const float logits[3] = {0.0f, std::log(3.0f), -1e4f};  // probabilities 1/4, 3/4, 0 at T = 1
  EXPECT_EQ(pick_token(logits, 3, 0.0f, 0.99), 1);
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 0.2), 0);
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 0.3), 1);
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 0.999999), 1);
  // T = 0.5 squares the odds: 1/10 vs 9/10.
  EXPECT_EQ(pick_token(logits, 3, 0.5f, 0.09), 0);
  EXPECT_EQ(pick_token(logits, 3, 0.5f, 0.11), 1);
}

TEST(Generate, GreedyPicksTheReferenceArgmaxOverASlidingWindow) {
  Transformer m(tiny_model());
  Weights w(m, 9);
  const std::string prompt = "To be, or not to be, that is the";  // longer than the context of 16
  GenerateOptions opt;
  opt.max_new_tokens = 6;
  const std::string out = generate(m, w.bindings, prompt, opt);
  ASSERT_EQ(out.size(), prompt.size() + 6);
  EXPECT_EQ(out.substr(0, prompt.size()), prompt);
  const auto& c = m.config();
  testing::RefConfig rc{c.vocab, c.d_model, c.n_layer, c.n_head, c.context, c.mlp_hidden(), false, c.norm_eps};
  std::vector<std::vector<double>> wd;
  for (const auto& v : w.value) wd.emplace_back(v.begin(), v.end());
  for (std::size_t pos = prompt.size(); pos < out.size(); ++pos) {
    std::vector<uint8_t> window(out.begin() + static_cast<std::ptrdiff_t>(pos - 16), out.begin() + pos);
    const auto ref = testing::reference_forward(rc, wd, window, {}, 1, 16);
    const auto last = ref.logits.begin() + 15 * 256;
    EXPECT_EQ(static_cast<uint8_t>(out[pos]), std::max_element(last, last + 256) - last) << "byte " << pos;
  }
}

TEST(Generate, TemperatureSamplingIsDeterministicPerSeed) {
  Transformer m(tiny_model());
  Weights w(m, 10);
  GenerateOptions opt;
  opt.max_new_tokens = 24;
  opt.temperature = 2.0f;
  opt.seed = 1;
  const std::string a = generate(m, w.bindings, "", opt);
  EXPECT_EQ(a.size(), 25u);
  EXPECT_EQ(a, generate(m, w.bindings, "", opt));
  opt.seed = 2;
  EXPECT_NE(a, generate(m, w.bindings, "", opt));
}

TEST(Generate, TopKRenormalizesOverTheKLargestLogits) {
  const float logits[3] = {0.0f, std::log(3.0f), std::log(4.0f)};  // 1/8, 3/8, 4/8 at T = 1
  // top_k = 2 keeps bytes 1 and 2: 3/7 and 4/7, walked in byte order.
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 3.0 / 7 - 1e-3, 2), 1);
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 3.0 / 7 + 1e-3, 2), 2);
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 1e-9, 2), 1);  // byte 0 is never drawn, even at u ~ 0
  EXPECT_EQ(pick_token(logits, 3, 1.0f, 1e-9, 0), 0);  // ... though it is without top-k
  // Ties at the k-th place go to the lower byte.
  const float tied[4] = {1.0f, 2.0f, 1.0f, 0.0f};
  for (double u : {0.01, 0.5, 0.99}) EXPECT_NE(pick_token(tied, 4, 1.0f, u, 2), 2) << u;
}

TEST(Generate, TemperatureToZeroIsTheArgmax) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(256);
  for (int trial = 0; trial < 50; ++trial) {
    for (auto& l : logits) l = normal(rng);
    const int argmax = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    for (double u : {1e-6, 0.3, 0.999999}) {
      EXPECT_EQ(pick_token(logits.data(), 256, 1e-4f, u), argmax);
      EXPECT_EQ(pick_token(logits.data(), 256, 1e-4f, u, 10), argmax);
    }
  }
}

TEST(Generate, TopKOneIsGreedyDecoding) {
  Transformer m(tiny_model());
  Weights w(m, 11);
  GenerateOptions greedy;
  greedy.max_new_tokens = 24;
  GenerateOptions top1 = greedy;
  top1.temperature = 3.0f;  // hot enough that plain sampling would wander off the argmax
  top1.top_k = 1;
  top1.seed = 7;
  EXPECT_EQ(generate(m, w.bindings, "ROMEO:", top1), generate(m, w.bindings, "ROMEO:", greedy));
  GenerateOptions hot = top1;
  hot.top_k = 0;
  EXPECT_NE(generate(m, w.bindings, "ROMEO:", hot), generate(m, w.bindings, "ROMEO:", greedy));
  GenerateOptions cold = hot;  // temperature -> 0 limit of the whole decoder
  cold.temperature = 1e-5f;
  EXPECT_EQ(generate(m, w.bindings, "ROMEO:", cold), generate(m, w.bindings, "ROMEO:", greedy));
}

// Every sampled byte is among the k largest logits of the double-precision reference model on the
// window before it; without top-k, the same temperature does leave that set.
TEST(Generate, TopKNeverEmitsOutsideTheKMostLikelyOfTheReference) {
  Transformer m(tiny_model());
  Weights w(m, 12);
  const auto& c = m.config();
  testing::RefConfig rc{c.vocab, c.d_model, c.n_layer, c.n_head, c.context, c.mlp_hidden(), false, c.norm_eps};
  std::vector<std::vector<double>> wd;
  for (const auto& v : w.value) wd.emplace_back(v.begin(), v.end());
  const std::string prompt = "To be, or not to be, that is the";  // longer than the context of 16
  const int k = 5;
  auto outside_top_k = [&](const std::string& out) {
    int outside = 0;
    for (std::size_t pos = prompt.size(); pos < out.size(); ++pos) {
      std::vector<uint8_t> window(out.begin() + static_cast<std::ptrdiff_t>(pos - 16), out.begin() + pos);
      const auto ref = testing::reference_forward(rc, wd, window, {}, 1, 16);
      std::vector<double> last(ref.logits.begin() + 15 * 256, ref.logits.begin() + 16 * 256);
      const double chosen = last[static_cast<uint8_t>(out[pos])];
      // Rank of the chosen byte: how many logits are strictly larger.
      const auto larger = std::count_if(last.begin(), last.end(), [&](double l) { return l > chosen; });
      outside += larger >= k ? 1 : 0;
    }
    return outside;
  };
  GenerateOptions opt;
  opt.max_new_tokens = 40;
  opt.temperature = 5.0f;
  opt.top_k = k;
  for (uint64_t seed : {1, 2, 3}) {
    opt.seed = seed;
    const std::string out = generate(m, w.bindings, prompt, opt);
    EXPECT_EQ(outside_top_k(out), 0) << "seed " << seed;
    EXPECT_EQ(out, generate(m, w.bindings, prompt, opt)) << "deterministic for a seed";
  }
  opt.top_k = 0;
  EXPECT_GT(outside_top_k(generate(m, w.bindings, prompt, opt)), 0) << "the check must be able to fail";
}

}  // namespace
}  // namespace shardopt::model

namespace shardopt::model {
namespace {

// End to end: the gradients are usable for learning. A test-local Adam on tinyshakespeare must
// take the validation loss far below the uniform ln(256) = 5.55 within a few dozen steps.
TEST(Integration, AdamOnTinyShakespeareLowersValidationLoss) {
  ModelConfig c;
  c.d_model = 32;
  c.n_layer = 2;
  c.n_head = 2;
  c.context = 32;
  Transformer m(c);
  std::vector<std::vector<float>> w, g, mom, var;
  std::vector<ParamBinding> bindings;
  std::vector<float*> ptrs;
  for (const auto& p : m.params()) {
    const auto n = static_cast<std::size_t>(p.numel());
    w.emplace_back(n);
    g.emplace_back(n);
    mom.emplace_back(n, 0.0f);
    var.emplace_back(n, 0.0f);
  }
  for (std::size_t i = 0; i < w.size(); ++i) {
    bindings.push_back({w[i].data(), g[i].data()});
    ptrs.push_back(w[i].data());
  }
  m.init(42, ptrs);
  ByteCorpus corpus = ByteCorpus::load(std::string(SHARDOPT_DATA_DIR) + "/tinyshakespeare.txt");
  SamplerConfig sc;
  sc.global_batch = 8;
  sc.seq_len = 32;
  sc.seed = 7;
  BatchSampler sampler(corpus, sc);
  TokenBatch batch = sampler.make_batch();
  const double before = validation_loss(m, bindings, sampler, 4, batch);
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.99f;
  for (int step = 1; step <= 80; ++step) {
    sampler.train_batch(step, batch);
    m.forward(bindings, batch.inputs.data(), batch.targets.data(), batch.batch, batch.seq_len);
    m.backward(bindings, GradMode::kOverwrite);
    const float c1 = 1.0f - std::pow(b1, float(step)), c2 = 1.0f - std::pow(b2, float(step));
    for (std::size_t t = 0; t < w.size(); ++t)
      for (std::size_t i = 0; i < w[t].size(); ++i) {
        mom[t][i] = b1 * mom[t][i] + (1 - b1) * g[t][i];
        var[t][i] = b2 * var[t][i] + (1 - b2) * g[t][i] * g[t][i];
        w[t][i] -= lr * (mom[t][i] / c1) / (std::sqrt(var[t][i] / c2) + 1e-8f);
      }
  }
  const double after = validation_loss(m, bindings, sampler, 4, batch);
  EXPECT_NEAR(before, std::log(256.0), 0.1);
  EXPECT_LT(after, 3.3) << "before " << before;
  RecordProperty("validation_loss_after", std::to_string(after));
  GenerateOptions opt;
  opt.max_new_tokens = 40;
  const std::string sample = generate(m, bindings, "ROMEO:", opt);
  int printable = 0;
  for (std::size_t i = 6; i < sample.size(); ++i) printable += (sample[i] >= 32 && sample[i] < 127) || sample[i] == '\n';
  EXPECT_GE(printable, 38) << sample;  // learned the byte distribution of English text
  RecordProperty("sample", sample);
}

}  // namespace
}  // namespace shardopt::model
