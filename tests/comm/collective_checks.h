// Backend-independent checks of every collective: each rank's input is a known function of
// (rank, index) and expected values are computed here in double / int64, sharing no code with the
// backends. Run by the threads suite (one call per rank thread) and the MPI suites (one per process).
#pragma once

#include <cstddef>
#include <vector>

#include "comm/communicator.h"

namespace shardopt::comm::testing {

// The dtypes and reduce ops covered for a given element count (the largest count covers fewer).
std::vector<DType> dtypes_for(size_t count);
std::vector<ReduceOp> ops_for(size_t count);

// Uneven per-rank split of `total` elements: rank r gets roughly (r+1)/sum of it, so small totals
// leave low ranks empty.
std::vector<size_t> skewed_counts(size_t total, int world);

void check_all_reduce(Communicator& comm, size_t count);
void check_all_reduce_in_place(Communicator& comm, size_t count);
void check_reduce_scatter(Communicator& comm, size_t total);
void check_all_gather(Communicator& comm, size_t total);
void check_all_gather_in_place(Communicator& comm, size_t total);
void check_reduce(Communicator& comm, size_t count);
void check_broadcast(Communicator& comm, size_t count);
void check_all_to_all(Communicator& comm, size_t count);
void check_send_recv(Communicator& comm, size_t count);
void check_sendrecv(Communicator& comm, size_t count);
void check_barrier(Communicator& comm);
// bf16 sums accumulate in fp32: 256 + (N-1)·1 rounds once (pairwise bf16 addition would stay 256).
void check_bf16_fp32_accumulation(Communicator& comm);
// Several operations in flight at once, waited in reverse order; and the caller computes meanwhile.
void check_overlap(Communicator& comm);
// Three reduce-scatters in flight at once (as the engine keeps gradient buckets in flight), waited
// for in reverse order: each gets its own sums (the MPI backend's steps of different operations
// must never match each other's messages).
void check_reduce_scatters_in_flight(Communicator& comm);
// Counters after one call of each collective equal the logical formulas of TrafficCounters.
void check_counters(Communicator& comm, size_t count);
// split(color = rank % 2, key = -rank): sizes, ranks ordered by key, and an all_reduce in each group.
void check_split(Communicator& comm);

// Error behaviour. Each needs size() >= 2 and leaves the communicator aborted.
void check_desync_count(Communicator& comm);  // rank 1 passes count+1: DesyncError naming both
void check_desync_kind(Communicator& comm);   // rank 1 issues broadcast instead of all_reduce
// The last rank joins late (after `late_ms`); rank 0 waits `timeout_ms` and must get a TimeoutError
// naming the op and the last rank; the others get TimeoutError or PeerError.
void check_timeout_names_missing(Communicator& comm, int timeout_ms, int late_ms);
// Rank 0 aborts while the others wait in a barrier: they fail fast with PeerError.
void check_abort_propagates(Communicator& comm);

}  // namespace shardopt::comm::testing
