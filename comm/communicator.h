// The Communicator: moves bytes between ranks. It knows nothing of parameters or optimizers.
//
// Every collective takes raw buffers (pointer, element count, DType) and returns a Work handle at
// once, so callers can overlap communication with compute. Operations issued on one
// communicator complete in issue order on every rank (like an MPI communicator or an NCCL stream).
//
// Buffer conventions (counts are in elements; `counts` spans have size() entries, one per rank):
//   all_reduce      send[count] -> recv[count] on every rank; send == recv is in place.
//   reduce_scatter  send = concatenation of size() segments of counts[0..N) elements, identical
//                   layout on every rank; rank r receives the reduction of segment r into recv[counts[r]].
//   all_gather      send[counts[rank]] -> recv[sum(counts)] = every rank's piece in rank order;
//                   send may alias recv + offset(rank) (in place).
//   reduce          send[count] -> recv[count] on root only (recv ignored elsewhere).
//   broadcast       buf[count] from root to all.
//   all_to_all      send = size() segments of send_counts[p] elements (segment p goes to rank p);
//                   recv = size() segments of recv_counts[p] elements (segment p came from rank p).
//   send/recv/sendrecv  point to point with a tag.
// Buffers must stay valid and untouched until the Work completes.
//
// Reductions: sum, avg, max, min. bf16 and f16 are reduced with fp32 accumulation. Integer
// dtypes support sum/max/min (avg truncates toward zero).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "base/dtype.h"

namespace shardopt::comm {

enum class ReduceOp : uint8_t { kSum, kAvg, kMax, kMin };
std::string_view reduce_op_name(ReduceOp op);

// Kinds of operation, used for traffic accounting, fingerprints and error messages.
enum class OpKind : uint8_t {
  kAllReduce,
  kReduceScatter,
  kAllGather,
  kReduce,
  kBroadcast,
  kAllToAll,
  kSend,
  kRecv,
  kSendRecv,
  kBarrier,
  kSplit,
  kCount  // number of kinds; not an operation
};
std::string_view op_kind_name(OpKind kind);

// A handle on one issued operation.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the operation completes. Throws TimeoutError (naming the operation, its sequence
  // number and the ranks that did not arrive, where the backend can know them), DesyncError or
  // PeerError. A timeout leaves the communicator unusable (aborted): the caller should give up.
  virtual void wait(std::chrono::milliseconds timeout) = 0;
  // Waits with the communicator's default timeout.
  virtual void wait() = 0;
  // Non-blocking: true once the operation finished (successfully or not).
  virtual bool done() = 0;
  // Non-blocking: true once the backend will never read or write this operation's buffers again, so
  // the caller may reuse or free them. After success this is done(); after a failure (timeout, abort)
  // a backend that cannot take a started transfer back (MPI) keeps it false until its requests
  // complete or are cancelled. A caller that abandons a failed operation keeps its buffers (and this
  // handle) until then.
  virtual bool buffers_released() { return done(); }
  // The failure of a finished operation, or nullptr.
  virtual std::exception_ptr error() const = 0;
  // Sequence number of the operation on its communicator (0, 1, 2, ... in issue order).
  virtual uint64_t seq() const = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// Bytes this rank moved, by kind of operation. "Logical" volume of the bandwidth-optimal
// algorithm, independent of how a backend implements it:
//   all_reduce: 2·B·(N−1)/N sent and received (B = buffer bytes; ring reduce-scatter + all-gather)
//   reduce_scatter: sent = B_total − B_own (every other rank's segment leaves this rank once),
//                   received = B_own·(N−1)
//   all_gather: sent = B_own·(N−1), received = B_total − B_own
//   reduce / broadcast: B·(N−1)/N per rank in each direction (pipelined tree/ring)
//   all_to_all, send, recv, sendrecv: the bytes actually addressed to / from other ranks.
// For equal shards these give the ZeRO arithmetic: reduce-scatter and all-gather each move
// Ψ·(N−1)/N per rank.
struct TrafficCounters {
  std::array<uint64_t, static_cast<size_t>(OpKind::kCount)> bytes_sent{};
  std::array<uint64_t, static_cast<size_t>(OpKind::kCount)> bytes_received{};
  std::array<uint64_t, static_cast<size_t>(OpKind::kCount)> calls{};

