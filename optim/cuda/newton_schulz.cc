#include "optim/cuda/newton_schulz.h"

#include <string>

#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/kernels.h"

namespace shardopt::cuda {
namespace {
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper
}  // namespace

NsCombine parse_ns_combine(const std::string& name, const char* source) {
  if (name == "kernel") return NsCombine::kKernel;
  if (name == "epilogue") return NsCombine::kGemmEpilogue;
  throw ConfigError(std::string(source) + "='" + name + "': expected kernel or epilogue");
}

NewtonSchulzCuda::NewtonSchulzCuda(int64_t rows, int64_t cols, int64_t max_batch, NsOptions options)
    : rows_(rows), cols_(cols), max_batch_(max_batch), options_(std::move(options)) {
  if (rows < 1 || cols < 1 || max_batch < 1)
    throw ConfigError("NewtonSchulzCuda: expected rows, cols, max_batch >= 1, got " + std::to_string(rows) + "x" +
                      std::to_string(cols) + " batch " + std::to_string(max_batch));
  if (!(options_.eps > 0.0f))
    throw ConfigError("NewtonSchulzCuda: eps must be > 0, got " + std::to_string(options_.eps));
  p_ = std::min(rows, cols);
  q_ = std::max(rows, cols);
  blocks_ = options_.symmetric_blocks;
  if (blocks_ < 1 || p_ % blocks_ != 0)
    throw ConfigError("NewtonSchulzCuda: symmetric_blocks must be a divisor of min(rows, cols) = " +
                      std::to_string(p_) + ", got " + std::to_string(options_.symmetric_blocks));
  if (options_.combine == NsCombine::kGemmEpilogue && blocks_ != 1)
    throw ConfigError("NewtonSchulzCuda: the GEMM-epilogue combine needs full GEMMs (symmetric_blocks = 1), got " +
                      std::to_string(blocks_));
  const size_t x_elems = size_t(max_batch) * size_t(p_) * size_t(q_);
  const size_t pp_elems = size_t(max_batch) * size_t(p_) * size_t(p_);
  try {
    SHARDOPT_CUBLAS_CHECK(cublasCreate(&handle_));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&x_[0], x_elems * 2));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&x_[1], x_elems * 2));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&a_, pp_elems * 2));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&b_, pp_elems * 2));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&sumsq_, size_t(max_batch) * sizeof(float)));
    SHARDOPT_CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
    SHARDOPT_CUBLAS_CHECK(cublasSetWorkspace(handle_, cublas_workspace_, kCublasWorkspaceBytes));
    if (options_.combine == NsCombine::kGemmEpilogue) SHARDOPT_CUBLAS_CHECK(cublasLtCreate(&lt_));
    device_bytes_ = 2 * (x_elems * 2) + 2 * (pp_elems * 2) + size_t(max_batch) * sizeof(float) + kCublasWorkspaceBytes;
  } catch (...) {
    release();
    throw;
  }
}

NewtonSchulzCuda::~NewtonSchulzCuda() { release(); }

void NewtonSchulzCuda::release() {
  for (void* ptr : {static_cast<void*>(x_[0]), static_cast<void*>(x_[1]), static_cast<void*>(a_),
                    static_cast<void*>(b_), static_cast<void*>(sumsq_), cublas_workspace_})
    if (ptr != nullptr) cudaFree(ptr);
  x_[0] = x_[1] = a_ = b_ = nullptr;
  sumsq_ = nullptr;
  cublas_workspace_ = nullptr;
  for (auto& [key, plan] : lt_plans_) {
    for (cublasLtMatrixLayout_t layout : {plan.a, plan.b, plan.cd})
      if (layout != nullptr) cublasLtMatrixLayoutDestroy(layout);
    if (plan.op != nullptr) cublasLtMatmulDescDestroy(plan.op);
  }
  lt_plans_.clear();
  if (lt_ != nullptr) cublasLtDestroy(lt_);
  lt_ = nullptr;
  if (handle_ != nullptr) cublasDestroy(handle_);
  handle_ = nullptr;
}

