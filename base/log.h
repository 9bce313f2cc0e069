// Diagnostics (warnings, errors, debug detail) go through this logger, to stderr, never stdout:
// stdout is the CLI's and the benchmarks' normal output (progress lines, tables, JSON).
//
//   shardopt::log::warn("gnuplot failed; no loss.png (script: {})", path);
//
// Each line carries the time, the rank that logged it and the level:
//   [12:03:04.512] [rank 3] [warning] gnuplot failed; ...
// The level comes from SHARDOPT_LOG_LEVEL (base/env.cc): debug, info, warn or error; messages below
// it are dropped before they are formatted. Backed by spdlog.
#pragma once

#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace shardopt::log {

enum class Level { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// "debug" | "info" | "warn" | "error"; anything else is a ConfigError naming the valid levels.
Level parse_level(std::string_view name);
const char* level_name(Level level);

// Reads SHARDOPT_LOG_LEVEL and applies it (ConfigError when invalid). Programs call this at start-up
// so a bad value is reported at once; without it the first message applies the variable, falling
// back to info (with an error line) when it is invalid.
void init_from_env();
void set_level(Level level);
Level level();
inline bool enabled(Level l) { return static_cast<int>(l) >= static_cast<int>(level()); }

// The rank shown in the line: set_process_rank for one rank per process (MPI), ScopedRank for the
// calling thread (the threads backend runs one rank per thread; it wins over the process rank).
// Without either the line shows "rank -".
void set_process_rank(int rank);
class ScopedRank {
 public:
  explicit ScopedRank(int rank);
  ~ScopedRank();
  ScopedRank(const ScopedRank&) = delete;
  ScopedRank& operator=(const ScopedRank&) = delete;

 private:
  int previous_;
};

// Writes one already formatted line at `level` (no filtering: use the functions below).
void write(Level level, std::string_view message);

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kDebug)) write(Level::kDebug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kInfo)) write(Level::kInfo, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kWarn)) write(Level::kWarn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::kError)) write(Level::kError, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace shardopt::log
