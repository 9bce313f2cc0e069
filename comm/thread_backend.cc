#include "comm/thread_backend.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>

#include "base/error.h"
#include "comm/backend_util.h"
#include "comm/checked_communicator.h"
#include "comm/reduce_kernel.h"

namespace shardopt::comm {
namespace {

using Clock = std::chrono::steady_clock;
using detail::Fingerprint;

// Host data per chunk: large enough to amortize scheduling, small enough to spread over the pool.
constexpr size_t kHostChunkBytes = 256 << 10;
// Single-chunk operations moving at most this much run inline on the thread that made them runnable.
constexpr uint64_t kInlineBytes = 256 << 10;

class World;

// One operation shared by the ranks that take part in it.
struct OpRec {
  enum class State : uint8_t { kPosting, kReady, kRunning, kDone, kFailed };
  explicit OpRec(ThreadBufferMover& mover) : mover(mover) {}
  virtual ~OpRec() = default;
  // Called under the world lock once every side has posted; sets num_chunks and bytes_moved.
  // Throws DesyncError when the posted sides disagree in a way only visible now.
  virtual void prepare() = 0;
  // Moves the data of chunk i; chunks are independent of each other.
  virtual void run_chunk(size_t i) = 0;
  virtual bool is_collective() const = 0;

  ThreadBufferMover& mover;  // the world's: every read and write of the ranks' buffers

  // Guarded by World::mu.
  State state = State::kPosting;
  std::exception_ptr error;
  std::condition_variable cv;
  std::shared_ptr<World> world;  // set while running, so the world outlives the executing threads

  size_t num_chunks = 1;
  uint64_t bytes_moved = 0;
  std::atomic<size_t> next_chunk{0};
  std::atomic<size_t> chunks_done{0};
};
using OpPtr = std::shared_ptr<OpRec>;

bool terminal(const OpRec& op) { return op.state == OpRec::State::kDone || op.state == OpRec::State::kFailed; }

// What one rank posted into a collective.
struct CollSlot {
  bool posted = false;
  const void* send = nullptr;
  void* recv = nullptr;
  std::vector<size_t> send_counts, recv_counts, send_offsets, recv_offsets;  // all_to_all
  int color = 0, key = 0;                                                     // split
  std::shared_ptr<World> child;
  int child_rank = -1;
};

struct CollOp final : OpRec {
  CollOp(ThreadBufferMover& mover, int n, uint64_t index) : OpRec(mover), slots(static_cast<size_t>(n)) {
    fp.index = index;
  }
  void prepare() override;
  void run_chunk(size_t i) override;
  bool is_collective() const override { return true; }

  Fingerprint fp;  // the first poster's
  int first_rank = -1;
  int posted = 0;
  std::vector<CollSlot> slots;
  std::vector<size_t> counts;   // reduce_scatter / all_gather per-rank counts (first poster's)
  std::vector<size_t> offsets;  // prefix sums of counts
  size_t esz = 1;
  size_t chunk_elems = 1;
};

struct P2POp final : OpRec {
  explicit P2POp(ThreadBufferMover& mover) : OpRec(mover) {}
  void prepare() override;
  void run_chunk(size_t i) override;
  bool is_collective() const override { return false; }
  std::string describe_send() const;
  std::string describe_recv() const;

  int src_rank = -1, dst_rank = -1, tag = 0;
  bool send_posted = false, recv_posted = false;
  const void* src = nullptr;
  void* dst = nullptr;
  size_t send_count = 0, recv_count = 0;
  DType send_dtype = DType::kUnspecified, recv_dtype = DType::kUnspecified;
  size_t chunk_bytes = 0;  // set by prepare()
};

OpPtr work_on(const OpPtr& op);
void dispatch(OpPtr op);

// Process-wide pool of executor threads shared by every thread world.
class Executor {
 public:
  static Executor& get() {
    static Executor* executor = new Executor();  // never destroyed: threads may run until exit
    return *executor;
  }
  int threads() const { return static_cast<int>(threads_.size()); }
  void submit(const OpPtr& op, size_t copies) {
    {
      std::lock_guard lk(mu_);
      for (size_t i = 0; i < copies; ++i) queue_.push_back(op);
    }
    if (copies == 1)
      cv_.notify_one();
    else
      cv_.notify_all();
  }

