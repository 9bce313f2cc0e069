// Steady-state steps must not touch the heap: count operator new calls around them.
#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include "base/thread_pool.h"
#include "model/data.h"
#include "model/transformer.h"
#include "tests/common/counting_new.h"

namespace shardopt::model {
namespace {

void expect_no_allocations_after_reserve(ThreadPool* pool) {
  ModelConfig c;
  c.d_model = 32;
  c.n_layer = 2;
  c.n_head = 4;
  c.context = 16;
  Transformer m(c);
  m.set_thread_pool(pool);
  std::vector<std::vector<float>> value, grad;
  std::vector<ParamBinding> bindings;
  std::vector<float*> ptrs;
  for (const auto& p : m.params()) {
    value.emplace_back(static_cast<std::size_t>(p.numel()));
    grad.emplace_back(static_cast<std::size_t>(p.numel()));
  }
  for (std::size_t i = 0; i < value.size(); ++i) {
    bindings.push_back({value[i].data(), grad[i].data()});
    ptrs.push_back(value[i].data());
  }
  m.init(3, ptrs);
  std::vector<uint8_t> text(5000);
  for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<uint8_t>((i * 7919) % 251);
  ByteCorpus corpus(text);
  SamplerConfig sc;
  sc.global_batch = 4;
  sc.seq_len = 16;
  BatchSampler sampler(corpus, sc);
  TokenBatch batch = sampler.make_batch();
  m.reserve(4, 16);
  std::size_t ready_calls = 0;
  const GradReadyFn on_ready = [&](std::size_t) { ++ready_calls; };

  float loss = 0;
  auto one_step = [&](int step) {
    sampler.train_batch(step, batch);
    loss += m.forward(bindings, batch.inputs.data(), batch.targets.data(), 4, 16);
    m.backward(bindings, step == 0 ? GradMode::kOverwrite : GradMode::kAccumulate, on_ready);
    loss += m.forward(bindings, batch.inputs.data(), batch.targets.data(), 2, 9);  // smaller shape
  };
  // One step outside the count: oneDNN generates its GEMM kernels (JIT, on the heap) on the first
  // products of the process; the model's own buffers are all in place after reserve().
  one_step(0);
  std::optional<test_alloc::AllocationCounter> counter(std::in_place);
  for (int step = 1; step < 4; ++step) one_step(step);
  EXPECT_EQ(counter->count(), 0);
  counter.reset();
  EXPECT_EQ(ready_calls, 4 * m.num_tensors());
  EXPECT_GT(loss, 0.0f);

  // Control: the counter does see the workspace growing for a larger shape.
  std::vector<uint8_t> more(8 * 16, 65);
  counter.emplace();
  m.forward(bindings, more.data(), more.data(), 8, 16);
  EXPECT_GT(counter->count(), 0);
}

TEST(Allocation, SamplingForwardBackwardAllocateNothingAfterReserve) { expect_no_allocations_after_reserve(nullptr); }

TEST(Allocation, ThreadedForwardBackwardAllocateNothingAfterReserve) {
  ThreadPool pool(3);
  expect_no_allocations_after_reserve(&pool);
}

}  // namespace
}  // namespace shardopt::model
