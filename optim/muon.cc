#include "optim/muon.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <fmt/format.h>

#include "base/error.h"
#include "optim/finite.h"
#include "optim/simd_util.h"

namespace shardopt::optim {
namespace {

// M = mu M + kg g; U = nesterov ? kg g + mu M : M (kg = 1-mu averaged, 1 summed).
template <typename G>
void momentum_pass(const G* __restrict grad, float* __restrict m, float* __restrict u, size_t n, float mu, float kg,
                   bool nesterov) {
  if (nesterov) {
    for (size_t i = 0; i < n; ++i) {
      const float g = kg * load_as_float(grad[i]);
      const float mi = mu * m[i] + g;
      m[i] = mi;
      u[i] = g + mu * mi;
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      const float mi = mu * m[i] + kg * load_as_float(grad[i]);
      m[i] = mi;
      u[i] = mi;
    }
  }
}

// W = W decay - step O for one row; writes the mirror when present.
void update_row(float* __restrict w, bf16* __restrict mirror, const float* __restrict o, int64_t n, float decay,
                float step) {
  if (mirror) {
    for (int64_t j = 0; j < n; ++j) {
      const float wj = w[j] * decay - step * o[j];
      w[j] = wj;
      mirror[j] = to_bf16_rne(wj);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) w[j] = w[j] * decay - step * o[j];
  }
}

double row_sum_squares(const float* o, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(o[j]) * o[j];
  return s;
}

}  // namespace

void MuonWorkspace::reserve(int64_t rows, int64_t cols, NsPrecision precision) {
  ns_.reserve(rows, cols, precision);
  const size_t elements = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  if (elements > update_.size()) update_ = FloatBuffer(elements);
}

bool MuonWorkspace::fits(int64_t rows, int64_t cols, NsPrecision precision) const {
  return ns_.fits(rows, cols, precision) && static_cast<size_t>(rows) * static_cast<size_t>(cols) <= update_.size();
}

float muon_shape_scale(MuonShapeScale scale, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 0.0f;
  const double m = static_cast<double>(rows);
  const double n = static_cast<double>(cols);
  switch (scale) {
    case proto::MUON_SHAPE_SCALE_ORIGINAL: return static_cast<float>(std::sqrt(std::max(1.0, m / n)));
    case proto::MUON_SHAPE_SCALE_MATCH_RMS_ADAMW: return static_cast<float>(0.2 * std::sqrt(std::max(m, n)));
    case proto::MUON_SHAPE_SCALE_SPECTRAL: return static_cast<float>(std::sqrt(m / n));
    default:
      throw ConfigError(fmt::format("muon_shape_scale: expected original|match_rms_adamw|spectral, found {}",
                                    static_cast<int>(scale)));
  }
}

ParallelMuon::ParallelMuon(ThreadPool* pool, std::span<const std::pair<int64_t, int64_t>> shapes,
                           std::span<const std::span<const int64_t>> block_rows, NsPrecision precision)
    : pool_(pool), shapes_(shapes.begin(), shapes.end()) {
  if (!block_rows.empty() && block_rows.size() != shapes.size()) {
    throw ConfigError(fmt::format("ParallelMuon: {} block lists for {} matrices", block_rows.size(), shapes.size()));
  }
  const int threads = pool ? pool->size() : 1;
  workspaces_.resize(static_cast<size_t>(threads));
  for (MuonWorkspace& ws : workspaces_) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      const auto [rows, cols] = shapes[i];
      ws.reserve(rows, cols, precision);
      if (!block_rows.empty())
        for (int64_t b : block_rows[i])
          if (b > 0) ws.reserve(b, cols, precision);
    }
  }
  order_.resize(shapes.size());
  for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  std::stable_sort(order_.begin(), order_.end(), [&](size_t a, size_t b) {
    return newton_schulz_flops(shapes[a].first, shapes[a].second, 1) >
           newton_schulz_flops(shapes[b].first, shapes[b].second, 1);
  });
}

