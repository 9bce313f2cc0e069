#include "bench/common/bench_util.h"

#include <algorithm>
#include <cstdio>

#include <fmt/format.h>

namespace shardopt::bench {

double seconds_between(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double>(t1 - t0).count();
}

double best_seconds(int repeats, const std::function<void()>& fn) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, seconds_since(t0));
  }
  return best;
}

void add_json_flag(CLI::App& app, bool& json) { app.add_flag("--json", json, "one JSON object per result line"); }

CLI::Option* add_repeat_option(CLI::App& app, int& repeat, std::string_view alias) {
  std::string names = "--repeat";
  if (!alias.empty()) names += "," + std::string(alias);
  return app.add_option(names, repeat, "runs per figure; the best is reported")
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
}

std::string key_value_line(const Row& row) {
  std::string line;
  for (auto it = row.begin(); it != row.end(); ++it) {
    if (!line.empty()) line += "  ";
    line += it.key() + "=";
    if (it->is_number_float()) line += fmt::format("{:.4g}", it->get<double>());
    else if (it->is_string()) line += it->get<std::string>();
    else line += it->dump();
  }
  return line;
}

void Emitter::operator()(const Row& row, std::string_view text) const {
  if (!enabled_) return;
  const std::string line = json_ ? row.dump() : text.empty() ? key_value_line(row) : std::string(text);
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

void Emitter::text(std::string_view line) const {
  if (!enabled_ || json_) return;
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

}  // namespace shardopt::bench
