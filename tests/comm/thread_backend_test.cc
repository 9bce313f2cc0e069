// The threads backend: every collective, dtype and uneven split over world sizes 1..8 and element
// counts {0, 1, 7, 1000, 1<<20}, plus error behaviour, split, overlap and many-rank worlds.
#include <gtest/gtest.h>

#include <atomic>
#include <utility>
#include <thread>

#include "base/error.h"
#include "comm/checked_communicator.h"
#include "comm/forwarding_communicator.h"
#include "comm/thread_backend.h"
#include "tests/comm/collective_checks.h"

namespace shardopt::comm {
namespace {

using testing::skewed_counts;

CommOptions checked_options(int timeout_ms = 60000) {
  CommOptions o;
  o.checked = true;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  return o;
}

struct Case {
  int world;
  size_t count;
};

class ThreadCollectives : public ::testing::TestWithParam<Case> {};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return "n" + std::to_string(info.param.world) + "_count" + std::to_string(info.param.count);
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (int n : {1, 2, 3, 4, 5, 7, 8})
    for (size_t c : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{1} << 20}) cases.push_back({n, c});
  return cases;
}

#define RUN_ON_RANKS(check) \
  run_ranks(GetParam().world, [&](Communicator& c) { check(c, GetParam().count); }, checked_options())

TEST_P(ThreadCollectives, AllReduce) { RUN_ON_RANKS(testing::check_all_reduce); }
TEST_P(ThreadCollectives, AllReduceInPlace) { RUN_ON_RANKS(testing::check_all_reduce_in_place); }
TEST_P(ThreadCollectives, ReduceScatter) { RUN_ON_RANKS(testing::check_reduce_scatter); }
TEST_P(ThreadCollectives, AllGather) { RUN_ON_RANKS(testing::check_all_gather); }
TEST_P(ThreadCollectives, AllGatherInPlace) { RUN_ON_RANKS(testing::check_all_gather_in_place); }
TEST_P(ThreadCollectives, Reduce) { RUN_ON_RANKS(testing::check_reduce); }
TEST_P(ThreadCollectives, Broadcast) { RUN_ON_RANKS(testing::check_broadcast); }
TEST_P(ThreadCollectives, AllToAll) { RUN_ON_RANKS(testing::check_all_to_all); }
TEST_P(ThreadCollectives, SendRecv) { RUN_ON_RANKS(testing::check_send_recv); }
TEST_P(ThreadCollectives, SendRecvCombined) { RUN_ON_RANKS(testing::check_sendrecv); }
TEST_P(ThreadCollectives, Counters) { RUN_ON_RANKS(testing::check_counters); }

INSTANTIATE_TEST_SUITE_P(Worlds, ThreadCollectives, ::testing::ValuesIn(all_cases()), case_name);

class ThreadWorlds : public ::testing::TestWithParam<int> {};
INSTANTIATE_TEST_SUITE_P(Worlds, ThreadWorlds, ::testing::Values(1, 2, 3, 4, 5, 7, 8));

TEST_P(ThreadWorlds, Barrier) { run_ranks(GetParam(), testing::check_barrier, checked_options()); }
TEST_P(ThreadWorlds, Bf16AccumulatesInFp32) {
  run_ranks(GetParam(), testing::check_bf16_fp32_accumulation, checked_options());
}
TEST_P(ThreadWorlds, OverlapAndOrder) { run_ranks(GetParam(), testing::check_overlap, checked_options()); }
TEST_P(ThreadWorlds, ReduceScattersInFlight) {
  run_ranks(GetParam(), testing::check_reduce_scatters_in_flight, checked_options());
}
TEST_P(ThreadWorlds, Split) { run_ranks(GetParam(), testing::check_split, checked_options()); }

class ThreadErrors : public ::testing::TestWithParam<int> {};
INSTANTIATE_TEST_SUITE_P(Worlds, ThreadErrors, ::testing::Values(2, 3, 5, 8));

