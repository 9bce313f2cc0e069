#include "optim/cuda/elementwise.h"

#include <cmath>
#include <string>

#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/kernels.h"

namespace shardopt::cuda {
namespace {

const char* algorithm_name(ElementwiseAlgorithm a) {
  switch (a) {
    case ElementwiseAlgorithm::kAdamW: return "adamw";
    case ElementwiseAlgorithm::kLion: return "lion";
    case ElementwiseAlgorithm::kSgd: return "sgd";
  }
  return "?";
}

bool grad_is_bf16(DType dtype, const char* where) {
  if (dtype == DType::kF32) return false;
  if (dtype == DType::kBF16) return true;
  throw ConfigError(std::string(where) + ": gradient dtype must be f32 or bf16, got " +
                    std::string(dtype_name(dtype)));
}

}  // namespace

ElementwiseOptimizerCuda::ElementwiseOptimizerCuda(ElementwiseAlgorithm algorithm, DType grad_dtype)
    : algorithm_(algorithm), grad_bf16_(grad_is_bf16(grad_dtype, "ElementwiseOptimizerCuda")) {}

ElementwiseOptimizerCuda::~ElementwiseOptimizerCuda() {
  if (device_table_ != nullptr) cudaFree(device_table_);
}

void ElementwiseOptimizerCuda::set_slices(std::span<const DeviceSlice> slices) {
  std::vector<detail::DeviceChunk> table;
  size_t elements = 0;
  bool any_without_momentum = false;
  for (size_t i = 0; i < slices.size(); ++i) {
    const DeviceSlice& s = slices[i];
    const std::string where = std::string("ElementwiseOptimizerCuda(") + algorithm_name(algorithm_) +
                              ")::set_slices: slice " + std::to_string(i);
    if (s.count == 0) continue;
    if (s.param == nullptr || s.grad == nullptr)
      throw ConfigError(where + ": param and grad pointers are required, found null");
    if (algorithm_ != ElementwiseAlgorithm::kSgd && s.exp_avg == nullptr)
      throw ConfigError(where + ": exp_avg (first moment) is required, found null");
    if (algorithm_ == ElementwiseAlgorithm::kAdamW && s.exp_avg_sq == nullptr)
      throw ConfigError(where + ": exp_avg_sq (second moment) is required for AdamW, found null");
    any_without_momentum |= s.exp_avg == nullptr;
    const size_t grad_size = grad_bf16_ ? 2 : 4;
    for (size_t off = 0; off < s.count; off += kChunkElements) {
      const size_t n = std::min(kChunkElements, s.count - off);
      detail::DeviceChunk c{};
      c.param = s.param + off;
      c.grad = static_cast<const char*>(s.grad) + off * grad_size;
      c.state0 = s.exp_avg != nullptr ? s.exp_avg + off : nullptr;
      c.state1 = s.exp_avg_sq != nullptr ? s.exp_avg_sq + off : nullptr;
      c.mirror = s.param_bf16 != nullptr ? reinterpret_cast<uint16_t*>(s.param_bf16) + off : nullptr;
      c.count = static_cast<uint32_t>(n);
      table.push_back(c);
    }
    elements += s.count;
  }
  upload_table(&device_table_, &table_bytes_, table.data(), table.size() * sizeof(detail::DeviceChunk));
  chunk_count_ = table.size();
  element_count_ = elements;
  any_slice_without_momentum_ = any_without_momentum;
}

void ElementwiseOptimizerCuda::check_algorithm(ElementwiseAlgorithm expected, int64_t t) const {
  if (algorithm_ != expected)
    throw ConfigError(std::string("ElementwiseOptimizerCuda::step: hyperparameters for ") +
                      algorithm_name(expected) + " given to an optimizer built for " + algorithm_name(algorithm_));
  if (t < 1) throw ConfigError("ElementwiseOptimizerCuda::step: step t must be >= 1, got " + std::to_string(t));
}

void ElementwiseOptimizerCuda::step(const AdamWHyper& h, int64_t t, cudaStream_t stream) {
  check_algorithm(ElementwiseAlgorithm::kAdamW, t);
  detail::ElementwiseScalars s{};
  s.lr = h.lr;
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.decay = static_cast<float>(1.0 - double(h.lr) * h.weight_decay);
  s.bias_correction1 = static_cast<float>(1.0 - std::pow(double(h.beta1), double(t)));
  s.bias_correction2 = static_cast<float>(1.0 - std::pow(double(h.beta2), double(t)));
  detail::launch_elementwise(detail::ElementwiseKind::kAdamW, grad_bf16_,
                             static_cast<const detail::DeviceChunk*>(device_table_), int(chunk_count_), s, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void ElementwiseOptimizerCuda::step(const LionHyper& h, int64_t t, cudaStream_t stream) {
  check_algorithm(ElementwiseAlgorithm::kLion, t);
  detail::ElementwiseScalars s{};
  s.lr = h.lr;
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.decay = static_cast<float>(1.0 - double(h.lr) * h.weight_decay);
  detail::launch_elementwise(detail::ElementwiseKind::kLion, grad_bf16_,
                             static_cast<const detail::DeviceChunk*>(device_table_), int(chunk_count_), s, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void ElementwiseOptimizerCuda::step(const SgdHyper& h, int64_t t, cudaStream_t stream) {
  check_algorithm(ElementwiseAlgorithm::kSgd, t);
  if (h.nesterov && (h.momentum <= 0.0f || h.dampening != 0.0f))
    throw ConfigError("SgdHyper: Nesterov momentum requires momentum > 0 and dampening 0, got momentum " +
                      std::to_string(h.momentum) + ", dampening " + std::to_string(h.dampening));
  if (h.momentum != 0.0f && any_slice_without_momentum_)
    throw ConfigError("SgdHyper: momentum " + std::to_string(h.momentum) +
                      " needs a momentum buffer (exp_avg) on every slice, but a slice has none");
  detail::ElementwiseScalars s{};
  s.lr = h.lr;
  s.beta1 = h.momentum;
  s.beta2 = h.dampening;
  s.decay = 1.0f;
  s.coupled_wd = h.weight_decay;
  s.first_step = t == 1;
  s.nesterov = h.nesterov;
  detail::launch_elementwise(detail::ElementwiseKind::kSgd, grad_bf16_,
                             static_cast<const detail::DeviceChunk*>(device_table_), int(chunk_count_), s, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void ElementwiseOptimizerCuda::count_nonfinite_grads(unsigned long long* device_count, cudaStream_t stream) const {
  detail::launch_count_nonfinite_chunks(grad_bf16_, static_cast<const detail::DeviceChunk*>(device_table_),
                                        int(chunk_count_), device_count, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

void count_nonfinite(const void* data, size_t n, DType dtype, unsigned long long* device_count, cudaStream_t stream) {
  detail::launch_count_nonfinite(data, grad_is_bf16(dtype, "count_nonfinite"), n, device_count, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
}

}  // namespace shardopt::cuda
