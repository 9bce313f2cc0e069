// A flight recorder for communicators: a wrapper Communicator that keeps this rank's last
// `capacity` operations (op, sequence number, element count and bytes, peer or root, tag, issue and
// completion time) and, when a wait fails with TimeoutError, DesyncError or PeerError, rethrows the
// same error type with the record appended, so a failure report says where this rank stopped:
//
//   flight recorder (rank 1 of 4, last 3 ops, oldest first; t in ms since the recorder started):
//     seq 7  all_reduce     count 1024  4096 B  t 12.1 -> 12.9
//     seq 8  send           count 64  256 B  peer/root 2  tag 5  t 13.0 -> 13.0
//     seq 9  all_reduce     count 1024  4096 B  t 13.1 -> (failed)
//
// It wraps any backend and depends on nothing but the Communicator interface. Splits are recorded
// by their children's own recorders (same capacity). Thread-safety: like the wrapped communicator
// (one thread at a time); the record is guarded so a Work may be waited on from another thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "comm/communicator.h"

namespace shardopt::comm {

struct FlightRecord {
  uint64_t seq = 0;
  OpKind kind = OpKind::kBarrier;
  uint64_t count = 0;  // elements (send side; the sum of counts for variable-count collectives)
  uint64_t bytes = 0;
  int peer = -1;       // point to point: the peer (sendrecv: destination); rooted: the root; else -1
  int tag = -1;
  double start_ms = 0, end_ms = -1;  // end < 0: not completed (pending or failed)
  bool failed = false;
};

class FlightRecorder final : public Communicator {
 public:
  // Wraps `inner` (not owned when `owned` is null, e.g. a world the caller keeps).
  FlightRecorder(Communicator& inner, size_t capacity = 64);
  FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity = 64);

  // The last `capacity` operations, formatted as above.
  std::string dump() const;
  std::deque<FlightRecord> records() const;

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string_view backend() const override { return inner_->backend(); }
  bool device_buffers() const override { return inner_->device_buffers(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  void abort(const std::string& reason) override { inner_->abort(reason); }

 protected:
  // Checks and traffic accounting happen in Communicator before these; each forwards and records.
  std::unique_ptr<Communicator> start_split(int color, int key) override;
  WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override;
  WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                         ReduceOp op) override;
  WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override;
  WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) override;
  WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override;
  WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                     std::span<const size_t> recv_counts, DType dtype) override;
  WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override;
  WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override;
  WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                   DType dtype, int tag) override;
  WorkPtr start_barrier() override;

 private:
  struct Log;  // the ring, shared with the Work wrappers
  WorkPtr record(OpKind kind, uint64_t count, DType dtype, int peer, int tag, WorkPtr work);

  std::unique_ptr<Communicator> owned_;
  Communicator* inner_;
  std::shared_ptr<Log> log_;
};

}  // namespace shardopt::comm