 private:
  Executor() {
    const int n = detail::executor_threads_for(std::thread::hardware_concurrency());
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { loop(); });
    for (auto& t : threads_) t.detach();
  }
  void loop() {
    for (;;) {
      OpPtr op;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty(); });
        op = std::move(queue_.front());
        queue_.pop_front();
      }
      OpPtr next = work_on(op);
      op.reset();
      dispatch(std::move(next));
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<OpPtr> queue_;
  std::vector<std::thread> threads_;
};

class World : public std::enable_shared_from_this<World> {
 public:
  World(int n, CommOptions options, std::shared_ptr<ThreadBufferMover> mover)
      : n(n), options(options), mover(std::move(mover)) {}

  const int n;
  const CommOptions options;
  const std::shared_ptr<ThreadBufferMover> mover;
  std::mutex mu;
  bool aborted = false;
  std::string abort_reason;

  // Collectives not yet completed: colls[i] has collective index coll_base + i.
  std::deque<std::shared_ptr<CollOp>> colls;
  uint64_t coll_base = 0;
  bool coll_running = false;

  struct Channel {
    std::deque<std::shared_ptr<P2POp>> sends, recvs;  // posted, not yet matched
  };
  std::map<std::tuple<int, int, int>, Channel> channels;  // (source, destination, tag)

  // Marks the world failed; fails every operation that has not started moving data.
  void abort_locked(const std::string& reason) {
    if (aborted) return;
    aborted = true;
    abort_reason = reason;
    auto fail = [&](OpRec& op, const std::string& what) {
      if (op.state == OpRec::State::kPosting || op.state == OpRec::State::kReady) {
        op.state = OpRec::State::kFailed;
        op.error = std::make_exception_ptr(PeerError("threads communicator aborted (" + reason + "); " + what +
                                                     " cannot complete"));
        op.cv.notify_all();
      }
    };
    for (auto& c : colls) fail(*c, c->fp.describe());
    for (auto& [key, ch] : channels) {
      for (auto& s : ch.sends) fail(*s, s->describe_send());
      for (auto& r : ch.recvs) fail(*r, r->describe_recv());
    }
    channels.clear();
  }

  // Starts the oldest collective if every rank posted it and none is running; returns it to dispatch.
  OpPtr maybe_start_collective_locked() {
    if (coll_running || colls.empty() || colls.front()->state != OpRec::State::kReady) return nullptr;
    return start_locked(colls.front());
  }

  OpPtr start_locked(const OpPtr& op) {
    try {
      op->prepare();
    } catch (const DesyncError& e) {
      op->state = OpRec::State::kFailed;
      op->error = std::current_exception();
      op->cv.notify_all();
      abort_locked(std::string("desync: ") + e.what());
      return nullptr;
    }
    op->state = OpRec::State::kRunning;
    op->world = shared_from_this();
    if (op->is_collective()) coll_running = true;
    op->cv.notify_all();  // waiters may help with the chunks
    return op;
  }

  // Called by the thread that completed the last chunk; returns the next operation to dispatch.
  OpPtr finish(const OpPtr& op) {
    std::shared_ptr<World> keep = op->world;
    std::lock_guard lk(mu);
    op->state = op->error ? OpRec::State::kFailed : OpRec::State::kDone;
    op->world.reset();
    op->cv.notify_all();
    if (!op->is_collective()) return nullptr;
    SHARDOPT_ASSERT(!colls.empty() && colls.front() == op, "threads backend: collectives finish out of order");
    colls.pop_front();
    ++coll_base;
    coll_running = false;
    return aborted ? nullptr : maybe_start_collective_locked();
  }

  std::shared_ptr<CollOp> failed_collective(const Fingerprint& fp) {
    auto op = std::make_shared<CollOp>(*mover, n, fp.index);
    op->fp = fp;
    op->state = OpRec::State::kFailed;
    op->error = std::make_exception_ptr(
        PeerError("threads communicator aborted (" + abort_reason + "); " + fp.describe() + " cannot run"));
    return op;
  }

