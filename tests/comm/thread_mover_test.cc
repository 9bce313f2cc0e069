// The threads backend's data movement through a ThreadBufferMover, checked without a GPU. The
// stand-in mover behaves like a device stream: its reductions and copies are only queued, and run
// when the chunk calls finish() on the same thread, and its chunks are small (many per operation).
// So a path of the backend that touched a buffer directly, skipped finish(), or let a queued
// operation see a reused pointer array would give wrong values in the backend-independent checks of
// tests/comm/collective_checks.h. The CUDA mover itself runs in tests/gpu/cuda_thread_world_test.cc.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <memory>
#include <vector>

#include "comm/reduce_kernel.h"
#include "comm/thread_backend.h"
#include "tests/comm/collective_checks.h"

namespace shardopt::comm {
namespace {

class QueuedMover final : public ThreadBufferMover {
 public:
  bool device() const override { return true; }
  size_t chunk_bytes() const override { return 96; }  // 24 f32 / 48 bf16 elements: many chunks
  void reduce(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
              size_t len) override {
    // The pointer arrays are copied, as a kernel launch copies its arguments.
    queue().push_back([dtype, op, in = std::vector<const void*>(inputs.begin(), inputs.end()),
                       out = std::vector<void*>(outputs.begin(), outputs.end()), len] {
      detail::reduce_elements(dtype, op, in, out, len);
    });
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    queue().push_back([=] { detail::copy_bytes(dst, src, bytes); });
  }
  void finish() override {
    auto& q = queue();
    if (!q.empty()) ++chunks_with_work;
    for (auto& f : q) f();
    q.clear();
  }
  std::atomic<int> chunks_with_work{0};

 private:
  static std::vector<std::function<void()>>& queue() {
    thread_local std::vector<std::function<void()>> q;
    return q;
  }
};

CommOptions checked_options() {
  CommOptions o;
  o.checked = true;
  o.timeout = std::chrono::milliseconds(60000);
  return o;
}

struct Case {
  int world;
  size_t count;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return "n" + std::to_string(info.param.world) + "_count" + std::to_string(info.param.count);
}

class MoverCollectives : public ::testing::TestWithParam<Case> {
 protected:
  void run(void (*check)(Communicator&, size_t)) {
    auto mover = std::make_shared<QueuedMover>();
    run_ranks(
        GetParam().world,
        [&](Communicator& c) {
          EXPECT_TRUE(c.device_buffers());
          check(c, GetParam().count);
        },
        checked_options(), mover);
    if (GetParam().count > 0 && GetParam().world > 1) {  // one rank's in-place forms move nothing
      EXPECT_GT(mover->chunks_with_work.load(), 0);
    }
  }
};

TEST_P(MoverCollectives, AllReduce) { run(testing::check_all_reduce); }
TEST_P(MoverCollectives, AllReduceInPlace) { run(testing::check_all_reduce_in_place); }
TEST_P(MoverCollectives, ReduceScatter) { run(testing::check_reduce_scatter); }
TEST_P(MoverCollectives, AllGather) { run(testing::check_all_gather); }
TEST_P(MoverCollectives, AllGatherInPlace) { run(testing::check_all_gather_in_place); }
TEST_P(MoverCollectives, Reduce) { run(testing::check_reduce); }
TEST_P(MoverCollectives, Broadcast) { run(testing::check_broadcast); }
TEST_P(MoverCollectives, AllToAll) { run(testing::check_all_to_all); }
TEST_P(MoverCollectives, SendRecv) { run(testing::check_send_recv); }
TEST_P(MoverCollectives, SendRecvCombined) { run(testing::check_sendrecv); }

std::vector<Case> mover_cases() {
  std::vector<Case> cases;
  for (int n : {1, 2, 3, 4})
    for (size_t c : {size_t{0}, size_t{7}, size_t{1000}}) cases.push_back({n, c});
  return cases;
}
INSTANTIATE_TEST_SUITE_P(Worlds, MoverCollectives, ::testing::ValuesIn(mover_cases()), case_name);

TEST(ThreadBufferMover, OverlapAndOrderAndSplitChildren) {
  auto mover = std::make_shared<QueuedMover>();
  run_ranks(
      4,
      [&](Communicator& c) {
        testing::check_overlap(c);
        testing::check_reduce_scatters_in_flight(c);
        auto child = c.split(c.rank() % 2, c.rank());
        ASSERT_NE(child, nullptr);
        EXPECT_TRUE(child->device_buffers());  // children move data with the parent's mover
        testing::check_all_reduce(*child, 1000);
      },
      checked_options(), mover);
}

TEST(ThreadBufferMover, HostWorldsReportHostBuffers) {
  run_ranks(2, [&](Communicator& c) { EXPECT_FALSE(c.device_buffers()); });
  EXPECT_FALSE(host_buffer_mover()->device());
}

}  // namespace
}  // namespace shardopt::comm
