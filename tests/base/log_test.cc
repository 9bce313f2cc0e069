#include "base/log.h"

#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "base/error.h"

namespace shardopt {
namespace {

// What one debug and one warning line leave on stderr at the given level.
std::string logged_at(log::Level level) {
  log::set_level(level);
  testing::internal::CaptureStderr();
  log::debug("debug detail {}", 7);
  log::warn("warning about {}", "x");
  return testing::internal::GetCapturedStderr();
}

TEST(Log, LevelFilterDropsMessagesBelowIt) {
  const std::string at_info = logged_at(log::Level::kInfo);
  EXPECT_EQ(at_info.find("debug detail 7"), std::string::npos) << at_info;
  EXPECT_NE(at_info.find("warning about x"), std::string::npos) << at_info;

  const std::string at_debug = logged_at(log::Level::kDebug);
  EXPECT_NE(at_debug.find("debug detail 7"), std::string::npos) << at_debug;
  EXPECT_NE(at_debug.find("warning about x"), std::string::npos) << at_debug;

  const std::string at_error = logged_at(log::Level::kError);
  EXPECT_EQ(at_error, "");
  log::set_level(log::Level::kInfo);
}

TEST(Log, LineCarriesTheRankAndTheLevel) {
  log::set_level(log::Level::kInfo);
  testing::internal::CaptureStderr();
  log::warn("no rank yet");
  {
    log::ScopedRank rank(5);
    log::error("from rank five");
  }
  const std::string out = testing::internal::GetCapturedStderr();
  EXPECT_NE(out.find("[rank -] [warning] no rank yet"), std::string::npos) << out;
  EXPECT_NE(out.find("[rank 5] [error] from rank five"), std::string::npos) << out;
}

TEST(Log, LevelComesFromTheEnvironmentAndBadValuesNameTheValidOnes) {
  ::setenv("SHARDOPT_LOG_LEVEL", "debug", 1);
  log::init_from_env();
  EXPECT_EQ(log::level(), log::Level::kDebug);
  ::setenv("SHARDOPT_LOG_LEVEL", "warn", 1);
  log::init_from_env();
  EXPECT_EQ(log::level(), log::Level::kWarn);

  ::setenv("SHARDOPT_LOG_LEVEL", "verbose", 1);
  try {
    log::init_from_env();
    FAIL() << "SHARDOPT_LOG_LEVEL=verbose was accepted";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("'verbose'"), std::string::npos) << what;
    for (const char* valid : {"debug", "info", "warn", "error"}) EXPECT_NE(what.find(valid), std::string::npos) << what;
  }
  EXPECT_EQ(log::level(), log::Level::kWarn);  // a rejected value leaves the level alone
  ::unsetenv("SHARDOPT_LOG_LEVEL");
  log::set_level(log::Level::kInfo);
}

}  // namespace
}  // namespace shardopt
