// Launchers of the CUDA step backend's own kernels (step_kernels.cu): the arithmetic the Engine does
// around the optimizers (gradient check + squared norm, clipping scale, accumulation, dim0 update
// application). Plain types only, so the C++ compiler can call them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace shardopt::runtime::cuda_detail {

// One piece of a tensor in this rank's reduced gradient shard.
struct CheckPiece {
  const float* data;
  int64_t length;
  int32_t tensor;
  int32_t reserved;
};

// nonfinite[piece.tensor] += NaN/Inf count of each piece; *sumsq += Σ g² over the finite values
// (fp64 accumulation). Both zeroed by the caller.
void launch_check_pieces(const CheckPiece* pieces, int piece_count, int64_t longest_piece,
                         unsigned long long* nonfinite, double* sumsq, cudaStream_t stream);
void launch_add(float* dst, const float* src, size_t n, cudaStream_t stream);                    // dst += src
void launch_scale(float* x, float s, size_t n, cudaStream_t stream);                             // x *= s
void launch_scale_copy(float* dst, const float* src, float s, size_t n, cudaStream_t stream);     // dst = src s
void launch_decay_add(float* w, const float* delta, float decay, size_t n, cudaStream_t stream);  // w = w decay + delta

}  // namespace shardopt::runtime::cuda_detail
