// Fused element-wise optimizers on the GPU (AdamW, Lion, SGD with momentum / Nesterov).
//
// One launch updates many slices: the slices (fp32 master params, gradient, fp32 state, optional
// bf16 param mirror) are cut into chunks whose (pointers, count) table lives on the device. The
// table is built and uploaded once, when the slices are set (buffers are allocated once per
// plan), so a step is one kernel launch with no host-to-device copy and no allocation.
//
// Formulas: docs/algorithms.md, "Element-wise optimizers". Step t starts at 1.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/dtype.h"

namespace shardopt::cuda {

struct AdamWHyper {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;  // decoupled: W ← W(1 − ηλ) − ...
};

struct LionHyper {
  float lr = 1e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float weight_decay = 0.0f;  // decoupled
};

// As torch.optim.SGD: weight decay is added to the gradient; the momentum buffer starts as the
// (decayed) gradient at the first step; Nesterov needs momentum > 0 and dampening 0.
struct SgdHyper {
  float lr = 1e-2f;
  float momentum = 0.0f;
  float dampening = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

enum class ElementwiseAlgorithm { kAdamW, kLion, kSgd };

// One contiguous range of a parameter on the device. All pointers are device pointers.
struct DeviceSlice {
  float* param = nullptr;        // fp32 master, updated in place
  const void* grad = nullptr;    // fp32 or bf16 (the optimizer's grad dtype)
  float* exp_avg = nullptr;      // AdamW m / Lion m / SGD momentum buffer (null only for SGD, momentum 0)
  float* exp_avg_sq = nullptr;   // AdamW v; null for Lion and SGD
  bf16* param_bf16 = nullptr;    // optional bf16 copy of the updated param, written in the same pass
  size_t count = 0;
};

class ElementwiseOptimizerCuda {
 public:
  // grad_dtype: F32 or BF16 (all slices share it). Throws ConfigError for anything else.
  ElementwiseOptimizerCuda(ElementwiseAlgorithm algorithm, DType grad_dtype);
  ~ElementwiseOptimizerCuda();
  ElementwiseOptimizerCuda(const ElementwiseOptimizerCuda&) = delete;
  ElementwiseOptimizerCuda& operator=(const ElementwiseOptimizerCuda&) = delete;

  // Builds the chunk table and uploads it (blocking). Validates the slices: ConfigError names
  // the slice index and the missing pointer.
  void set_slices(std::span<const DeviceSlice> slices);

  // One step on `stream`. t = step number, starting at 1 (bias correction, SGD's first step).
  void step(const AdamWHyper& hyper, int64_t t, cudaStream_t stream);
  void step(const LionHyper& hyper, int64_t t, cudaStream_t stream);
  void step(const SgdHyper& hyper, int64_t t, cudaStream_t stream);

  // Adds the number of NaN/Inf gradient elements over all slices to *device_count (a device
  // counter the caller zeroes), asynchronously on `stream`.
  void count_nonfinite_grads(unsigned long long* device_count, cudaStream_t stream) const;

  size_t chunk_count() const { return chunk_count_; }
  size_t element_count() const { return element_count_; }
  // Elements per chunk (one thread block each).
  static constexpr size_t kChunkElements = 16384;

 private:
  void check_algorithm(ElementwiseAlgorithm expected, int64_t t) const;

  ElementwiseAlgorithm algorithm_;
  bool grad_bf16_;
  void* device_table_ = nullptr;
  size_t table_bytes_ = 0;  // capacity of device_table_
  size_t chunk_count_ = 0;
  size_t element_count_ = 0;
  bool any_slice_without_momentum_ = false;
};

// Adds the number of NaN/Inf elements of data[0..n) (F32 or BF16) to *device_count, on `stream`.
void count_nonfinite(const void* data, size_t n, DType dtype, unsigned long long* device_count, cudaStream_t stream);

}  // namespace shardopt::cuda