size_t ParallelMuon::workspace_bytes() const {
  size_t b = 0;
  for (const MuonWorkspace& ws : workspaces_) b += ws.bytes();
  return b;
}

void ParallelMuon::step(const OptimizerParams& params, std::span<const MuonMatrix* const> matrices, float lr) {
  if (matrices.size() != shapes_.size()) {
    throw ConfigError(fmt::format("ParallelMuon::step: {} matrices, constructed for {}", matrices.size(), shapes_.size()));
  }
  for (size_t i = 0; i < matrices.size(); ++i) {
    if (matrices[i]->rows != shapes_[i].first || matrices[i]->cols != shapes_[i].second) {
      throw ConfigError(fmt::format("ParallelMuon::step: matrix {} is {}x{}, constructed for {}x{}", i,
                                    matrices[i]->rows, matrices[i]->cols, shapes_[i].first, shapes_[i].second));
    }
  }
  if (pool_ == nullptr || pool_->size() == 1 || matrices.size() < 2) {
    for (size_t i : order_) muon_step(params, *matrices[i], lr, workspaces_[0]);
    return;
  }
  // One BLAS thread per task: the pool threads are the parallelism.
  const int blas_threads = openblas_get_num_threads();
  const int omp_threads = omp_get_max_threads();
  openblas_set_num_threads(1);
  try {
    pool_->parallel_for(static_cast<int64_t>(order_.size()), [&](int64_t task, int thread) {
      omp_set_num_threads(1);  // per-thread OpenMP setting: oneDNN's bf16 products
      muon_step(params, *matrices[order_[static_cast<size_t>(task)]], lr, workspaces_[static_cast<size_t>(thread)]);
    });
  } catch (...) {
    openblas_set_num_threads(blas_threads);
    omp_set_num_threads(omp_threads);
    throw;
  }
  openblas_set_num_threads(blas_threads);
  omp_set_num_threads(omp_threads);
}

