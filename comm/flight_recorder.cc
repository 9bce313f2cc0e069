#include "comm/flight_recorder.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "base/error.h"

namespace shardopt::comm {

struct FlightRecorder::Log {
  std::mutex mu;
  std::string name;
  size_t capacity = 64;
  int rank = 0, size = 1;
  uint64_t next_seq = 0;
  std::deque<FlightRecord> ring;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();

  double now_ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  static std::string line_of(const FlightRecord& r) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "seq %llu  %-14s count %llu  %llu B", static_cast<unsigned long long>(r.seq),
                  std::string(op_kind_name(r.kind)).c_str(), static_cast<unsigned long long>(r.count),
                  static_cast<unsigned long long>(r.bytes));
    std::string out = buf;
    if (r.peer >= 0) out += "  peer/root " + std::to_string(r.peer);
    if (r.tag >= 0) out += "  tag " + std::to_string(r.tag);
    std::snprintf(buf, sizeof buf, "  t %.1f -> ", r.start_ms);
    out += buf;
    if (r.end_ms >= 0) {
      std::snprintf(buf, sizeof buf, "%.1f", r.end_ms);
      out += buf;
    } else {
      out += r.failed ? "(failed)" : "(pending)";
    }
    return out;
  }
  std::string dump() {
    std::lock_guard lock(mu);
    std::string out = "flight recorder " + name + " (rank " + std::to_string(rank) + " of " + std::to_string(size) +
                      ", last " + std::to_string(ring.size()) +
                      " ops, oldest first; t in ms since the recorder started):";
    for (const FlightRecord& r : ring) out += "\n  " + line_of(r);
    return out;
  }
  // "world (rank 1 of 4): stopped at seq 9 all_reduce ... (failed)" or "... all ops completed (last seq 8)".
  std::string stopped_at() {
    std::lock_guard lock(mu);
    std::string out = name + " (rank " + std::to_string(rank) + " of " + std::to_string(size) + "): ";
    for (const FlightRecord& r : ring)
      if (r.end_ms < 0) return out + "stopped at " + line_of(r);
    if (ring.empty()) return out + "no operations";
    return out + "all ops completed (last seq " + std::to_string(ring.back().seq) + ")";
  }
  FlightRecord* find(uint64_t seq) {
    for (auto& r : ring)
      if (r.seq == seq) return &r;
    return nullptr;  // fell out of the ring
  }
  void finish(uint64_t seq, bool ok) {
    std::lock_guard lock(mu);
    if (FlightRecord* r = find(seq)) {
      if (ok && r->end_ms < 0) r->end_ms = now_ms();
      if (!ok) r->failed = true;
    }
  }
};

struct FlightRecorder::Tree {
  std::mutex mu;
  std::vector<std::weak_ptr<Log>> logs;  // creation order; a destroyed communicator's log expires
  std::chrono::system_clock::time_point started = std::chrono::system_clock::now();
};

namespace {

// Completes the record on success; appends the dump to a failure, keeping its type. (A template over
// the log type: FlightRecorder::Log is private to the recorder.)
template <class LogT>
class RecordedWork final : public Work {
 public:
  RecordedWork(WorkPtr inner, std::shared_ptr<LogT> log, uint64_t seq)
      : inner_(std::move(inner)), log_(std::move(log)), seq_(seq) {}
  void wait(std::chrono::milliseconds timeout) override { guarded([&] { inner_->wait(timeout); }); }
  void wait() override { guarded([&] { inner_->wait(); }); }
  // A caller that polls instead of waiting completes the record too.
  bool done() override {
    const bool finished = inner_->done();
    if (finished) log_->finish(seq_, inner_->error() == nullptr);
    return finished;
  }
  bool buffers_released() override { return inner_->buffers_released(); }
  std::exception_ptr error() const override { return inner_->error(); }
  uint64_t seq() const override { return inner_->seq(); }