TEST_P(ThreadErrors, MismatchedCountIsDesync) {
  run_ranks(GetParam(), testing::check_desync_count, checked_options());
}
TEST_P(ThreadErrors, MismatchedKindIsDesync) { run_ranks(GetParam(), testing::check_desync_kind, checked_options()); }
TEST_P(ThreadErrors, TimeoutNamesMissingRanks) {
  run_ranks(GetParam(), [](Communicator& c) { testing::check_timeout_names_missing(c, 200, 600); },
            checked_options());
}
TEST_P(ThreadErrors, AbortPropagates) { run_ranks(GetParam(), testing::check_abort_propagates, checked_options()); }

TEST(ThreadBackend, ReduceScatterCountsMismatchIsDesync) {
  run_ranks(3, [](Communicator& c) {
    std::vector<size_t> counts = {2, 2, 2};
    if (c.rank() == 2) counts = {1, 3, 2};  // same total, different split
    std::vector<float> send(6, 1.0f), recv(3);
    auto w = c.reduce_scatter(send.data(), recv.data(), counts, DType::kF32, ReduceOp::kSum);
    EXPECT_THROW(w->wait(), DesyncError);
  }, checked_options());
}

// A side channel that delivers rank 0's verdict only after rank 0's abort has arrived, as MPI may
// (the root's eager broadcast completes at once; the abort that follows can overtake it). The rank
// must still report the desync, not a lost peer.
class VerdictAfterAbortSide final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;

 protected:
  WorkPtr forward(const ForwardedOp& op, IssueRef issue) override {
    if (op.kind != OpKind::kBroadcast) return issue();
    issue()->wait();                      // the verdict is here...
    WorkPtr aborted = inner().barrier();  // ...but what this rank sees is rank 0's abort that follows it
    while (!aborted->done()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return aborted;
  }
};

TEST(ThreadBackend, DesyncIsReportedWhenTheAbortOvertakesTheVerdict) {
  auto inner = make_thread_world(2), side = make_thread_world(2);
  std::vector<std::unique_ptr<Communicator>> comms;
  comms.push_back(make_checked_communicator(std::move(inner[0]), std::move(side[0])));
  comms.push_back(make_checked_communicator(std::move(inner[1]),
                                            std::make_unique<VerdictAfterAbortSide>(std::move(side[1]))));
  std::vector<std::thread> ranks;
  for (auto& comm : comms) ranks.emplace_back([&c = *comm] { testing::check_desync_count(c); });
  for (auto& t : ranks) t.join();
}

TEST(ThreadBackend, AllToAllPairMismatchIsDesync) {
  run_ranks(2, [](Communicator& c) {
    std::vector<size_t> send_counts = {1, 2}, recv_counts = {1, 2};
    if (c.rank() == 1) send_counts = {3, 1}, recv_counts = {2, 1};  // rank 1 sends 3 to rank 0, which expects 2
    std::vector<float> send(4), recv(4);
    auto w = c.all_to_all(send.data(), send_counts, recv.data(), recv_counts, DType::kF32);
    try {
      w->wait();
      ADD_FAILURE() << "expected DesyncError";
    } catch (const DesyncError& e) {
      EXPECT_NE(std::string(e.what()).find("rank 1 sends 3 elements to rank 0"), std::string::npos) << e.what();
    }
  }, checked_options());
}

TEST(ThreadBackend, P2PTimeoutNamesPeer) {
  run_ranks(2, [](Communicator& c) {
    if (c.rank() == 1) return;  // never posts the recv
    float x = 1;
    auto w = c.send(&x, 1, DType::kF32, 1, 4);
    try {
      w->wait(std::chrono::milliseconds(100));
      ADD_FAILURE() << "expected TimeoutError";
    } catch (const TimeoutError& e) {
      EXPECT_NE(std::string(e.what()).find("rank 1 never posted the matching recv"), std::string::npos) << e.what();
    }
  }, checked_options());
}

