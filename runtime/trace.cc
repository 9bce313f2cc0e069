#include "runtime/trace.h"

#include <fstream>

#include <nlohmann/json.hpp>

#include "base/error.h"

namespace shardopt::runtime {

void TraceRecorder::record(std::string name, const char* category, clock::TimePoint start, clock::TimePoint end) {
  if (!enabled_) return;
  using std::chrono::duration_cast;
  using std::chrono::microseconds;
  events_.push_back(TraceEvent{std::move(name), category, duration_cast<microseconds>(start - epoch_).count(),
                               duration_cast<microseconds>(end - start).count()});
}

void TraceRecorder::keep_last_steps(size_t steps) {
  if (step_marks_.size() <= steps) return;
  const size_t first_kept = step_marks_[step_marks_.size() - steps];
  events_.erase(events_.begin(), events_.begin() + static_cast<std::ptrdiff_t>(first_kept));
  std::vector<size_t> marks;
  for (size_t i = step_marks_.size() - steps; i < step_marks_.size(); ++i) marks.push_back(step_marks_[i] - first_kept);
  step_marks_ = std::move(marks);
}

void write_chrome_trace(const std::string& path, const std::vector<const TraceRecorder*>& ranks,
                        const std::vector<int>& rank_ids) {
  nlohmann::json events = nlohmann::json::array();
  for (size_t i = 0; i < ranks.size(); ++i) {
    events.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", 0}, {"tid", rank_ids[i]},
                      {"args", {{"name", "rank " + std::to_string(rank_ids[i])}}}});
    for (const TraceEvent& e : ranks[i]->events())
      events.push_back({{"name", e.name}, {"cat", e.category}, {"ph", "X"}, {"pid", 0}, {"tid", rank_ids[i]},
                        {"ts", e.start_us}, {"dur", e.duration_us}});
  }
  std::ofstream out(path);
  if (!out) throw Error("cannot write trace file " + path);
  out << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
}

}  // namespace shardopt::runtime