 private:
  template <class F>
  void guarded(F&& f) {
    try {
      f();
      log_->finish(seq_, true);
    } catch (const TimeoutError& e) {
      log_->finish(seq_, false);
      throw TimeoutError(std::string(e.what()) + "\n" + log_->dump());
    } catch (const DesyncError& e) {
      log_->finish(seq_, false);
      throw DesyncError(std::string(e.what()) + "\n" + log_->dump());
    } catch (const PeerError& e) {
      log_->finish(seq_, false);
      throw PeerError(std::string(e.what()) + "\n" + log_->dump());
    }
  }
  WorkPtr inner_;
  std::shared_ptr<LogT> log_;
  uint64_t seq_;
};

}  // namespace

FlightRecorder::FlightRecorder(Communicator& inner, size_t capacity, std::string name)
    : ForwardingCommunicator(inner) {
  init(capacity, std::move(name), std::make_shared<Tree>());
}

FlightRecorder::FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity, std::string name)
    : ForwardingCommunicator(std::move(owned)) {
  init(capacity, std::move(name), std::make_shared<Tree>());
}

FlightRecorder::FlightRecorder(std::unique_ptr<Communicator> owned, size_t capacity, std::string name,
                               std::shared_ptr<Tree> tree)
    : ForwardingCommunicator(std::move(owned)) {
  init(capacity, std::move(name), std::move(tree));
}

FlightRecorder::~FlightRecorder() = default;

void FlightRecorder::init(size_t capacity, std::string name, std::shared_ptr<Tree> tree) {
  log_ = std::make_shared<Log>();
  log_->capacity = capacity == 0 ? 1 : capacity;
  log_->name = std::move(name);
  log_->rank = inner().rank();
  log_->size = inner().size();
  tree_ = std::move(tree);
  std::lock_guard lock(tree_->mu);
  tree_->logs.push_back(log_);
}

std::string FlightRecorder::dump() const { return log_->dump(); }
std::string FlightRecorder::name() const {
  std::lock_guard lock(log_->mu);
  return log_->name;
}
void FlightRecorder::rename(std::string name) {
  std::lock_guard lock(log_->mu);
  log_->name = std::move(name);
}

std::deque<FlightRecord> FlightRecorder::records() const {
  std::lock_guard lock(log_->mu);
  return log_->ring;
}

std::string FlightRecorder::dump_tree() const {
  std::vector<std::shared_ptr<Log>> logs;
  {
    std::lock_guard lock(tree_->mu);
    for (const auto& w : tree_->logs)
      if (auto l = w.lock()) logs.push_back(std::move(l));
  }
  const auto started_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(tree_->started.time_since_epoch()).count();
  std::string out = "recorders started at unix time " + std::to_string(started_ms) + " ms\nwhere each communicator stopped:";
  for (const auto& l : logs) out += "\n  " + l->stopped_at();
  for (const auto& l : logs) out += "\n\n" + l->dump();
  return out + "\n";
}

void FlightRecorder::write_report(const std::string& path, const std::string& headline) const noexcept {
  try {
    const std::filesystem::path p(path);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
    std::ofstream out(p);
    out << headline << "\n\n" << dump_tree();
    out.close();
    if (!out) std::fprintf(stderr, "flight recorder: could not write %s\n", path.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flight recorder: could not write %s: %s\n", path.c_str(), e.what());
  }
}

WorkPtr FlightRecorder::forward(const ForwardedOp& op, IssueRef issue) {
  uint64_t seq = 0;
  {
    std::lock_guard lock(log_->mu);
    seq = log_->next_seq++;
    FlightRecord r;
    r.seq = seq, r.kind = op.kind, r.count = op.count, r.bytes = op.count * dtype_size(op.dtype), r.peer = op.peer,
    r.tag = op.tag;
    r.start_ms = log_->now_ms();
    log_->ring.push_back(r);
    if (log_->ring.size() > log_->capacity) log_->ring.pop_front();
  }
  return std::make_shared<RecordedWork<Log>>(issue(), log_, seq);
}

std::unique_ptr<Communicator> FlightRecorder::wrap_child(std::unique_ptr<Communicator> child) {
  std::string child_name = log_->name + "/split " + std::to_string(splits_++);
  return std::unique_ptr<Communicator>(new FlightRecorder(std::move(child), log_->capacity, child_name, tree_));
}

}  // namespace shardopt::comm
