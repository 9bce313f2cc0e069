// Newton–Schulz orthogonalization (Muon's NS5) on the GPU with cuBLAS: bf16 operands, fp32
// accumulation, batched over same-shaped matrices with strided-batched GEMMs.
//
// Semantics (docs/algorithms.md, "Newton–Schulz orthogonalization"): X = bf16(U); X ← X / max(‖X‖_F, eps);
// iterate on the wide orientation (p = min(m,n) rows): A = X·Xᵀ, B = b·A + c·A·A, X = a·X + B·X.
// No transpose is ever materialized: a row-major m×n buffer is, to column-major cuBLAS, the wide
// matrix Xᵀ (m ≤ n) or the wide matrix X itself (m > n); only the GEMM operand flags differ.
// Each iteration is three GEMMs (X·Xᵀ, c·A·A, B·X) plus one p×p element-wise pass that forms
// B + a·I (so a·X + B·X = (aI + B)·X needs no copy of X): NsCombine::kKernel, the default.
// NsCombine::kGemmEpilogue (an option) drops that pass: the last two products are cuBLASLt GEMMs
// whose epilogue adds a second input that is not the output (D = α·op(A)·op(B) + β·C, C ≠ D),
// B = c·A·A + b·A and X' = B·X + a·X, so b·A and a·X are read inside the GEMMs. It saves a p×p
// read-modify-write per iteration and a launch (3-10% of an iteration's time on the shapes of
// docs/benchmarks.md, by their bandwidth) and rounds B once instead of twice.
// Symmetric products (an option, off by default): A = X·Xᵀ and A·A are symmetric, so with k
// blocks of p/k rows only the k(k+1)/2 blocks on and below the block diagonal need computing, and
// a p×p pass fills the rest; X·Xᵀ and A·A then cost (k+1)/2k of the full products (k = 2: 75%,
// k = 4: 62.5%). The blocks of one diagonal (offset d) are one strided-batched GEMM (k calls per
// product and matrix). Whether that beats one full GEMM depends on the shape; docs/benchmarks.md
// has the H200 measurements, and full GEMMs stay the default.
// Workspace (2 X-sized + 2 p×p bf16 buffers per matrix) is allocated once, in the constructor.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "base/dtype.h"

namespace shardopt::cuda {

struct NsCoefficients {
  float a, b, c;
};

// How an iteration adds b·A and a·X (see above).
enum class NsCombine { kKernel, kGemmEpilogue };

// "kernel" / "epilogue" (SHARDOPT_CUDA_NS_COMBINE); ConfigError naming `source` otherwise.
NsCombine parse_ns_combine(const std::string& name, const char* source);

struct NsOptions {
  // One (a, b, c) triple per iteration; the default is 5 × (3.4445, −4.7750, 2.0315).
  std::vector<NsCoefficients> coefficients = std::vector<NsCoefficients>(5, NsCoefficients{3.4445f, -4.7750f, 2.0315f});
  float eps = 1e-7f;  // the Frobenius norm is clamped at eps before dividing
  // Blocks k of the symmetric products: 1 = full GEMMs; k > 1 must divide p = min(rows, cols).
  int symmetric_blocks = 1;
  // kGemmEpilogue needs full GEMMs (symmetric_blocks = 1).
  NsCombine combine = NsCombine::kKernel;
};

class NewtonSchulzCuda {
 public:
  // Workspace for up to max_batch matrices of rows×cols (row-major). Needs a device; throws
  // DeviceError if there is none, ConfigError for empty shapes or a batch < 1.
  NewtonSchulzCuda(int64_t rows, int64_t cols, int64_t max_batch, NsOptions options = {});
  ~NewtonSchulzCuda();
  NewtonSchulzCuda(const NewtonSchulzCuda&) = delete;
  NewtonSchulzCuda& operator=(const NewtonSchulzCuda&) = delete;

  // Orthogonalizes `batch` row-major matrices stored back to back at `input` (F32 or BF16) and
  // writes the bf16 results in the same layout to `output` (may alias a bf16 input).
  void orthogonalize(const void* input, DType input_dtype, bf16* output, int64_t batch, cudaStream_t stream);

  // For fused callers (Muon): the bf16 X buffer they fill, the per-matrix Σx² (zeroed by
  // begin_prepared), then run_prepared normalizes and iterates; returns where the result is.
  uint16_t* prepared_input() { return x_[0]; }
  float* prepared_sumsq() { return sumsq_; }
  void begin_prepared(int64_t batch, cudaStream_t stream);
  const uint16_t* run_prepared(int64_t batch, cudaStream_t stream, uint16_t* final_output = nullptr);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t max_batch() const { return max_batch_; }
  const NsOptions& options() const { return options_; }
  // FLOPs of one matrix with plain GEMMs: steps·(4p²q + 2p³) (the conventional count; rates quoted
  // against it show the symmetric products' savings as speed).
  double plain_gemm_flops() const;
  // The k in use (1: full GEMMs).
  int symmetric_blocks() const { return blocks_; }
  // Device memory of the workspace (X twice, A, B, the norms, cuBLAS's workspace).
  size_t device_bytes() const { return device_bytes_; }

 private:
  void check_batch(int64_t batch, const char* where) const;
  void release();
  // kGemmEpilogue: one cuBLASLt product of the iteration, D = α·op(A)·op(B) + β·C over the batch;
  // its descriptors and algorithm are made on first use per (product, batch, operand alignment) and kept.
  enum class LtProduct { kBFromA, kNextX };
  struct LtPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, cd = nullptr;  // C and D share one layout
    cublasLtMatmulAlgo_t algo{};
  };
  const LtPlan& lt_plan(LtProduct product, int batch, uint32_t alignment);
  void lt_matmul(LtProduct product, int batch, float alpha, const uint16_t* a, const uint16_t* b, float beta,
                 const uint16_t* c, uint16_t* d, cudaStream_t stream);

  int64_t rows_, cols_, max_batch_, p_, q_;
  NsOptions options_;
  int blocks_ = 1;
  cublasHandle_t handle_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;  // kGemmEpilogue only
  std::map<std::tuple<LtProduct, int, uint32_t>, LtPlan> lt_plans_;  // (product, batch, alignment)
  uint16_t* x_[2] = {nullptr, nullptr};
  uint16_t* a_ = nullptr;
  uint16_t* b_ = nullptr;
  float* sumsq_ = nullptr;
  void* cublas_workspace_ = nullptr;
  size_t device_bytes_ = 0;
};

}  // namespace shardopt::cuda
