#include "comm/flight_recorder.h"

#include <cstdio>
#include <functional>
#include <numeric>

#include "base/error.h"

namespace shardopt::comm {

struct FlightRecorder::Log {
  std::mutex mu;
  size_t capacity;
  int rank = 0, size = 1;
  uint64_t next_seq = 0;
  std::deque<FlightRecord> ring;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();

  double now_ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  std::string dump() {
    std::lock_guard lock(mu);
    std::string out = "flight recorder (rank " + std::to_string(rank) + " of " + std::to_string(size) + ", last " +
                      std::to_string(ring.size()) + " ops, oldest first; t in ms since the recorder started):";
    char line[200];
    for (const FlightRecord& r : ring) {
      std::snprintf(line, sizeof line, "\n  seq %llu  %-14s count %llu  %llu B", static_cast<unsigned long long>(r.seq),
                    std::string(op_kind_name(r.kind)).c_str(), static_cast<unsigned long long>(r.count),
                    static_cast<unsigned long long>(r.bytes));
      out += line;
      if (r.peer >= 0) out += "  peer/root " + std::to_string(r.peer);
      if (r.tag >= 0) out += "  tag " + std::to_string(r.tag);
      std::snprintf(line, sizeof line, "  t %.1f -> ", r.start_ms);
      out += line;
      if (r.end_ms >= 0) {
        std::snprintf(line, sizeof line, "%.1f", r.end_ms);
        out += line;
      } else {
        out += r.failed ? "(failed)" : "(pending)";
      }
    }
    return out;
  }
  FlightRecord* find(uint64_t seq) {
    for (auto& r : ring)
      if (r.seq == seq) return &r;
    return nullptr;  // fell out of the ring
  }
};

namespace {

// Completes the record on success; appends the dump to a failure, keeping its type.
class RecordedWork final : public Work {
 public:
  RecordedWork(WorkPtr inner, std::shared_ptr<void> log, uint64_t seq,
               std::function<void(uint64_t, bool)> finish, std::function<std::string()> dump)
      : inner_(std::move(inner)), log_(std::move(log)), seq_(seq), finish_(std::move(finish)), dump_(std::move(dump)) {}
  void wait(std::chrono::milliseconds timeout) override { guarded([&] { inner_->wait(timeout); }); }
  void wait() override { guarded([&] { inner_->wait(); }); }
  bool done() override { return inner_->done(); }
  bool buffers_released() override { return inner_->buffers_released(); }
  std::exception_ptr error() const override { return inner_->error(); }
  uint64_t seq() const override { return inner_->seq(); }

 private:
  template <class F>
  void guarded(F&& f) {
    try {
      f();
      finish_(seq_, true);
    } catch (const TimeoutError& e) {
      finish_(seq_, false);
      throw TimeoutError(std::string(e.what()) + "\n" + dump_());
    } catch (const DesyncError& e) {
      finish_(seq_, false);
      throw DesyncError(std::string(e.what()) + "\n" + dump_());
    } catch (const PeerError& e) {
      finish_(seq_, false);
      throw PeerError(std::string(e.what()) + "\n" + dump_());
    }
  }
  WorkPtr inner_;
  std::shared_ptr<void> log_;
  uint64_t seq_;
  std::function<void(uint64_t, bool)> finish_;
  std::function<std::string()> dump_;
};

uint64_t sum(std::span<const size_t> counts) { return std::accumulate(counts.begin(), counts.end(), uint64_t{0}); }

}  // namespace

FlightRecorder::FlightRecorder(Communicator& inner, size_t capacity)
    : Communicator(inner.options()), inner_(&inner), log_(std::make_shared<Log>()) {
  log_->capacity = capacity == 0 ? 1 : capacity;
  log_->rank = inner.rank();
  log_->size = inner.size();
}

FlightRecorder::FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity) : FlightRecorder(*owned, capacity) {
  owned_ = std::move(owned);
}