  // Posts rank's side of a collective. Returns the shared record; *to_dispatch is set when this post
  // made an operation runnable.
  std::shared_ptr<CollOp> post_collective(int rank, const Fingerprint& fp, CollSlot&& slot,
                                          std::span<const size_t> counts, OpPtr* to_dispatch) {
    std::lock_guard lk(mu);
    while (coll_base + colls.size() <= fp.index) {
      if (aborted) return failed_collective(fp);
      colls.push_back(std::make_shared<CollOp>(*mover, n, coll_base + colls.size()));
    }
    SHARDOPT_ASSERT(fp.index >= coll_base, "threads backend: collective posted after it completed");
    std::shared_ptr<CollOp> op = colls[fp.index - coll_base];
    if (op->state == OpRec::State::kFailed) return op;
    if (aborted) return failed_collective(fp);
    if (op->posted == 0) {
      op->fp = fp;
      op->first_rank = rank;
      op->counts.assign(counts.begin(), counts.end());
    } else if (!fp.same_collective(op->fp)) {
      const std::string msg = "threads communicator desync: rank " + std::to_string(op->first_rank) + " issued " +
                              op->fp.describe() + " but rank " + std::to_string(rank) + " issued " + fp.describe();
      op->state = OpRec::State::kFailed;
      op->error = std::make_exception_ptr(DesyncError(msg));
      op->cv.notify_all();
      abort_locked(msg);
      return op;
    }
    slot.posted = true;
    op->slots[static_cast<size_t>(rank)] = std::move(slot);
    if (++op->posted == n) {
      op->state = OpRec::State::kReady;
      *to_dispatch = maybe_start_collective_locked();
    }
    return op;
  }

  std::shared_ptr<P2POp> post_p2p(bool is_send, int self, int peer, int tag, const void* src, void* dst, size_t count,
                                  DType dtype, OpPtr* to_dispatch) {
    std::lock_guard lk(mu);
    const int s = is_send ? self : peer;
    const int d = is_send ? peer : self;
    std::shared_ptr<P2POp> op;
    auto fill = [&](P2POp& o) {
      if (is_send) {
        o.send_posted = true, o.src = src, o.send_count = count, o.send_dtype = dtype;
      } else {
        o.recv_posted = true, o.dst = dst, o.recv_count = count, o.recv_dtype = dtype;
      }
    };
    if (aborted) {
      op = std::make_shared<P2POp>(*mover);
      op->src_rank = s, op->dst_rank = d, op->tag = tag;
      fill(*op);
      op->state = OpRec::State::kFailed;
      op->error = std::make_exception_ptr(PeerError("threads communicator aborted (" + abort_reason + "); " +
                                                    (is_send ? op->describe_send() : op->describe_recv()) +
                                                    " cannot run"));
      return op;
    }
    Channel& ch = channels[{s, d, tag}];
    auto& waiting = is_send ? ch.recvs : ch.sends;
    if (waiting.empty()) {
      op = std::make_shared<P2POp>(*mover);
      op->src_rank = s, op->dst_rank = d, op->tag = tag;
      fill(*op);
      (is_send ? ch.sends : ch.recvs).push_back(op);
      return op;
    }
    op = std::move(waiting.front());
    waiting.pop_front();
    if (ch.sends.empty() && ch.recvs.empty()) channels.erase({s, d, tag});
    fill(*op);
    if (op->send_count != op->recv_count || op->send_dtype != op->recv_dtype) {
      const std::string msg = "threads communicator desync: " + op->describe_send() + " matched " +
                              op->describe_recv() + " (counts and dtypes must be equal)";
      op->state = OpRec::State::kFailed;
      op->error = std::make_exception_ptr(DesyncError(msg));
      op->cv.notify_all();
      abort_locked(msg);
      return op;
    }
    op->state = OpRec::State::kReady;
    *to_dispatch = start_locked(op);
    return op;
  }

  // For timeout messages: the ranks that have not posted collective `index`.
  std::vector<int> missing_ranks_locked(const CollOp& op) const {
    std::vector<int> missing;
    for (int r = 0; r < n; ++r)
      if (!op.slots[static_cast<size_t>(r)].posted) missing.push_back(r);
    return missing;
  }
};

