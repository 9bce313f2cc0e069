#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "base/error.h"
#include "model/rng.h"

namespace shardopt::model {

int pick_token(const float* logits, int vocab, float temperature, double u, int top_k) {
  const int argmax = static_cast<int>(std::max_element(logits, logits + vocab) - logits);
  if (temperature <= 0.0f || top_k == 1) return argmax;
  // Candidates: every byte, or the top_k largest logits (ties broken toward the lower byte), in byte order.
  std::vector<int> candidates(static_cast<std::size_t>(vocab));
  std::iota(candidates.begin(), candidates.end(), 0);
  if (top_k > 0 && top_k < vocab) {
    std::nth_element(candidates.begin(), candidates.begin() + top_k, candidates.end(), [&](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    candidates.resize(static_cast<std::size_t>(top_k));
    std::sort(candidates.begin(), candidates.end());
  }
  // Inverse CDF of softmax(logits / temperature) over the candidates, computed in double.
  const double m = logits[argmax];
  double z = 0.0;
  for (int c : candidates) z += std::exp((logits[c] - m) / temperature);
  double acc = 0.0;
  const double target = u * z;
  for (int c : candidates) {
    acc += std::exp((logits[c] - m) / temperature);
    if (target < acc) return c;
  }
  return argmax;  // rounding left target at the very top
}

std::string generate(Transformer& model, std::span<const ParamBinding> params, std::string_view prompt,
                     const GenerateOptions& options) {
  if (options.max_new_tokens < 0)
    throw ConfigError("generate: max_new_tokens must be >= 0, got " + std::to_string(options.max_new_tokens));
  if (options.top_k < 0) throw ConfigError("generate: top_k must be >= 0 (0 = all), got " + std::to_string(options.top_k));
  const int ctx = model.config().context, vocab = model.config().vocab;
  std::string text = prompt.empty() ? std::string("\n") : std::string(prompt);
  model.reserve(1, ctx);
  std::vector<uint8_t> window(static_cast<std::size_t>(ctx));
  for (int step = 0; step < options.max_new_tokens; ++step) {
    const int len = static_cast<int>(std::min<std::size_t>(text.size(), static_cast<std::size_t>(ctx)));
    std::copy(text.end() - len, text.end(), window.begin());
    model.forward(params, window.data(), nullptr, 1, len);
    const float* last = model.logits() + static_cast<std::ptrdiff_t>(len - 1) * vocab;
    const double u = uniform_open(hash_combine(options.seed, static_cast<uint64_t>(step)));
    text.push_back(static_cast<char>(pick_token(last, vocab, options.temperature, u, options.top_k)));
  }
  return text;
}

}  // namespace shardopt::model
