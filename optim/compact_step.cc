#include "optim/compact_step.h"

#include <algorithm>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/error.h"
#include "base/thread_pool.h"
#include "optim/compact_codec.h"
#include "optim/elementwise_kernels.h"
#include "optim/quant8_codec.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

// Elements per tile: the decoded state of a tile (2 slots x 8 KiB) stays in L1 between the decode,
// the update and the encode.
constexpr int64_t kTileElems = 8 * kQ8BlockElems;
static_assert(kCompactChunkElems % kTileElems == 0, "a pool task is a whole number of tiles");

void check_compact(const CompactState& s, const char* what, size_t index, int slot) {
  if ((s.dtype != proto::STATE_BF16 && s.dtype != proto::STATE_Q8) || s.values == nullptr ||
      (s.dtype == proto::STATE_Q8 && s.absmax == nullptr))
    throw ConfigError(fmt::format("{}: slice {} state slot {}: expected bf16 or q8 storage with non-null buffers, "
                                  "found {}", what, index, slot, state_dtype_name(s.dtype)));
}

// bf16 state: elements [start, start + n) of slice s, tile by tile: decode the tile's state slots
// into L1 scratch, run the fp32 update loops on them, encode the new state.
SHARDOPT_KERNEL void run_range_bf16(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                    const CompactSlots& slots, int64_t start, int64_t n) {
  alignas(64) static thread_local float scratch[2][kTileElems];
  const size_t gsize = dtype_size(s.grad_dtype);
  for (int64_t t = start; t < start + n; t += kTileElems) {
    const int64_t len = std::min(kTileElems, start + n - t);
    ElementwiseSlice tile = s;
    tile.master = s.master + t;
    tile.mirror = s.mirror ? s.mirror + t : nullptr;
    tile.grad = static_cast<const unsigned char*>(s.grad) + static_cast<size_t>(t) * gsize;
    tile.count = static_cast<size_t>(len);
    CompactState st[2];
    for (int k = 0; k < p.state_slots; ++k) {
      st[k] = advanced(slots.slot[k], t);
      decode_compact(st[k], len, scratch[k]);
      tile.state[k] = scratch[k];
    }
    detail::run_prepared(p, tile, 0, static_cast<size_t>(len));
    for (int k = 0; k < p.state_slots; ++k) encode_compact(st[k], len, scratch[k]);
  }
}

// q8 state, one block (len <= kQ8BlockElems elements) per call, in one pass over memory: each
// element's state is decoded from its code in the update loop, the update is the fp32 one
// (elementwise_kernels.h), the new state goes to an L1 scratch while the loop keeps the block's new
// absmax (an integer max over the magnitude bits, NaN-preserving: quant8_codec.h), then the block
// is encoded. AdamW's v is encoded from the sqrt(v) the update computed (the unsigned code lives in
// the sqrt domain).
constexpr int64_t kPrefetchBlocks = 2;

struct Q8Block {
  uint8_t* codes;
  float* absmax;  // the block's one absmax: read, then replaced
};

template <typename G, bool kMirror>
SHARDOPT_KERNEL void adamw_q8_block(const detail::AdamConsts& k, float* __restrict w, bf16* __restrict mirror,
                                    const G* __restrict grad, Q8Block m_block, Q8Block v_block, int64_t len) {
  alignas(64) float m_new[kQ8BlockElems], sqrt_v_new[kQ8BlockElems];
  const uint8_t* __restrict mc = m_block.codes;
  const uint8_t* __restrict vc = v_block.codes;
  const float am = *m_block.absmax, av = *v_block.absmax;
  uint32_t m_max = 0, v_max = 0;
  for (int64_t i = 0; i < len; ++i) {
    float m = codec::decode_signed(mc[i]) * am, v = codec::decode_unsigned(vc[i]) * av, sqrt_v;
    const float wi = detail::adamw_update(k, load_as_float(grad[i]), w[i], m, v, sqrt_v);
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
    m_new[i] = m;
    sqrt_v_new[i] = sqrt_v;
    const uint32_t mb = codec::bits_of(m) & 0x7fffffffu, vb = codec::bits_of(v) & 0x7fffffffu;
    m_max = mb > m_max ? mb : m_max;
    v_max = vb > v_max ? vb : v_max;
  }
  *m_block.absmax = codec::float_of(m_max);
  *v_block.absmax = codec::float_of(v_max);
  codec::encode_signed_block(m_new, len, *m_block.absmax, m_block.codes);
  codec::encode_unsigned_block_from_sqrt(sqrt_v_new, len, *v_block.absmax, v_block.codes);
}

