// Owner assignment for whole-matrix Newton-Schulz: greedy longest-processing-time (LPT);
// docs/algorithms.md, "Owner assignment (LPT)".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardopt::sharding {

// NS cost of an m x n matrix, proportional to max(m,n) * min(m,n)^2. ConfigError on overflow.
uint64_t ns_cost(int64_t rows, int64_t cols);
// Per-block cost of a fused matrix: sum over blocks of ns_cost(block_rows[i], cols); the whole
// matrix when block_rows is empty.
uint64_t ns_cost_blocks(int64_t rows, int64_t cols, const std::vector<int64_t>& block_rows);

struct LptResult {
  std::vector<int> owner;            // per job
  std::vector<uint64_t> load;        // per rank, sum of costs
  std::vector<double> memory_bytes;  // per rank, sum of job memory
};

// Sorts jobs by cost (descending, ties by index ascending) and gives each to the least-loaded rank
// (ties: lowest rank) among those whose memory stays <= cap_bytes (cap_bytes <= 0: no cap).
// Throws ConfigError naming the job when no rank can take it. Deterministic.
LptResult assign_owners_lpt(const std::vector<uint64_t>& costs, const std::vector<double>& memory_bytes, int world,
                            double cap_bytes, const std::vector<std::string>& names = {});

}  // namespace shardopt::sharding