std::string FlightRecorder::dump() const { return log_->dump(); }

std::deque<FlightRecord> FlightRecorder::records() const {
  std::lock_guard lock(log_->mu);
  return log_->ring;
}

WorkPtr FlightRecorder::record(OpKind kind, uint64_t count, DType dtype, int peer, int tag, WorkPtr work) {
  uint64_t seq = 0;
  {
    std::lock_guard lock(log_->mu);
    seq = log_->next_seq++;
    FlightRecord r;
    r.seq = seq, r.kind = kind, r.count = count, r.bytes = count * dtype_size(dtype), r.peer = peer, r.tag = tag;
    r.start_ms = log_->now_ms();
    log_->ring.push_back(r);
    if (log_->ring.size() > log_->capacity) log_->ring.pop_front();
  }
  std::shared_ptr<Log> log = log_;
  auto finish = [log](uint64_t s, bool ok) {
    std::lock_guard lock(log->mu);
    if (FlightRecord* r = log->find(s)) {
      if (ok && r->end_ms < 0) r->end_ms = log->now_ms();
      if (!ok) r->failed = true;
    }
  };
  return std::make_shared<RecordedWork>(std::move(work), log, seq, finish, [log] { return log->dump(); });
}

std::unique_ptr<Communicator> FlightRecorder::start_split(int color, int key) {
  auto child = inner_->split(color, key);
  if (!child) return nullptr;
  return std::make_unique<FlightRecorder>(std::move(child), log_->capacity);
}

WorkPtr FlightRecorder::start_all_reduce(const void* s, void* r, size_t c, DType d, ReduceOp op) {
  return record(OpKind::kAllReduce, c, d, -1, -1, inner_->all_reduce(s, r, c, d, op));
}
WorkPtr FlightRecorder::start_reduce_scatter(const void* s, void* r, std::span<const size_t> c, DType d, ReduceOp op) {
  return record(OpKind::kReduceScatter, sum(c), d, -1, -1, inner_->reduce_scatter(s, r, c, d, op));
}
WorkPtr FlightRecorder::start_all_gather(const void* s, void* r, std::span<const size_t> c, DType d) {
  return record(OpKind::kAllGather, sum(c), d, -1, -1, inner_->all_gather(s, r, c, d));
}
WorkPtr FlightRecorder::start_reduce(const void* s, void* r, size_t c, DType d, ReduceOp op, int root) {
  return record(OpKind::kReduce, c, d, root, -1, inner_->reduce(s, r, c, d, op, root));
}
WorkPtr FlightRecorder::start_broadcast(void* b, size_t c, DType d, int root) {
  return record(OpKind::kBroadcast, c, d, root, -1, inner_->broadcast(b, c, d, root));
}
WorkPtr FlightRecorder::start_all_to_all(const void* s, std::span<const size_t> sc, void* r, std::span<const size_t> rc,
                                   DType d) {
  return record(OpKind::kAllToAll, sum(sc), d, -1, -1, inner_->all_to_all(s, sc, r, rc, d));
}
WorkPtr FlightRecorder::start_send(const void* b, size_t c, DType d, int peer, int tag) {
  return record(OpKind::kSend, c, d, peer, tag, inner_->send(b, c, d, peer, tag));
}
WorkPtr FlightRecorder::start_recv(void* b, size_t c, DType d, int peer, int tag) {
  return record(OpKind::kRecv, c, d, peer, tag, inner_->recv(b, c, d, peer, tag));
}
WorkPtr FlightRecorder::start_sendrecv(const void* s, size_t sc, int dst, void* r, size_t rc, int src, DType d, int tag) {
  return record(OpKind::kSendRecv, sc, d, dst, tag, inner_->sendrecv(s, sc, dst, r, rc, src, d, tag));
}
WorkPtr FlightRecorder::start_barrier() {
  return record(OpKind::kBarrier, 0, DType::kU8, -1, -1, inner_->barrier());
}

}  // namespace shardopt::comm
