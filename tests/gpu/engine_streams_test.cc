// The device Engine ordered after the trainer's CUDA stream with events (Engine::grad_ready(t, stream),
// Communicator::wait_stream): gradients written by kernels that are still running when grad_ready
// returns are reduced only once written, and with NCCL a bucket's reduce-scatter runs while later
// backward work on the trainer's stream is still computing (the overlap). Skips without a CUDA device.
// The CPU half of the protocol (which calls the engine makes, in which order) is
// DevicePath.BucketReadsWaitForTheStreamsOfTheirGradients in tests/runtime/device_path_test.cc.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/cuda_buffer_mover.h"
#include "comm/nccl_backend.h"
#include "comm/thread_backend.h"
#include "runtime/engine.h"
#include "sharding/layout.h"
#include "tests/common/engine_reference.h"
#include "tests/gpu/device_engine_util.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/stream_test_kernels.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites
using shardopt::testing::cycles_of;
using shardopt::testing::launch_delayed_copy;
using shardopt::testing::launch_spin;

EngineOptions device_options(proto::ShardLayout layout) {
  EngineOptions o = engine_options(2, layout, "muon");
  o.memory_space = MemorySpace::kCuda;
  o.device = 0;
  return o;
}

// The fixture's gradient of step `step` for tensor k on this rank.
std::vector<float> gradient(Engine& engine, int step, size_t k) {
  std::vector<float> g(static_cast<size_t>(numel(engine.spec(k))));
  for (int64_t i = 0; i < numel(engine.spec(k)); ++i)
    g[i] = common_grad(step, k, i) + rank_offset(engine.comm().rank(), engine.comm().size(), k, i);
  return g;
}

// Two steps. late = false: every gradient is in place (cudaMemcpy) before grad_ready(t). late = true:
// each is copied in by a kernel on this rank's own stream that first spins ~20 ms, and grad_ready(t,
// stream) returns before it ran; an engine that read the bucket without waiting for the stream would
// reduce the zero-filled buffer.
Params train(Engine& engine, bool late) {
  cudaStream_t stream = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  init_params(engine);
  std::vector<float*> sources(engine.num_tensors(), nullptr);
  for (int step = 1; step <= 2; ++step) {
    for (size_t k = engine.num_tensors(); k-- > 0;) {
      const std::vector<float> g = gradient(engine, step, k);
      if (!late) {
        EXPECT_EQ(cudaMemcpy(engine.grad(k), g.data(), 4 * g.size(), cudaMemcpyHostToDevice), cudaSuccess);
        engine.grad_ready(k);
        continue;
      }
      if (sources[k] == nullptr) {
        EXPECT_EQ(cudaMalloc(&sources[k], 4 * g.size()), cudaSuccess);
      }
      EXPECT_EQ(cudaMemcpy(sources[k], g.data(), 4 * g.size(), cudaMemcpyHostToDevice), cudaSuccess);
      launch_delayed_copy(engine.grad(k), sources[k], g.size(), cycles_of(0.02), stream);
      engine.grad_ready(k, stream);
    }
    EXPECT_TRUE(engine.step().applied);
  }
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (float* p : sources) cudaFree(p);
  cudaStreamDestroy(stream);
  return full_params(engine);
}

void expect_identical(const Params& got, const Params& want, const std::string& where) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t t = 0; t < want.size(); ++t)
    EXPECT_EQ(std::memcmp(got[t].data(), want[t].data(), 4 * want[t].size()), 0) << where << ", tensor " << t;
}

std::unique_ptr<comm::NcclCommunicator> nccl_world_of_one() {
  ncclUniqueId id;
  EXPECT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  return std::make_unique<comm::NcclCommunicator>(id, 0, 1, 0);
}

TEST(DeviceEngineStreams, LateGradientsOnNcclAreReducedOnceWritten) {
  SHARDOPT_REQUIRE_GPU();
  for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) {
    Params want, got;
    {
      auto comm = nccl_world_of_one();
      Engine engine(*comm, mixed_model(), device_options(layout));
      want = train(engine, false);
    }
    {
      auto comm = nccl_world_of_one();
      Engine engine(*comm, mixed_model(), device_options(layout));
      got = train(engine, true);
    }
    expect_identical(got, want, std::string("NCCL, ") + sharding::layout_name(layout));
  }
}

