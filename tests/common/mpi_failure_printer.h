// gtest listener for suites launched under mpirun: ranks other than 0 drop gtest's own printer and
// print only their failures, tagged with the rank.
#pragma once

#include <cstdio>
#include <string>

#include <gtest/gtest.h>

namespace shardopt::test_fixture {

class MpiFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit MpiFailurePrinter(int rank) : rank_(rank) {}
  // The name is remembered here: OnTestPartResult runs under gtest's UnitTest mutex, so calling
  // UnitTest::current_test_info() there deadlocks (a failure on rank != 0 became a hang).
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] FAILED %s at %s:%d\n%s\n", rank_, test_.c_str(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }

 private:
  int rank_;
  std::string test_ = "?";
};

// On rank != 0: replaces gtest's printer with a MpiFailurePrinter.
inline void quiet_gtest_on_other_ranks(int rank) {
  if (rank == 0) return;
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  delete listeners.Release(listeners.default_result_printer());
  listeners.Append(new MpiFailurePrinter(rank));
}

}  // namespace shardopt::test_fixture
