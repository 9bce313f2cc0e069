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
// Buffers: the data movement (reductions and copies) goes through a ThreadBufferMover: host memory by
// default; a device mover (comm/cuda_buffer_mover.h) lets ranks sharing one GPU exchange device buffers
// directly (device-to-device copies and a reduction kernel), and the ranks then report
// device_buffers() = true. Nothing else in the backend reads or writes a rank's buffer.
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
#include <span>
#include <vector>

#include "comm/communicator.h"

namespace shardopt::comm {

// How the threads backend reduces and copies the ranks' buffers. An operation is cut into chunks of
// about chunk_bytes() that run on the executor pool and on waiting ranks; a chunk calls reduce() and
// copy() any number of times, then finish() on the same thread before it counts as done. Called
// concurrently from several threads (each with its own chunks).
class ThreadBufferMover {
 public:
  virtual ~ThreadBufferMover() = default;
  // Whether the ranks' buffers are device memory (what the communicators report as device_buffers()).
  virtual bool device() const = 0;
  // Communicator::wait_stream of a rank: returns once the work enqueued on CUDA stream `stream` so
  // far is finished, when this mover's copies and reductions could otherwise read buffers that work
  // is still writing (the CUDA mover synchronizes it). Default: nothing (host buffers).
  virtual void wait_stream(void* stream) { (void)stream; }
  // Data per chunk: large enough to amortize what a chunk costs to start and finish.
  virtual size_t chunk_bytes() const = 0;
  // outputs[o][i] = op(inputs[0][i], ..., inputs[n-1][i]) for i < len, with the arithmetic and the
  // aliasing rules of detail::reduce_elements (comm/reduce_kernel.h). May complete at finish().
  virtual void reduce(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
                      size_t len) = 0;
  // Copies `bytes` bytes between non-overlapping buffers. May complete at finish().
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  // Returns once everything this thread issued through reduce() and copy() has completed.
  virtual void finish() {}
};

// The default mover: host memory, comm/reduce_kernel.h's loops, 256 KiB chunks.
std::shared_ptr<ThreadBufferMover> host_buffer_mover();

// Creates the n communicators of one in-process world; element r is rank r. The threading contract
// of Communicator applies: one issuing thread at a time per communicator (normally "its" rank
// thread); Work handles and abort() from any thread. Wrapped in CheckedCommunicator when
// options.checked (its side channel is a host world: the fingerprints are host values).
// `mover` null: host_buffer_mover(). Split children share the parent's mover.
std::vector<std::unique_ptr<Communicator>> make_thread_world(int n, CommOptions options = CommOptions{},
                                                             std::shared_ptr<ThreadBufferMover> mover = nullptr);

// Runs fn(comm) for ranks 0..n-1 on n threads over a fresh thread world and joins them. When a rank
// throws, the world is aborted (the others fail fast with PeerError) and the first failure (the
// earliest in time, i.e. the cause rather than its echoes) is rethrown after all threads joined.
void run_ranks(int n, const std::function<void(Communicator&)>& fn, CommOptions options = CommOptions{},
               std::shared_ptr<ThreadBufferMover> mover = nullptr);

// Number of threads in the process-wide executor pool of the threads backend.
int thread_executor_threads();

namespace detail {
// The pool size for a machine with `hardware_threads` (std::thread::hardware_concurrency(), 0 when
// unknown): min(hardware_threads, 8), at least 2.
int executor_threads_for(unsigned hardware_threads);
}  // namespace detail

}  // namespace shardopt::comm
