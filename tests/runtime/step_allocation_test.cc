// Engine::step() (and, with ZeRO-2 gradients, the per-micro-batch grad()/grad_ready() path)
// allocates nothing after warm-up: tests/common/counting_new counts the allocations made on the
// calling rank's thread while a measured region is open.
//
// Communication is excluded by design: the engine talks to the threads backend through
// PausingComm, which suspends counting inside every communicator call and Work::wait. What the
// backend allocates for its own operation records is the backend's business (and MPI/NCCL's);
// what is measured is the engine's own work around them.
#include <mutex>

#include <gtest/gtest.h>

#include "comm/forwarding_communicator.h"
#include "comm/thread_backend.h"
#include "optim/compact_step.h"
#include "runtime/engine.h"
#include "tests/common/counting_new.h"
#include "tests/common/engine_reference.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

using test_alloc::AllocationCounter;
using test_alloc::PauseCounting;

class PausingWork : public comm::Work {
 public:
  explicit PausingWork(comm::WorkPtr inner) : inner_(std::move(inner)) {}
  void wait(std::chrono::milliseconds timeout) override {
    PauseCounting p;
    inner_->wait(timeout);
  }
  void wait() override {
    PauseCounting p;
    inner_->wait();
  }
  bool done() override {
    PauseCounting p;
    return inner_->done();
  }
  std::exception_ptr error() const override { return inner_->error(); }
  uint64_t seq() const override { return inner_->seq(); }

 private:
  comm::WorkPtr inner_;
};

// Forwards to a communicator with allocation counting suspended inside it.
class PausingComm : public comm::ForwardingCommunicator {
 public:
  explicit PausingComm(comm::Communicator& inner) : ForwardingCommunicator(inner) {}

 protected:
  // The base class's argument checks and traffic counting run before these (no allocation there).
  comm::WorkPtr forward(const comm::ForwardedOp&, comm::IssueRef issue) override {
    PauseCounting p;
    return std::make_shared<PausingWork>(issue());
  }
  std::unique_ptr<Communicator> start_split(int color, int key) override {
    PauseCounting p;
    return ForwardingCommunicator::start_split(color, key);
  }
};

struct Case {
  int stage;
  proto::ShardLayout layout;
  std::string optimizer;
  int accumulation;
  GradMemory grad_memory;
  proto::StateDType state = proto::STATE_F32;  // optimizer state storage (bf16 / q8: compact)
  int threads = 1;                             // the Engine's compute pool
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return "stage" + std::to_string(c.stage) + (c.layout == proto::SHARD_LAYOUT_DIM0 ? "_dim0_" : "_owned_") +
         c.optimizer + "_acc" + std::to_string(c.accumulation) +
         (c.grad_memory == GradMemory::kFull ? "_fullgrads" : "_sharded") +
         (c.state == proto::STATE_F32 ? "" : "_" + optim::state_dtype_name(c.state)) +
         (c.threads == 1 ? "" : "_threads" + std::to_string(c.threads));
}

class StepAllocations : public testing::TestWithParam<Case> {};

