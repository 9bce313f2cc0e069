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
//     accumulation), as torch.optim.Muon does.
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

struct DnnlNsState;  // oneDNN primitives, the second iterate, bf16 operand buffers (newton_schulz.cc)

// Scratch for newton_schulz(): two m x n fp32 buffers, two p x p buffers; kBF16 adds bf16 operand
// copies and the oneDNN matmul primitives of each shape. Size it once
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

 private:
  friend struct NsAccess;
  FloatBuffer x_;  // an iterate (OpenBLAS: the ping-pong partner of the output), max_elements
  FloatBuffer a_;  // A = X X^T, max_small_dim^2
  FloatBuffer b_;  // B = b A + c A A (+ a I), max_small_dim^2
  size_t max_elements_ = 0;
  int64_t max_small_dim_ = 0;
  std::unique_ptr<DnnlNsState> dnnl_;
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
