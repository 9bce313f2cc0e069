#include "optim/cuda/newton_schulz.h"

#include <string>

#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/kernels.h"

namespace shardopt::cuda {
namespace {
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper
}  // namespace

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
  if (handle_ != nullptr) cublasDestroy(handle_);
  handle_ = nullptr;
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
