#include "sharding/lpt.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include <fmt/format.h>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a)
    throw ConfigError(std::string("ns_cost: ") + what + " overflows 64 bits");
  return a * b;
}

}  // namespace

uint64_t ns_cost(int64_t rows, int64_t cols) {
  if (rows < 1 || cols < 1)
    throw ConfigError("ns_cost: expected a matrix with rows, cols >= 1, got " + std::to_string(rows) + " x " +
                      std::to_string(cols));
  const uint64_t p = static_cast<uint64_t>(std::min(rows, cols));
  const uint64_t q = static_cast<uint64_t>(std::max(rows, cols));
  return checked_mul(checked_mul(q, p, "max*min"), p, "max*min^2");
}

uint64_t ns_cost_blocks(int64_t rows, int64_t cols, const std::vector<int64_t>& block_rows) {
  if (block_rows.empty()) return ns_cost(rows, cols);
  uint64_t total = 0;
  for (int64_t b : block_rows) {
    const uint64_t c = ns_cost(b, cols);
    if (total > std::numeric_limits<uint64_t>::max() - c) throw ConfigError("ns_cost: block sum overflows 64 bits");
    total += c;
  }
  return total;
}

LptResult assign_owners_lpt(const std::vector<uint64_t>& costs, const std::vector<double>& memory_bytes, int world,
                            double cap_bytes, const std::vector<std::string>& names) {
  if (world < 1) throw ConfigError("assign_owners_lpt: world size must be >= 1, got " + std::to_string(world));
  if (memory_bytes.size() != costs.size())
    throw ConfigError("assign_owners_lpt: " + std::to_string(costs.size()) + " costs but " +
                      std::to_string(memory_bytes.size()) + " memory sizes");
  std::vector<size_t> order(costs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return costs[a] > costs[b]; });

  LptResult r;
  r.owner.assign(costs.size(), -1);
  r.load.assign(static_cast<size_t>(world), 0);
  r.memory_bytes.assign(static_cast<size_t>(world), 0.0);
  for (size_t job : order) {
    int best = -1;
    for (int rank = 0; rank < world; ++rank) {
      if (cap_bytes > 0 && r.memory_bytes[rank] + memory_bytes[job] > cap_bytes) continue;
      if (best < 0 || r.load[rank] < r.load[best]) best = rank;
    }
    if (best < 0) {
      const std::string name = job < names.size() ? fmt::format("#{} '{}'", job, names[job]) : fmt::format("#{}", job);
      const double least = *std::min_element(r.memory_bytes.begin(), r.memory_bytes.end());
      throw ConfigError("owner assignment: matrix " + name + " needs " + std::to_string(memory_bytes[job]) +
                        " bytes of optimizer state but no rank has room under the per-rank cap of " +
                        std::to_string(cap_bytes) + " bytes (least-used rank already holds " + std::to_string(least) +
                        " bytes)");
    }
    r.owner[job] = best;
    r.load[best] += costs[job];
    r.memory_bytes[best] += memory_bytes[job];
  }
  return r;
}

}  // namespace shardopt::sharding