void CollOp::prepare() {
  const int n = static_cast<int>(slots.size());
  esz = (fp.kind == OpKind::kBarrier || fp.kind == OpKind::kSplit) ? 1 : dtype_size(fp.dtype);
  chunk_elems = std::max<size_t>(1, mover.chunk_bytes() / esz);
  auto chunks_for = [&](uint64_t elems) { return std::max<size_t>(1, (elems + chunk_elems - 1) / chunk_elems); };
  switch (fp.kind) {
    case OpKind::kAllReduce:
    case OpKind::kReduce:
    case OpKind::kBroadcast:
      num_chunks = chunks_for(fp.count);
      bytes_moved = fp.count * esz * static_cast<uint64_t>(n);
      break;
    case OpKind::kReduceScatter:
    case OpKind::kAllGather:
      offsets.assign(static_cast<size_t>(n) + 1, 0);
      for (int r = 0; r < n; ++r) offsets[r + 1] = offsets[r] + counts[r];
      num_chunks = chunks_for(fp.count);
      bytes_moved = fp.count * esz * static_cast<uint64_t>(n);
      break;
    case OpKind::kAllToAll: {
      bytes_moved = 0;
      for (int p = 0; p < n; ++p)
        for (int q = 0; q < n; ++q) {
          const size_t sent = slots[p].send_counts[q], expected = slots[q].recv_counts[p];
          if (sent != expected)
            throw DesyncError("threads communicator desync in " + fp.describe() + ": rank " + std::to_string(p) +
                              " sends " + std::to_string(sent) + " elements to rank " + std::to_string(q) +
                              " but rank " + std::to_string(q) + " expects " + std::to_string(expected) +
                              " from rank " + std::to_string(p));
          bytes_moved += sent * esz;
        }
      num_chunks = static_cast<size_t>(n);  // one per source rank
      break;
    }
    case OpKind::kBarrier:
    case OpKind::kSplit:
    default:
      num_chunks = 1;
      bytes_moved = 0;
  }
}

void CollOp::run_chunk(size_t i) {
  const int n = static_cast<int>(slots.size());
  thread_local std::vector<const void*> inputs;
  thread_local std::vector<void*> outputs;
  auto at = [&](const void* p, size_t elems) { return static_cast<const std::byte*>(p) + elems * esz; };
  auto at_mut = [&](void* p, size_t elems) { return static_cast<std::byte*>(p) + elems * esz; };
  const size_t begin = i * chunk_elems;
  switch (fp.kind) {
    case OpKind::kAllReduce:
    case OpKind::kReduce: {
      const size_t end = std::min<size_t>(fp.count, begin + chunk_elems);
      if (begin >= end) return;
      inputs.resize(n);
      for (int r = 0; r < n; ++r) inputs[r] = at(slots[r].send, begin);
      if (fp.kind == OpKind::kAllReduce) {
        outputs.resize(n);
        for (int r = 0; r < n; ++r) outputs[r] = at_mut(slots[r].recv, begin);
      } else {
        outputs.assign(1, at_mut(slots[fp.root].recv, begin));
      }
      mover.reduce(fp.dtype, fp.op, inputs, outputs, end - begin);
      break;
    }
    case OpKind::kBroadcast: {
      const size_t end = std::min<size_t>(fp.count, begin + chunk_elems);
      if (begin >= end) return;
      const void* src = at(slots[fp.root].recv, begin);
      for (int r = 0; r < n; ++r)
        if (r != fp.root) mover.copy(at_mut(slots[r].recv, begin), src, (end - begin) * esz);
      break;
    }
    case OpKind::kReduceScatter:
    case OpKind::kAllGather: {
      size_t a = begin;
      const size_t end = std::min<size_t>(fp.count, begin + chunk_elems);
      if (a >= end) return;
      // Segment s holds global elements [offsets[s], offsets[s+1]); find the one containing a.
      size_t s = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), a) - offsets.begin()) - 1;
      inputs.resize(n);
      while (a < end) {
        while (offsets[s + 1] <= a) ++s;
        const size_t piece_end = std::min(end, offsets[s + 1]);
        const size_t len = piece_end - a;
        if (fp.kind == OpKind::kReduceScatter) {
          for (int r = 0; r < n; ++r) inputs[r] = at(slots[r].send, a);
          outputs.assign(1, at_mut(slots[s].recv, a - offsets[s]));
          mover.reduce(fp.dtype, fp.op, inputs, outputs, len);
        } else {
          const void* src = at(slots[s].send, a - offsets[s]);
          for (int q = 0; q < n; ++q) {
            void* dst = at_mut(slots[q].recv, a);
            if (dst != src) mover.copy(dst, src, len * esz);
          }
        }
        a = piece_end;
      }
      break;
    }
    case OpKind::kAllToAll: {
      const size_t p = i;
      for (int q = 0; q < n; ++q) {
        const size_t len = slots[p].send_counts[q];
        if (len == 0) continue;
        mover.copy(at_mut(slots[q].recv, slots[q].recv_offsets[p]), at(slots[p].send, slots[p].send_offsets[q]),
                   len * esz);
      }
      break;
    }
    case OpKind::kSplit: {
      std::vector<std::tuple<int, int, int>> order;  // (color, key, old rank)
      for (int r = 0; r < n; ++r)
        if (slots[r].color >= 0) order.emplace_back(slots[r].color, slots[r].key, r);
      std::sort(order.begin(), order.end());
      for (size_t b = 0; b < order.size();) {
        size_t e = b;
        while (e < order.size() && std::get<0>(order[e]) == std::get<0>(order[b])) ++e;
        auto child = std::make_shared<World>(static_cast<int>(e - b), world->options, world->mover);
        for (size_t j = b; j < e; ++j) {
          slots[std::get<2>(order[j])].child = child;
          slots[std::get<2>(order[j])].child_rank = static_cast<int>(j - b);
        }
        b = e;
      }
      return;
    }
    default: return;
  }
  mover.finish();  // the data cases break out of the switch
}

