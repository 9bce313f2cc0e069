#include "runtime/cuda/step_kernels.h"

namespace shardopt::runtime::cuda_detail {
namespace {

constexpr int kThreads = 256;

int blocks_for(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 4096 ? (b == 0 ? 1 : b) : 4096);
}

__global__ void check_pieces_kernel(const CheckPiece* pieces, int piece_count, unsigned long long* nonfinite,
                                    double* sumsq) {
  __shared__ double block_sum[kThreads];
  for (int k = blockIdx.y; k < piece_count; k += gridDim.y) {
    const CheckPiece p = pieces[k];
    double local = 0;
    unsigned long long bad = 0;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.length; i += int64_t(gridDim.x) * blockDim.x) {
      const float v = p.data[i];
      if (isfinite(v)) {
        local += double(v) * double(v);
      } else {
        ++bad;
      }
    }
    if (bad != 0) atomicAdd(&nonfinite[p.tensor], bad);
    block_sum[threadIdx.x] = local;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) block_sum[threadIdx.x] += block_sum[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0 && block_sum[0] != 0.0) atomicAdd(sumsq, block_sum[0]);
    __syncthreads();
  }
}

__global__ void add_kernel(float* dst, const float* src, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

__global__ void scale_kernel(float* x, float s, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] *= s;
}

__global__ void scale_copy_kernel(float* dst, const float* src, float s, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = src[i] * s;
}

__global__ void decay_add_kernel(float* w, const float* delta, float decay, size_t n) {
  // No FMA contraction: the host computes w * decay, rounds, then adds delta.
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    w[i] = __fadd_rn(__fmul_rn(w[i], decay), delta[i]);
}

}  // namespace

void launch_check_pieces(const CheckPiece* pieces, int piece_count, int64_t longest_piece,
                         unsigned long long* nonfinite, double* sumsq, cudaStream_t stream) {
  if (piece_count == 0) return;
  const dim3 grid(static_cast<unsigned>(blocks_for(static_cast<size_t>(longest_piece)) < 256
                                            ? blocks_for(static_cast<size_t>(longest_piece))
                                            : 256),
                  static_cast<unsigned>(piece_count < 65535 ? piece_count : 65535));
  check_pieces_kernel<<<grid, kThreads, 0, stream>>>(pieces, piece_count, nonfinite, sumsq);
}

void launch_add(float* dst, const float* src, size_t n, cudaStream_t stream) {
  if (n > 0) add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dst, src, n);
}

void launch_scale(float* x, float s, size_t n, cudaStream_t stream) {
  if (n > 0) scale_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, s, n);
}

void launch_scale_copy(float* dst, const float* src, float s, size_t n, cudaStream_t stream) {
  if (n > 0) scale_copy_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dst, src, s, n);
}

void launch_decay_add(float* w, const float* delta, float decay, size_t n, cudaStream_t stream) {
  if (n > 0) decay_add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(w, delta, decay, n);
}

}  // namespace shardopt::runtime::cuda_detail
