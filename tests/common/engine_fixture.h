// Shared fixture of the runtime suites: a small mixed model and exactly averageable gradients.
//
// Gradients are dyadic rationals with few significant bits, and each rank's gradient is the common
// value plus an offset that sums to exactly zero over ranks, so the averaged gradient equals the
// common one bit for bit whatever the reduction order: N-rank results can be compared with a
// single-process reference without rounding slack.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "comm/thread_backend.h"
#include "proto/types.pb.h"

namespace shardopt::test_fixture {

inline proto::TensorSpec spec(const std::string& name, std::vector<int64_t> shape) {
  proto::TensorSpec s;
  s.set_name(name);
  for (int64_t d : shape) s.add_shape(d);
  s.set_dtype(proto::F32);
  return s;
}

// Embeddings, norms and the head go to the element-wise optimizer, the rest to Muon; with a small
// bucket size the model spans several buckets, some tensors larger than a bucket.
inline std::vector<proto::TensorSpec> mixed_model(int64_t up_rows = 24) {
  return {spec("tok_embed", {13, 10}), spec("layer0.attn_norm", {10}), spec("layer0.w_q", {10, 10}),
          spec("layer0.w_up", {up_rows, 10}), spec("layer0.w_down", {10, 24}), spec("layer1.w_k", {7, 10}),
          spec("layer1.w_o", {10, 7}),   spec("layer1.mlp_norm", {10}),   spec("lm_head", {13, 10})};
}

// For block-wise (q8) optimizer state: element-wise tensors of several 256-element quantization
// blocks (cut across ranks in every layout, the last block short), Muon matrices of one and two.
inline std::vector<proto::TensorSpec> q8_model() {
  return {spec("tok_embed", {97, 10}), spec("layer0.attn_norm", {10}), spec("layer0.w_q", {10, 10}),
          spec("layer0.w_up", {40, 10}), spec("layer0.w_down", {10, 24}), spec("layer1.w_k", {7, 10}),
          spec("layer1.w_o", {10, 7}),   spec("layer1.mlp_norm", {300}),  spec("lm_head", {61, 10})};
}

inline int64_t numel(const proto::TensorSpec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape()) n *= d;
  return n;
}

// All arithmetic is signed: with a size_t operand, `x % 97 - 48` would wrap to ~2^64.
inline float initial_value(size_t t, int64_t i) {
  const auto ti = static_cast<int64_t>(t);
  return static_cast<float>((ti * 131 + i * 17) % 97 - 48) / 64.0f;  // in [-0.75, 0.75]
}
// Common gradient of step s (dyadic, |g| < 1).
inline float common_grad(int step, size_t t, int64_t i) {
  const auto ti = static_cast<int64_t>(t);
  return static_cast<float>((int64_t{step} * 7 + ti * 29 + i * 13) % 61 - 30) / 32.0f;
}
// Rank r's offset: sums to exactly zero over the ranks of a world.
inline float rank_offset(int rank, int world, size_t t, int64_t i) {
  const auto ti = static_cast<int64_t>(t);
  return static_cast<float>(int64_t{2 * rank - (world - 1)} * ((i + ti) % 5 - 2)) / 128.0f;
}

// Micro-batch k's offset (of A per step): sums to exactly zero over the micro-batches, so the
// accumulated gradient is exactly A times the common one.
inline float micro_offset(int k, int accumulation, size_t t, int64_t i) {
  const auto ti = static_cast<int64_t>(t);
  return static_cast<float>(int64_t{2 * k - (accumulation - 1)} * ((i + 2 * ti) % 3 - 1)) / 256.0f;
}

// Runs fn on `world` threads-backend ranks (buffers moved by `mover`; null: host memory) and returns
// rank 0's value.
template <typename T>
T rank0_result(int world, const std::function<T(comm::Communicator&)>& fn, comm::CommOptions options = {},
               std::shared_ptr<comm::ThreadBufferMover> mover = nullptr) {
  T result{};
  std::mutex mu;
  comm::run_ranks(
      world,
      [&](comm::Communicator& c) {
        T mine = fn(c);
        if (c.rank() == 0) {
          std::lock_guard<std::mutex> lock(mu);
          result = std::move(mine);
        }
      },
      options, std::move(mover));
  return result;
}

}  // namespace shardopt::test_fixture