std::string P2POp::describe_send() const {
  return "send from rank " + std::to_string(src_rank) + " to rank " + std::to_string(dst_rank) + " (tag " +
         std::to_string(tag) + ", " + std::to_string(send_count) + " " + std::string(dtype_name(send_dtype)) + ")";
}
std::string P2POp::describe_recv() const {
  return "recv on rank " + std::to_string(dst_rank) + " from rank " + std::to_string(src_rank) + " (tag " +
         std::to_string(tag) + ", " + std::to_string(recv_count) + " " + std::string(dtype_name(recv_dtype)) + ")";
}

void P2POp::prepare() {
  chunk_bytes = mover.chunk_bytes();
  bytes_moved = send_count * dtype_size(send_dtype);
  num_chunks = std::max<size_t>(1, (bytes_moved + chunk_bytes - 1) / chunk_bytes);
}

void P2POp::run_chunk(size_t i) {
  const size_t begin = i * chunk_bytes;
  const size_t end = std::min<size_t>(bytes_moved, begin + chunk_bytes);
  if (begin < end && src != dst) {
    mover.copy(static_cast<std::byte*>(dst) + begin, static_cast<const std::byte*>(src) + begin, end - begin);
    mover.finish();
  }
}

// Claims and runs chunks of a running op until none is left; returns the op to dispatch next.
OpPtr work_on(const OpPtr& op) {
  OpPtr next;
  for (;;) {
    const size_t i = op->next_chunk.fetch_add(1);
    if (i >= op->num_chunks) break;
    try {
      op->run_chunk(i);
    } catch (...) {
      std::lock_guard lk(op->world->mu);
      if (!op->error) op->error = std::current_exception();
    }
    if (op->chunks_done.fetch_add(1) + 1 == op->num_chunks) next = op->world->finish(op);
  }
  return next;
}

void dispatch(OpPtr op) {
  while (op) {
    if (op->num_chunks == 1 && op->bytes_moved <= kInlineBytes) {
      op = work_on(op);
    } else {
      Executor& ex = Executor::get();
      ex.submit(op, std::min<size_t>(op->num_chunks, static_cast<size_t>(ex.threads())));
      op = nullptr;
    }
  }
}