// Lion's m and SGD's momentum buffer: one signed slot; Update(g, w, state&) -> new w.
template <typename G, bool kMirror, typename Update>
SHARDOPT_KERNEL void one_slot_q8_block(const Update& update, float* __restrict w, bf16* __restrict mirror,
                                       const G* __restrict grad, Q8Block block, int64_t len) {
  alignas(64) float m_new[kQ8BlockElems];
  const uint8_t* __restrict mc = block.codes;
  const float am = *block.absmax;
  uint32_t m_max = 0;
  for (int64_t i = 0; i < len; ++i) {
    float m = codec::decode_signed(mc[i]) * am;
    const float wi = update(load_as_float(grad[i]), w[i], m);
    w[i] = wi;
    if constexpr (kMirror) mirror[i] = to_bf16_rne(wi);
    m_new[i] = m;
    const uint32_t mb = codec::bits_of(m) & 0x7fffffffu;
    m_max = mb > m_max ? mb : m_max;
  }
  *block.absmax = codec::float_of(m_max);
  codec::encode_signed_block(m_new, len, *block.absmax, block.codes);
}

template <typename G, bool kMirror>
SHARDOPT_KERNEL void run_range_q8_typed(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                        const CompactSlots& slots, int64_t start, int64_t n) {
  const G* grad = static_cast<const G*>(s.grad);
  const detail::SgdMomentumTerms sgd_terms = detail::sgd_momentum_terms(p.sgd);
  auto lion = [&](float g, float w, float& m) { return detail::lion_update(p.lion, g, w, m); };
  auto sgd = [&](float g, float w, float& m) { return detail::sgd_momentum_update(p.sgd, sgd_terms, g, w, m); };
  for (int64_t b = start; b < start + n; b += kQ8BlockElems) {
    const int64_t len = std::min(kQ8BlockElems, start + n - b);
    const int64_t j = b / kQ8BlockElems;
    // The update and encode phases of a block leave the memory streams idle; prefetching the
    // block kPrefetchBlocks ahead keeps them busy (the fp32 loop streams without gaps).
    if (b + (kPrefetchBlocks + 1) * kQ8BlockElems <= start + n) {
      const int64_t ahead = b + kPrefetchBlocks * kQ8BlockElems;
      for (int64_t e = 0; e < kQ8BlockElems; e += 16) {
        __builtin_prefetch(grad + ahead + e);
        __builtin_prefetch(s.master + ahead + e, 1);
      }
      for (int k = 0; k < p.state_slots; ++k)
        for (int64_t e = 0; e < kQ8BlockElems; e += 64)
          __builtin_prefetch(static_cast<uint8_t*>(slots.slot[k].values) + ahead + e, 1);
    }
    bf16* mirror = kMirror ? s.mirror + b : nullptr;
    const Q8Block m{static_cast<uint8_t*>(slots.slot[0].values) + b, slots.slot[0].absmax + j};
    switch (p.kind) {
      case proto::OPTIMIZER_ADAMW:
        adamw_q8_block<G, kMirror>(p.adam, s.master + b, mirror, grad + b, m,
                                   {static_cast<uint8_t*>(slots.slot[1].values) + b, slots.slot[1].absmax + j}, len);
        break;
      case proto::OPTIMIZER_LION: one_slot_q8_block<G, kMirror>(lion, s.master + b, mirror, grad + b, m, len); break;
      case proto::OPTIMIZER_SGD: one_slot_q8_block<G, kMirror>(sgd, s.master + b, mirror, grad + b, m, len); break;
      default: break;
    }
  }
}

// Elements [start, start + n) of slice s (start on a block boundary). A block touches only its own
// codes and absmax, so ranges may run in any order on any thread.
SHARDOPT_KERNEL void run_range(const detail::PreparedStep& p, const ElementwiseSlice& s, const CompactSlots& slots,
                               int64_t start, int64_t n) {
  if (slots.slot[0].dtype != proto::STATE_Q8) return run_range_bf16(p, s, slots, start, n);
  if (s.grad_dtype == DType::kBF16) {
    if (s.mirror) run_range_q8_typed<bf16, true>(p, s, slots, start, n);
    else run_range_q8_typed<bf16, false>(p, s, slots, start, n);
  } else {
    if (s.mirror) run_range_q8_typed<float, true>(p, s, slots, start, n);
    else run_range_q8_typed<float, false>(p, s, slots, start, n);
  }
}

