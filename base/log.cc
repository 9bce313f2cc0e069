#include "base/log.h"

#include <atomic>
#include <memory>
#include <mutex>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "base/env.h"
#include "base/error.h"

namespace shardopt::log {
namespace {

constexpr int kNoRank = -1;
std::atomic<int> g_process_rank{kNoRank};
thread_local int t_thread_rank = kNoRank;

int current_rank() { return t_thread_rank != kNoRank ? t_thread_rank : g_process_rank.load(std::memory_order_relaxed); }

// %R in the pattern: the rank of the thread that logs (the sink is synchronous, so this runs there).
class RankFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&, spdlog::memory_buf_t& dest) override {
    const int rank = current_rank();
    if (rank == kNoRank) {
      dest.push_back('-');
    } else {
      fmt::format_to(std::back_inserter(dest), "{}", rank);
    }
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<RankFlag>(); }
};

spdlog::level::level_enum to_spdlog(Level l) {
  switch (l) {
    case Level::kDebug: return spdlog::level::debug;
    case Level::kInfo: return spdlog::level::info;
    case Level::kWarn: return spdlog::level::warn;
    case Level::kError: return spdlog::level::err;
  }
  return spdlog::level::info;
}

// Level as an atomic int so enabled() costs one relaxed load; -1 until the environment is read.
std::atomic<int> g_level{-1};

spdlog::logger& logger() {
  static const std::shared_ptr<spdlog::logger> instance = [] {
    auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<RankFlag>('R').set_pattern("[%H:%M:%S.%e] [rank %R] [%l] %v");
    sink->set_formatter(std::move(formatter));
    auto l = std::make_shared<spdlog::logger>("shardopt", std::move(sink));
    l->set_level(spdlog::level::trace);  // filtering happens in enabled(), before formatting
    l->flush_on(spdlog::level::trace);
    return l;
  }();
  return *instance;
}

}  // namespace

Level parse_level(std::string_view name) {
  for (Level l : {Level::kDebug, Level::kInfo, Level::kWarn, Level::kError})
    if (name == level_name(l)) return l;
  throw ConfigError("SHARDOPT_LOG_LEVEL='" + std::string(name) + "' is not a log level (use debug, info, warn or error)");
}

const char* level_name(Level l) {
  switch (l) {
    case Level::kDebug: return "debug";
    case Level::kInfo: return "info";
    case Level::kWarn: return "warn";
    case Level::kError: return "error";
  }
  return "info";
}

void init_from_env() { set_level(parse_level(env::get_string("SHARDOPT_LOG_LEVEL"))); }

void set_level(Level l) { g_level.store(static_cast<int>(l), std::memory_order_relaxed); }

Level level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l >= 0) return static_cast<Level>(l);
  // First use without init_from_env(): apply the variable; a bad value is reported, not thrown, here
  // (a log call must not throw), and info is used.
  static std::once_flag once;
  std::call_once(once, [] {
    try {
      init_from_env();
    } catch (const ConfigError& e) {
      set_level(Level::kInfo);
      write(Level::kError, e.what());
    }
  });
  return static_cast<Level>(g_level.load(std::memory_order_relaxed));
}

void set_process_rank(int rank) { g_process_rank.store(rank, std::memory_order_relaxed); }

ScopedRank::ScopedRank(int rank) : previous_(t_thread_rank) { t_thread_rank = rank; }
ScopedRank::~ScopedRank() { t_thread_rank = previous_; }

void write(Level l, std::string_view message) { logger().log(to_spdlog(l), "{}", message); }

}  // namespace shardopt::log