class ThreadWork final : public Work {
 public:
  ThreadWork(std::shared_ptr<World> world, int rank, uint64_t seq, std::chrono::milliseconds default_timeout,
             OpPtr op, OpPtr op2 = nullptr)
      : world_(std::move(world)),
        rank_(rank),
        seq_(seq),
        default_timeout_(default_timeout),
        op_(std::move(op)),
        op2_(std::move(op2)) {}

  void wait(std::chrono::milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    wait_one(op_, deadline, timeout);
    if (op2_) wait_one(op2_, deadline, timeout);
  }
  void wait() override { wait(default_timeout_); }
  bool done() override {
    std::lock_guard lk(world_->mu);
    return local_error_ || (terminal(*op_) && (!op2_ || terminal(*op2_)));
  }
  std::exception_ptr error() const override {
    std::lock_guard lk(world_->mu);
    if (local_error_) return local_error_;
    if (op_->error) return op_->error;
    return op2_ ? op2_->error : nullptr;
  }
  uint64_t seq() const override { return seq_; }

 private:
  void wait_one(const OpPtr& op, Clock::time_point deadline, std::chrono::milliseconds timeout) {
    std::unique_lock lk(world_->mu);
    if (local_error_) std::rethrow_exception(local_error_);
    for (;;) {
      if (op->state == OpRec::State::kDone) return;
      if (op->state == OpRec::State::kFailed) std::rethrow_exception(op->error);
      if (op->state == OpRec::State::kRunning) {
        // Data is moving: help with it, and never return before it finished (buffers stay in use).
        if (op->next_chunk.load() < op->num_chunks) {
          lk.unlock();
          dispatch(work_on(op));
          lk.lock();
        } else {
          op->cv.wait(lk);
        }
        continue;
      }
      if (op->cv.wait_until(lk, deadline) != std::cv_status::timeout) continue;
      if (terminal(*op) || op->state == OpRec::State::kRunning) continue;
      if (op->state == OpRec::State::kReady && world_->coll_running) {
        // All ranks arrived; an earlier collective is still moving data.
        op->cv.wait_for(lk, std::chrono::milliseconds(1));
        continue;
      }
      const std::string msg = timeout_message_locked(*op, timeout);
      local_error_ = std::make_exception_ptr(TimeoutError(msg));
      world_->abort_locked("rank " + std::to_string(rank_) + ": " + msg);
      std::rethrow_exception(local_error_);
    }
  }

  std::string timeout_message_locked(OpRec& op, std::chrono::milliseconds timeout) {
    std::string head = "threads communicator rank " + std::to_string(rank_) + ": ";
    const std::string after = ", seq " + std::to_string(seq_) + ", timed out after " +
                              std::to_string(timeout.count()) + " ms; ";
    if (!op.is_collective()) {
      auto& p = static_cast<P2POp&>(op);
      if (p.send_posted && !p.recv_posted)
        return head + p.describe_send() + after + "rank " + std::to_string(p.dst_rank) +
               " never posted the matching recv";
      return head + p.describe_recv() + after + "rank " + std::to_string(p.src_rank) +
             " never posted the matching send";
    }
    auto& c = static_cast<CollOp&>(op);
    std::vector<int> missing = world_->missing_ranks_locked(c);
    if (!missing.empty()) return head + c.fp.describe() + after + "ranks " + detail::format_ranks(missing) + " never arrived";
    // Every rank posted this one: it waits behind an earlier collective that some never posted.
    for (auto& earlier : world_->colls) {
      if (earlier.get() == &c) break;
      std::vector<int> m = world_->missing_ranks_locked(*earlier);
      if (!m.empty())
        return head + c.fp.describe() + after + "it waits behind " + earlier->fp.describe() + ", where ranks " +
               detail::format_ranks(m) + " never arrived";
    }
    return head + c.fp.describe() + after + "every rank arrived but it never started";
  }

  std::shared_ptr<World> world_;
  int rank_;
  uint64_t seq_;
  std::chrono::milliseconds default_timeout_;
  OpPtr op_, op2_;
  std::exception_ptr local_error_;  // guarded by world_->mu
};

