// The flight recorder wrapper: it keeps the last N operations of its rank in issue order with their
// completion, and a timed-out wait rethrows the same error type with that record appended, so the
// report names where this rank stopped (here: an all_reduce that the other rank never issued).
#include "comm/flight_recorder.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/thread_backend.h"

#include <unistd.h>

namespace shardopt::comm {
namespace {

TEST(FlightRecorder, TimeoutReportNamesWhereThisRankStopped) {
  run_ranks(2, [](Communicator& world) {
    FlightRecorder rec(world, 4);
    std::vector<float> buf(8, 1.0f), other(8);
    for (int k = 0; k < 3; ++k) rec.all_reduce(buf.data(), buf.data(), buf.size(), DType::kF32, ReduceOp::kSum)->wait();
    rec.sendrecv(buf.data(), 8, 1 - world.rank(), other.data(), 8, 1 - world.rank(), DType::kF32, 7)->wait();
    if (world.rank() == 1) return;  // rank 1 stops here: rank 0's next all_reduce never matches
    auto work = rec.all_reduce(buf.data(), buf.data(), 3, DType::kF32, ReduceOp::kSum);
    try {
      work->wait(std::chrono::milliseconds(200));
      ADD_FAILURE() << "expected a timeout";
    } catch (const TimeoutError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("flight recorder world (rank 0 of 2, last 4 ops"), std::string::npos) << what;
      EXPECT_NE(what.find("seq 4  all_reduce     count 3  12 B  t "), std::string::npos) << what;
      EXPECT_NE(what.find("seq 3  sendrecv       count 8  32 B  peer/root 1  tag 7  t "), std::string::npos) << what;
      EXPECT_NE(what.find("(failed)"), std::string::npos) << what;
      EXPECT_EQ(what.find("seq 0 "), std::string::npos) << "capacity 4 keeps seqs 1..4 only: " << what;
    }
    const auto records = rec.records();
    ASSERT_EQ(records.size(), 4u);
    for (size_t i = 0; i < records.size(); ++i) EXPECT_EQ(records[i].seq, i + 1);
    EXPECT_EQ(records[2].kind, OpKind::kSendRecv);
    for (size_t i = 0; i + 1 < records.size(); ++i) {
      EXPECT_GE(records[i].end_ms, records[i].start_ms) << "completed ops carry their end time";
      EXPECT_FALSE(records[i].failed);
    }
    EXPECT_LT(records[3].end_ms, 0.0);
    EXPECT_TRUE(records[3].failed);
  });
}

// The report of a tree (world and its splits): each communicator's own record, headed by where it
// stopped. Rank 1 of a 4-rank world stops after the splits; rank 0's split child (a pair {0, 1})
// times out on a recv from rank 1, while the world's last collective completed on every rank.
TEST(FlightRecorder, ReportNamesEveryCommunicatorAndWhereItStopped) {
  const auto dir = std::filesystem::temp_directory_path() / ("flight_report_" + std::to_string(::getpid()));
  run_ranks(4, [&](Communicator& world) {
    FlightRecorder rec(world, 64);
    auto pair = rec.split(world.rank() / 2, world.rank());  // {0, 1} and {2, 3}
    auto* pair_rec = dynamic_cast<FlightRecorder*>(pair.get());
    ASSERT_NE(pair_rec, nullptr) << "a recorder's split children are recorders";
    EXPECT_EQ(pair_rec->name(), "world/split 0");
    pair_rec->rename("pair " + std::to_string(world.rank() / 2));
    std::vector<float> buf(5, 1.0f);
    rec.all_reduce(buf.data(), buf.data(), 5, DType::kF32, ReduceOp::kSum)->wait();
    EXPECT_FLOAT_EQ(buf[0], 4.0f);
    if (world.rank() != 0) return;
    auto work = pair->recv(buf.data(), 5, DType::kF32, 1, 3);
    try {
      work->wait(std::chrono::milliseconds(100));
      ADD_FAILURE() << "expected a timeout";
    } catch (const TimeoutError& e) {
      rec.write_report((dir / "rank0.txt").string(), std::string("run ended: ") + e.what());
    }
  });
  std::ifstream in(dir / "rank0.txt");
  ASSERT_TRUE(in.good()) << "no report written at " << (dir / "rank0.txt");
  std::stringstream text;
  text << in.rdbuf();
  const std::string report = text.str();
  std::filesystem::remove_all(dir);
  EXPECT_EQ(report.rfind("run ended: ", 0), 0u) << report;
  EXPECT_NE(report.find("world (rank 0 of 4): all ops completed (last seq 0)"), std::string::npos) << report;
  EXPECT_NE(report.find("pair 0 (rank 0 of 2): stopped at seq 0  recv           count 5  20 B  peer/root 1  tag 3"),
            std::string::npos)
      << report;
  EXPECT_NE(report.find("(failed)"), std::string::npos) << report;
  EXPECT_NE(report.find("flight recorder world (rank 0 of 4, last 1 ops"), std::string::npos) << report;
  EXPECT_NE(report.find("flight recorder pair 0 (rank 0 of 2, last 1 ops"), std::string::npos) << report;
}

}  // namespace
}  // namespace shardopt::comm