const NewtonSchulzCuda::LtPlan& NewtonSchulzCuda::lt_plan(LtProduct product, int batch, uint32_t alignment) {
  auto found = lt_plans_.find({product, batch, alignment});
  if (found != lt_plans_.end()) return found->second;
  LtPlan& plan = lt_plans_[{product, batch, alignment}];  // destroyed by release() even if this throws
  const uint64_t p = uint64_t(p_), q = uint64_t(q_);
  const int64_t x_per = int64_t(p_) * q_, pp = int64_t(p_) * p_;
  const bool wide = rows_ <= cols_;
  auto layout = [&](cublasLtMatrixLayout_t* l, uint64_t rows, uint64_t cols, int64_t stride) {
    SHARDOPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(l, CUDA_R_16BF, rows, cols, int64_t(rows)));
    SHARDOPT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
    SHARDOPT_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  };
  // Column-major operands as in run_prepared: the wide X buffer is Xᵀ (q×p), the tall one X (p×q).
  cublasOperation_t op_b = CUBLAS_OP_N;
  if (product == LtProduct::kBFromA) {  // B = c·A·A + b·A
    layout(&plan.a, p, p, pp);
    layout(&plan.b, p, p, pp);
    layout(&plan.cd, p, p, pp);
  } else if (wide) {  // X'ᵀ = Xᵀ·Bᵀ + a·Xᵀ
    layout(&plan.a, q, p, x_per);
    layout(&plan.b, p, p, pp);
    op_b = CUBLAS_OP_T;
    layout(&plan.cd, q, p, x_per);
  } else {  // X' = B·X + a·X
    layout(&plan.a, p, p, pp);
    layout(&plan.b, p, q, x_per);
    layout(&plan.cd, p, q, x_per);
  }
  SHARDOPT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = CUBLAS_OP_N;
  SHARDOPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  SHARDOPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  cublasLtMatmulPreference_t preference = nullptr;
  SHARDOPT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
  const size_t workspace = kCublasWorkspaceBytes;
  cublasLtMatmulHeuristicResult_t result{};
  int found_algos = 0;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                               &workspace, sizeof(workspace));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(preference, attr, &alignment, sizeof(alignment));
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulAlgoGetHeuristic(lt_, plan.op, plan.a, plan.b, plan.cd, plan.cd, preference, 1, &result,
                                            &found_algos);
  cublasLtMatmulPreferenceDestroy(preference);
  SHARDOPT_CUBLAS_CHECK(status);
  if (found_algos == 0)
    throw DeviceError("NewtonSchulzCuda: cuBLASLt has no algorithm for the " +
                      std::string(product == LtProduct::kBFromA ? "c·A·A + b·A" : "B·X + a·X") + " product of " +
                      std::to_string(rows_) + "x" + std::to_string(cols_) + " batch " + std::to_string(batch));
  plan.algo = result.algo;
  return plan;
}

void NewtonSchulzCuda::lt_matmul(LtProduct product, int batch, float alpha, const uint16_t* a, const uint16_t* b,
                                 float beta, const uint16_t* c, uint16_t* d, cudaStream_t stream) {
  // cuBLASLt's algorithms assume 256-byte aligned operands unless told less: the alignment every
  // batch member of every operand has (pointers, leading dimensions and batch strides in bytes).
  uint64_t bits = 256 | uint64_t(p_) * 2 | uint64_t(q_) * 2;
  for (const void* ptr : {static_cast<const void*>(a), static_cast<const void*>(b), static_cast<const void*>(c),
                          static_cast<const void*>(d)})
    bits |= reinterpret_cast<uintptr_t>(ptr);
  const auto alignment = static_cast<uint32_t>(bits & (~bits + 1));  // lowest set bit; ld, stride are multiples
  const LtPlan& plan = lt_plan(product, batch, alignment);
  SHARDOPT_CUBLAS_CHECK(cublasLtMatmul(lt_, plan.op, &alpha, a, plan.a, b, plan.b, &beta, c, plan.cd, d, plan.cd,
                                       &plan.algo, cublas_workspace_, kCublasWorkspaceBytes, stream));
}

