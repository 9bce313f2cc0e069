// A flight recorder for communicators: a wrapper Communicator that keeps this rank's last
// `capacity` operations (op, sequence number, element count and bytes, peer or root, tag, issue and
// completion time) and, when a wait fails with TimeoutError, DesyncError or PeerError, rethrows the
// same error type with the record appended, so a failure report says where this rank stopped:
//
//   flight recorder world (rank 1 of 4, last 3 ops, oldest first; t in ms since the recorder started):
//     seq 7  all_reduce     count 1024  4096 B  t 12.1 -> 12.9
//     seq 8  send           count 64  256 B  peer/root 2  tag 5  t 13.0 -> 13.0
//     seq 9  all_reduce     count 1024  4096 B  t 13.1 -> (failed)
//
// Splits: the children of a recorder's split are recorders too (same capacity), named after their
// parent ("world/split 2": this recorder's third split; rename() gives them their role), and belong to the root's tree: write_report() on any
// recorder of the tree writes every live communicator's record, each headed by the op where it
// stopped (its oldest op that failed or is still pending), into one file per rank. The trainer wraps
// its world in one and writes the report into the run folder when a communication error ends the run.
//
// It wraps any backend and depends on nothing but the Communicator interface. Thread-safety: like the
// wrapped communicator (one issuing thread at a time); the record is guarded so a Work may be waited
// on from another thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "comm/forwarding_communicator.h"

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

class FlightRecorder final : public ForwardingCommunicator {
 public:
  // Wraps `inner` (not owned, e.g. a world the caller keeps); `name` labels it in reports.
  explicit FlightRecorder(Communicator& inner, size_t capacity = 64, std::string name = "world");
  explicit FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity = 64, std::string name = "world");
  ~FlightRecorder() override;

  // This communicator's last `capacity` operations, formatted as above.
  std::string dump() const;
  std::deque<FlightRecord> records() const;
  std::string name() const;
  // Relabels this communicator in reports (e.g. a split's role: "shard group of replica 1").
  void rename(std::string name);

  // Every live recorder of this tree (the root and its splits, in creation order): where each stopped,
  // then its dump.
  std::string dump_tree() const;
  // Writes `headline` (e.g. the error that ended the run) and dump_tree() to `path` (folders created).
  // Never throws: a report that cannot be written is named on stderr instead.
  void write_report(const std::string& path, const std::string& headline) const noexcept;

 protected:
  WorkPtr forward(const ForwardedOp& op, IssueRef issue) override;
  std::unique_ptr<Communicator> wrap_child(std::unique_ptr<Communicator> child) override;

 private:
  struct Log;   // the ring, shared with the Work wrappers
  struct Tree;  // the logs of a root recorder and its splits
  FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity, std::string name, std::shared_ptr<Tree> tree);
  void init(size_t capacity, std::string name, std::shared_ptr<Tree> tree);

  std::shared_ptr<Log> log_;
  std::shared_ptr<Tree> tree_;
  int splits_ = 0;
};

}  // namespace shardopt::comm
