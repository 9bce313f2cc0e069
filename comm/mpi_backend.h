// The MPI backend (OpenMPI): a Communicator over a duplicate of an MPI communicator.
//
// Thread level: MPI_THREAD_SERIALIZED. The backend keeps the threading contract of Communicator
// (communicator.h): one issuing thread at a time per communicator, Work methods and abort() from
// any thread. Every MPI call, and every change to state a Work handle or abort() reads (pending
// operations, sequence numbers, abort state), is made under one process-wide mutex, so MPI itself
// is never entered concurrently. MpiRuntime asks for SERIALIZED; with a lower level (MPI
// initialized elsewhere) only one thread may use the backend.
//
// Operations map to nonblocking MPI calls (MPI_Iallreduce, MPI_Ireduce, MPI_Ibcast,
// MPI_Isend/MPI_Irecv, MPI_Ibarrier), except three collectives the backend runs as its own
// MPI_Isend/MPI_Irecv messages: the reduce-scatter (recursive halving, comm/halving_schedule.h:
// OpenMPI 4.1's MPI_Ireduce_scatter reduces whole buffers at rank 0) and the all-gather (recursive
// doubling), each step posted when the previous one completed, inside the backend's progress calls
// (issue, done(), wait()), as MPI's own nonblocking collectives progress only inside MPI calls; and
// the all-to-all (one message per pair with data, all at once: the dim0 exchange sends only to the
// matrices' owners, where MPI_Alltoallv may post every pair; each receive's count is checked). Work::wait() polls
// MPI_Test until done or timeout: it spins for the first 200 µs (like MPI_Wait), then yields the
// core between polls (which matters when ranks share cores).
//
// bf16 and f16 reductions: the inputs are widened to fp32 scratch buffers (reused, not allocated
// per call), reduced in fp32 (MPI_SUM/MAX/MIN on MPI_FLOAT; the reduce-scatter's combines) and rounded once to the 16-bit
// type, so accumulation is fp32 end to end (a user-defined MPI_Op on 16-bit data would round after
// every pairwise step). The price: twice the bytes on the wire for 16-bit reductions (the traffic
// counters still report the logical 16-bit volume). avg = MPI_SUM, then a division (in fp32 for
// 16-bit types, truncating for integers).
//
// Checked mode (CommOptions::checked): make_mpi_communicator wraps the communicator in a
// CheckedCommunicator (comm/checked_communicator.h) whose side channel is a second MPI
// communicator over the same ranks; the backend itself issues every MPI call at once, and its own
// timeouts cannot name the ranks that never arrived (the checked wrapper's can), except those of its
// own collectives: the reduce-scatter's and all-gather's name the peer their step in flight waits on,
// the all-to-all's the peers whose messages are still missing.
//
// Failures: a timeout or abort() sends an abort notice to every peer on a control communicator, so
// their pending and future operations fail fast with PeerError (DesyncError for a desync). A failed
// receive (recv, sendrecv) is cancelled (MPI_Cancel: it succeeds while no message matched it yet).
// MPI cannot cancel a started collective or a send: after a failure, buffers of abandoned
// operations may still be read or written by MPI until Work::buffers_released() turns true (their
// requests completed or were cancelled); keep them until then, or for good. After a failed
// collective the process should give up on the communicator (and normally exit). A rank
// that dies under mpirun ends the job (mpirun's default); the timeouts bound the wait otherwise.
// Errors returned by MPI (MPI_ERRORS_RETURN on the duplicates) raise PeerError.
#pragma once

#include <mpi.h>

#include <memory>

#include "comm/communicator.h"

namespace shardopt::comm {

// Initializes MPI (MPI_THREAD_SERIALIZED) unless already initialized, and finalizes it on
// destruction if it initialized it. Communicators must be destroyed before it.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // The thread level MPI provides (MPI_THREAD_*).
  int thread_level() const { return provided_; }
  int world_rank() const;
  int world_size() const;
  // A communicator over MPI_COMM_WORLD.
  std::unique_ptr<Communicator> world(CommOptions options = CommOptions::from_env()) const;

 private:
  bool owns_ = false;
  int provided_ = 0;
};

// A communicator over a duplicate of `comm` (which the caller keeps and frees); a
// CheckedCommunicator over it when options.checked. Collective over `comm`.
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, CommOptions options = CommOptions::from_env());

}  // namespace shardopt::comm
