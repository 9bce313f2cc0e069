// The threads backend: N ranks as threads of one process, exchanging data through shared memory.
// It is the embedded default and the basis of single-machine simulation of many ranks.
//
// Execution model (no OS thread per rank or per communicator):
//   - Each operation is a shared record. Ranks post their buffers into it (collectives match by
//     collective index, point-to-point by (source, destination, tag) in issue order).
//   - The rank whose post completes the match makes the operation runnable. Small operations run
//     inline on that thread; larger ones are cut into chunks (~256 KiB) that a small process-wide
//     executor pool (min(hardware threads, 8), at least 2) and every rank waiting on the operation
//     claim and run. So an issued operation progresses while its callers compute, and waiting
//     ranks add their cores to it.
//   - Collectives of one communicator run and complete in issue order; point-to-point operations
//     run as soon as both sides are posted (MPI-like: matched in order per (peer, tag)).
//   - Data moves once: a reduction reads every rank's input and writes every output directly.
// Desync checks: every rank's fingerprint (op, dtype, count(s), root, reduce op) is compared with
// the first poster's whenever the op is posted, in checked and unchecked mode alike (it is free here,
// and a mismatch would otherwise read out of bounds). A mismatch fails the op on every rank with a
// DesyncError naming both sides, and aborts the communicator. Checked mode (CommOptions::checked)
// is the backend-independent CheckedCommunicator on top (make_thread_world wraps each rank's
// communicator, with a second world as the side channel), which catches a desync before the
// operation reaches this backend.
// Timeouts: Work::wait(timeout) raises TimeoutError naming the op, its sequence number, its
// collective index and the ranks that never posted; the communicator is then aborted so every other
// rank fails fast with PeerError. An operation whose data movement has started is always finished
// before wait() returns or throws, so buffers are never written after an error is reported.
// Work::seq() numbers every operation a rank issued on the communicator (collectives and
// point-to-point); error messages also give the collective index ("all_reduce #4"), which is
// the same on every rank.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "comm/communicator.h"

namespace shardopt::comm {

// Creates the n communicators of one in-process world; element r is rank r. The threading contract
// of Communicator applies: one issuing thread at a time per communicator (normally "its" rank
// thread); Work handles and abort() from any thread. Wrapped in CheckedCommunicator when
// options.checked.
std::vector<std::unique_ptr<Communicator>> make_thread_world(int n, CommOptions options = CommOptions{});

// Runs fn(comm) for ranks 0..n-1 on n threads over a fresh thread world and joins them. When a rank
// throws, the world is aborted (the others fail fast with PeerError) and the first failure (the
// earliest in time, i.e. the cause rather than its echoes) is rethrown after all threads joined.
void run_ranks(int n, const std::function<void(Communicator&)>& fn, CommOptions options = CommOptions{});

// Number of threads in the process-wide executor pool of the threads backend.
int thread_executor_threads();

namespace detail {
// The pool size for a machine with `hardware_threads` (std::thread::hardware_concurrency(), 0 when
// unknown): min(hardware_threads, 8), at least 2.
int executor_threads_for(unsigned hardware_threads);
}  // namespace detail

}  // namespace shardopt::comm
