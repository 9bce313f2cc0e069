#include "optim/cuda/newton_schulz.h"

#include <string>

#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/kernels.h"

namespace shardopt::cuda {
namespace {
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;  // cuBLAS's recommendation for Hopper
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
    detail::launch_ns_combine(b_, a_, k.a, k.b, p, nb, stream);
    SHARDOPT_CUDA_CHECK_LAUNCH();
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