TEST_P(StepAllocations, NoneAfterWarmUp) {
  const Case c = GetParam();
  const auto specs = mixed_model();
  constexpr int kWorld = 3, kWarmUp = 2, kMeasured = 3;
  std::mutex mu;
  std::vector<int64_t> step_allocs(kWorld, -1), grad_allocs(kWorld, -1);
  comm::CommOptions copts;
  copts.checked = true;
  copts.timeout = std::chrono::milliseconds(60000);
  comm::run_ranks(
      kWorld,
      [&](comm::Communicator& inner) {
        PausingComm comm(inner);
        EngineOptions o = engine_options(c.stage, c.layout, c.optimizer);
        o.grad_accumulation_steps = c.accumulation;
        o.grad_memory = c.grad_memory;
        o.max_grad_norm = 0.5f;  // the clipping path runs too
        o.threads = c.threads;
        if (c.state != proto::STATE_F32) {
          o.elementwise_optimizer.set_state_dtype(c.state);
          if (o.matrix_optimizer.kind() != proto::OPTIMIZER_KIND_UNSPECIFIED) o.matrix_optimizer.set_state_dtype(c.state);
        }
        Engine engine(comm, specs, o);
        engine.set_params([&](size_t t, float* dst) {
          for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
        });
        int64_t in_step = 0, in_grads = 0;
        for (int step = 1; step <= kWarmUp + kMeasured; ++step) {
          const bool measured = step > kWarmUp;
          {
            AllocationCounter counter;
            for (int micro = 0; micro < c.accumulation; ++micro)
              for (size_t k = specs.size(); k-- > 0;) {
                const bool add = engine.grad_accumulates(k);
                float* g = engine.grad(k);
                for (int64_t i = 0; i < numel(specs[k]); ++i) {
                  const float v = common_grad(step, k, i) + rank_offset(comm.rank(), kWorld, k, i);
                  g[i] = add ? g[i] + v : v;
                }
                engine.grad_ready(k);
              }
            if (measured) in_grads += counter.count();
          }
          AllocationCounter counter;
          const StepReport report = engine.step();
          if (measured) in_step += counter.count();
          EXPECT_TRUE(report.applied);
        }
        std::lock_guard<std::mutex> lock(mu);
        step_allocs[comm.rank()] = in_step;
        grad_allocs[comm.rank()] = in_grads;
      },
      copts);
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(step_allocs[r], 0) << "allocations in step() on rank " << r;
    EXPECT_EQ(grad_allocs[r], 0) << "allocations in grad()/grad_ready() on rank " << r;
  }
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (int stage : {1, 2, 3})
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
      for (const char* opt : {"muon", "normuon", "adamw"})
        for (int accumulation : {1, 2})
          for (GradMemory mode : {GradMemory::kSharded, GradMemory::kFull}) {
            if (stage == 1 && mode == GradMemory::kFull) continue;  // stage 1 is full either way
            cases.push_back({stage, layout, opt, accumulation, mode});
          }
  // Compact state on a 2-thread pool: the fused element-wise steps and the Muon momentum's pooled
  // decode and encode.
  for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
    for (auto state : {proto::STATE_Q8, proto::STATE_BF16})
      cases.push_back({2, layout, "normuon", 1, GradMemory::kSharded, state, 2});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(EveryStageAndLayout, StepAllocations, testing::ValuesIn(all_cases()), case_name);

// What muon_step_compact adds to muon_step: the momentum's decode and encode (load_compact /
// store_compact) split over a 2-thread pool (131 x 777 elements: 4 tasks) allocate nothing on the
// calling thread, q8 and bf16. (muon_step itself is covered by the Engine cases above; on matrices this
// large oneDNN's sgemm allocates inside it.)
TEST(StepAllocations, CompactMomentumDecodeAndEncodeOnAPoolAllocateNothing) {
  const int64_t rows = 131, cols = 777, n = rows * cols;
  ASSERT_GT(n, 3 * optim::kCompactChunkElems);
  ThreadPool pool(2);
  for (auto dtype : {proto::STATE_Q8, proto::STATE_BF16}) {
    std::vector<float> m(static_cast<size_t>(n));
    for (size_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(i % 97) * 1e-3f - 0.04f;
    std::vector<unsigned char> values(static_cast<size_t>(n) * 2, 0);
    std::vector<float> absmax(static_cast<size_t>(optim::q8_num_blocks(n)), 0.0f);
    const optim::CompactState momentum{dtype, values.data(), absmax.data(), false};
    const optim::KernelOptions exec{&pool};
    optim::store_compact(momentum, n, m.data(), exec);  // warm-up: the pool's threads are started
    AllocationCounter counter;
    for (int step = 0; step < 3; ++step) {
      optim::load_compact(momentum, n, m.data(), exec);
      optim::store_compact(momentum, n, m.data(), exec);
    }
    EXPECT_EQ(counter.count(), 0) << optim::state_dtype_name(dtype);
  }
}

// The counter itself works: a region that allocates is seen.
std::vector<int>* volatile g_sink = nullptr;  // volatile: the allocation cannot be elided

TEST(StepAllocations, CounterSeesAnAllocation) {
  AllocationCounter counter;
  g_sink = new std::vector<int>(3);
  const int64_t seen = counter.count();
  delete g_sink;
  EXPECT_GE(seen, 2);  // the vector object and its storage
}

}  // namespace
}  // namespace shardopt::runtime