TEST(ThreadBackend, BadArgumentsAreConfigErrors) {
  auto comms = make_thread_world(2, checked_options());
  float x = 0;
  std::vector<size_t> wrong_counts = {1, 2, 3};
  EXPECT_THROW(comms[0]->reduce(&x, &x, 1, DType::kF32, ReduceOp::kSum, 2), ConfigError);
  EXPECT_THROW(comms[0]->all_gather(&x, &x, wrong_counts, DType::kF32), ConfigError);
  EXPECT_THROW(comms[0]->send(&x, 1, DType::kF32, -1, 0), ConfigError);
  EXPECT_THROW(comms[0]->all_reduce(nullptr, &x, 1, DType::kF32, ReduceOp::kSum), ConfigError);
  EXPECT_THROW(comms[0]->all_reduce(&x, &x, 1, DType::kUnspecified, ReduceOp::kSum), ConfigError);
  EXPECT_THROW(make_thread_world(0), ConfigError);
}

TEST(ThreadBackend, RunRanksRethrowsTheCauseNotItsEchoes) {
  try {
    run_ranks(4, [](Communicator& c) {
      if (c.rank() == 2) throw ConfigError("rank 2 broke");
      c.barrier()->wait(std::chrono::seconds(30));  // fails fast with PeerError once rank 2 aborts
    });
    ADD_FAILURE() << "expected the rank 2 failure";
  } catch (const ConfigError& e) {
    EXPECT_STREQ(e.what(), "rank 2 broke");
  }
}

TEST(ThreadBackend, ManyRanksManyOps) {
  // 64 ranks, a mix of collectives issued back to back and waited at the end.
  const int n = 64;
  run_ranks(n, [&](Communicator& c) {
    const int me = c.rank();
    std::vector<int64_t> vals(20), sums(20);
    std::vector<WorkPtr> works;
    for (int k = 0; k < 20; ++k) {
      vals[k] = me * 100 + k;
      works.push_back(c.all_reduce(&vals[k], &sums[k], 1, DType::kI64, ReduceOp::kSum));
    }
    std::vector<int32_t> mine(3, me), all(3 * n);
    std::vector<size_t> counts(n, 3);
    works.push_back(c.all_gather(mine.data(), all.data(), counts, DType::kI32));
    for (auto& w : works) w->wait();
    for (int k = 0; k < 20; ++k) EXPECT_EQ(sums[k], int64_t{100} * n * (n - 1) / 2 + int64_t{k} * n);
    for (int r = 0; r < n; ++r) EXPECT_EQ(all[3 * r + 2], r);
  }, checked_options());
}

TEST(ThreadBackend, ThousandRanks) {
  // The scale of a 1000-rank simulation: one thread per rank, no extra threads per communicator.
  const int n = 1000;
  run_ranks(n, [&](Communicator& c) {
    int64_t mine = c.rank(), sum = 0;
    for (int k = 0; k < 5; ++k) {
      c.all_reduce(&mine, &sum, 1, DType::kI64, ReduceOp::kSum)->wait();
      EXPECT_EQ(sum, int64_t{n} * (n - 1) / 2);
    }
    float piece = static_cast<float>(c.rank());
    std::vector<float> all(n);
    std::vector<size_t> counts(n, 1);
    c.all_gather(&piece, all.data(), counts, DType::kF32)->wait();
    EXPECT_EQ(all[n - 1], static_cast<float>(n - 1));
  }, checked_options());
}

TEST(ThreadBackend, ExecutorPoolSizeForHardwareThreads) {
  // Expected sizes by hand from the documented rule (min(hw, 8), at least 2; 0 = unknown).
  const std::pair<unsigned, int> cases[] = {{0, 2}, {1, 2}, {2, 2}, {3, 3}, {5, 5}, {8, 8}, {9, 8}, {192, 8}};
  for (auto [hw, want] : cases) EXPECT_EQ(detail::executor_threads_for(hw), want) << "hardware threads " << hw;
  // The process-wide pool is the one sized for this machine.
  EXPECT_EQ(thread_executor_threads(), detail::executor_threads_for(std::thread::hardware_concurrency()));
}

}  // namespace
}  // namespace shardopt::comm
