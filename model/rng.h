// Small deterministic random sources, identical on every platform and standard library
// (std::normal_distribution is implementation-defined, so it cannot reproduce across builds).
#pragma once

#include <cmath>
#include <cstdint>

namespace shardopt::model {

// SplitMix64 finalizer: a strong 64-bit mix, used as a counter-based hash.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Hash of a tuple of integers: stream-independent values from (seed, a, b, ...).
inline uint64_t hash_combine(uint64_t seed, uint64_t a) { return mix64(seed ^ mix64(a)); }
inline uint64_t hash_combine(uint64_t seed, uint64_t a, uint64_t b) { return hash_combine(hash_combine(seed, a), b); }

// Uniform in (0, 1), never 0 (safe for log).
inline double uniform_open(uint64_t bits) { return (static_cast<double>(bits >> 11) + 0.5) * 0x1.0p-53; }

// Counter-based standard normal stream (Box–Muller) for one (seed, stream) pair.
class NormalRng {
 public:
  NormalRng(uint64_t seed, uint64_t stream) : key_(hash_combine(seed, stream)) {}
  float next() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    const double u1 = uniform_open(mix64(key_ ^ (2 * counter_)));
    const double u2 = uniform_open(mix64(key_ ^ (2 * counter_ + 1)));
    ++counter_;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586 * u2;
    spare_ = static_cast<float>(r * std::sin(theta));
    have_spare_ = true;
    return static_cast<float>(r * std::cos(theta));
  }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
  float spare_ = 0.0f;
  bool have_spare_ = false;
};

}  // namespace shardopt::model
