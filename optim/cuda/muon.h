// The full Muon update on the GPU for a batch of same-shaped matrices (one owner rank's work):
// momentum, Nesterov, NS orthogonalization (NewtonSchulzCuda), shape scale and decoupled weight
// decay, optional bf16 param mirror. Formulas: docs/algorithms.md, "Muon":
//   averaged: M ← μM + (1−μ)G; U = Nesterov ? (1−μ)G + μM : M
//   summed:   M ← μM + G;      U = Nesterov ? G + μM : M
//   W ← W·(1 − ηλ) − η·s(m,n)·NS(U)
// Three passes over memory besides the GEMMs: momentum (writes bf16 U and Σu²), normalize, apply.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "base/dtype.h"
#include "optim/cuda/kernels.h"
#include "optim/cuda/newton_schulz.h"

namespace shardopt::cuda {

enum class MomentumConvention { kAveraged, kSummed };
enum class ShapeScale { kOriginal, kMatchRmsAdamW, kSpectral };

struct MuonHyper {
  float lr = 1e-3f;
  float weight_decay = 0.1f;
  float momentum = 0.95f;
  bool nesterov = true;
  MomentumConvention convention = MomentumConvention::kAveraged;
  ShapeScale shape_scale = ShapeScale::kOriginal;
  // NorMuon (the table step only): rows of the NS output normalized by their second moment
  // (beta2, eps), then rescaled to the output's Frobenius norm; each MatrixRefs names its row moments.
  bool normuon = false;
  float normuon_beta2 = 0.95f;
  float normuon_eps = 1e-10f;
};

// s(m, n) for an m×n (rows×cols) matrix: original √max(1, m/n); match_rms_adamw 0.2·√max(m,n);
// spectral √(m/n).
double muon_shape_scale(ShapeScale scale, int64_t rows, int64_t cols);

class MuonCuda {
 public:
  MuonCuda(int64_t rows, int64_t cols, int64_t max_batch, NsOptions ns_options = {});
  ~MuonCuda();
  MuonCuda(const MuonCuda&) = delete;
  MuonCuda& operator=(const MuonCuda&) = delete;

  // `batch` row-major rows×cols matrices back to back in each buffer (device pointers):
  // param fp32 (in place), grad F32 or BF16, momentum fp32 (in place), param_bf16 optional.
  void step(float* param, const void* grad, DType grad_dtype, float* momentum, bf16* param_bf16, int64_t batch,
            const MuonHyper& hyper, cudaStream_t stream);

  // The same step on `batch` matrices that live anywhere (an owner rank's matrices in its shard
  // buffers): `device_refs` is a device array of `batch` refs, built once by the caller. The NS runs
  // on the whole batch at once (strided-batched GEMMs on the workspace); nothing is gathered.
  using MatrixRefs = detail::MuonMatrixRefs;
  void step(const MatrixRefs* device_refs, DType grad_dtype, int64_t batch, const MuonHyper& hyper,
            cudaStream_t stream);

  NewtonSchulzCuda& newton_schulz() { return ns_; }
  // Device memory of its workspaces (the NS workspace and NorMuon's row buffers).
  size_t device_bytes() const;

 private:
  NewtonSchulzCuda ns_;
  float* row_scale_ = nullptr;     // NorMuon: r_i of every row of a batch
  double* norm_sums_ = nullptr;    // NorMuon: per matrix Σ s_i and Σ r_i² s_i
  int64_t rows_ = 0, max_batch_ = 0;
};

}  // namespace shardopt::cuda
