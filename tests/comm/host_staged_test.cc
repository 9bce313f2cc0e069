// HostStagedCommunicator's staging logic (buffer sizes per operation and rank, in-place forms,
// outputs written back once the Work finishes), checked on machines without a GPU: the copies
// between the caller's buffers and the host staging are plain memcpy here (cudaMemcpy in use), and
// every backend-independent collective check of tests/comm/collective_checks.h runs through it over
// the threads backend. The device copies themselves run in tests/gpu/engine_cuda_test.cc.
#include <gtest/gtest.h>

#include <cstring>

#include "base/error.h"
#include "comm/host_staged_communicator.h"
#include "comm/thread_backend.h"
#include "tests/comm/collective_checks.h"

namespace shardopt::comm {
namespace {

StagingCopies memcpy_copies() {
  return {[](void* host, const void* device, size_t bytes) { std::memcpy(host, device, bytes); },
          [](void* device, const void* host, size_t bytes) { std::memcpy(device, host, bytes); },
          [](void* to, const void* from, size_t bytes) { std::memmove(to, from, bytes); }};
}

void staged(int world, void (*check)(Communicator&, size_t), size_t count) {
  CommOptions options;
  options.checked = true;
  run_ranks(world, [&](Communicator& host) {
    HostStagedCommunicator comm(host, memcpy_copies());
    EXPECT_TRUE(comm.device_buffers());
    check(comm, count);
  }, options);
}

class HostStaged : public ::testing::TestWithParam<int> {};

// 37 elements: uneven segments (low ranks empty at 4 ranks) in reduce_scatter / all_gather / all_to_all.
TEST_P(HostStaged, AllReduce) { staged(GetParam(), testing::check_all_reduce, 37); }
TEST_P(HostStaged, AllReduceInPlace) { staged(GetParam(), testing::check_all_reduce_in_place, 37); }
TEST_P(HostStaged, ReduceScatter) { staged(GetParam(), testing::check_reduce_scatter, 37); }
TEST_P(HostStaged, AllGather) { staged(GetParam(), testing::check_all_gather, 37); }
TEST_P(HostStaged, AllGatherInPlace) { staged(GetParam(), testing::check_all_gather_in_place, 37); }
TEST_P(HostStaged, Reduce) { staged(GetParam(), testing::check_reduce, 37); }
TEST_P(HostStaged, Broadcast) { staged(GetParam(), testing::check_broadcast, 37); }
TEST_P(HostStaged, AllToAll) { staged(GetParam(), testing::check_all_to_all, 37); }
TEST_P(HostStaged, SendRecv) { staged(GetParam(), testing::check_send_recv, 37); }
TEST_P(HostStaged, SendRecvCombined) { staged(GetParam(), testing::check_sendrecv, 37); }
TEST_P(HostStaged, OverlapAndOrder) {
  staged(GetParam(), [](Communicator& c, size_t) { testing::check_overlap(c); }, 0);
}
TEST_P(HostStaged, Split) {
  staged(GetParam(), [](Communicator& c, size_t) { testing::check_split(c); }, 0);
}
INSTANTIATE_TEST_SUITE_P(Worlds, HostStaged, ::testing::Values(1, 2, 3, 4));

TEST(HostStagedErrors, RefusesToWrapACommunicatorOnDeviceMemory) {
  run_ranks(1, [&](Communicator& host) {
    HostStagedCommunicator device(host, memcpy_copies());
    EXPECT_THROW(HostStagedCommunicator twice(device, memcpy_copies()), ConfigError);
  });
}

}  // namespace
}  // namespace shardopt::comm
