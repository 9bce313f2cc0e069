// Helpers shared by the communication backends: logical traffic formulas (TrafficCounters),
// operation fingerprints for desync checks, argument validation and message formatting.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace shardopt::comm::detail {

struct Traffic {
  uint64_t sent = 0;
  uint64_t received = 0;
};

// Logical per-rank volume of the bandwidth-optimal algorithm, as documented on TrafficCounters.
Traffic all_reduce_traffic(uint64_t bytes, int world);
Traffic reduce_scatter_traffic(uint64_t total_bytes, uint64_t own_bytes, int world);
Traffic all_gather_traffic(uint64_t total_bytes, uint64_t own_bytes, int world);
Traffic rooted_traffic(uint64_t bytes, int world);  // reduce and broadcast
Traffic all_to_all_traffic(std::span<const size_t> send_counts, std::span<const size_t> recv_counts,
                           size_t elem_bytes, int self);

// What one rank says a collective is; ranks compare these in checked mode.
struct Fingerprint {
  uint64_t index = 0;  // collective index (sequence of collectives on the communicator)
  OpKind kind = OpKind::kCount;
  DType dtype = DType::kUnspecified;
  ReduceOp op = ReduceOp::kSum;
  int32_t root = -1;
  uint64_t count = 0;        // count, or the sum of per-rank counts
  uint64_t counts_hash = 0;  // hash of the per-rank counts (reduce_scatter, all_gather), else 0

  bool same_collective(const Fingerprint& other) const;
  // "all_reduce #3 (f32, count 10, op sum)".
  std::string describe() const;
};

uint64_t hash_counts(std::span<const size_t> counts);
uint64_t sum_counts(std::span<const size_t> counts);
// "[1, 3]".
std::string format_ranks(const std::vector<int>& ranks);

// Argument checks of each operation, the one path every backend (and CheckedCommunicator, before
// it defers an operation) runs at issue; throw ConfigError naming the operation and the argument.
// `rank` and `world` are the caller's rank and the communicator's size.
void check_all_reduce_args(const void* send, const void* recv, size_t count, DType dtype);
void check_reduce_scatter_args(const void* send, const void* recv, std::span<const size_t> counts, DType dtype,
                               int rank, int world);
void check_all_gather_args(const void* send, const void* recv, std::span<const size_t> counts, DType dtype, int rank,
                           int world);
void check_reduce_args(const void* send, const void* recv, size_t count, DType dtype, int root, int rank, int world);
void check_broadcast_args(const void* buf, size_t count, DType dtype, int root, int world);
void check_all_to_all_args(const void* send, std::span<const size_t> send_counts, const void* recv,
                           std::span<const size_t> recv_counts, DType dtype, int world);
// send (recv == nullptr, recv_count 0), recv (send == nullptr) and sendrecv; dst / src < 0 = no such side.
void check_p2p_args(OpKind kind, const void* send, size_t send_count, int dst, const void* recv, size_t recv_count,
                    int src, DType dtype, int world);

// The logical traffic (TrafficCounters) of each operation, by the formulas above; the one path
// every backend counts with.
Traffic p2p_traffic(size_t send_count, int dst, size_t recv_count, int src, DType dtype, int self);

// Building blocks of the checks above.
void check_counts_size(OpKind kind, std::span<const size_t> counts, int world, const char* what);
void check_rank_arg(OpKind kind, int rank, int world, const char* what);
void check_buffer(OpKind kind, const void* ptr, size_t count, const char* what);
void check_reducible(OpKind kind, DType dtype);
void check_dtype(OpKind kind, DType dtype);  // a known, specified dtype

}  // namespace shardopt::comm::detail
