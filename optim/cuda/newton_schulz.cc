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
    if (blocks_ > 1) build_block_pointers();
  } catch (...) {
    release();
    throw;
  }
}

NewtonSchulzCuda::~NewtonSchulzCuda() { release(); }

// Pointer arrays of the blocked symmetric products (column-major views, b = p/k rows per block).
// The wide matrix W (p×q) is, in the X buffer, either Wᵀ column-major (q×p, ld q: rows <= cols) or W
// column-major (p×q, ld p); its row block i starts at element i·b·q or i·b. A (p×p, ld p) block (i, j)
// starts at i·b + j·b·p; row block i of A at i·b, column block j at j·b·p.
void NewtonSchulzCuda::build_block_pointers() {
  const size_t b = size_t(p_ / blocks_), p = size_t(p_), q = size_t(q_);
  const size_t x_per = p * q, pp = p * p;
  const bool wide = rows_ <= cols_;
  const size_t row_block = wide ? b * q : b;
  std::vector<const void*> xx_left[2], xx_right[2], aa_left, aa_right;
  std::vector<void*> xx_out, aa_out;
  for (int64_t m = 0; m < max_batch_; ++m)
    for (int i = 0; i < blocks_; ++i)
      for (int j = 0; j <= i; ++j) {
        for (int buf = 0; buf < 2; ++buf) {
          const uint16_t* x = x_[buf] + size_t(m) * x_per;
          xx_left[buf].push_back(x + size_t(i) * row_block);
          xx_right[buf].push_back(x + size_t(j) * row_block);
        }
        uint16_t* a = a_ + size_t(m) * pp;
        uint16_t* bb = b_ + size_t(m) * pp;
        xx_out.push_back(a + size_t(i) * b + size_t(j) * b * p);
        aa_left.push_back(a + size_t(i) * b);
        aa_right.push_back(a + size_t(j) * b * p);
        aa_out.push_back(bb + size_t(i) * b + size_t(j) * b * p);
      }
  // One allocation: left/right for x_[0], x_[1], the X·Xᵀ outputs, A·A left/right/outputs.
  const size_t n = xx_out.size();
  void** all = nullptr;
  SHARDOPT_CUDA_CHECK(cudaMalloc(&all, 8 * n * sizeof(void*)));
  pointer_arrays_ = all;
  std::vector<const void*> host;
  for (const auto* v : {&xx_left[0], &xx_right[0], &xx_left[1], &xx_right[1], &aa_left, &aa_right})
    host.insert(host.end(), v->begin(), v->end());
  host.insert(host.end(), xx_out.begin(), xx_out.end());
  host.insert(host.end(), aa_out.begin(), aa_out.end());
  SHARDOPT_CUDA_CHECK(cudaMemcpy(all, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
  const auto at = [&](size_t k) { return const_cast<const void**>(all + k * n); };
  xx_in_[0][0] = at(0), xx_in_[0][1] = at(1), xx_in_[1][0] = at(2), xx_in_[1][1] = at(3);
  aa_left_ = at(4), aa_right_ = at(5);
  xx_out_ = all + 6 * n;
  aa_out_ = all + 7 * n;
}

void NewtonSchulzCuda::release() {
  for (void* ptr : {static_cast<void*>(x_[0]), static_cast<void*>(x_[1]), static_cast<void*>(a_),
                    static_cast<void*>(b_), static_cast<void*>(sumsq_), cublas_workspace_,
                    static_cast<void*>(pointer_arrays_)})
    if (ptr != nullptr) cudaFree(ptr);
  x_[0] = x_[1] = a_ = b_ = nullptr;
  sumsq_ = nullptr;
  cublas_workspace_ = nullptr;
  pointer_arrays_ = nullptr;
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
      // A = X·Xᵀ, blocks on and below the block diagonal, then mirrored; B = c·A·A likewise.
      const int b = int(p_ / blocks_), blocks = nb * blocks_ * (blocks_ + 1) / 2;
      const int buf = cur == x_[0] ? 0 : 1;
      SHARDOPT_CUBLAS_CHECK(cublasGemmBatchedEx(handle_, wide ? CUBLAS_OP_T : CUBLAS_OP_N, wide ? CUBLAS_OP_N : CUBLAS_OP_T,
                                                b, b, q, &one, xx_in_[buf][0], CUDA_R_16BF, wide ? q : p,
                                                xx_in_[buf][1], CUDA_R_16BF, wide ? q : p, &zero, xx_out_, CUDA_R_16BF,
                                                p, blocks, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      detail::launch_mirror_lower_blocks(a_, p, b, nb, stream);
      SHARDOPT_CUDA_CHECK_LAUNCH();
      SHARDOPT_CUBLAS_CHECK(cublasGemmBatchedEx(handle_, CUBLAS_OP_N, CUBLAS_OP_N, b, b, p, &k.c, aa_left_,
                                                CUDA_R_16BF, p, aa_right_, CUDA_R_16BF, p, &zero, aa_out_,
                                                CUDA_R_16BF, p, blocks, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
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
