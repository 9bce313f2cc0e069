// Newton-Schulz orthogonalization (Muon's NS5) on CPU: fp32 with OpenBLAS, or bf16 products with
// oneDNN (schedule.precision).
//
// For an m x n row-major G with p = min(m, n), q = max(m, n), iterating on the wide orientation
// X (p x q; X = G^T when m > n, never materialized: the BLAS calls take the transpose flags):
//   X0 = G / max(norm_scale*||G||_F + norm_add, norm_floor)
//   per iteration (a, b, c):  A = X X^T;  B = b A + c A A;  X = a X + B X
// kSymmetric uses that A and B are symmetric: A by SSYRK, A A = A A^T by SSYRK, (aI + B) X by SSYMM
// (3p^2 q + p^3 FLOPs per iteration instead of 4p^2 q + 2p^3). kPlainGemm is the SGEMM-only
// baseline the benchmarks compare against.
// NsPrecision::kBF16 keeps X, A and B in fp32 but rounds them to bf16 as GEMM operands (fp32
// accumulation, oneDNN matmul). oneDNN has no SYRK: the symmetric products X X^T and A A are
// computed as the GEMMs of the upper-triangle blocks (192 rows; measured faster than one full
// GEMM at p = 768), mirrored to the lower triangle. Its thread count is OpenMP's for the calling
// thread (omp_set_num_threads / OMP_NUM_THREADS).
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

struct Bf16NsState;  // oneDNN primitives and bf16 operand buffers (newton_schulz.cc)

// Scratch for newton_schulz(): one m x n buffer and two p x p buffers (kBF16 adds a second m x n
// fp32 buffer, bf16 operand copies and the oneDNN matmul primitives of each shape). Size it once
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
  FloatBuffer x_;  // ping-pong partner of the output, max_elements
  FloatBuffer a_;  // A = X X^T, max_small_dim^2
  FloatBuffer b_;  // B = b A + c A A (+ a I), max_small_dim^2
  size_t max_elements_ = 0;
  int64_t max_small_dim_ = 0;
  std::unique_ptr<Bf16NsState> bf16_;  // only after a kBF16 reserve()
};

enum class NsAlgorithm {
  kSymmetric,  // SSYRK / SSYMM (default)
  kPlainGemm,  // SGEMM only: the baseline
};

// Orthogonalizes the rows x cols row-major `input` into `output` (which may alias `input`), in
// schedule.precision (kBF16 ignores `algorithm`). An empty matrix (rows or cols 0) is a no-op.
// Throws ConfigError for negative sizes, an empty schedule, or a workspace too small (or not
// reserved for kBF16).
void newton_schulz(const float* input, int64_t rows, int64_t cols, float* output, const NsSchedule& schedule,
                   NsWorkspace& workspace, NsAlgorithm algorithm = NsAlgorithm::kSymmetric);

// The plain-GEMM FLOP count, steps * (4 p^2 q + 2 p^3): the "useful FLOPs" benchmarks report.
double newton_schulz_flops(int64_t rows, int64_t cols, int steps);

}  // namespace shardopt::optim