class ThreadComm final : public Communicator {
 public:
  ThreadComm(std::shared_ptr<World> world, int rank)
      : Communicator(world->options), world_(std::move(world)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return world_->n; }
  std::string_view backend() const override { return "threads"; }
  bool device_buffers() const override { return world_->mover->device(); }
  void wait_stream(void* stream) override { world_->mover->wait_stream(stream); }

  std::unique_ptr<Communicator> start_split(int color, int key) override {
    CollSlot slot;
    slot.color = color;
    slot.key = key;
    Fingerprint fp = make_fp(OpKind::kSplit, DType::kUnspecified, ReduceOp::kSum, -1, 0);
    WorkPtr work = post(fp, std::move(slot), {});
    work->wait();
    std::lock_guard lk(world_->mu);
    CollSlot& mine = last_split_->slots[static_cast<size_t>(rank_)];
    if (!mine.child) return nullptr;  // negative color: in no group
    auto child = std::make_unique<ThreadComm>(mine.child, mine.child_rank);
    mine.child.reset();
    return child;
  }

  WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    CollSlot slot;
    slot.send = send, slot.recv = recv;
    return post(make_fp(OpKind::kAllReduce, dtype, op, -1, count), std::move(slot), {});
  }

  WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                               ReduceOp op) override {
    Fingerprint fp = make_fp(OpKind::kReduceScatter, dtype, op, -1, detail::sum_counts(counts));
    fp.counts_hash = detail::hash_counts(counts);
    CollSlot slot;
    slot.send = send, slot.recv = recv;
    return post(fp, std::move(slot), counts);
  }

  WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    Fingerprint fp = make_fp(OpKind::kAllGather, dtype, ReduceOp::kSum, -1, detail::sum_counts(counts));
    fp.counts_hash = detail::hash_counts(counts);
    CollSlot slot;
    slot.send = send, slot.recv = recv;
    return post(fp, std::move(slot), counts);
  }

  WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) override {
    CollSlot slot;
    slot.send = send, slot.recv = recv;
    return post(make_fp(OpKind::kReduce, dtype, op, root, count), std::move(slot), {});
  }

  WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override {
    CollSlot slot;
    slot.send = buf, slot.recv = buf;
    return post(make_fp(OpKind::kBroadcast, dtype, ReduceOp::kSum, root, count), std::move(slot), {});
  }

  WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts, DType dtype) override {
    CollSlot slot;
    slot.send = send, slot.recv = recv;
    slot.send_counts.assign(send_counts.begin(), send_counts.end());
    slot.recv_counts.assign(recv_counts.begin(), recv_counts.end());
    slot.send_offsets.resize(send_counts.size());
    slot.recv_offsets.resize(recv_counts.size());
    for (size_t p = 0, s = 0, r = 0; p < send_counts.size(); ++p) {
      slot.send_offsets[p] = s, slot.recv_offsets[p] = r;
      s += send_counts[p], r += recv_counts[p];
    }
    return post(make_fp(OpKind::kAllToAll, dtype, ReduceOp::kSum, -1, 0), std::move(slot), {});
  }

  WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override {
    auto op = post_p2p(true, buf, nullptr, count, dtype, peer, tag);
    return std::make_shared<ThreadWork>(world_, rank_, next_seq_++, options_.timeout, std::move(op));
  }

  WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override {
    auto op = post_p2p(false, nullptr, buf, count, dtype, peer, tag);
    return std::make_shared<ThreadWork>(world_, rank_, next_seq_++, options_.timeout, std::move(op));
  }

  WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                         DType dtype, int tag) override {
    auto s = post_p2p(true, send, nullptr, send_count, dtype, dst, tag);
    auto r = post_p2p(false, nullptr, recv, recv_count, dtype, src, tag);
    return std::make_shared<ThreadWork>(world_, rank_, next_seq_++, options_.timeout, std::move(s), std::move(r));
  }

  WorkPtr start_barrier() override {
    return post(make_fp(OpKind::kBarrier, DType::kUnspecified, ReduceOp::kSum, -1, 0), CollSlot{}, {});
  }

  void abort(const std::string& reason) override {
    std::lock_guard lk(world_->mu);
    world_->abort_locked("rank " + std::to_string(rank_) + " aborted: " + reason);
  }

 private:
  Fingerprint make_fp(OpKind kind, DType dtype, ReduceOp op, int root, uint64_t count) {
    Fingerprint fp;
    fp.index = next_coll_;
    fp.kind = kind, fp.dtype = dtype, fp.op = op, fp.root = root, fp.count = count;
    return fp;
  }

  WorkPtr post(const Fingerprint& fp, CollSlot&& slot, std::span<const size_t> counts) {
    ++next_coll_;
    OpPtr to_dispatch;
    auto op = world_->post_collective(rank_, fp, std::move(slot), counts, &to_dispatch);
    if (fp.kind == OpKind::kSplit) last_split_ = op;
    dispatch(std::move(to_dispatch));
    return std::make_shared<ThreadWork>(world_, rank_, next_seq_++, options_.timeout, std::move(op));
  }

  OpPtr post_p2p(bool is_send, const void* src, void* dst, size_t count, DType dtype, int peer, int tag) {
    OpPtr to_dispatch;
    auto op = world_->post_p2p(is_send, rank_, peer, tag, src, dst, count, dtype, &to_dispatch);
    dispatch(std::move(to_dispatch));
    return op;
  }

  std::shared_ptr<World> world_;
  int rank_;
  uint64_t next_seq_ = 0;   // every operation
  uint64_t next_coll_ = 0;  // collectives only: the index ranks rendezvous on
  std::shared_ptr<CollOp> last_split_;
};

}  // namespace

