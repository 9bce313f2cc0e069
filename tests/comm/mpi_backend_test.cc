// The MPI backend under mpirun (np 2, 3, 4): every collective, dtype and uneven split over element
// counts {0, 1, 7, 1000, 1<<20}, counters, split, overlap, and error behaviour across processes.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "comm/backend_util.h"
#include "comm/mpi_backend.h"
#include "tests/comm/collective_checks.h"

namespace shardopt::comm {
namespace {

CommOptions checked_options(int timeout_ms = 60000) {
  CommOptions o;
  o.checked = true;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  return o;
}

// One communicator for the value tests; error tests make their own (they leave it aborted).
Communicator& shared_comm() {
  static std::unique_ptr<Communicator> comm = make_mpi_communicator(MPI_COMM_WORLD, checked_options());
  return *comm;
}

class MpiCollectives : public ::testing::TestWithParam<size_t> {};
INSTANTIATE_TEST_SUITE_P(Counts, MpiCollectives,
                         ::testing::Values(size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{1} << 20),
                         [](const auto& info) { return "count" + std::to_string(info.param); });

TEST_P(MpiCollectives, AllReduce) { testing::check_all_reduce(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, AllReduceInPlace) { testing::check_all_reduce_in_place(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, ReduceScatter) { testing::check_reduce_scatter(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, AllGather) { testing::check_all_gather(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, AllGatherInPlace) { testing::check_all_gather_in_place(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, Reduce) { testing::check_reduce(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, Broadcast) { testing::check_broadcast(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, AllToAll) { testing::check_all_to_all(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, SendRecv) { testing::check_send_recv(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, SendRecvCombined) { testing::check_sendrecv(shared_comm(), GetParam()); }
TEST_P(MpiCollectives, Counters) { testing::check_counters(shared_comm(), GetParam()); }

TEST(MpiBackend, Barrier) { testing::check_barrier(shared_comm()); }
TEST(MpiBackend, Bf16AccumulatesInFp32) { testing::check_bf16_fp32_accumulation(shared_comm()); }
TEST(MpiBackend, OverlapAndOrder) { testing::check_overlap(shared_comm()); }
TEST(MpiBackend, ReduceScattersInFlight) { testing::check_reduce_scatters_in_flight(shared_comm()); }
TEST(MpiBackend, Split) { testing::check_split(shared_comm()); }
TEST(MpiBackend, UncheckedModeWorks) {
  CommOptions o;
  o.checked = false;
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, o);
  testing::check_all_reduce(*comm, 1000);
  testing::check_all_gather(*comm, 1000);
}

TEST(MpiErrors, MismatchedCountIsDesync) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, checked_options());
  testing::check_desync_count(*comm);
}
TEST(MpiErrors, MismatchedKindIsDesync) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, checked_options());
  testing::check_desync_kind(*comm);
}
TEST(MpiErrors, TimeoutNamesMissingRanks) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, checked_options());
  testing::check_timeout_names_missing(*comm, 300, 1500);
  MPI_Barrier(MPI_COMM_WORLD);
}
// Unchecked mode knows no fingerprints, but the backend's own collectives know their peers. The
// protocol of these tests: the last rank never joins the collective `issue` starts; rank n-2 times
// out and its message holds `op` and `names_peer`; the others fail fast on its abort.
void expect_unchecked_timeout_naming(const std::function<WorkPtr(Communicator&)>& issue, const std::string& op,
                                     const std::string& names_peer) {
  CommOptions o;
  o.checked = false;
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, o);
  const int n = comm->size(), me = comm->rank();
  if (me == n - 1) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  } else {
    auto work = issue(*comm);
    if (me == n - 2) {
      try {
        work->wait(std::chrono::milliseconds(300));
        ADD_FAILURE() << "rank " << me << ": the " << op << " did not time out";
      } catch (const TimeoutError& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find(op), std::string::npos) << what;
        EXPECT_NE(what.find(names_peer), std::string::npos) << what;
      }
    } else {
      EXPECT_THROW(work->wait(std::chrono::seconds(30)), Error) << "rank " << me;
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Rank n-2's halving schedule pairs it with rank n-1 after steps with present ranks (n = 2, 3, 4):
// the timeout names rank n-1 as the peer of its step in flight.
TEST(MpiErrors, UncheckedReduceScatterTimeoutNamesThePeer) {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  const std::vector<size_t> counts(n, 1000);
  std::vector<float> send(1000 * static_cast<size_t>(n), 1.0f), recv(1000);
  expect_unchecked_timeout_naming(
      [&](Communicator& c) { return c.reduce_scatter(send.data(), recv.data(), counts, DType::kF32, ReduceOp::kSum); },
      "reduce_scatter", "waits on rank " + std::to_string(n - 1) + " ");
}

// The all-to-all runs as point-to-point messages with the peers that exchange data: the timeout
// names the ranks whose messages are still missing.
TEST(MpiErrors, UncheckedAllToAllTimeoutNamesTheMissingPeer) {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  const std::vector<size_t> counts(n, 5);
  std::vector<float> send(5 * static_cast<size_t>(n), 1.0f), recv(5 * static_cast<size_t>(n));
  expect_unchecked_timeout_naming(
      [&](Communicator& c) { return c.all_to_all(send.data(), counts, recv.data(), counts, DType::kF32); },
      "all_to_all", "waits on ranks " + detail::format_ranks({n - 1}));
}

// Rank 0 sends rank 1 fewer elements than rank 1 expects: rank 1's all-to-all fails with a desync
// naming rank 0 and both counts (MPI's alltoallv would have filled part of the buffer silently).
TEST(MpiErrors, AllToAllCountMismatchIsADesyncNamingTheSender) {
  CommOptions o;
  o.checked = false;
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, o);
  const int n = comm->size(), me = comm->rank();
  std::vector<size_t> send_counts(n, 2), recv_counts(n, 2);
  if (me == 0) send_counts[1] = 3;
  if (me == 1) recv_counts[0] = 5;
  std::vector<float> send(2 * static_cast<size_t>(n) + 1, 1.0f), recv(2 * static_cast<size_t>(n) + 3);
  auto work = comm->all_to_all(send.data(), send_counts, recv.data(), recv_counts, DType::kF32);
  if (me == 1) {
    try {
      work->wait(std::chrono::seconds(30));
      ADD_FAILURE() << "rank 1: the mismatched all-to-all completed";
    } catch (const DesyncError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("expected 5 elements from rank 0 but it sent 3"), std::string::npos) << what;
    }
  } else {
    work->wait(std::chrono::seconds(30));
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(MpiErrors, AbortPropagates) {
  auto comm = make_mpi_communicator(MPI_COMM_WORLD, checked_options());
  testing::check_abort_propagates(*comm);
  MPI_Barrier(MPI_COMM_WORLD);
}
TEST(MpiErrors, RuntimeProvidesSerializedThreads) {
  int provided = 0;
  MPI_Query_thread(&provided);
  EXPECT_GE(provided, MPI_THREAD_SERIALIZED);
}

}  // namespace
}  // namespace shardopt::comm
