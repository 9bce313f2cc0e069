#include "optim/compact_step.h"

#include <algorithm>
#include <string>

#include <fmt/format.h>

#include "base/error.h"
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
                                    std::span<const CompactSlots> states, float lr, int64_t step, FiniteCheck check) {
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
  if (slots == 0) return elementwise_step(params, slices, lr, step);  // plain SGD: no state to convert

  alignas(64) static thread_local float scratch[2][kCompactChunkElems];
  for (size_t i = 0; i < slices.size(); ++i) {
    const ElementwiseSlice& s = slices[i];
    const size_t gsize = dtype_size(s.grad_dtype);
    for (int64_t start = 0; start < static_cast<int64_t>(s.count); start += kCompactChunkElems) {
      const int64_t n = std::min<int64_t>(kCompactChunkElems, static_cast<int64_t>(s.count) - start);
      ElementwiseSlice chunk = s;
      chunk.master = s.master + start;
      chunk.mirror = s.mirror ? s.mirror + start : nullptr;
      chunk.grad = static_cast<const unsigned char*>(s.grad) + static_cast<size_t>(start) * gsize;
      chunk.count = static_cast<size_t>(n);
      CompactState st[2];
      for (int k = 0; k < slots; ++k) {
        st[k] = advanced(states[i].slot[k], start);
        load_compact(st[k], n, scratch[k]);
        chunk.state[k] = scratch[k];
      }
      elementwise_step(params, std::span<const ElementwiseSlice>(&chunk, 1), lr, step);
      for (int k = 0; k < slots; ++k) store_compact(st[k], n, scratch[k]);
    }
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
