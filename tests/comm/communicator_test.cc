// The backend-independent part of Communicator: option checks (a backend that cannot honour an
// option refuses it by name), per-operation timeouts, and the checked wrapper's factory rules.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>

#include "base/error.h"
#include "comm/checked_communicator.h"
#include "comm/thread_backend.h"

namespace shardopt::comm {
namespace {

// A backend without tag matching (like NCCL) that records what reached it.
class NoTagsComm final : public Communicator {
 public:
  NoTagsComm() : Communicator(CommOptions{}) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string_view backend() const override { return "fake"; }
  Capabilities capabilities() const override { return {.tags = false}; }
  void abort(const std::string&) override {}
  int started = 0;

 protected:
  std::unique_ptr<Communicator> start_split(int, int) override { return ++started, nullptr; }
  WorkPtr start_all_reduce(const void*, void*, size_t, DType, ReduceOp) override { return ++started, nullptr; }
  WorkPtr start_reduce_scatter(const void*, void*, std::span<const size_t>, DType, ReduceOp) override {
    return ++started, nullptr;
  }
  WorkPtr start_all_gather(const void*, void*, std::span<const size_t>, DType) override { return ++started, nullptr; }
  WorkPtr start_reduce(const void*, void*, size_t, DType, ReduceOp, int) override { return ++started, nullptr; }
  WorkPtr start_broadcast(void*, size_t, DType, int) override { return ++started, nullptr; }
  WorkPtr start_all_to_all(const void*, std::span<const size_t>, void*, std::span<const size_t>, DType) override {
    return ++started, nullptr;
  }
  WorkPtr start_send(const void*, size_t, DType, int, int) override { return ++started, nullptr; }
  WorkPtr start_recv(void*, size_t, DType, int, int) override { return ++started, nullptr; }
  WorkPtr start_sendrecv(const void*, size_t, int, void*, size_t, int, DType, int) override {
    return ++started, nullptr;
  }
  WorkPtr start_barrier() override { return ++started, nullptr; }
};

TEST(CommunicatorOptions, BackendWithoutTagsRefusesANonZeroTagByName) {
  NoTagsComm comm;
  float x = 0;
  for (auto issue : {+[](Communicator& c, float* p) { c.send(p, 1, DType::kF32, 1, 5); },
                     +[](Communicator& c, float* p) { c.recv(p, 1, DType::kF32, 1, 5); },
                     +[](Communicator& c, float* p) { c.sendrecv(p, 1, 1, p, 1, 1, DType::kF32, 5); }}) {
    try {
      issue(comm, &x);
      ADD_FAILURE() << "expected ConfigError";
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("'tag'"), std::string::npos) << what;
      EXPECT_NE(what.find("fake backend"), std::string::npos) << what;
    }
  }
  EXPECT_EQ(comm.started, 0) << "a refused operation must not reach the backend";
  EXPECT_EQ(comm.counters().calls[static_cast<size_t>(OpKind::kSend)], 0u) << "nor be counted";
  comm.send(&x, 1, DType::kF32, 1, 0);
  EXPECT_EQ(comm.started, 1);
  EXPECT_EQ(comm.counters().calls[static_cast<size_t>(OpKind::kSend)], 1u);
  EXPECT_EQ(comm.counters().bytes_sent[static_cast<size_t>(OpKind::kSend)], 4u);
}

// CollectiveOptions::timeout replaces the communicator's default for wait() without an argument,
// on the plain threads backend and through the checked wrapper.
TEST(CommunicatorOptions, PerOperationTimeoutGovernsWait) {
  for (bool checked : {false, true}) {
    CommOptions o;
    o.checked = checked;
    o.timeout = std::chrono::seconds(30);
    run_ranks(2, [&](Communicator& c) {
      if (c.rank() == 1) return;  // never arrives
      float x = 1, y = 0;
      auto w = c.all_reduce(&x, &y, 1, DType::kF32, ReduceOp::kSum, {.timeout = std::chrono::milliseconds(150)});
      const auto t0 = std::chrono::steady_clock::now();
      EXPECT_THROW(w->wait(), TimeoutError) << "checked " << checked;
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_GE(ms, 140.0) << "checked " << checked;
      EXPECT_LT(ms, 5000.0) << "checked " << checked << ": the 30 s default was used";
    }, o);
  }
}

TEST(CheckedCommunicator, DeviceBackendWithoutSideChannelIsAConfigError) {
  // A communicator that claims device buffers cannot carry host fingerprints itself.
  class DeviceComm final : public Communicator {
   public:
    DeviceComm() : Communicator(CommOptions{}) {}
    int rank() const override { return 0; }
    int size() const override { return 1; }
    std::string_view backend() const override { return "device"; }
    bool device_buffers() const override { return true; }
    void abort(const std::string&) override {}

   protected:
    std::unique_ptr<Communicator> start_split(int, int) override { return nullptr; }
    WorkPtr start_all_reduce(const void*, void*, size_t, DType, ReduceOp) override { return nullptr; }
    WorkPtr start_reduce_scatter(const void*, void*, std::span<const size_t>, DType, ReduceOp) override {
      return nullptr;
    }
    WorkPtr start_all_gather(const void*, void*, std::span<const size_t>, DType) override { return nullptr; }
    WorkPtr start_reduce(const void*, void*, size_t, DType, ReduceOp, int) override { return nullptr; }
    WorkPtr start_broadcast(void*, size_t, DType, int) override { return nullptr; }
    WorkPtr start_all_to_all(const void*, std::span<const size_t>, void*, std::span<const size_t>, DType) override {
      return nullptr;
    }
    WorkPtr start_send(const void*, size_t, DType, int, int) override { return nullptr; }
    WorkPtr start_recv(void*, size_t, DType, int, int) override { return nullptr; }
    WorkPtr start_sendrecv(const void*, size_t, int, void*, size_t, int, DType, int) override { return nullptr; }
    WorkPtr start_barrier() override { return nullptr; }
  };
  EXPECT_THROW(make_checked_communicator(std::make_unique<DeviceComm>()), ConfigError);
}

// Ranks that agree on the buffers but not on the reduce op (MPI alone would reduce with mixed ops):
// every rank gets a DesyncError from rank 0's verdict, naming both sides.
TEST(CheckedCommunicator, ReduceOpMismatchIsDesyncNamingBothSides) {
  CommOptions o;
  o.checked = true;
  o.timeout = std::chrono::seconds(30);
  run_ranks(3, [](Communicator& c) {
    float x = 1, y = 0;
    auto w = c.all_reduce(&x, &y, 1, DType::kF32, c.rank() == 2 ? ReduceOp::kMax : ReduceOp::kSum);
    try {
      w->wait();
      ADD_FAILURE() << "expected DesyncError on rank " << c.rank();
    } catch (const DesyncError& e) {
      const std::string what = e.what();
      // Raised by the wrapper's verdict, before the operation reached the threads backend.
      EXPECT_EQ(what.rfind("checked communicator desync: ", 0), 0u) << what;
      EXPECT_NE(what.find("rank 0 issued all_reduce #0 (f32, count 1, op sum)"), std::string::npos) << what;
      EXPECT_NE(what.find("rank 2 issued all_reduce #0 (f32, count 1, op max)"), std::string::npos) << what;
    }
    EXPECT_TRUE(w->done());
    // The communicator is aborted: later operations fail fast instead of hanging.
    EXPECT_THROW(c.barrier()->wait(std::chrono::seconds(30)), PeerError);
  }, o);
}

}  // namespace
}  // namespace shardopt::comm
