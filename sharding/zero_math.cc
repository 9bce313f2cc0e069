#include "sharding/zero_math.h"

#include <string>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

void check_world_and_stage(const char* where, int stage, int world) {
  if (world < 1) throw ConfigError(std::string(where) + ": world size must be >= 1, got " + std::to_string(world));
  if (stage < 0 || stage > 3)
    throw ConfigError(std::string(where) + ": stage must be 0 (replicated), 1, 2 or 3, got " + std::to_string(stage));
}

}  // namespace

double state_bytes_per_param(std::string_view optimizer) {
  if (optimizer == "adamw" || optimizer == "adam") return kAdamStateBytes;
  if (optimizer == "muon" || optimizer == "normuon") return kMuonStateBytes;
  if (optimizer == "lion") return kLionStateBytes;
  if (optimizer == "sgd") return kSgdStateBytes;
  throw ConfigError("state_bytes_per_param: unknown optimizer '" + std::string(optimizer) +
                    "': expected adamw, adam, lion, sgd, muon or normuon");
}

ZeroMemory zero_memory_per_rank(int stage, double num_params, int world, double state_bytes, double param_elem_bytes,
                                double grad_elem_bytes) {
  check_world_and_stage("zero_memory_per_rank", stage, world);
  const double n = world;
  ZeroMemory m;
  m.param_bytes = param_elem_bytes * num_params / (stage >= 3 ? n : 1.0);
  m.grad_bytes = grad_elem_bytes * num_params / (stage >= 2 ? n : 1.0);
  m.optimizer_state_bytes = state_bytes * num_params / (stage >= 1 ? n : 1.0);
  m.total_bytes = m.param_bytes + m.grad_bytes + m.optimizer_state_bytes;
  return m;
}

ZeroTraffic zero_traffic_per_rank(int stage, double num_params, int world, double elem_bytes) {
  check_world_and_stage("zero_traffic_per_rank", stage, world);
  const double n = world;
  // One reduce-scatter or all-gather moves Ψ(N-1)/N elements per rank.
  const double one_pass = num_params * (n - 1) / n;
  ZeroTraffic t;
  t.elements = (stage == 3 ? 3.0 : 2.0) * one_pass;
  t.bytes = t.elements * elem_bytes;
  return t;
}

ZeroTraffic dim0_muon_extra_traffic_per_rank(double muon_params, int world, double elem_bytes) {
  check_world_and_stage("dim0_muon_extra_traffic_per_rank", 1, world);
  const double n = world;
  ZeroTraffic t;
  t.elements = 2.0 * muon_params * (n - 1) / (n * n);
  t.bytes = t.elements * elem_bytes;
  return t;
}

}  // namespace shardopt::sharding