double NewtonSchulzCuda::plain_gemm_flops() const {
  const double p = double(p_), q = double(q_);
  return double(options_.coefficients.size()) * (4.0 * p * p * q + 2.0 * p * p * p);
}

void NewtonSchulzCuda::check_batch(int64_t batch, const char* where) const {
  if (batch < 1 || batch > max_batch_)
    throw ConfigError(std::string("NewtonSchulzCuda::") + where + ": batch must be in [1, " +
                      std::to_string(max_batch_) + "] (the workspace size), got " + std::to_string(batch));
}

void NewtonSchulzCuda::begin_prepared(int64_t batch, cudaStream_t stream) {
  check_batch(batch, "begin_prepared");
  SHARDOPT_CUDA_CHECK(cudaMemsetAsync(sumsq_, 0, size_t(batch) * sizeof(float), stream));
}

const uint16_t* NewtonSchulzCuda::run_prepared(int64_t batch, cudaStream_t stream, uint16_t* final_output) {
  check_batch(batch, "run_prepared");
  const int p = int(p_), q = int(q_), nb = int(batch);
  const size_t x_per = size_t(p_) * size_t(q_), pp = size_t(p_) * size_t(p_);
  detail::launch_normalize(x_[0], sumsq_, options_.eps, x_per, nb, stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
  SHARDOPT_CUBLAS_CHECK(cublasSetStream(handle_, stream));
  // wide (rows <= cols): the buffer is Xᵀ column-major (q×p, ld q); tall: X column-major (p×q, ld p).
  const bool wide = rows_ <= cols_;
  const float one = 1.0f, zero = 0.0f;
  uint16_t* cur = x_[0];
  const size_t steps = options_.coefficients.size();
  for (size_t it = 0; it < steps; ++it) {
    const NsCoefficients& k = options_.coefficients[it];
    uint16_t* next = (it + 1 == steps && final_output != nullptr) ? final_output : (cur == x_[0] ? x_[1] : x_[0]);
    if (blocks_ > 1) {
      // A = X·Xᵀ, then B = c·A·A, on the k(k+1)/2 blocks on and below the block diagonal: for each
      // diagonal offset d, blocks (j + d, j), j = 0..k−d−1, are one strided batch (operands step
      // one row block, the output one block down and right), per matrix. A is mirrored whole before
      // A·A reads it; the combine pass mirrors B.
      const int b = p / blocks_;
      const long long row_block = wide ? static_cast<long long>(b) * q : b, diag = static_cast<long long>(b) * (p + 1);
      const int ldx = wide ? q : p;
      for (int m = 0; m < nb; ++m) {
        const uint16_t* x = cur + size_t(m) * x_per;
        uint16_t* a = a_ + size_t(m) * pp;
        for (int d = 0; d < blocks_; ++d)
          SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              handle_, wide ? CUBLAS_OP_T : CUBLAS_OP_N, wide ? CUBLAS_OP_N : CUBLAS_OP_T, b, b, q, &one,
              x + size_t(d) * size_t(row_block), CUDA_R_16BF, ldx, row_block, x, CUDA_R_16BF, ldx, row_block, &zero,
              a + size_t(d) * b, CUDA_R_16BF, p, diag, blocks_ - d, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      detail::launch_mirror_lower_blocks(a_, p, b, nb, stream);
      SHARDOPT_CUDA_CHECK_LAUNCH();
      for (int m = 0; m < nb; ++m) {
        const uint16_t* a = a_ + size_t(m) * pp;
        uint16_t* bb = b_ + size_t(m) * pp;
        for (int d = 0; d < blocks_; ++d)
          SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
              handle_, CUBLAS_OP_N, CUBLAS_OP_N, b, b, p, &k.c, a + size_t(d) * b, CUDA_R_16BF, p, b, a, CUDA_R_16BF, p,
              static_cast<long long>(b) * p, &zero, bb + size_t(d) * b, CUDA_R_16BF, p, diag, blocks_ - d,
              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      detail::launch_ns_combine(b_, a_, k.a, k.b, p, b, nb, stream);
      SHARDOPT_CUDA_CHECK_LAUNCH();
    } else {
      // A = X·Xᵀ (p×p)
      if (wide) {
        SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, p, p, q, &one, cur,
                                                         CUDA_R_16BF, q, x_per, cur, CUDA_R_16BF, q, x_per, &zero, a_,
                                                         CUDA_R_16BF, p, pp, nb, CUBLAS_COMPUTE_32F,
                                                         CUBLAS_GEMM_DEFAULT));
      } else {
        SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle_, CUBLAS_OP_N, CUBLAS_OP_T, p, p, q, &one, cur,
                                                         CUDA_R_16BF, p, x_per, cur, CUDA_R_16BF, p, x_per, &zero, a_,
                                                         CUDA_R_16BF, p, pp, nb, CUBLAS_COMPUTE_32F,
                                                         CUBLAS_GEMM_DEFAULT));
      }
      if (options_.combine == NsCombine::kGemmEpilogue) {
        // B = c·A·A + b·A, X' = B·X + a·X: the second terms added in the GEMMs' epilogues.
        lt_matmul(LtProduct::kBFromA, nb, k.c, a_, a_, k.b, a_, b_, stream);
        if (wide)
          lt_matmul(LtProduct::kNextX, nb, 1.0f, cur, b_, k.a, cur, next, stream);
        else
          lt_matmul(LtProduct::kNextX, nb, 1.0f, b_, cur, k.a, cur, next, stream);
        cur = next;
        continue;
      }
      // B = c·A·A, then B += b·A + a·I
      SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, p, p, p, &k.c, a_,
                                                       CUDA_R_16BF, p, pp, a_, CUDA_R_16BF, p, pp, &zero, b_,
                                                       CUDA_R_16BF, p, pp, nb, CUBLAS_COMPUTE_32F,
                                                       CUBLAS_GEMM_DEFAULT));
      detail::launch_ns_combine(b_, a_, k.a, k.b, p, p, nb, stream);
      SHARDOPT_CUDA_CHECK_LAUNCH();
    }
    // X ← (aI + B)·X. Row-major wide X: column-major it is Xᵀ, and (B·X)ᵀ = Xᵀ·Bᵀ.
    if (wide) {
      SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle_, CUBLAS_OP_N, CUBLAS_OP_T, q, p, p, &one, cur,
                                                       CUDA_R_16BF, q, x_per, b_, CUDA_R_16BF, p, pp, &zero, next,
                                                       CUDA_R_16BF, q, x_per, nb, CUBLAS_COMPUTE_32F,
                                                       CUBLAS_GEMM_DEFAULT));
    } else {
      SHARDOPT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, p, q, p, &one, b_,
                                                       CUDA_R_16BF, p, pp, cur, CUDA_R_16BF, p, x_per, &zero, next,
                                                       CUDA_R_16BF, p, x_per, nb, CUBLAS_COMPUTE_32F,
                                                       CUBLAS_GEMM_DEFAULT));
    }
    cur = next;
  }
  if (final_output != nullptr && cur != final_output) {  // zero iterations: the normalized input
    SHARDOPT_CUDA_CHECK(cudaMemcpyAsync(final_output, cur, size_t(batch) * x_per * 2, cudaMemcpyDeviceToDevice,
                                        stream));
    cur = final_output;
  }
  return cur;
}

void NewtonSchulzCuda::orthogonalize(const void* input, DType input_dtype, bf16* output, int64_t batch,
                                     cudaStream_t stream) {
  if (input_dtype != DType::kF32 && input_dtype != DType::kBF16)
    throw ConfigError("NewtonSchulzCuda::orthogonalize: input dtype must be f32 or bf16, got " +
                      std::string(dtype_name(input_dtype)));
  begin_prepared(batch, stream);
  detail::launch_to_bf16_sumsq(input, input_dtype == DType::kBF16, x_[0], sumsq_, size_t(p_) * size_t(q_), int(batch),
                               stream);
  SHARDOPT_CUDA_CHECK_LAUNCH();
  run_prepared(batch, stream, reinterpret_cast<uint16_t*>(output));
}

}  // namespace shardopt::cuda
