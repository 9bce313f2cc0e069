#include "comm/checked_communicator.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/error.h"
#include "comm/backend_util.h"

namespace shardopt::comm {
namespace {

using Clock = std::chrono::steady_clock;
using detail::Fingerprint;

// A fingerprint as it travels on the side channel (bytes, same layout on every rank of a job).
struct WireFingerprint {
  uint64_t index = 0, count = 0, counts_hash = 0;
  int32_t root = -1;
  uint8_t kind = 0, dtype = 0, op = 0, pad = 0;
};

WireFingerprint to_wire(const Fingerprint& f) {
  WireFingerprint w;
  w.index = f.index, w.count = f.count, w.counts_hash = f.counts_hash, w.root = f.root;
  w.kind = static_cast<uint8_t>(f.kind), w.dtype = static_cast<uint8_t>(f.dtype), w.op = static_cast<uint8_t>(f.op);
  return w;
}

// The text of a desync verdict; rank 0 aborts the communicator with it right after broadcasting the verdict.
constexpr std::string_view kDesyncText = "checked communicator desync: ";

// Rank 0 broadcasts a desync verdict and then aborts. On a backend whose broadcast root completes before
// the data is delivered (MPI, eager), another rank may see that abort before the verdict: its broadcast
// fails with a PeerError that carries the verdict's text. That is the same desync, reported as one.
std::exception_ptr desync_carried_by_abort(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const PeerError& e) {
    const std::string_view msg = e.what();
    if (msg.find(kDesyncText) != std::string_view::npos) return std::make_exception_ptr(DesyncError(e.what()));
  } catch (...) {
  }
  return error;
}

Fingerprint from_wire(const WireFingerprint& w) {
  Fingerprint f;
  f.index = w.index, f.count = w.count, f.counts_hash = w.counts_hash, f.root = w.root;
  f.kind = static_cast<OpKind>(w.kind), f.dtype = static_cast<DType>(w.dtype), f.op = static_cast<ReduceOp>(w.op);
  return f;
}

// Rank 0's verdict on one collective, broadcast to every rank.
struct Verdict {
  int32_t mismatch_rank = -1;  // -1: every fingerprint matched rank 0's
  int32_t pad = 0;
  WireFingerprint root_fp, theirs;
};

// One operation issued on the wrapper.
struct Pending {
  enum class State : uint8_t { kChecking, kStarted, kFailed };
  bool collective = true;
  Fingerprint fp;
  std::string what;
  uint64_t seq = 0;
  std::function<WorkPtr()> start;  // hands the operation to the inner communicator

  // Fingerprint exchange (side channel). Buffers live here until the exchange completed.
  WireFingerprint mine;
  std::vector<WireFingerprint> theirs;  // rank 0: one per rank
  std::vector<WorkPtr> recvs;           // rank 0: one per rank (none for itself)
  size_t next_recv = 1;                 // rank 0: recvs[1, next_recv) completed
  WorkPtr fp_send;                      // other ranks
  Verdict verdict;
  WorkPtr verdict_work;

  State state = State::kChecking;
  WorkPtr work;  // the inner communicator's, once started (none for split's agreement)
  std::exception_ptr error;
};
using PendingPtr = std::shared_ptr<Pending>;

// State shared by the wrapper and its Work handles; guarded by mu. Every call into `inner` and
// `side` that issues an operation is made under mu (the Communicator contract: one issuing
// thread at a time); waits on their Work are made without it.
struct Shared {
  Shared(std::unique_ptr<Communicator> in, std::unique_ptr<Communicator> sc)
      : inner(std::move(in)),
        side(std::move(sc)),
        rank(inner->rank()),
        size(inner->size()),
        ordered_p2p(inner->device_buffers()),
        timeout(inner->options().timeout) {}