StepResult muon_step(const OptimizerParams& params, const MuonMatrix& mat, float lr, MuonWorkspace& workspace,
                     FiniteCheck check) {
  if (!params.is_matrix_optimizer()) {
    throw ConfigError(fmt::format("muon_step: expected kind muon|normuon, found {}", optimizer_kind_name(params.kind)));
  }
  const bool normuon = params.kind == proto::OPTIMIZER_NORMUON;
  if (mat.rows < 0 || mat.cols < 0) {
    throw ConfigError(fmt::format("muon_step: matrix shape must be non-negative, found {}x{}", mat.rows, mat.cols));
  }
  if (!std::isfinite(lr) || lr < 0.0f) throw ConfigError(fmt::format("muon_step: lr must be finite and >= 0, found {}", lr));
  if (mat.grad_dtype != DType::kF32 && mat.grad_dtype != DType::kBF16) {
    throw ConfigError(fmt::format("muon_step: grad dtype must be f32 or bf16, found {}", dtype_name(mat.grad_dtype)));
  }
  if (!mat.block_rows.empty()) {
    int64_t total = 0;
    for (size_t i = 0; i < mat.block_rows.size(); ++i) {
      if (mat.block_rows[i] < 0) {
        throw ConfigError(fmt::format("muon_step: block_rows[{}] must be >= 0, found {}", i, mat.block_rows[i]));
      }
      total += mat.block_rows[i];
    }
    if (total != mat.rows) {
      throw ConfigError(fmt::format("muon_step: block_rows must sum to the matrix rows {}, found sum {}", mat.rows, total));
    }
  }
  StepResult result;
  const size_t count = static_cast<size_t>(mat.rows) * static_cast<size_t>(mat.cols);
  if (count == 0) return result;
  if (mat.master == nullptr || mat.grad == nullptr || mat.momentum == nullptr ||
      (normuon && mat.row_second_moment == nullptr)) {
    throw ConfigError(fmt::format("muon_step: {}x{} matrix: master, grad, momentum{} must be non-null", mat.rows,
                                  mat.cols, normuon ? " and row_second_moment" : ""));
  }
  if (!workspace.fits(mat.rows, mat.cols, params.ns.precision)) {
    throw ConfigError(fmt::format("muon_step: workspace too small for a {}x{} matrix; reserve() it at setup",
                                  mat.rows, mat.cols));
  }
  if (check == FiniteCheck::kGradients) {
    result.nonfinite_gradients = count_nonfinite(mat.grad, mat.grad_dtype, count);
    if (result.nonfinite_gradients != 0) {
      result.applied = false;
      return result;
    }
  }

  float* u = workspace.update();
  const auto mu = static_cast<float>(params.momentum);
  const auto kg = static_cast<float>(params.muon_momentum == proto::MUON_MOMENTUM_SUMMED ? 1.0 : 1.0 - params.momentum);
  if (mat.grad_dtype == DType::kBF16) {
    momentum_pass(static_cast<const bf16*>(mat.grad), mat.momentum, u, count, mu, kg, params.nesterov);
  } else {
    momentum_pass(static_cast<const float*>(mat.grad), mat.momentum, u, count, mu, kg, params.nesterov);
  }

  const int64_t whole[1] = {mat.rows};
  const std::span<const int64_t> blocks = mat.block_rows.empty() ? std::span<const int64_t>(whole) : mat.block_rows;
  const auto decay = static_cast<float>(1.0 - lr * params.weight_decay);
  const int64_t n = mat.cols;
  int64_t row0 = 0;
  for (const int64_t block : blocks) {
    if (block == 0) continue;
    float* o = u + row0 * n;
    newton_schulz(o, block, n, o, params.ns, workspace.ns());
    const float scale = muon_shape_scale(params.shape_scale, block, n);
    float* w = mat.master + row0 * n;
    bf16* mirror = mat.mirror ? mat.mirror + row0 * n : nullptr;
    if (!normuon) {
      for (int64_t i = 0; i < block; ++i) update_row(w + i * n, mirror ? mirror + i * n : nullptr, o + i * n, n, decay, lr * scale);
    } else {
      float* v = mat.row_second_moment + row0;
      const auto b2 = static_cast<float>(params.normuon_beta2);
      const auto one_minus_b2 = static_cast<float>(1.0 - params.normuon_beta2);
      double norm_sq = 0.0, normalized_sq = 0.0;
      for (int64_t i = 0; i < block; ++i) {
        const double row_sq = row_sum_squares(o + i * n, n);
        v[i] = b2 * v[i] + one_minus_b2 * static_cast<float>(row_sq / static_cast<double>(n));
        const double r = 1.0 / (std::sqrt(static_cast<double>(v[i])) + params.normuon_eps);
        norm_sq += row_sq;
        normalized_sq += r * r * row_sq;
      }
      const double rescale = normalized_sq > 0.0 ? std::sqrt(norm_sq / normalized_sq) : 0.0;
      for (int64_t i = 0; i < block; ++i) {
        const double r = 1.0 / (std::sqrt(static_cast<double>(v[i])) + params.normuon_eps);
        const auto step = static_cast<float>(static_cast<double>(lr) * scale * rescale * r);
        update_row(w + i * n, mirror ? mirror + i * n : nullptr, o + i * n, n, decay, step);
      }
    }
    row0 += block;
  }
  return result;
}

