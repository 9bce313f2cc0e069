// Newton-Schulz orthogonalization (Muon's NS5) on CPU: the matrix products on oneDNN (fp32, or
// bf16 operands with schedule.precision), or on OpenBLAS (NsAlgorithm::kBlasSymmetric, kPlainGemm).
//
// For an m x n row-major G with p = min(m, n), q = max(m, n), iterating on the wide orientation
// X (p x q; X = G^T when m > n):
//   X0 = G / max(norm_scale*||G||_F + norm_add, norm_floor)
//   per iteration (a, b, c):  A = X X^T;  B = b A + c A A;  X = a X + B X
// The symmetric algorithms use that A and B are symmetric: X X^T and A A = A A^T computed once per
// triangle, (aI + B) X as one product (3p^2 q + p^3 FLOPs per iteration instead of 4p^2 q + 2p^3).
//   kSymmetric (default): oneDNN (sgemm for fp32, the matmul primitive for bf16), which picks its
//     kernels from the CPU's ISA itself. oneDNN has no SYRK: X X^T and A A are the GEMMs of the upper-triangle blocks (192 rows), mirrored to
//     the lower triangle. A tall input is transposed in and out (O(pq) next to the O(p^2 q) products).
//     With NsPrecision::kBF16, X, A and B stay fp32 but are rounded to bf16 as GEMM operands (fp32
//     accumulation), as torch.optim.Muon does. Which GEMM multiplies the rounded operands is
//     Bf16GemmKernel (below): the numerics are the same, the speed is the CPU's.
//   kBlasSymmetric: OpenBLAS SSYRK / SSYMM (fp32). Its speed depends on the kernels OpenBLAS detects at
//     load (Debian's 0.3.21 falls back to generic SSE3 kernels on some AVX-512 CPUs unless the user
//     sets OPENBLAS_CORETYPE), hence not the default.
//   kPlainGemm: OpenBLAS SGEMM only, the baseline the benchmarks compare against.
// Threads: oneDNN's products use OpenMP's thread count for the calling thread (omp_set_num_threads /
// OMP_NUM_THREADS); OpenBLAS's use OPENBLAS_NUM_THREADS.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "base/dtype.h"
#include "optim/config.h"

namespace shardopt::optim {

// 64-byte aligned fp32 storage, allocated at setup and reused every step.
class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(size_t count);
  float* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(float* p) const;
  };
  std::unique_ptr<float, Free> data_;
  size_t size_ = 0;
};

// How NsPrecision::kBF16's products run. Both multiply operands rounded to bf16 and accumulate in
// fp32; a product of two bf16 values (8-bit significands) is exact in fp32, so the results differ only
// by the order of the fp32 sums inside the GEMM.
enum class Bf16GemmKernel {
  kNative,    // oneDNN's bf16 matmul on bf16 copies: faster where the CPU multiplies bf16 at a higher
              // rate than fp32 (AMX; AMD Zen 4 and later run AVX512_BF16 at twice the fp32 FMA rate)
  kF32Units,  // the rounded operands kept in fp32 and multiplied by sgemm: faster where bf16 dot products
              // run at the fp32 FMA rate plus conversions (Intel AVX512_BF16 without AMX: 0.57x fp32 here)
};
// The kernel SHARDOPT_NS_BF16_GEMM selects: native, f32, or auto (default): kNative on CPUs with AMX
// (oneDNN's effective ISA) or AMD CPUs with AVX512_BF16, kF32Units otherwise. A rule on the CPU, not a
// timing, so that every process of a job on the same CPUs picks the same kernel.
Bf16GemmKernel default_bf16_gemm_kernel();
const char* to_string(Bf16GemmKernel kernel);

struct DnnlNsState;  // oneDNN primitives, the second iterate, bf16 operand buffers (newton_schulz.cc)

// Scratch for newton_schulz(): two m x n fp32 buffers, two p x p buffers; kBF16 adds the rounded
// operand copies (bf16 and the matmul primitives of each shape for kNative, fp32 for kF32Units). Size it once
// for every matrix shape the caller will orthogonalize; newton_schulz() then never allocates and
// throws ConfigError if a matrix does not fit. One workspace serves one thread at a time.
class NsWorkspace {
 public:
  NsWorkspace();
  NsWorkspace(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32);
  ~NsWorkspace();
  NsWorkspace(NsWorkspace&&) noexcept;
  NsWorkspace& operator=(NsWorkspace&&) noexcept;
  // Grows (never shrinks) so that a rows x cols matrix fits; with kBF16 also builds that shape's
  // matmul primitives. Allocates: call at setup only.
  void reserve(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32);
  bool fits(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32) const;
  size_t bytes() const;
  // The bf16 GEMM kernel (default_bf16_gemm_kernel() unless set). Setting it after reserve() needs
  // another reserve() before a kBF16 newton_schulz().
  Bf16GemmKernel bf16_gemm_kernel() const { return bf16_kernel_; }
  void set_bf16_gemm_kernel(Bf16GemmKernel kernel) { bf16_kernel_ = kernel; }

 private:
  friend struct NsAccess;
  FloatBuffer x_;  // an iterate (OpenBLAS: the ping-pong partner of the output), max_elements
  FloatBuffer a_;  // A = X X^T, max_small_dim^2
  FloatBuffer b_;  // B = b A + c A A (+ a I), max_small_dim^2
  size_t max_elements_ = 0;
  int64_t max_small_dim_ = 0;
  std::unique_ptr<DnnlNsState> dnnl_;
  Bf16GemmKernel bf16_kernel_;
};

enum class NsAlgorithm {
  kSymmetric,      // oneDNN, symmetric products (default)
  kBlasSymmetric,  // OpenBLAS SSYRK / SSYMM, fp32 only
  kPlainGemm,      // OpenBLAS SGEMM only, fp32 only: the baseline
};

// Orthogonalizes the rows x cols row-major `input` into `output` (which may alias `input`), in
// schedule.precision (kBF16 always runs kSymmetric). An empty matrix (rows or cols 0) is a no-op.
// Throws ConfigError for negative sizes, an empty schedule, or a workspace too small (or not
// reserved for kBF16).
void newton_schulz(const float* input, int64_t rows, int64_t cols, float* output, const NsSchedule& schedule,
                   NsWorkspace& workspace, NsAlgorithm algorithm = NsAlgorithm::kSymmetric);

// The plain-GEMM FLOP count, steps * (4 p^2 q + 2 p^3): the "useful FLOPs" benchmarks report.
double newton_schulz_flops(int64_t rows, int64_t cols, int steps);

}  // namespace shardopt::optim
