// What every benchmark in bench/ shares: the --json and --repeat options, best-of-N timing, and the
// printing of one result per line (a JSON object with --json, readable text otherwise).
// Benchmarks report figures; they never pass or fail on time.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "base/clock.h"

namespace shardopt::bench {

// Benchmarks read the project's one clock (base/clock.h), like everything they measure.
struct Clock {
  using time_point = clock::TimePoint;
  static time_point now() { return clock::now(); }
};
// Rows keep their fields in the order written (readable text mode; JSON readers do not care).
using Row = nlohmann::ordered_json;

using clock::seconds_since;
double seconds_between(Clock::time_point t0, Clock::time_point t1);

// The smallest wall time of `repeats` calls of fn: on a shared machine, the least disturbed run.
double best_seconds(int repeats, const std::function<void()>& fn);

// --json: one JSON object per result line.
void add_json_flag(CLI::App& app, bool& json);
// --repeat N (N >= 1; the best run is reported). `alias` keeps a benchmark's older spelling
// (--repeats, --reps) working as the same option; empty for none.
CLI::Option* add_repeat_option(CLI::App& app, int& repeat, std::string_view alias = "");

// "key=value  key=value ..." with floats to 4 significant digits.
std::string key_value_line(const Row& row);

// Prints results to stdout, flushing each line (a killed run keeps what it measured).
class Emitter {
 public:
  // enabled = false prints nothing (MPI ranks other than 0).
  explicit Emitter(bool json, bool enabled = true) : json_(json), enabled_(enabled) {}
  bool json() const { return json_; }
  bool enabled() const { return enabled_; }
  // With --json the row as one line; otherwise `text`, or key_value_line(row) when text is empty.
  void operator()(const Row& row, std::string_view text = {}) const;
  // A line of text only in text mode (table headers, notes).
  void text(std::string_view line) const;

 private:
  bool json_;
  bool enabled_;
};

}  // namespace shardopt::bench
