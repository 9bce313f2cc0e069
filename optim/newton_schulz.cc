#include "optim/newton_schulz.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "base/error.h"

namespace shardopt::optim {

FloatBuffer::FloatBuffer(size_t count) : size_(count) {
  if (count == 0) return;
  const size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw Error(fmt::format("FloatBuffer: cannot allocate {} bytes", bytes));
  data_.reset(static_cast<float*>(p));
}

void FloatBuffer::Free::operator()(float* p) const { std::free(p); }

void NsWorkspace::reserve(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) {
    throw ConfigError(fmt::format("NsWorkspace: matrix shape must be non-negative, found {}x{}", rows, cols));
  }
  const size_t elements = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  const int64_t small_dim = std::min(rows, cols);
  if (elements > max_elements_) {
    x_ = FloatBuffer(elements);
    max_elements_ = elements;
  }
  if (small_dim > max_small_dim_) {
    const size_t square = static_cast<size_t>(small_dim) * static_cast<size_t>(small_dim);
    a_ = FloatBuffer(square);
    b_ = FloatBuffer(square);
    max_small_dim_ = small_dim;
  }
}

bool NsWorkspace::fits(int64_t rows, int64_t cols) const {
  return rows >= 0 && cols >= 0 && static_cast<size_t>(rows) * static_cast<size_t>(cols) <= max_elements_ &&
         std::min(rows, cols) <= max_small_dim_;
}

struct NsAccess {
  static float* x(NsWorkspace& w) { return w.x_.data(); }
  static float* a(NsWorkspace& w) { return w.a_.data(); }
  static float* b(NsWorkspace& w) { return w.b_.data(); }
};

namespace {

// Copies the upper triangle of the p x p row-major `a` into its lower triangle, in tiles so both
// the reads and the writes stay in cache.
void symmetrize_upper_to_lower(float* a, int64_t p) {
  constexpr int64_t kTile = 64;
  for (int64_t i0 = 0; i0 < p; i0 += kTile) {
    const int64_t i1 = std::min(p, i0 + kTile);
    for (int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const int64_t j1 = std::min(p, j0 + kTile);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t jend = std::min(j1, i);
        for (int64_t j = j0; j < jend; ++j) a[i * p + j] = a[j * p + i];
      }
    }
  }
}

// One iteration src -> dst on the wide orientation. `wide`: src is p x q row-major (X itself);
// otherwise src is q x p row-major (X^T).
void iterate_symmetric(const float* src, float* dst, int64_t p, int64_t q, bool wide, float ca, float cb, float cc,
                       float* a, float* b) {
  const auto pi = static_cast<blasint>(p);
  const auto qi = static_cast<blasint>(q);
  // A = X X^T (upper triangle only).
  if (wide) {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, pi, qi, 1.0f, src, qi, 0.0f, a, pi);
  } else {
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, pi, qi, 1.0f, src, pi, 0.0f, a, pi);
  }
  // SSYRK reads its input as a general matrix: A must be complete before A A^T.
  symmetrize_upper_to_lower(a, p);
  std::memcpy(b, a, sizeof(float) * static_cast<size_t>(p * p));
  // B = c A A^T + b A (upper triangle), then B += a I so one SSYMM gives a X + B X.
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, pi, pi, cc, a, pi, cb, b, pi);
  for (int64_t i = 0; i < p; ++i) b[i * p + i] += ca;
  if (wide) {
    cblas_ssymm(CblasRowMajor, CblasLeft, CblasUpper, pi, qi, 1.0f, b, pi, src, qi, 0.0f, dst, qi);
  } else {
    // (B X)^T = X^T B for symmetric B.
    cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, qi, pi, 1.0f, b, pi, src, pi, 0.0f, dst, pi);
  }
}

// The same iteration with plain SGEMMs, as a straightforward implementation would write it.
void iterate_plain(const float* src, float* dst, int64_t p, int64_t q, bool wide, float ca, float cb, float cc,
                   float* a, float* b) {
  const auto pi = static_cast<blasint>(p);
  const auto qi = static_cast<blasint>(q);
  if (wide) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, pi, pi, qi, 1.0f, src, qi, src, qi, 0.0f, a, pi);
  } else {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, pi, pi, qi, 1.0f, src, pi, src, pi, 0.0f, a, pi);
  }
  std::memcpy(b, a, sizeof(float) * static_cast<size_t>(p * p));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pi, pi, pi, cc, a, pi, a, pi, cb, b, pi);
  std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(p * q));
  if (wide) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pi, qi, pi, 1.0f, b, pi, src, qi, ca, dst, qi);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, qi, pi, pi, 1.0f, src, pi, b, pi, ca, dst, pi);
  }
}

}  // namespace

double newton_schulz_flops(int64_t rows, int64_t cols, int steps) {
  const double p = static_cast<double>(std::min(rows, cols));
  const double q = static_cast<double>(std::max(rows, cols));
  return static_cast<double>(steps) * (4.0 * p * p * q + 2.0 * p * p * p);
}

void newton_schulz(const float* input, int64_t rows, int64_t cols, float* output, const NsSchedule& schedule,
                   NsWorkspace& workspace, NsAlgorithm algorithm) {
  if (rows < 0 || cols < 0) {
    throw ConfigError(fmt::format("newton_schulz: matrix shape must be non-negative, found {}x{}", rows, cols));
  }
  const int steps = schedule.steps();
  if (steps < 1) throw ConfigError("newton_schulz: the schedule has no iterations (expected >= 1)");
  if (rows == 0 || cols == 0) return;
  if (!workspace.fits(rows, cols)) {
    throw ConfigError(fmt::format("newton_schulz: workspace too small for a {}x{} matrix; reserve() it at setup",
                                  rows, cols));
  }
  const int64_t p = std::min(rows, cols);
  const int64_t q = std::max(rows, cols);
  const bool wide = rows <= cols;
  const size_t count = static_cast<size_t>(rows) * static_cast<size_t>(cols);

  // Ping-pong between `output` and the workspace so that the last iteration lands in `output`.
  float* other = NsAccess::x(workspace);
  float* src = (steps % 2 == 1) ? other : output;
  float* dst = (steps % 2 == 1) ? output : other;

  double sum_sq = 0.0;
  for (size_t i = 0; i < count; ++i) sum_sq += static_cast<double>(input[i]) * input[i];
  const double norm = std::sqrt(sum_sq);
  const double denom = std::max(static_cast<double>(schedule.norm_scale) * norm + schedule.norm_add,
                                static_cast<double>(schedule.norm_floor));
  const float inv = denom > 0.0 ? static_cast<float>(1.0 / denom) : 0.0f;
  for (size_t i = 0; i < count; ++i) src[i] = input[i] * inv;

  float* a = NsAccess::a(workspace);
  float* b = NsAccess::b(workspace);
  for (int s = 0; s < steps; ++s) {
    const auto& k = schedule.coefficients[static_cast<size_t>(s)];
    if (algorithm == NsAlgorithm::kPlainGemm) {
      iterate_plain(src, dst, p, q, wide, k[0], k[1], k[2], a, b);
    } else {
      iterate_symmetric(src, dst, p, q, wide, k[0], k[1], k[2], a, b);
    }
    std::swap(src, dst);
  }
}

}  // namespace shardopt::optim