// One build per instruction set (optim/kernel_options.h; flatten: the decode, update and encode
// loops are all compiled for the wrapper's target). The codec is bit-exact across them; the update
// loops may differ in the last bit between the portable and the FMA builds, as elementwise_step's do.
SHARDOPT_BUILD_PORTABLE void run_range_portable(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                                const CompactSlots& slots, int64_t start, int64_t n) {
  run_range(p, s, slots, start, n);
}
SHARDOPT_BUILD_AVX2 void run_range_avx2(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                        const CompactSlots& slots, int64_t start, int64_t n) {
  run_range(p, s, slots, start, n);
}
SHARDOPT_BUILD_AVX512 void run_range_avx512(const detail::PreparedStep& p, const ElementwiseSlice& s,
                                            const CompactSlots& slots, int64_t start, int64_t n) {
  run_range(p, s, slots, start, n);
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
    for (int k = 0; k < slots; ++k) {
      if (slices[i].count == 0) continue;
      const CompactState& st = states[i].slot[k];
      check_compact(st, "elementwise_step_compact", i, k);
      // The fused q8 loops take the code of each slot from the optimizer (q8_slot_is_nonnegative).
      if (st.dtype != states[i].slot[0].dtype ||
          (st.dtype == proto::STATE_Q8 && st.nonnegative != q8_slot_is_nonnegative(params.kind, k)))
        throw ConfigError(fmt::format("elementwise_step_compact: slice {} state slot {}: {} storage{} where the {} "
                                      "step needs {}{}", i, k, state_dtype_name(st.dtype),
                                      st.nonnegative ? " (unsigned code)" : "", optimizer_kind_name(params.kind),
                                      state_dtype_name(states[i].slot[0].dtype),
                                      q8_slot_is_nonnegative(params.kind, k) ? " (unsigned code)" : ""));
    }
  detail::PreparedStep prepared;
  const StepResult result = detail::prepare_elementwise_step(params, slices, lr, step, check, false, prepared);
  if (!result.applied) return result;
  if (slots == 0) return elementwise_step(params, slices, lr, step, FiniteCheck::kNone, exec);  // plain SGD: no state

  // One pool task per kCompactChunkElems of one slice; the result does not depend on the pool size.
  // Task t is found by walking the slices (few next to the tasks; no per-step table: the step
  // allocates nothing).
  const auto tasks_in = [](const ElementwiseSlice& s) {
    return (static_cast<int64_t>(s.count) + kCompactChunkElems - 1) / kCompactChunkElems;
  };
  int64_t tasks = 0;
  for (const ElementwiseSlice& s : slices) tasks += tasks_in(s);
  const Isa isa = select_isa(exec.max_isa);
  auto run_task = [&](int64_t task) {
    size_t i = 0;
    while (task >= tasks_in(slices[i])) task -= tasks_in(slices[i++]);
    const int64_t start = task * kCompactChunkElems;
    const int64_t n = std::min<int64_t>(kCompactChunkElems, static_cast<int64_t>(slices[i].count) - start);
    switch (isa) {
      case Isa::kAvx512: run_range_avx512(prepared, slices[i], states[i], start, n); break;
      case Isa::kAvx2: run_range_avx2(prepared, slices[i], states[i], start, n); break;
      case Isa::kPortable: run_range_portable(prepared, slices[i], states[i], start, n); break;
    }
  };
  if (exec.pool == nullptr || exec.pool->size() == 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) run_task(t);
  } else {
    exec.pool->parallel_for(tasks, [&](int64_t t, int) { run_task(t); });
  }
  return result;
}

StepResult muon_step_compact(const OptimizerParams& params, const MuonMatrix& matrix, const CompactState& momentum,
                             float lr, MuonWorkspace& workspace, FiniteCheck check, const KernelOptions& exec) {
  check_compact(momentum, "muon_step_compact", 0, 0);
  if (matrix.momentum == nullptr) throw ConfigError("muon_step_compact: matrix.momentum (fp32 scratch) is null");
  const int64_t n = matrix.rows * matrix.cols;
  load_compact(momentum, n, matrix.momentum, exec);
  const StepResult result = muon_step(params, matrix, lr, workspace, check);
  if (result.applied) store_compact(momentum, n, matrix.momentum, exec);
  return result;
}

}  // namespace shardopt::optim
