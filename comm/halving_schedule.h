// The MPI backend's reduce-scatter and all-gather as point-to-point messages: recursive halving with a
// fold for rank counts that are not a power of two (Rabenseifner's reduce-scatter half), and its mirror
// image, recursive doubling, for the all-gather. Pure arithmetic on counts, no communication: the
// backend (comm/mpi_backend.cc) runs the steps, the simulation (sim/step_sim.cc) charges the
// reduce-scatter's combines, and a test executes both in one process.
//
// Why not MPI_Ireduce_scatter: OpenMPI 4.1 serves nonblocking collectives from coll/libnbc, whose
// reduce-scatter reduces the whole vector to rank 0 (log2 N whole-vector messages and reductions at
// rank 0) and then scatters it; the step's reduce-scatter then scales with N·B at one rank instead
// of B per rank (docs/simulation.md). With this schedule every rank sends and combines at most
// B (P-1)/P elements (P the largest power of two <= N), plus one whole vector for the ranks folded in.
//
// With N ranks, P = 2^floor(log2 N) and r = N - P: for i < r, rank 2i is *folded*: it sends its whole
// vector to rank 2i + 1 and, at the end, receives its own segment back from it. The other P ranks
// are participants v = 0..P-1 (rank 2v + 1 for v < r, rank v + r otherwise); participant v answers for
// the segments of the ranks first(v)..rank(v), contiguous in rank order. Round k (mask P/2, P/4, .., 1)
// pairs participant v with v XOR mask: each keeps the half of its current participant range that holds
// v, sends the other half, and combines the partner's contribution to its own half.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

namespace shardopt::comm {

struct HalvingStep {
  enum class Send { kNothing, kInput, kAccumulator };
  enum class Receive {
    kNothing,
    kCombine,  // into a temporary, then accumulator[range] = (first combine ? input : accumulator) + temporary
    kOutput,   // straight into the caller's output (a folded rank's own segment)
  };
  int peer = -1;
  Send send = Send::kNothing;
  size_t send_begin = 0, send_end = 0;  // element range of the whole vector
  Receive receive = Receive::kNothing;
  size_t recv_begin = 0, recv_end = 0;  // element range of the whole vector
};

struct HalvingSchedule {
  std::vector<HalvingStep> steps;  // in order; a step's send and receive are posted together
  // The accumulator covers [acc_begin, acc_end) of the whole vector (what the first combine
  // produces; every later range lies inside it). Empty for folded ranks and N = 1.
  size_t acc_begin = 0, acc_end = 0;
  size_t max_receive = 0;  // elements of the largest kCombine receive (the temporary's size)
  // This rank's own segment [own_begin, own_end). Participants: the last kCombine step writes that
  // part of its range into the output instead of the accumulator. Folded ranks: their last step
  // receives it into the output. N = 1: the output is a copy of the input.
  size_t own_begin = 0, own_end = 0;
  bool folded = false;
  // Elements this rank combines in all (the reduction arithmetic MPI would otherwise do).
  size_t combined_elements = 0;
};

// The reduce-scatter steps of rank `rank` for segments `counts` (one per rank, in rank order).
HalvingSchedule halving_schedule(std::span<const size_t> counts, int rank);

// The all-gather: the reduce-scatter's steps in reverse order with send and receive swapped. Every
// buffer is the output vector itself (element ranges of it): each step sends a range this rank holds
// complete and receives the partner's into its place. A folded rank sends its segment first and
// receives the whole vector last; its participant receives that segment first and sends the whole
// vector last. A participant sends and receives B (P-1)/P elements over log2 P steps (even split).
// An empty range is neither sent nor received: both ranks of a pair see the same range.
struct DoublingStep {
  int peer = -1;
  size_t send_begin = 0, send_end = 0;
  size_t recv_begin = 0, recv_end = 0;
};
std::vector<DoublingStep> doubling_schedule(std::span<const size_t> counts, int rank);

}  // namespace shardopt::comm