TEST(DeviceEngineStreams, LateGradientsOnTheThreadsBackendAreReducedOnceWritten) {
  SHARDOPT_REQUIRE_GPU();
  for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0}) {
    Params want, got;
    std::mutex mu;
    for (bool late : {false, true}) {
      comm::run_ranks(
          2,
          [&](comm::Communicator& comm) {
            Engine engine(comm, mixed_model(), device_options(layout));
            Params p = train(engine, late);
            std::lock_guard<std::mutex> lock(mu);
            if (comm.rank() == 0) (late ? got : want) = std::move(p);
          },
          comm::CommOptions{}, comm::cuda_buffer_mover(0));
    }
    expect_identical(got, want, std::string("threads, 2 ranks, ") + sharding::layout_name(layout));
  }
}

// The overlap: with NCCL, a bucket's reduce-scatter waits for the trainer's stream only up to the
// point where its gradients were announced, so it finishes while later work on that stream (a 300 ms
// kernel standing for the rest of backward) still runs; a reduce-scatter ordered behind the whole
// stream (or issued on it) would finish only after that kernel.
TEST(DeviceEngineStreams, NcclReduceScatterRunsWhileBackwardContinues) {
  SHARDOPT_REQUIRE_GPU();
  auto comm = nccl_world_of_one();
  Engine engine(*comm, mixed_model(), device_options(proto::SHARD_LAYOUT_OWNED));
  init_params(engine);
  cudaStream_t backward = nullptr;
  CUDA_OK(cudaStreamCreateWithFlags(&backward, cudaStreamNonBlocking));
  cudaEvent_t reduced = nullptr;
  CUDA_OK(cudaEventCreateWithFlags(&reduced, cudaEventDisableTiming));
  // The tensors of the last bucket first: announcing them launches its reduce-scatter.
  const int first_bucket = engine.bucket_of(engine.num_tensors() - 1);
  std::vector<size_t> first, rest;
  for (size_t k = 0; k < engine.num_tensors(); ++k) (engine.bucket_of(k) == first_bucket ? first : rest).push_back(k);
  ASSERT_FALSE(rest.empty());
  for (size_t k : first) {
    const std::vector<float> g = gradient(engine, 1, k);
    CUDA_OK(cudaMemcpyAsync(engine.grad(k), g.data(), 4 * g.size(), cudaMemcpyHostToDevice, backward));
    CUDA_OK(cudaStreamSynchronize(backward));  // g is host memory of this scope
    engine.grad_ready(k, backward);
  }
  launch_spin(cycles_of(0.3), backward);  // the rest of backward
  CUDA_OK(cudaEventRecord(reduced, comm->stream()));  // behind the first bucket's reduce-scatter
  const auto start = std::chrono::steady_clock::now();
  while (cudaEventQuery(reduced) == cudaErrorNotReady &&
         std::chrono::steady_clock::now() - start < std::chrono::milliseconds(250))
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  EXPECT_EQ(cudaEventQuery(reduced), cudaSuccess) << "the first bucket's reduce-scatter did not finish within 250 ms";
  EXPECT_EQ(cudaStreamQuery(backward), cudaErrorNotReady)
      << "backward's stream finished before the reduce-scatter was seen done: no overlap shown";
  for (size_t k : rest) {
    const std::vector<float> g = gradient(engine, 1, k);
    CUDA_OK(cudaMemcpyAsync(engine.grad(k), g.data(), 4 * g.size(), cudaMemcpyHostToDevice, backward));
    CUDA_OK(cudaStreamSynchronize(backward));
    engine.grad_ready(k, backward);
  }
  EXPECT_TRUE(engine.step().applied);
  cudaEventDestroy(reduced);
  cudaStreamDestroy(backward);
}

}  // namespace
}  // namespace shardopt::runtime