  std::mutex mu;
  std::unique_ptr<Communicator> inner, side;
  const int rank, size;
  const bool ordered_p2p;  // device backends: one stream, so p2p keep their place behind collectives
  const std::chrono::milliseconds timeout;
  std::deque<PendingPtr> queue;       // not yet started, issue order
  std::vector<PendingPtr> abandoned;  // failed while the side channel may still write their buffers
  bool aborted = false;
  std::string abort_reason;
  uint64_t next_seq = 0, next_coll = 0;

  std::exception_ptr aborted_error(const Pending& e) const {
    return std::make_exception_ptr(
        PeerError("checked communicator aborted (" + abort_reason + "); " + e.what + " cannot run"));
  }

  void fail_locked(Pending& e, std::exception_ptr error) {
    if (e.state != Pending::State::kChecking) return;
    e.state = Pending::State::kFailed;
    e.error = std::move(error);
    e.start = nullptr;
  }

  // Marks the wrapper failed, fails every operation not yet started and aborts inner and side.
  void abort_locked(const std::string& reason) {
    if (aborted) return;
    aborted = true;
    abort_reason = reason;
    for (auto& e : queue) {
      fail_locked(*e, aborted_error(*e));
      abandoned.push_back(e);
    }
    queue.clear();
    inner->abort(reason);
    if (side) side->abort(reason);
  }

  // True once the ranks agreed on e (e may have failed); false while waiting for the side channel.
  bool agree_locked(Pending& e) {
    if (!e.collective || size == 1) return true;
    if (rank == 0 && !e.verdict_work) {
      for (; e.next_recv < static_cast<size_t>(size); ++e.next_recv) {
        Work& r = *e.recvs[e.next_recv];
        if (!r.done()) return false;
        if (auto err = r.error()) {
          fail_locked(e, err);
          abort_locked("fingerprint exchange failed for " + e.what);
          return true;
        }
      }
      e.verdict.root_fp = e.mine;
      for (int p = 1; p < size; ++p)
        if (!from_wire(e.theirs[p]).same_collective(e.fp)) {
          e.verdict.mismatch_rank = p;
          e.verdict.theirs = e.theirs[p];
          break;
        }
      e.verdict_work = side->broadcast(&e.verdict, sizeof(Verdict), DType::kU8, 0);
    }
    if (!e.verdict_work->done()) return false;
    if (auto err = e.verdict_work->error()) {
      fail_locked(e, rank == 0 ? err : desync_carried_by_abort(err));
      abort_locked("fingerprint exchange failed for " + e.what);
      return true;
    }
    if (e.verdict.mismatch_rank >= 0) {
      const std::string msg = std::string(kDesyncText) + "rank 0 issued " + from_wire(e.verdict.root_fp).describe() +
                              " but rank " + std::to_string(e.verdict.mismatch_rank) + " issued " +
                              from_wire(e.verdict.theirs).describe();
      fail_locked(e, std::make_exception_ptr(DesyncError(msg)));
      abort_locked("desync: " + msg);
    }
    return true;
  }

  // Starts, in issue order, every operation whose agreement is complete.
  void advance_locked() {
    while (!queue.empty()) {
      Pending& e = *queue.front();
      if (e.state == Pending::State::kChecking && !agree_locked(e)) return;
      if (e.state == Pending::State::kChecking) {
        try {
          if (e.start) e.work = e.start();
          e.state = Pending::State::kStarted;
          e.start = nullptr;
        } catch (...) {
          fail_locked(e, std::current_exception());
        }
      }
      if (!queue.empty() && queue.front().get() == &e) queue.pop_front();  // abort_locked may have cleared it
    }
  }

  // The side-channel Work the oldest unstarted operation waits for.
  WorkPtr blocker_locked() const {
    const Pending& f = *queue.front();
    if (rank == 0 && !f.verdict_work) return f.recvs[f.next_recv];
    return f.verdict_work;
  }

