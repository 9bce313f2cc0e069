// Internal launchers for the CUDA kernels of optim/cuda (kernels.cu). Plain types only, so that
// host code compiled by the C++ compiler can call them. Not a public API: use elementwise.h,
// newton_schulz.h and muon.h.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace shardopt::cuda::detail {

// One piece of one slice: pointers already offset to the chunk's first element.
struct DeviceChunk {
  float* param;          // fp32 master
  const void* grad;      // fp32 or bf16 (see grad_bf16)
  float* state0;         // AdamW m, Lion m, SGD momentum buffer (may be null for SGD without momentum)
  float* state1;         // AdamW v (null otherwise)
  uint16_t* mirror;      // bf16 copy of the param written in the same pass, or null
  uint32_t count;        // elements in this chunk
  uint32_t reserved;
};

enum class ElementwiseKind : int { kAdamW = 0, kLion = 1, kSgd = 2 };

// Per-step scalars, computed on the host (bias corrections in double, then rounded).
struct ElementwiseScalars {
  float lr;
  float beta1;           // AdamW β₁, Lion β₁, SGD momentum μ
  float beta2;           // AdamW β₂, Lion β₂, SGD dampening
  float eps;             // AdamW ε
  float decay;           // 1 − η·λ (decoupled; AdamW, Lion); 1 for SGD
  float coupled_wd;      // SGD's λ added to the gradient (torch.optim.SGD); 0 otherwise
  float bias_correction1;  // 1 − β₁ᵗ
  float bias_correction2;  // 1 − β₂ᵗ
  int first_step;        // SGD: the momentum buffer starts as the gradient
  int nesterov;          // SGD
};

void launch_elementwise(ElementwiseKind kind, bool grad_bf16, const DeviceChunk* chunks, int chunk_count,
                        const ElementwiseScalars& s, cudaStream_t stream);
// Adds the number of non-finite gradient elements over all chunks to *count.
void launch_count_nonfinite_chunks(bool grad_bf16, const DeviceChunk* chunks, int chunk_count,
                                   unsigned long long* count, cudaStream_t stream);
void launch_count_nonfinite(const void* data, bool bf16, size_t n, unsigned long long* count, cudaStream_t stream);

// Newton–Schulz helpers. `per_matrix` elements per matrix, `batch` matrices back to back.
// to_bf16_sumsq: x[i] = bf16(in[i]); sumsq[b] += Σ x² (fp32 atomics; sumsq must be zeroed).
void launch_to_bf16_sumsq(const void* in, bool in_bf16, uint16_t* x, float* sumsq, size_t per_matrix, int batch,
                          cudaStream_t stream);
// x[i] = bf16(x[i] / max(sqrt(sumsq[b]), eps)).
void launch_normalize(uint16_t* x, const float* sumsq, float eps, size_t per_matrix, int batch, cudaStream_t stream);
// b_buf = b_buf + b·a_buf + a·I over symmetric p×p matrices (b_buf holds c·A·A on entry, in the
// blocks of `block` rows on and below the block diagonal; block = p: all of it); b_buf is whole after.
void launch_ns_combine(uint16_t* b_buf, const uint16_t* a_buf, float a, float b, int p, int block, int batch,
                       cudaStream_t stream);
// Symmetric p×p matrices whose blocks on and below the block diagonal are computed: fills the rest.
void launch_mirror_lower_blocks(uint16_t* a_buf, int p, int block, int batch, cudaStream_t stream);

// Muon: momentum update, update U written as bf16 into x with Σx² per matrix into sumsq.
struct MuonScalars {
  float momentum;
  int averaged;   // 1: M ← μM + (1−μ)G; 0: M ← μM + G
  int nesterov;
};
// One matrix of a Muon batch wherever it lives (device pointers): grad (F32 or BF16, read from
// element grad_offset), momentum and param fp32 (in place), mirror bf16 (optional), NorMuon's
// per-row second moment (in place).
struct MuonMatrixRefs {
  const void* grad;
  float* momentum;
  float* param;
  uint16_t* mirror;
  size_t grad_offset;
  float* row_moment;  // NorMuon: the matrix's per-row second moment (rows values); else null
};
// Matrices back to back in each buffer, or named by a device array of `batch` MuonMatrixRefs.
void launch_muon_momentum(const void* grad, bool grad_bf16, float* momentum, uint16_t* x, float* sumsq,
                          const MuonScalars& s, size_t per_matrix, int batch, cudaStream_t stream);
void launch_muon_momentum(const MuonMatrixRefs* refs, bool grad_bf16, uint16_t* x, float* sumsq, const MuonScalars& s,
                          size_t per_matrix, int batch, cudaStream_t stream);
// W ← W·decay − step·O (+ bf16 mirror), O the batch's NS outputs back to back.
void launch_muon_apply(float* param, uint16_t* mirror, const uint16_t* ortho, float decay, float step,
                       size_t per_matrix, int batch, cudaStream_t stream);
void launch_muon_apply(const MuonMatrixRefs* refs, const uint16_t* ortho, float decay, float step, size_t per_matrix,
                       int batch, cudaStream_t stream);
// NorMuon (docs/algorithms.md), per matrix of `rows`×`cols` with NS output O: s_i = Σ_j O_ij²,
// v_i ← β₂v_i + (1−β₂)s_i/cols, r_i = 1/(√v_i + eps); sums[2m] += Σ s_i, sums[2m+1] += Σ r_i² s_i
// (fp64; zero them first); r holds r_i (batch·rows floats). Then apply:
// W ← W·decay − step·√(sums[2m]/sums[2m+1])·r_i·O_ij (0 when the second sum is 0).
void launch_normuon_rows(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols, float beta2,
                         float eps, float* r, double* sums, int batch, cudaStream_t stream);
void launch_normuon_apply(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols, float decay,
                          float step, const float* r, const double* sums, int batch, cudaStream_t stream);

}  // namespace shardopt::cuda::detail