namespace {
class HostBufferMover final : public ThreadBufferMover {
 public:
  bool device() const override { return false; }
  size_t chunk_bytes() const override { return kHostChunkBytes; }
  void reduce(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
              size_t len) override {
    detail::reduce_elements(dtype, op, inputs, outputs, len);
  }
  void copy(void* dst, const void* src, size_t bytes) override { detail::copy_bytes(dst, src, bytes); }
};
}  // namespace

std::shared_ptr<ThreadBufferMover> host_buffer_mover() {
  static const auto mover = std::make_shared<HostBufferMover>();
  return mover;
}

std::vector<std::unique_ptr<Communicator>> make_thread_world(int n, CommOptions options,
                                                             std::shared_ptr<ThreadBufferMover> mover) {
  if (n < 1) throw ConfigError("make_thread_world: world size must be at least 1, got " + std::to_string(n));
  if (!mover) mover = host_buffer_mover();
  auto world = std::make_shared<World>(n, options, std::move(mover));
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) comms.push_back(std::make_unique<ThreadComm>(world, r));
  if (options.checked) {
    // Checked mode: each rank's communicator is wrapped, with a second world as its side channel.
    auto side_world = std::make_shared<World>(n, options, host_buffer_mover());
    for (int r = 0; r < n; ++r)
      comms[r] = make_checked_communicator(std::move(comms[r]), std::make_unique<ThreadComm>(side_world, r));
  }
  return comms;
}

void run_ranks(int n, const std::function<void(Communicator&)>& fn, CommOptions options,
               std::shared_ptr<ThreadBufferMover> mover) {
  auto comms = make_thread_world(n, options, std::move(mover));
  std::mutex mu;
  std::exception_ptr first_cause, first_echo;  // echo: a PeerError caused by another rank's failure
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(*comms[r]);
      } catch (...) {
        std::string what = "unknown exception";
        bool echo = false;
        try {
          throw;
        } catch (const PeerError& e) {
          what = e.what(), echo = true;
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        {
          std::lock_guard lk(mu);
          auto& slot = echo ? first_echo : first_cause;
          if (!slot) slot = std::current_exception();
        }
        comms[r]->abort("rank " + std::to_string(r) + " failed: " + what);
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first_cause) std::rethrow_exception(first_cause);
  if (first_echo) std::rethrow_exception(first_echo);
}

int thread_executor_threads() { return Executor::get().threads(); }

namespace detail {
int executor_threads_for(unsigned hardware_threads) { return static_cast<int>(std::clamp(hardware_threads, 2u, 8u)); }
}  // namespace detail

}  // namespace shardopt::comm