  std::string timeout_message_locked(const Pending& e, std::chrono::milliseconds timeout) const {
    std::string head = "checked communicator rank " + std::to_string(rank) + ": " + e.what + ", seq " +
                       std::to_string(e.seq) + ", timed out after " + std::to_string(timeout.count()) + " ms; ";
    const Pending& f = *queue.front();
    if (&f != &e) head += "it waits behind " + f.what + ", where ";
    if (rank != 0) return head + "rank 0 has not sent its verdict (a rank that never arrived keeps it waiting)";
    std::vector<int> missing;
    for (int p = 1; p < size; ++p) {
      const Work& r = *f.recvs[p];
      if (static_cast<size_t>(p) >= f.next_recv && (!const_cast<Work&>(r).done() || r.error())) missing.push_back(p);
    }
    return head + "ranks " + detail::format_ranks(missing) + " never arrived";
  }
};

class CheckedWork final : public Work {
 public:
  CheckedWork(std::shared_ptr<Shared> shared, PendingPtr e) : shared_(std::move(shared)), e_(std::move(e)) {}

  void wait(std::chrono::milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    auto left = [&] {
      return std::max(std::chrono::milliseconds(0),
                      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
    };
    for (;;) {
      WorkPtr blocker;
      bool started = false;
      {
        std::lock_guard lk(shared_->mu);
        shared_->advance_locked();
        if (e_->state == Pending::State::kFailed) std::rethrow_exception(e_->error);
        if (e_->state == Pending::State::kStarted) {
          started = true;
          blocker = e_->work;
        } else {
          if (Clock::now() >= deadline) timeout_locked(timeout);
          blocker = shared_->blocker_locked();
        }
      }
      if (started) {
        if (blocker) blocker->wait(left());  // the inner communicator's own errors pass through
        return;
      }
      try {
        blocker->wait(left());
      } catch (const TimeoutError&) {
        std::lock_guard lk(shared_->mu);
        if (e_->state == Pending::State::kChecking) timeout_locked(timeout);
      } catch (...) {
        // A failed exchange: advance_locked records it on the operation.
      }
    }
  }
  void wait() override { wait(shared_->timeout); }
  bool done() override {
    std::lock_guard lk(shared_->mu);
    shared_->advance_locked();
    if (e_->state == Pending::State::kFailed) return true;
    if (e_->state == Pending::State::kStarted) return !e_->work || e_->work->done();
    return false;
  }
  // A failed operation that never reached the backend holds no buffers; a started one holds them until
  // the backend releases them (MPI: requests completed or cancelled).
  bool buffers_released() override {
    std::lock_guard lk(shared_->mu);
    shared_->advance_locked();
    if (e_->work) return e_->work->buffers_released();
    return e_->state == Pending::State::kFailed;
  }
  std::exception_ptr error() const override {
    std::lock_guard lk(shared_->mu);
    if (e_->state == Pending::State::kFailed) return e_->error;
    if (e_->state == Pending::State::kStarted && e_->work) return e_->work->error();
    return nullptr;
  }
  uint64_t seq() const override { return e_->seq; }

 private:
  [[noreturn]] void timeout_locked(std::chrono::milliseconds timeout) {
    const std::string msg = shared_->timeout_message_locked(*e_, timeout);
    shared_->fail_locked(*e_, std::make_exception_ptr(TimeoutError(msg)));
    const std::exception_ptr error = e_->error;
    shared_->abort_locked(msg);
    std::rethrow_exception(error);
  }

  std::shared_ptr<Shared> shared_;
  PendingPtr e_;
};

class CheckedCommunicator final : public Communicator {
 public:
  CheckedCommunicator(std::unique_ptr<Communicator> inner, std::unique_ptr<Communicator> side)
      : Communicator(inner->options()), shared_(std::make_shared<Shared>(std::move(inner), std::move(side))) {}

  int rank() const override { return shared_->rank; }
  int size() const override { return shared_->size; }
  std::string_view backend() const override { return shared_->inner->backend(); }
  bool device_buffers() const override { return shared_->inner->device_buffers(); }
  Capabilities capabilities() const override { return shared_->inner->capabilities(); }
  // Local (nothing to agree on): inner operations issued later, deferred ones included, come after it.
  void wait_stream(void* stream) override { shared_->inner->wait_stream(stream); }