  uint64_t total_sent() const;
  uint64_t total_received() const;
  TrafficCounters operator-(const TrafficCounters& earlier) const;
};

struct CommOptions {
  // Default for Work::wait(); env SHARDOPT_COMM_TIMEOUT_MS.
  std::chrono::milliseconds timeout{300000};
  // Checked mode: the factories (make_thread_world / run_ranks, make_mpi_communicator,
  // make_nccl_communicator_mpi) wrap the communicator in a CheckedCommunicator
  // (comm/checked_communicator.h), which exchanges a fingerprint of every collective and raises
  // DesyncError at wait() on a mismatch, naming both sides; env SHARDOPT_COMM_CHECKED. Tests turn it on.
  bool checked = false;
  // Options from the environment registry (base/env.h).
  static CommOptions from_env();
};

// Options of one operation. Every field has a default that means "as the communicator does";
// a backend that cannot honour a non-default value throws ConfigError naming the option and
// itself (see Communicator::Capabilities) instead of ignoring it.
struct CollectiveOptions {
  // Timeout of this operation's Work::wait() (no argument); default CommOptions::timeout.
  std::optional<std::chrono::milliseconds> timeout;
};

// Threading contract (every backend keeps it; CheckedCommunicator too):
//   - Issuing calls (the collectives, send/recv/sendrecv, barrier, split) on one communicator must
//     come from one thread at a time: the caller serializes them (normally one thread per rank
//     issues). Different communicators may be used from different threads.
//   - Work methods (wait, done, error, seq): any thread, concurrently with issuing calls and with
//     other Work handles (one thread at a time per handle), not necessarily the issuing thread.
//   - abort() may be called from any thread at any time, concurrently with everything above.
//   - counters() (a snapshot taken under a lock), rank(), size(), backend(), device_buffers(),
//     capabilities() and options() may be read from any thread.
// The backends guard their shared state accordingly (the MPI backend's calls into MPI are
// serialized by one process-wide mutex; MPI may be initialized at MPI_THREAD_SERIALIZED).
//
// Issuing calls are non-virtual: they check the arguments and the options (one path,
// comm/backend_util.h), count the logical traffic, and hand the operation to the backend's
// start_* method. Checks throw ConfigError at issue; communication failures are reported by
// Work::wait() (TimeoutError, DesyncError, PeerError, DeviceError).
class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Backend name: "threads", "mpi", "nccl" (a CheckedCommunicator reports its inner backend's).
  virtual std::string_view backend() const = 0;
  // Where buffers must live: false = host memory, true = device memory (NCCL).
  virtual bool device_buffers() const { return false; }

  // Collective over all ranks: ranks with the same color form a new communicator, ordered by
  // (key, old rank); a negative color returns nullptr on that rank. Blocking. The child inherits
  // the options; its traffic is counted separately.
  std::unique_ptr<Communicator> split(int color, int key);

  WorkPtr all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                     const CollectiveOptions& options = {});
  WorkPtr reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype, ReduceOp op,
                         const CollectiveOptions& options = {});
  WorkPtr all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                     const CollectiveOptions& options = {});
  WorkPtr reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root,
                 const CollectiveOptions& options = {});
  WorkPtr broadcast(void* buf, size_t count, DType dtype, int root, const CollectiveOptions& options = {});
  WorkPtr all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                     std::span<const size_t> recv_counts, DType dtype, const CollectiveOptions& options = {});
  // Point to point. `tag` distinguishes messages between the same two ranks; a backend without
  // tag matching (Capabilities::tags false: NCCL) accepts only tag 0.
  WorkPtr send(const void* buf, size_t count, DType dtype, int peer, int tag, const CollectiveOptions& options = {});
  WorkPtr recv(void* buf, size_t count, DType dtype, int peer, int tag, const CollectiveOptions& options = {});
  WorkPtr sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src, DType dtype,
                   int tag, const CollectiveOptions& options = {});
  WorkPtr barrier(const CollectiveOptions& options = {});

  // Orders every operation issued on this communicator after this call behind the work enqueued so
  // far on CUDA stream `stream` (a cudaStream_t, opaque here; 0 = the legacy default stream): the
  // kernels that wrote the buffers those operations read. NCCL: its stream waits on an event
  // recorded on `stream`, the host does not wait. Communicators that reach device buffers from host
  // threads (host-staged, the threads backend with a device mover): the stream is synchronized
  // here. Host communicators: nothing (host code wrote their buffers). An issuing call.
  virtual void wait_stream(void* stream) { (void)stream; }

  // Marks the communicator failed: pending and future operations on every rank that can be
  // reached fail with PeerError instead of waiting for their timeout. Any thread, any time.
  virtual void abort(const std::string& reason) = 0;

  // A snapshot of the traffic this rank issued on this communicator.
  TrafficCounters counters() const;
  const CommOptions& options() const { return options_; }

  // What a backend can honour beyond the defaults of CollectiveOptions and the tag.
  struct Capabilities {
    bool tags = true;  // send/recv/sendrecv match by tag
  };
  virtual Capabilities capabilities() const { return {}; }

 protected:
  explicit Communicator(CommOptions options) : options_(options) {}

  // The backend's part of each operation, called after the checks and the traffic accounting.
  virtual std::unique_ptr<Communicator> start_split(int color, int key) = 0;
  virtual WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) = 0;
  virtual WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                                       ReduceOp op) = 0;
  virtual WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) = 0;
  virtual WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) = 0;
  virtual WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) = 0;
  virtual WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                                   std::span<const size_t> recv_counts, DType dtype) = 0;
  virtual WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) = 0;
  virtual WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) = 0;
  virtual WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                                 DType dtype, int tag) = 0;
  virtual WorkPtr start_barrier() = 0;

  CommOptions options_;

 private:
  // ConfigError when the backend cannot honour `tag` or `options`.
  void check_options(OpKind kind, int tag, const CollectiveOptions& options) const;
  // Adds the logical traffic of one operation (see TrafficCounters) to the counters.
  void count_traffic(OpKind kind, uint64_t bytes_sent, uint64_t bytes_received);
  // Applies CollectiveOptions::timeout to the backend's Work.
  static WorkPtr with_options(WorkPtr work, const CollectiveOptions& options);

  mutable std::mutex counters_mu_;  // counters() may be read while another thread issues
  TrafficCounters counters_;
};

}  // namespace shardopt::comm
