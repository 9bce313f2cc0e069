// Chrome-trace (Perfetto-viewable) recorder: one instance per rank records complete events
// ("ph":"X") with the rank as the thread id, and write_chrome_trace merges all ranks into one file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/clock.h"

namespace shardopt::runtime {

struct TraceEvent {
  std::string name;      // "reduce_scatter b3", "muon ns", ...
  std::string category;  // "compute" or "comm"
  int64_t start_us = 0;  // since the recorder's epoch
  int64_t duration_us = 0;
};

class TraceRecorder {
 public:
  // All ranks of one process should share an epoch so their timelines line up.
  explicit TraceRecorder(clock::TimePoint epoch = clock::now()) : epoch_(epoch) {}

  // Recording is off until enabled; keep_last_steps bounds memory to the last few steps.
  void enable(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  void begin_step() { if (enabled_) step_marks_.push_back(events_.size()); }
  void keep_last_steps(size_t steps);

  void record(std::string name, const char* category, clock::TimePoint start, clock::TimePoint end);
  const std::vector<TraceEvent>& events() const { return events_; }

  // RAII span: records [construction, destruction). The (prefix, suffix) forms build the name only
  // while recording is enabled, so a disabled recorder costs no allocation.
  class Span {
   public:
    Span(TraceRecorder& rec, std::string name, const char* category)
        : rec_(rec), active_(rec.enabled()), name_(std::move(name)), category_(category), start_(clock::now()) {}
    Span(TraceRecorder& rec, const char* name, const char* category)
        : rec_(rec), active_(rec.enabled()), category_(category), start_(clock::now()) {
      if (active_) name_ = name;
    }
    Span(TraceRecorder& rec, const char* prefix, int index, const char* category)
        : rec_(rec), active_(rec.enabled()), category_(category), start_(clock::now()) {
      if (active_) name_ = prefix + std::to_string(index);
    }
    Span(TraceRecorder& rec, const char* prefix, const std::string& suffix, const char* category)
        : rec_(rec), active_(rec.enabled()), category_(category), start_(clock::now()) {
      if (active_) name_ = prefix + suffix;
    }
    ~Span() {
      if (active_) rec_.record(std::move(name_), category_, start_, clock::now());
    }
    Span(const Span&) = delete;
    Span& operator=(const Span&) = delete;

   private:
    TraceRecorder& rec_;
    bool active_;
    std::string name_;
    const char* category_;
    clock::TimePoint start_;
  };

 private:
  clock::TimePoint epoch_;
  bool enabled_ = false;
  std::vector<TraceEvent> events_;
  std::vector<size_t> step_marks_;
};

// Writes {"traceEvents": [...]} with pid 0 and tid = rank for every rank's events.
void write_chrome_trace(const std::string& path, const std::vector<const TraceRecorder*>& ranks,
                        const std::vector<int>& rank_ids);

}  // namespace shardopt::runtime