  void abort(const std::string& reason) override {
    std::lock_guard lk(shared_->mu);
    shared_->abort_locked("rank " + std::to_string(shared_->rank) + " aborted: " + reason);
  }

 protected:
  std::unique_ptr<Communicator> start_split(int color, int key) override {
    // Agree first (in order after every earlier collective), then split inner and side channel.
    collective(fingerprint(OpKind::kSplit, DType::kUnspecified, ReduceOp::kSum, -1, 0), nullptr)->wait();
    auto child = shared_->inner->split(color, key);
    auto child_side = shared_->side->split(color, key);
    if (!child) return nullptr;
    return std::make_unique<CheckedCommunicator>(std::move(child), std::move(child_side));
  }

  WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    Communicator* in = shared_->inner.get();
    return collective(fingerprint(OpKind::kAllReduce, dtype, op, -1, count),
                      [=] { return in->all_reduce(send, recv, count, dtype, op); });
  }
  WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                               ReduceOp op) override {
    Communicator* in = shared_->inner.get();
    Fingerprint fp = fingerprint(OpKind::kReduceScatter, dtype, op, -1, detail::sum_counts(counts));
    fp.counts_hash = detail::hash_counts(counts);
    return collective(fp, [=, c = std::vector<size_t>(counts.begin(), counts.end())] {
      return in->reduce_scatter(send, recv, c, dtype, op);
    });
  }
  WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    Communicator* in = shared_->inner.get();
    Fingerprint fp = fingerprint(OpKind::kAllGather, dtype, ReduceOp::kSum, -1, detail::sum_counts(counts));
    fp.counts_hash = detail::hash_counts(counts);
    return collective(fp, [=, c = std::vector<size_t>(counts.begin(), counts.end())] {
      return in->all_gather(send, recv, c, dtype);
    });
  }
  WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) override {
    Communicator* in = shared_->inner.get();
    return collective(fingerprint(OpKind::kReduce, dtype, op, root, count),
                      [=] { return in->reduce(send, recv, count, dtype, op, root); });
  }
  WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override {
    Communicator* in = shared_->inner.get();
    return collective(fingerprint(OpKind::kBroadcast, dtype, ReduceOp::kSum, root, count),
                      [=] { return in->broadcast(buf, count, dtype, root); });
  }
  WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts, DType dtype) override {
    // The per-pair counts differ by rank by design; the backend checks that pairs agree.
    Communicator* in = shared_->inner.get();
    return collective(fingerprint(OpKind::kAllToAll, dtype, ReduceOp::kSum, -1, 0),
                      [=, s = std::vector<size_t>(send_counts.begin(), send_counts.end()),
                       r = std::vector<size_t>(recv_counts.begin(), recv_counts.end())] {
                        return in->all_to_all(send, s, recv, r, dtype);
                      });
  }
  WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override {
    Communicator* in = shared_->inner.get();
    return point_to_point("send to rank " + std::to_string(peer),
                          [=] { return in->send(buf, count, dtype, peer, tag); });
  }
  WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override {
    Communicator* in = shared_->inner.get();
    return point_to_point("recv from rank " + std::to_string(peer),
                          [=] { return in->recv(buf, count, dtype, peer, tag); });
  }
  WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                         DType dtype, int tag) override {
    Communicator* in = shared_->inner.get();
    return point_to_point("sendrecv to rank " + std::to_string(dst) + " and from rank " + std::to_string(src), [=] {
      return in->sendrecv(send, send_count, dst, recv, recv_count, src, dtype, tag);
    });
  }
  WorkPtr start_barrier() override {
    Communicator* in = shared_->inner.get();
    return collective(fingerprint(OpKind::kBarrier, DType::kUnspecified, ReduceOp::kSum, -1, 0),
                      [=] { return in->barrier(); });
  }

 private:
  Fingerprint fingerprint(OpKind kind, DType dtype, ReduceOp op, int root, uint64_t count) {
    Fingerprint fp;
    fp.kind = kind, fp.dtype = dtype, fp.op = op, fp.root = root, fp.count = count;
    return fp;
  }

  WorkPtr collective(Fingerprint fp, std::function<WorkPtr()> start) {
    Shared& s = *shared_;
    auto e = std::make_shared<Pending>();
    std::lock_guard lk(s.mu);
    fp.index = s.next_coll++;
    e->fp = fp;
    e->what = fp.describe();
    e->seq = s.next_seq++;
    e->start = std::move(start);
    if (s.aborted) {
      s.fail_locked(*e, s.aborted_error(*e));
      return std::make_shared<CheckedWork>(shared_, e);
    }
    try {
      if (s.size > 1) {
        e->mine = to_wire(fp);
        if (s.rank == 0) {
          e->theirs.resize(static_cast<size_t>(s.size));
          e->recvs.resize(static_cast<size_t>(s.size));
          for (int p = 1; p < s.size; ++p)
            e->recvs[p] = s.side->recv(&e->theirs[p], sizeof(WireFingerprint), DType::kU8, p, 0);
        } else {
          e->fp_send = s.side->send(&e->mine, sizeof(WireFingerprint), DType::kU8, 0, 0);
          e->verdict_work = s.side->broadcast(&e->verdict, sizeof(Verdict), DType::kU8, 0);
        }
      }
    } catch (...) {
      s.fail_locked(*e, std::current_exception());
      s.abort_locked("fingerprint exchange failed for " + e->what);
      return std::make_shared<CheckedWork>(shared_, e);
    }
    s.queue.push_back(e);
    s.advance_locked();
    return std::make_shared<CheckedWork>(shared_, e);
  }

  WorkPtr point_to_point(std::string what, std::function<WorkPtr()> start) {
    Shared& s = *shared_;
    auto e = std::make_shared<Pending>();
    e->collective = false;
    e->what = std::move(what);
    e->start = std::move(start);
    std::lock_guard lk(s.mu);
    e->seq = s.next_seq++;
    if (s.aborted) {
      s.fail_locked(*e, s.aborted_error(*e));
    } else if (s.ordered_p2p) {
      s.queue.push_back(e);
      s.advance_locked();
    } else {
      try {
        e->work = e->start();
        e->state = Pending::State::kStarted;
        e->start = nullptr;
      } catch (...) {
        s.fail_locked(*e, std::current_exception());
      }
    }
    return std::make_shared<CheckedWork>(shared_, e);
  }

  std::shared_ptr<Shared> shared_;
};

}  // namespace

std::unique_ptr<Communicator> make_checked_communicator(std::unique_ptr<Communicator> inner,
                                                        std::unique_ptr<Communicator> side_channel) {
  if (!inner) throw ConfigError("make_checked_communicator: no communicator to wrap");
  if (!side_channel) {
    if (inner->device_buffers())
      throw ConfigError("make_checked_communicator: the " + std::string(inner->backend()) +
                        " communicator uses device buffers; checked mode needs a host-memory side channel over the "
                        "same ranks (e.g. an MPI communicator: make_nccl_communicator_mpi provides one)");
    side_channel = inner->split(0, inner->rank());
  }
  if (side_channel->device_buffers() || side_channel->size() != inner->size() ||
      side_channel->rank() != inner->rank())
    throw ConfigError("make_checked_communicator: the side channel must use host memory and span the same ranks "
                      "(rank " + std::to_string(side_channel->rank()) + " of " + std::to_string(side_channel->size()) +
                      ", expected rank " + std::to_string(inner->rank()) + " of " + std::to_string(inner->size()) + ")");
  return std::make_unique<CheckedCommunicator>(std::move(inner), std::move(side_channel));
}

}  // namespace shardopt::comm
