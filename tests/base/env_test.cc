#include "base/env.h"

#include <cstdlib>

#include <gtest/gtest.h>

#include "base/error.h"

namespace shardopt {
namespace {

TEST(Env, ReadsRegisteredVariablesAndRejectsOthers) {
  ::unsetenv("SHARDOPT_COMM_TIMEOUT_MS");
  EXPECT_EQ(env::get_int("SHARDOPT_COMM_TIMEOUT_MS"), 300000);
  ::setenv("SHARDOPT_COMM_TIMEOUT_MS", "1234", 1);
  EXPECT_EQ(env::get_int("SHARDOPT_COMM_TIMEOUT_MS"), 1234);
  ::setenv("SHARDOPT_COMM_TIMEOUT_MS", "12x", 1);
  EXPECT_THROW(env::get_int("SHARDOPT_COMM_TIMEOUT_MS"), ConfigError);
  ::unsetenv("SHARDOPT_COMM_TIMEOUT_MS");
  EXPECT_THROW(env::get_string("SHARDOPT_NOT_A_VARIABLE"), ConfigError);
  ::setenv("SHARDOPT_COMM_CHECKED", "maybe", 1);
  EXPECT_THROW(env::get_bool("SHARDOPT_COMM_CHECKED"), ConfigError);
  ::setenv("SHARDOPT_COMM_CHECKED", "1", 1);
  EXPECT_TRUE(env::get_bool("SHARDOPT_COMM_CHECKED"));
  ::unsetenv("SHARDOPT_COMM_CHECKED");
}

}  // namespace
}  // namespace shardopt
