// The Engine's memory space is chosen at construction (EngineOptions::memory_space): what a host-only
// machine can check. Asking for CUDA without its backend or without a device is a typed error at
// construction; a host engine refuses a communicator on device memory; the host arrays the buffers
// are made of keep std::vector's resize semantics. The device engine itself: tests/gpu/engine_cuda_test.cc.
#include <gtest/gtest.h>

#include <string>

#include "base/error.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"
#include "runtime/step_backend.h"
#include "tests/common/engine_reference.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

// Whether this test program can make a CUDA backend on this machine (it links shardopt_runtime_cuda
// when the build found the CUDA toolkit).
bool cuda_device_usable() {
  try {
    (void)make_step_backend(MemorySpace::kCuda);
    return true;
  } catch (const Error&) {
    return false;
  }
}

TEST(MemorySpace, NamesParseAndUnknownNamesAreConfigErrors) {
  EXPECT_EQ(parse_memory_space("host"), MemorySpace::kHost);
  EXPECT_EQ(parse_memory_space("cpu"), MemorySpace::kHost);
  EXPECT_EQ(parse_memory_space("cuda"), MemorySpace::kCuda);
  EXPECT_EQ(memory_space_name(MemorySpace::kCuda), "cuda");
  try {
    (void)parse_memory_space("tpu");
    FAIL() << "'tpu' was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("'tpu'"), std::string::npos) << e.what();
  }
}

TEST(MemorySpace, CudaWithoutItsBackendOrADeviceFailsAtConstructionWithATypedError) {
  if (cuda_device_usable()) GTEST_SKIP() << "a CUDA device is present: gpu_engine_test covers the device engine";
  EngineOptions o = engine_options(2, proto::SHARD_LAYOUT_OWNED, "adamw");
  o.memory_space = MemorySpace::kCuda;
  comm::run_ranks(1, [&](comm::Communicator& comm) {
    try {
      Engine engine(comm, mixed_model(), o);
      ADD_FAILURE() << "an Engine on memory space cuda was built without a device";
#ifdef SHARDOPT_TEST_CUDA_BACKEND
    } catch (const DeviceError& e) {  // the backend is linked: the device is what is missing
      EXPECT_NE(std::string(e.what()).find("memory space cuda: no CUDA device"), std::string::npos) << e.what();
#else
    } catch (const ConfigError& e) {  // built without the toolkit: the backend is what is missing
      EXPECT_NE(std::string(e.what()).find("no CUDA step backend"), std::string::npos) << e.what();
#endif
    }
  });
}

// A communicator that claims device buffers and must never be used: the engine checks the pairing
// before its first collective.
class DeviceMemoryStub final : public comm::Communicator {
 public:
  DeviceMemoryStub() : Communicator(comm::CommOptions{}) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string_view backend() const override { return "stub"; }
  bool device_buffers() const override { return true; }
  void abort(const std::string&) override {}

 protected:
  [[noreturn]] static comm::WorkPtr used() { throw std::logic_error("the stub communicator was used"); }
  std::unique_ptr<Communicator> start_split(int, int) override { used(); }
  comm::WorkPtr start_all_reduce(const void*, void*, size_t, DType, comm::ReduceOp) override { used(); }
  comm::WorkPtr start_reduce_scatter(const void*, void*, std::span<const size_t>, DType, comm::ReduceOp) override {
    used();
  }
  comm::WorkPtr start_all_gather(const void*, void*, std::span<const size_t>, DType) override { used(); }
  comm::WorkPtr start_reduce(const void*, void*, size_t, DType, comm::ReduceOp, int) override { used(); }
  comm::WorkPtr start_broadcast(void*, size_t, DType, int) override { used(); }
  comm::WorkPtr start_all_to_all(const void*, std::span<const size_t>, void*, std::span<const size_t>, DType) override {
    used();
  }
  comm::WorkPtr start_send(const void*, size_t, DType, int, int) override { used(); }
  comm::WorkPtr start_recv(void*, size_t, DType, int, int) override { used(); }
  comm::WorkPtr start_sendrecv(const void*, size_t, int, void*, size_t, int, DType, int) override { used(); }
  comm::WorkPtr start_barrier() override { used(); }
};

TEST(MemorySpace, HostEngineRefusesACommunicatorOnDeviceMemory) {
  DeviceMemoryStub comm;
  try {
    Engine engine(comm, mixed_model(), engine_options(2, proto::SHARD_LAYOUT_OWNED, "adamw"));
    FAIL() << "a host engine accepted a communicator on device memory";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("memory space host needs a communicator on host buffers"), std::string::npos) << what;
    EXPECT_NE(what.find("'stub' communicator moves device memory"), std::string::npos) << what;
  }
}

TEST(MemorySpace, HostArraysStartZeroedAndRegrowZeroFilledLikeAVector) {
  SpaceArray a(host_memory(), 8);
  ASSERT_EQ(a.size(), 8u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a.data()[i], 0.0f);
  for (size_t i = 0; i < a.size(); ++i) a.data()[i] = float(i + 1);
  a.resize_within_capacity(3);  // a stage-3 parameter buffer reused for a smaller bucket
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(a.capacity(), 8u);
  a.resize_within_capacity(6);  // and for a larger one: kept prefix, zero-filled growth
  const float want[6] = {1, 2, 3, 0, 0, 0};
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(a.data()[i], want[i]) << i;
  SpaceArray b = std::move(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(b.size(), 6u);
  EXPECT_EQ(b.data()[1], 2.0f);
}

}  // namespace
}  // namespace shardopt::runtime
