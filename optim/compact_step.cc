#include "optim/compact_step.h"

#include <algorithm>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/error.h"
#include "base/thread_pool.h"
#include "optim/finite.h"

namespace shardopt::optim {
namespace {

// Slot k's storage advanced by `offset` elements (a multiple of the q8 block).
CompactState advanced(const CompactState& s, int64_t offset) {
  CompactState out = s;
  const int64_t value_bytes = s.dtype == proto::STATE_BF16 ? 2 : 1;
  out.values = static_cast<unsigned char*>(s.values) + offset * value_bytes;
  if (s.dtype == proto::STATE_Q8) out.absmax = s.absmax + offset / kQ8BlockElems;
  return out;
}

void check_compact(const CompactState& s, const char* what, size_t index, int slot) {
  if ((s.dtype != proto::STATE_BF16 && s.dtype != proto::STATE_Q8) || s.values == nullptr ||
      (s.dtype == proto::STATE_Q8 && s.absmax == nullptr))
    throw ConfigError(fmt::format("{}: slice {} state slot {}: expected bf16 or q8 storage with non-null buffers, "
                                  "found {}", what, index, slot, state_dtype_name(s.dtype)));
}

}  // namespace

StepResult elementwise_step_compact(const OptimizerParams& params, std::span<const ElementwiseSlice> slices,
                                    std::span<const CompactSlots> states, float lr, int64_t step, FiniteCheck check,
                                    const KernelOptions& exec) {
  if (slices.size() != states.size())
    throw ConfigError(fmt::format("elementwise_step_compact: {} slices but {} state entries", slices.size(),
                                  states.size()));
  const int slots = state_values_per_element(params);
  for (size_t i = 0; i < slices.size(); ++i)
    for (int k = 0; k < slots; ++k)
      if (slices[i].count > 0) check_compact(states[i].slot[k], "elementwise_step_compact", i, k);

  StepResult result;
  if (check == FiniteCheck::kGradients) {
    for (const ElementwiseSlice& s : slices) result.nonfinite_gradients += count_nonfinite(s.grad, s.grad_dtype, s.count);
    if (result.nonfinite_gradients != 0) {
      result.applied = false;
      return result;
    }
  }
  if (slots == 0) return elementwise_step(params, slices, lr, step, FiniteCheck::kNone, exec);  // plain SGD: no state to convert

  // One task per chunk of one slice; a chunk's decode, kernel and encode touch only its own blocks,
  // so chunks run on the pool in any order with the single-threaded result bit for bit.
  std::vector<int64_t> first_chunk(slices.size() + 1, 0);
  for (size_t i = 0; i < slices.size(); ++i)
    first_chunk[i + 1] = first_chunk[i] + (static_cast<int64_t>(slices[i].count) + kCompactChunkElems - 1) /
                                              kCompactChunkElems;
  const KernelOptions inner{nullptr, exec.use_avx512};  // the chunk is this task's: no nested split
  auto run_chunk = [&](int64_t task) {
    const size_t i = static_cast<size_t>(
        std::upper_bound(first_chunk.begin(), first_chunk.end(), task) - first_chunk.begin() - 1);
    const ElementwiseSlice& s = slices[i];
    const int64_t start = (task - first_chunk[i]) * kCompactChunkElems;
    const int64_t n = std::min<int64_t>(kCompactChunkElems, static_cast<int64_t>(s.count) - start);
    alignas(64) static thread_local float scratch[2][kCompactChunkElems];
    const size_t gsize = dtype_size(s.grad_dtype);
    ElementwiseSlice chunk = s;
    chunk.master = s.master + start;
    chunk.mirror = s.mirror ? s.mirror + start : nullptr;
    chunk.grad = static_cast<const unsigned char*>(s.grad) + static_cast<size_t>(start) * gsize;
    chunk.count = static_cast<size_t>(n);
    CompactState st[2];
    for (int k = 0; k < slots; ++k) {
      st[k] = advanced(states[i].slot[k], start);
      load_compact(st[k], n, scratch[k], exec.use_avx512);
      chunk.state[k] = scratch[k];
    }
    elementwise_step(params, std::span<const ElementwiseSlice>(&chunk, 1), lr, step, FiniteCheck::kNone, inner);
    for (int k = 0; k < slots; ++k) store_compact(st[k], n, scratch[k], exec.use_avx512);
  };
  const int64_t tasks = first_chunk.back();
  if (exec.pool == nullptr || exec.pool->size() == 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) run_chunk(t);
  } else {
    exec.pool->parallel_for(tasks, [&](int64_t t, int) { run_chunk(t); });
  }
  return result;
}

StepResult muon_step_compact(const OptimizerParams& params, const MuonMatrix& matrix, const CompactState& momentum,
                             float lr, MuonWorkspace& workspace, FiniteCheck check) {
  check_compact(momentum, "muon_step_compact", 0, 0);
  if (matrix.momentum == nullptr) throw ConfigError("muon_step_compact: matrix.momentum (fp32 scratch) is null");
  const int64_t n = matrix.rows * matrix.cols;
  load_compact(momentum, n, matrix.momentum);
  const StepResult result = muon_step(params, matrix, lr, workspace, check);
  if (result.applied) store_compact(momentum, n, matrix.momentum);
  return result;
}

}  // namespace shardopt::optim
