// Muon / NorMuon on one whole m x n row-major matrix (the owner rank's job), and MuonClip's QK-clip.
//
// muon_step (docs/algorithms.md, "Muon" and "NorMuon"), mu = params.momentum, s = shape scale:
//   averaged: M = mu M + (1-mu) G;  U = nesterov ? (1-mu) G + mu M : M
//   summed:   M = mu M + G;         U = nesterov ? G + mu M : M
//   O = NS(U)                        (per block of rows when block_rows is given)
//   NorMuon:  v_i = b2 v_i + (1-b2) mean_j O_ij^2;  O_ij /= sqrt(v_i) + eps;  O *= ||O_before||_F/||O||_F
//   W = W (1 - lr wd) - lr s O       (s from the matrix shape, or the block's shape per block)
// Blocks: a fused matrix (QKV) whose row blocks are orthogonalized, shape-scaled and (NorMuon)
// Frobenius-rescaled as separate matrices; NorMuon's v is per row either way.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "base/dtype.h"
#include "base/thread_pool.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/newton_schulz.h"

namespace shardopt::optim {

struct MuonMatrix {
  float* master = nullptr;                // rows x cols fp32, updated in place
  bf16* mirror = nullptr;                 // optional bf16 copy of the new master
  const void* grad = nullptr;             // rows x cols of grad_dtype
  DType grad_dtype = DType::kF32;          // F32 or BF16
  float* momentum = nullptr;              // rows x cols fp32 state
  float* row_second_moment = nullptr;     // NorMuon: `rows` fp32 state (zero before step 1)
  int64_t rows = 0;
  int64_t cols = 0;
  std::span<const int64_t> block_rows;    // empty: the whole matrix is one block; else sums to rows
};

// Scratch for muon_step: the update U and the NS workspace. Size it once (for the largest matrix the
// rank owns); muon_step allocates nothing itself. (oneDNN's sgemm allocates one small record per call
// when it runs on more than one OpenMP thread; on one thread, as in ParallelMuon's tasks, nothing.)
class MuonWorkspace {
 public:
  MuonWorkspace() = default;
  MuonWorkspace(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32) {
    reserve(rows, cols, precision);
  }
  explicit MuonWorkspace(std::span<const std::pair<int64_t, int64_t>> shapes,
                         NsPrecision precision = NsPrecision::kF32) {
    for (const auto& [rows, cols] : shapes) reserve(rows, cols, precision);
  }
  // precision: the NS precision the caller will run (kBF16 prepares the oneDNN products).
  void reserve(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32);
  bool fits(int64_t rows, int64_t cols, NsPrecision precision = NsPrecision::kF32) const;
  size_t bytes() const { return 4 * update_.size() + ns_.bytes(); }

  NsWorkspace& ns() { return ns_; }
  float* update() { return update_.data(); }

 private:
  FloatBuffer update_;
  NsWorkspace ns_;
};

// s(m, n) of docs/algorithms.md ("Shape scale and decoupled weight decay") for a rows x cols matrix.
float muon_shape_scale(MuonShapeScale scale, int64_t rows, int64_t cols);

// One Muon or NorMuon step (params.kind) on `matrix` with learning rate `lr`. Throws ConfigError for
// another kind, bad shapes/blocks/pointers, a workspace too small. With FiniteCheck::kGradients a
// non-finite gradient leaves everything untouched and is reported.
StepResult muon_step(const OptimizerParams& params, const MuonMatrix& matrix, float lr, MuonWorkspace& workspace,
                     FiniteCheck check = FiniteCheck::kNone);

// Runs muon_step over a fixed list of matrices, several at once on a ThreadPool: one task per
// matrix, largest Newton-Schulz cost first (dynamic scheduling balances the tail), each task with
// its own workspace and single-threaded BLAS (OpenBLAS and oneDNN/OpenMP are set to 1 thread for
// the duration of a parallel step and restored after). So one process with T pool threads gets
// the throughput of T single-threaded ranks. With no pool (or size 1) the matrices run in order
// on the calling thread with the BLAS threads as configured (OMP_NUM_THREADS for oneDNN's products,
// OPENBLAS_NUM_THREADS for the OpenBLAS algorithms).
// Results do not depend on the pool size. step() allocates nothing (with a pool, whose tasks run
// oneDNN on one OpenMP thread: see MuonWorkspace): workspaces (one per pool thread, each fitting
// every shape) and the order are built in the constructor.
class ParallelMuon {
 public:
  // shapes: (rows, cols) of the matrices step() will get, in that order; block_rows: for each
  // matrix its row blocks (empty span: whole matrix), so the bf16 products of every block shape
  // are prepared too.
  ParallelMuon(ThreadPool* pool, std::span<const std::pair<int64_t, int64_t>> shapes,
               std::span<const std::span<const int64_t>> block_rows, NsPrecision precision);

  // muon_step(params, matrices[i], lr, ...) for every i; matrices has the constructor's shapes.
  // The first exception (e.g. ConfigError) is rethrown after the other tasks have finished.
  void step(const OptimizerParams& params, std::span<const MuonMatrix* const> matrices, float lr);

  size_t workspace_bytes() const;

 private:
  ThreadPool* pool_;
  std::vector<std::pair<int64_t, int64_t>> shapes_;
  std::vector<size_t> order_;  // matrix indices, largest NS cost first
  std::vector<MuonWorkspace> workspaces_;  // one per pool thread
};

// QK-clip targets: W_q has num_heads row blocks of q_head_rows rows, W_k num_heads blocks of
// k_head_rows rows, both row-major with `cols` columns (fp32 masters). Either side may be null when
// this rank does not hold it; mirrors are rewritten for the rows that change.
struct QkClipWeights {
  float* wq = nullptr;
  bf16* wq_mirror = nullptr;
  int64_t q_head_rows = 0;
  float* wk = nullptr;
  bf16* wk_mirror = nullptr;
  int64_t k_head_rows = 0;
  int64_t cols = 0;
};

// For each head h with max logit S_h > tau: eta = tau / S_h, W_q,h *= eta^alpha, W_k,h *= eta^(1-alpha).
// Returns how many heads were clipped. Throws ConfigError for a non-finite S_h, tau <= 0 or alpha
// outside [0, 1].
int64_t qk_clip(const QkClipWeights& weights, std::span<const float> max_logits, float tau, float alpha);

// The per-head factors qk_clip applies: q[h] = eta_h^alpha, k[h] = eta_h^(1-alpha), eta_h = min(1, tau/S_h)
// (1 exactly for heads at or below tau). Same validation as qk_clip. For callers that hold only a piece
// of W_q or W_k (a ZeRO shard): see qk_clip_piece.
void qk_clip_factors(std::span<const float> max_logits, float tau, float alpha, std::span<float> q_factors,
                     std::span<float> k_factors);

// Scales a contiguous piece of a head-blocked row-major matrix (head h = rows [h*head_rows, (h+1)*head_rows),
// `cols` columns): values[i] is element (flat_offset + i) of the matrix; head_factors from qk_clip_factors.
void qk_clip_piece(float* values, int64_t flat_offset, int64_t length, int64_t head_rows, int64_t cols,
                   std::span<const float> head_factors);

}  // namespace shardopt::optim
