// CheckedCommunicator: checked mode for any backend, in the style of PyTorch c10d's
// ProcessGroupWrapper. It wraps a communicator (`inner`) and, before each collective reaches it,
// makes the ranks agree that they are in the same collective.
//
// The fingerprint of a collective: collective index (0, 1, 2, ... per communicator), op kind,
// dtype, count (or the sum of the per-rank counts), a hash of the per-rank counts (reduce_scatter,
// all_gather), the reduce op and the root.
//
// Exchange, on a host-memory side channel (a second communicator over the same ranks, never used
// for data): every rank r != 0 sends its fingerprint to rank 0; rank 0 compares them with its own
// and broadcasts a verdict (the first mismatching rank and both fingerprints). A collective is
// handed to `inner` only after a good verdict, in issue order, so a backend never sees
// inconsistent arguments. The side channel is host memory even when `inner` is NCCL (device
// buffers): make_nccl_communicator_mpi pairs an NCCL communicator with an MPI one.
//
// Errors are raised by Work::wait() (and reported by done() / error()), never at issue, on every
// backend alike:
//   - DesyncError on every rank, naming both sides ("rank 0 issued all_reduce #3 (f32, count 10,
//     op sum) but rank 1 issued all_reduce #3 (f32, count 11, op sum)"); the communicator is then
//     aborted (inner and side channel), so later operations fail fast with PeerError.
//   - TimeoutError naming the collective and, on rank 0, the ranks whose fingerprints never
//     arrived; the communicator is aborted so the other ranks fail fast.
//   - Failures of `inner` (PeerError, DeviceError, its own TimeoutError) pass through unchanged.
// Argument errors (ConfigError) are still thrown at issue (Communicator's checks).
//
// Progress: a collective is handed to `inner` when its verdict has arrived and this rank calls
// into the communicator (an issue, or wait / done on any of its Work). A program that issues a
// collective and then blocks on something else that needs the collective's data to move first
// must wait on the collective's Work instead. Point-to-point operations are not fingerprinted;
// on host backends they go to `inner` at once, on device backends (one ordered stream) they keep
// their place behind pending collectives. Cost: one small message per rank plus one small
// broadcast per collective, and rank 0 handles N−1 messages: meant for tests and debugging.
//
// Threading: the Communicator contract (communicator.h); the wrapper's state is under one mutex,
// and a Work may be waited on from any thread. Two threads waiting on two of its Work handles may
// poll the same side-channel Work at once: the side channel's Work handles must allow concurrent
// calls (the threads and MPI backends' do; they guard them with the world / MPI mutex).
#pragma once

#include <memory>

#include "comm/communicator.h"

namespace shardopt::comm {

// Wraps `inner`. `side_channel` must span the same ranks in the same order and use host memory
// (device_buffers() false). Without one, a host-memory `inner` is split (a collective: every rank
// must construct its wrapper at the same point); a device-memory `inner` throws ConfigError.
std::unique_ptr<Communicator> make_checked_communicator(std::unique_ptr<Communicator> inner,
                                                        std::unique_ptr<Communicator> side_channel = nullptr);

}  // namespace shardopt::comm
