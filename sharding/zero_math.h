// ZeRO arithmetic: per-rank memory and per-step traffic of replicated (DDP) training and ZeRO
// stages 1-3, as closed formulas (docs/algorithms.md, "ZeRO arithmetic"). Pure functions: the runtime's
// tests and benchmarks compare measured memory and traffic against them.
#pragma once

#include <cstdint>
#include <string_view>

namespace shardopt::sharding {

// Optimizer-state bytes per parameter in mixed precision (fp32 master + fp32 moments).
inline constexpr double kAdamStateBytes = 12;  // master + m + v
inline constexpr double kMuonStateBytes = 8;   // master + momentum
inline constexpr double kLionStateBytes = 8;   // master + momentum
inline constexpr double kSgdStateBytes = 8;    // master + momentum

// K for an optimizer name ("adamw", "adam", "lion", "sgd", "muon", "normuon"); ConfigError otherwise.
double state_bytes_per_param(std::string_view optimizer);

// stage 0 = replicated (DDP); 1, 2, 3 = ZeRO stages.
struct ZeroMemory {
  double param_bytes = 0;
  double grad_bytes = 0;
  double optimizer_state_bytes = 0;
  double total_bytes = 0;  // the three above; stage 3 excludes live gathered parameters
};

// Per-rank bytes for `num_params` parameters on `world` ranks. `param_elem_bytes` and
// `grad_elem_bytes` are the sizes of the working copies (2 for bf16/fp16).
// DDP: 2Ψ + 2Ψ + KΨ; stage 1: 2Ψ + 2Ψ + KΨ/N; stage 2: 2Ψ + 2Ψ/N + KΨ/N; stage 3: (2+2+K)Ψ/N.
ZeroMemory zero_memory_per_rank(int stage, double num_params, int world, double state_bytes_per_param = kAdamStateBytes,
                                double param_elem_bytes = 2, double grad_elem_bytes = 2);

struct ZeroTraffic {
  double elements = 0;  // elements sent by one rank per step (== received)
  double bytes = 0;
};

// Per-rank traffic per step with ring/bandwidth-optimal collectives:
// DDP all-reduce 2Ψ(N-1)/N; stages 1-2 reduce-scatter + all-gather, the same 2Ψ(N-1)/N;
// stage 3 all-gather in forward and backward + reduce-scatter, 3Ψ(N-1)/N (1.5x).
ZeroTraffic zero_traffic_per_rank(int stage, double num_params, int world, double elem_bytes = 2);

// Extra traffic of Muon in the dim0 layout: each matrix's N-1 foreign row shards go to the owner and
// the updated shards come back. Per rank on average (matrices spread evenly): 2Ψ_muon(N-1)/N².
// The owned layout adds nothing.
ZeroTraffic dim0_muon_extra_traffic_per_rank(double muon_params, int world, double elem_bytes = 2);

}  // namespace shardopt::sharding
