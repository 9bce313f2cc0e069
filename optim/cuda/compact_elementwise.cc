#include "optim/cuda/compact_elementwise.h"

#include <algorithm>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/env.h"
#include "base/error.h"
#include "base/log.h"
#include "optim/cuda/compact_kernels.h"
#include "optim/cuda/cuda_check.h"
#include "optim/elementwise_kernels.h"

namespace shardopt::cuda {
namespace {

static_assert(optim::kQ8BlockElems == detail::kCompactBlockElems, "the kernel's q8 block is the CPU's");
static_assert(CompactElementwiseOptimizerCuda::kChunkElements % optim::kQ8BlockElems == 0,
              "chunks start on q8 block boundaries");

detail::ElementwiseKind kernel_kind(optim::OptimizerKind kind) {
  switch (kind) {
    case proto::OPTIMIZER_ADAMW: return detail::ElementwiseKind::kAdamW;
    case proto::OPTIMIZER_LION: return detail::ElementwiseKind::kLion;
    default: return detail::ElementwiseKind::kSgd;
  }
}

}  // namespace

CompactKernel parse_compact_kernel(std::string_view name, std::string_view what) {
  if (name == "warp") return CompactKernel::kWarp;
  if (name == "vector") return CompactKernel::kVector;
  throw ConfigError(fmt::format("{}='{}': expected warp or vector", what, name));
}

std::string_view compact_kernel_name(CompactKernel kernel) {
  return kernel == CompactKernel::kVector ? "vector" : "warp";
}

CompactKernel default_compact_kernel() {
  static const CompactKernel kernel =
      parse_compact_kernel(env::get_string("SHARDOPT_CUDA_COMPACT_KERNEL"), "SHARDOPT_CUDA_COMPACT_KERNEL");
  return kernel;
}

CompactElementwiseOptimizerCuda::CompactElementwiseOptimizerCuda(const optim::OptimizerParams& params,
                                                                 optim::StateDType state_dtype, DType grad_dtype,
                                                                 CompactKernel kernel)
    : kind_(params.kind), state_dtype_(state_dtype), grad_bf16_(grad_dtype == DType::kBF16),
      state_slots_(optim::state_values_per_element(params)), kernel_(kernel) {
  const std::string kind = optim::optimizer_kind_name(params.kind);
  if (params.kind != proto::OPTIMIZER_ADAMW && params.kind != proto::OPTIMIZER_LION &&
      params.kind != proto::OPTIMIZER_SGD)
    throw ConfigError("CompactElementwiseOptimizerCuda: expected kind adamw|lion|sgd, found " + kind);
  if (state_slots_ == 0)
    throw ConfigError("CompactElementwiseOptimizerCuda: " + kind + " without momentum keeps no state to store compact");
  if (state_dtype != proto::STATE_Q8 && state_dtype != proto::STATE_BF16)
    throw ConfigError("CompactElementwiseOptimizerCuda: state dtype must be bf16 or q8, found " +
                      optim::state_dtype_name(state_dtype));
  if (grad_dtype != DType::kF32 && grad_dtype != DType::kBF16)
    throw ConfigError("CompactElementwiseOptimizerCuda: gradient dtype must be f32 or bf16, found " +
                      std::string(dtype_name(grad_dtype)));
}

CompactElementwiseOptimizerCuda::~CompactElementwiseOptimizerCuda() {
  if (device_table_ != nullptr) cudaFree(device_table_);
}

void CompactElementwiseOptimizerCuda::set_slices(std::span<const DeviceCompactSlice> slices) {
  std::vector<detail::CompactChunk> table;
  const size_t grad_size = grad_bf16_ ? 2 : 4, value_size = state_dtype_ == proto::STATE_BF16 ? 2 : 1;
  const bool q8 = state_dtype_ == proto::STATE_Q8;
  for (size_t i = 0; i < slices.size(); ++i) {
    const DeviceCompactSlice& s = slices[i];
    if (s.count == 0) continue;
    const std::string where = fmt::format("CompactElementwiseOptimizerCuda({})::set_slices: slice {}",
                                          optim::optimizer_kind_name(kind_), i);
    if (s.param == nullptr || s.grad == nullptr)
      throw ConfigError(where + ": param and grad pointers are required, found null");
    for (int k = 0; k < state_slots_; ++k) {
      const optim::CompactState& st = s.state[k];
      if (st.dtype != state_dtype_ || st.values == nullptr || (q8 && st.absmax == nullptr))
        throw ConfigError(fmt::format("{}: state slot {}: expected {} storage with non-null buffers, found {}", where,
                                      k, optim::state_dtype_name(state_dtype_), optim::state_dtype_name(st.dtype)));
      if (q8 && st.nonnegative != optim::q8_slot_is_nonnegative(kind_, k))
        throw ConfigError(fmt::format("{}: state slot {}: the {} step stores it with the {} code", where, k,
                                      optim::optimizer_kind_name(kind_),
                                      optim::q8_slot_is_nonnegative(kind_, k) ? "unsigned" : "signed"));
    }
    for (size_t off = 0; off < s.count; off += kChunkElements) {
      detail::CompactChunk c{};
      c.param = s.param + off;
      c.grad = static_cast<const char*>(s.grad) + off * grad_size;
      c.mirror = s.param_bf16 != nullptr ? reinterpret_cast<uint16_t*>(s.param_bf16) + off : nullptr;
      for (int k = 0; k < state_slots_; ++k) {
        c.values[k] = static_cast<char*>(s.state[k].values) + off * value_size;
        c.absmax[k] = q8 ? s.state[k].absmax + off / optim::kQ8BlockElems : nullptr;
      }
      c.count = static_cast<uint32_t>(std::min(kChunkElements, s.count - off));
      table.push_back(c);
    }
  }
  // The vector kernel takes the chunks aligned for its wide accesses first, the others in a second
  // launch (the order of chunks does not matter otherwise: they are disjoint).
  const auto unaligned = std::stable_partition(table.begin(), table.end(), [&](const detail::CompactChunk& c) {
    return detail::compact_chunk_run_aligned(c, state_slots_, static_cast<uint32_t>(value_size),
                                             static_cast<uint32_t>(grad_size));
  });
  aligned_chunk_count_ = static_cast<size_t>(unaligned - table.begin());
  upload_table(&device_table_, &table_bytes_, table.data(), table.size() * sizeof(detail::CompactChunk));
  chunk_count_ = table.size();
  log::debug("CompactElementwiseOptimizerCuda({}): {} kernel; {} of {} chunks aligned for the vector kernel",
             optim::optimizer_kind_name(kind_), compact_kernel_name(kernel_), aligned_chunk_count_, chunk_count_);
}

void CompactElementwiseOptimizerCuda::step(const optim::OptimizerParams& params, float lr, int64_t step,
                                           cudaStream_t stream) {
  if (params.kind != kind_)
    throw ConfigError("CompactElementwiseOptimizerCuda: built for " + optim::optimizer_kind_name(kind_) +
                      ", stepped with " + optim::optimizer_kind_name(params.kind));
  // The CPU step's own prologue: same checks, same constants (rounded from double the same way).
  optim::detail::PreparedStep p;
  optim::detail::prepare_elementwise_step(params, {}, lr, step, optim::FiniteCheck::kNone, false, p);
  detail::CompactScalars s{};
  switch (kind_) {
    case proto::OPTIMIZER_ADAMW:
      s.beta1 = p.adam.beta1;
      s.one_minus_beta1 = p.adam.one_minus_beta1;
      s.beta2 = p.adam.beta2;
      s.one_minus_beta2 = p.adam.one_minus_beta2;
      s.decay = p.adam.decay;
      s.step_size = p.adam.step_size;
      s.inv_sqrt_bias2 = p.adam.inv_sqrt_bias2;
      s.eps = p.adam.eps;
      break;
    case proto::OPTIMIZER_LION:
      s.beta1 = p.lion.beta1;
      s.one_minus_beta1 = p.lion.one_minus_beta1;
      s.beta2 = p.lion.beta2;
      s.one_minus_beta2 = p.lion.one_minus_beta2;
      s.decay = p.lion.decay;
      s.lr = p.lion.lr;
      break;
    default: {
      if (!p.sgd.has_momentum)
        throw ConfigError("CompactElementwiseOptimizerCuda: sgd stepped with momentum 0 (no state to update)");
      const optim::detail::SgdMomentumTerms t = optim::detail::sgd_momentum_terms(p.sgd);
      s.lr = p.sgd.lr;
      s.weight_decay = p.sgd.weight_decay;
      s.momentum = p.sgd.momentum;
      s.keep = t.keep;
      s.take = t.take;
      s.nesterov = t.nesterov;
      break;
    }
  }
  detail::launch_compact_elementwise(kernel_ == CompactKernel::kVector, kernel_kind(kind_),
                                     state_dtype_ == proto::STATE_Q8, grad_bf16_,
                                     static_cast<const detail::CompactChunk*>(device_table_),
                                     static_cast<int>(chunk_count_), static_cast<int>(aligned_chunk_count_), s,
                                     stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

CompactCodecCuda::~CompactCodecCuda() {
  if (device_table_ != nullptr) cudaFree(device_table_);
}

void CompactCodecCuda::set_arrays(std::span<const DeviceCompactArray> arrays) {
  std::vector<detail::CompactCodecChunk> table;
  bool first = true;
  for (size_t i = 0; i < arrays.size(); ++i) {
    const DeviceCompactArray& a = arrays[i];
    const std::string where = fmt::format("CompactCodecCuda::set_arrays: array {}", i);
    const optim::StateDType dtype = a.state.dtype;
    if (dtype != proto::STATE_Q8 && dtype != proto::STATE_BF16)
      throw ConfigError(where + ": state dtype must be bf16 or q8, found " + optim::state_dtype_name(dtype));
    if (!first && (dtype == proto::STATE_Q8) != q8_)
      throw ConfigError(where + ": every array of one codec has the same state dtype");
    first = false;
    q8_ = dtype == proto::STATE_Q8;
    if (a.count == 0) continue;
    if (a.state.values == nullptr || a.f32 == nullptr || (q8_ && a.state.absmax == nullptr))
      throw ConfigError(where + ": values, absmax (q8) and f32 must be non-null");
    if (q8_ && a.state.nonnegative) throw ConfigError(where + ": expected the signed q8 code (a momentum)");
    const size_t value_size = q8_ ? 1 : 2;
    for (size_t off = 0; off < a.count; off += CompactElementwiseOptimizerCuda::kChunkElements) {
      detail::CompactCodecChunk c{};
      c.values = static_cast<char*>(a.state.values) + off * value_size;
      c.absmax = q8_ ? a.state.absmax + off / optim::kQ8BlockElems : nullptr;
      c.f32 = a.f32 + off;
      c.count = static_cast<uint32_t>(std::min(CompactElementwiseOptimizerCuda::kChunkElements, a.count - off));
      table.push_back(c);
    }
  }
  const uint32_t value_bytes = q8_ ? 1 : 2;
  const auto unaligned = std::stable_partition(table.begin(), table.end(), [&](const detail::CompactCodecChunk& c) {
    return detail::compact_codec_chunk_run_aligned(c, value_bytes);
  });
  aligned_chunk_count_ = static_cast<size_t>(unaligned - table.begin());
  upload_table(&device_table_, &table_bytes_, table.data(), table.size() * sizeof(detail::CompactCodecChunk));
  chunk_count_ = table.size();
}

void CompactCodecCuda::decode(cudaStream_t stream) const {
  detail::launch_compact_codec(kernel_ == CompactKernel::kVector, false, q8_,
                               static_cast<const detail::CompactCodecChunk*>(device_table_),
                               static_cast<int>(chunk_count_), static_cast<int>(aligned_chunk_count_), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void CompactCodecCuda::encode(cudaStream_t stream) const {
  detail::launch_compact_codec(kernel_ == CompactKernel::kVector, true, q8_,
                               static_cast<const detail::CompactCodecChunk*>(device_table_),
                               static_cast<int>(chunk_count_), static_cast<int>(aligned_chunk_count_), stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

}  // namespace shardopt::cuda