void qk_clip_factors(std::span<const float> max_logits, float tau, float alpha, std::span<float> q_factors,
                     std::span<float> k_factors) {
  if (!(tau > 0.0f) || !std::isfinite(tau)) throw ConfigError(fmt::format("qk_clip: tau must be finite and > 0, found {}", tau));
  if (!(alpha >= 0.0f && alpha <= 1.0f)) throw ConfigError(fmt::format("qk_clip: alpha must be in [0, 1], found {}", alpha));
  if (q_factors.size() != max_logits.size() || k_factors.size() != max_logits.size())
    throw ConfigError(fmt::format("qk_clip: {} heads but {} q factors and {} k factors", max_logits.size(),
                                  q_factors.size(), k_factors.size()));
  for (size_t h = 0; h < max_logits.size(); ++h) {
    if (!std::isfinite(max_logits[h])) {
      throw ConfigError(fmt::format("qk_clip: max logit of head {} must be finite, found {}", h, max_logits[h]));
    }
  }
  for (size_t h = 0; h < max_logits.size(); ++h) {
    q_factors[h] = k_factors[h] = 1.0f;
    if (max_logits[h] <= tau) continue;  // eta = min(1, tau/S) = 1: untouched
    const double eta = static_cast<double>(tau) / max_logits[h];
    q_factors[h] = static_cast<float>(std::pow(eta, alpha));
    k_factors[h] = static_cast<float>(std::pow(eta, 1.0 - alpha));
  }
}

void qk_clip_piece(float* values, int64_t flat_offset, int64_t length, int64_t head_rows, int64_t cols,
                   std::span<const float> head_factors) {
  if (head_rows <= 0 || cols <= 0 || flat_offset < 0 || length < 0)
    throw ConfigError(fmt::format("qk_clip_piece: head_rows {} and cols {} must be > 0, offset {} and length {} >= 0",
                                  head_rows, cols, flat_offset, length));
  const int64_t head_elems = head_rows * cols;
  if (length > 0 && (flat_offset + length - 1) / head_elems >= static_cast<int64_t>(head_factors.size()))
    throw ConfigError(fmt::format("qk_clip_piece: piece [{}, {}) reaches past {} heads of {} elements", flat_offset,
                                  flat_offset + length, head_factors.size(), head_elems));
  int64_t i = 0;
  while (i < length) {
    const int64_t head = (flat_offset + i) / head_elems;
    const int64_t end = std::min(length, (head + 1) * head_elems - flat_offset);  // this head's run in the piece
    const float f = head_factors[static_cast<size_t>(head)];
    if (f != 1.0f)
      for (int64_t j = i; j < end; ++j) values[j] *= f;
    i = end;
  }
}

int64_t qk_clip(const QkClipWeights& wts, std::span<const float> max_logits, float tau, float alpha) {
  if (wts.cols < 0 || wts.q_head_rows < 0 || wts.k_head_rows < 0) {
    throw ConfigError(fmt::format("qk_clip: sizes must be non-negative, found q_head_rows {} k_head_rows {} cols {}",
                                  wts.q_head_rows, wts.k_head_rows, wts.cols));
  }
  std::vector<float> q(max_logits.size()), k(max_logits.size());
  qk_clip_factors(max_logits, tau, alpha, q, k);
  auto scale_rows = [&](float* w, bf16* mirror, int64_t head, int64_t head_rows, float factor) {
    if (w == nullptr) return;
    const size_t begin = static_cast<size_t>(head * head_rows * wts.cols);
    const size_t end = begin + static_cast<size_t>(head_rows * wts.cols);
    for (size_t i = begin; i < end; ++i) {
      w[i] *= factor;
      if (mirror) mirror[i] = to_bf16_rne(w[i]);
    }
  };
  int64_t clipped = 0;
  for (size_t h = 0; h < max_logits.size(); ++h) {
    if (max_logits[h] <= tau) continue;
    const auto head = static_cast<int64_t>(h);
    scale_rows(wts.wq, wts.wq_mirror, head, wts.q_head_rows, q[h]);
    scale_rows(wts.wk, wts.wk_mirror, head, wts.k_head_rows, k[h]);
    ++clipped;
  }
  return clipped;
}

}  // namespace shardopt::optim
