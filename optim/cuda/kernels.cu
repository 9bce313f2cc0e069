// CUDA kernels for the fused element-wise optimizers, non-finite counting and the element-wise
// parts of Newton–Schulz and Muon. The GEMMs are cuBLAS calls made from newton_schulz.cc.
#include <cuda_bf16.h>

#include "optim/cuda/kernels.h"

namespace shardopt::cuda::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // independent elements in flight per thread

__device__ __forceinline__ float bf16_bits_to_float(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

template <bool kGradBf16>
__device__ __forceinline__ float load_grad(const void* grad, uint32_t i) {
  if constexpr (kGradBf16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(grad)[i]);
  } else {
    return static_cast<const float*>(grad)[i];
  }
}

// One element of one optimizer. p, m, v in registers; returns through references.
template <ElementwiseKind kKind>
__device__ __forceinline__ void update_element(float& p, float g, float& m, float& v, const ElementwiseScalars& s) {
  if constexpr (kKind == ElementwiseKind::kAdamW) {
    m = s.beta1 * m + (1.0f - s.beta1) * g;
    v = s.beta2 * v + (1.0f - s.beta2) * g * g;
    const float m_hat = m / s.bias_correction1;
    const float v_hat = v / s.bias_correction2;
    p = p * s.decay - s.lr * m_hat / (sqrtf(v_hat) + s.eps);
  } else if constexpr (kKind == ElementwiseKind::kLion) {
    const float c = s.beta1 * m + (1.0f - s.beta1) * g;
    const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p = p * s.decay - s.lr * sign;
    m = s.beta2 * m + (1.0f - s.beta2) * g;
  } else {
    // torch.optim.SGD: coupled weight decay, dampened momentum, buffer starts as the gradient.
    float d = g + s.coupled_wd * p;
    if (s.beta1 != 0.0f) {
      m = s.first_step ? d : s.beta1 * m + (1.0f - s.beta2) * d;
      d = s.nesterov ? d + s.beta1 * m : m;
    }
    p = p - s.lr * d;
  }
}

// One block per chunk; each thread handles kUnroll elements kThreads apart per round (coalesced).
template <ElementwiseKind kKind, bool kGradBf16>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(const DeviceChunk* chunks, ElementwiseScalars s) {
  const DeviceChunk c = chunks[blockIdx.x];
  const bool has_m = c.state0 != nullptr;
  for (uint32_t base = threadIdx.x; base < c.count; base += kThreads * kUnroll) {
    float p[kUnroll], g[kUnroll], m[kUnroll], v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const uint32_t i = base + k * kThreads;
      if (i < c.count) {
        p[k] = c.param[i];
        g[k] = load_grad<kGradBf16>(c.grad, i);
        m[k] = has_m ? c.state0[i] : 0.0f;
        v[k] = kKind == ElementwiseKind::kAdamW ? c.state1[i] : 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const uint32_t i = base + k * kThreads;
      if (i < c.count) {
        update_element<kKind>(p[k], g[k], m[k], v[k], s);
        c.param[i] = p[k];
        if (has_m) c.state0[i] = m[k];
        if (kKind == ElementwiseKind::kAdamW) c.state1[i] = v[k];
        if (c.mirror != nullptr) c.mirror[i] = float_to_bf16_bits(p[k]);
      }
    }
  }
}

__device__ __forceinline__ void block_add_count(unsigned int local, unsigned long long* count) {
  __shared__ unsigned int block_total;
  if (threadIdx.x == 0) block_total = 0;
  __syncthreads();
  // Warp sum first so that only one shared atomic per warp is needed.
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0 && local != 0) atomicAdd(&block_total, local);
  __syncthreads();
  if (threadIdx.x == 0 && block_total != 0) atomicAdd(count, static_cast<unsigned long long>(block_total));
}

template <bool kBf16>
__device__ __forceinline__ bool is_nonfinite(const void* data, size_t i) {
  if constexpr (kBf16) {
    return (static_cast<const uint16_t*>(data)[i] & 0x7f80u) == 0x7f80u;
  } else {
    return (__float_as_uint(static_cast<const float*>(data)[i]) & 0x7f800000u) == 0x7f800000u;
  }
}

template <bool kBf16>
__global__ void count_nonfinite_chunks_kernel(const DeviceChunk* chunks, unsigned long long* count) {
  const DeviceChunk c = chunks[blockIdx.x];
  unsigned int local = 0;
  for (uint32_t i = threadIdx.x; i < c.count; i += blockDim.x) local += is_nonfinite<kBf16>(c.grad, i);
  block_add_count(local, count);
}

template <bool kBf16>
__global__ void count_nonfinite_kernel(const void* data, size_t n, unsigned long long* count) {
  unsigned int local = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    local += is_nonfinite<kBf16>(data, i);
  block_add_count(local, count);
}

__device__ __forceinline__ void block_add_float(float local, float* out) {
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, local);
}

int blocks_for(size_t n) {
  const size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1024 ? (b < 1 ? 1 : b) : 1024);
}

template <bool kInBf16>
__global__ void to_bf16_sumsq_kernel(const void* in, uint16_t* x, float* sumsq, size_t per_matrix) {
  const size_t offset = blockIdx.y * per_matrix;
  float local = 0.0f;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per_matrix; i += size_t{gridDim.x} * blockDim.x) {
    uint16_t bits;
    if constexpr (kInBf16) {
      bits = static_cast<const uint16_t*>(in)[offset + i];
    } else {
      bits = float_to_bf16_bits(static_cast<const float*>(in)[offset + i]);
    }
    x[offset + i] = bits;
    const float f = bf16_bits_to_float(bits);
    local += f * f;
  }
  block_add_float(local, sumsq + blockIdx.y);
}

__global__ void normalize_kernel(uint16_t* x, const float* sumsq, float eps, size_t per_matrix) {
  const size_t offset = blockIdx.y * per_matrix;
  const float inv = 1.0f / fmaxf(sqrtf(sumsq[blockIdx.y]), eps);
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per_matrix; i += size_t{gridDim.x} * blockDim.x)
    x[offset + i] = float_to_bf16_bits(bf16_bits_to_float(x[offset + i]) * inv);
}

// B ← B + b·A + a·I on a symmetric p×p matrix of which B holds the blocks on and below the block
// diagonal (block = p: all of it). Each such element also writes its mirror, so B is whole after.
__global__ void ns_combine_kernel(uint16_t* b_buf, const uint16_t* a_buf, float a, float b, int p, int block) {
  const size_t per = size_t(p) * p;
  const size_t offset = blockIdx.y * per;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per; i += size_t{gridDim.x} * blockDim.x) {
    const size_t r = i % p, c = i / p;  // column-major (row r, column c)
    if (r / block < c / block) continue;  // above the block diagonal: written by its mirror
    float v = bf16_bits_to_float(b_buf[offset + i]) + b * bf16_bits_to_float(a_buf[offset + i]);
    if (r == c) v += a;
    const uint16_t bits = float_to_bf16_bits(v);
    b_buf[offset + i] = bits;
    if (r / block > c / block) b_buf[offset + c + r * p] = bits;
  }
}

// Copies the blocks below the block diagonal of a symmetric p×p matrix to their mirrors above it.
__global__ void mirror_lower_blocks_kernel(uint16_t* a_buf, int p, int block) {
  const size_t per = size_t(p) * p;
  const size_t offset = blockIdx.y * per;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per; i += size_t{gridDim.x} * blockDim.x) {
    const size_t r = i % p, c = i / p;
    if (r / block > c / block) a_buf[offset + c + r * p] = a_buf[offset + i];
  }
}

// Where matrix blockIdx.y of a Muon batch lives: back to back in one buffer each, or anywhere (a
// table of MuonMatrixRefs, one per matrix).
struct ContiguousMatrices {
  const void* grad;
  float* momentum;
  float* param;
  uint16_t* mirror;
  size_t per_matrix;
  __device__ MuonMatrixRefs at(unsigned m) const {
    const size_t o = m * per_matrix;
    return {grad, momentum == nullptr ? nullptr : momentum + o, param == nullptr ? nullptr : param + o,
            mirror == nullptr ? nullptr : mirror + o, o, nullptr};
  }
};
struct TabledMatrices {
  const MuonMatrixRefs* refs;
  __device__ MuonMatrixRefs at(unsigned m) const { return refs[m]; }
};

template <bool kGradBf16>
__device__ float load_grad(const MuonMatrixRefs& r, size_t i) {
  if constexpr (kGradBf16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(r.grad)[r.grad_offset + i]);
  } else {
    return static_cast<const float*>(r.grad)[r.grad_offset + i];
  }
}

template <bool kGradBf16, class Matrices>
__global__ void muon_momentum_kernel(Matrices mats, uint16_t* x, float* sumsq, MuonScalars s, size_t per_matrix) {
  const MuonMatrixRefs r = mats.at(blockIdx.y);
  uint16_t* xm = x + blockIdx.y * per_matrix;
  float local = 0.0f;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per_matrix; i += size_t{gridDim.x} * blockDim.x) {
    const float g = load_grad<kGradBf16>(r, i);
    float m = r.momentum[i];
    float u;
    if (s.averaged) {
      m = s.momentum * m + (1.0f - s.momentum) * g;
      u = s.nesterov ? (1.0f - s.momentum) * g + s.momentum * m : m;
    } else {
      m = s.momentum * m + g;
      u = s.nesterov ? g + s.momentum * m : m;
    }
    r.momentum[i] = m;
    const uint16_t bits = float_to_bf16_bits(u);
    xm[i] = bits;
    const float f = bf16_bits_to_float(bits);
    local += f * f;
  }
  block_add_float(local, sumsq + blockIdx.y);
}

template <class Matrices>
__global__ void muon_apply_kernel(Matrices mats, const uint16_t* ortho, float decay, float step, size_t per_matrix) {
  const MuonMatrixRefs r = mats.at(blockIdx.y);
  const uint16_t* om = ortho + blockIdx.y * per_matrix;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per_matrix; i += size_t{gridDim.x} * blockDim.x) {
    const float w = r.param[i] * decay - step * bf16_bits_to_float(om[i]);
    r.param[i] = w;
    if (r.mirror != nullptr) r.mirror[i] = float_to_bf16_bits(w);
  }
}

// One block per row (blockIdx.x) of matrix blockIdx.y: the row's Σ O², its second moment and r_i.
__global__ void normuon_rows_kernel(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols,
                                    float beta2, float eps, float* r, double* sums) {
  const int64_t row = blockIdx.x;
  const uint16_t* o = ortho + (size_t(blockIdx.y) * rows + row) * cols;
  float local = 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float x = bf16_bits_to_float(o[j]);
    local += x * x;
  }
  __shared__ float warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x != 0) return;
  double s = 0.0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) s += warp_sums[w];
  float* v = refs[blockIdx.y].row_moment + row;
  *v = beta2 * *v + (1.0f - beta2) * static_cast<float>(s / double(cols));
  const double ri = 1.0 / (sqrt(double(*v)) + double(eps));
  r[size_t(blockIdx.y) * rows + row] = static_cast<float>(ri);
  atomicAdd(sums + 2 * blockIdx.y, s);
  atomicAdd(sums + 2 * blockIdx.y + 1, ri * ri * s);
}

__global__ void normuon_apply_kernel(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols,
                                     float decay, float step, const float* r, const double* sums) {
  const MuonMatrixRefs ref = refs[blockIdx.y];
  const size_t per = size_t(rows) * size_t(cols);
  const uint16_t* om = ortho + blockIdx.y * per;
  const double norm_sq = sums[2 * blockIdx.y], normalized_sq = sums[2 * blockIdx.y + 1];
  const double rescale = normalized_sq > 0.0 ? sqrt(norm_sq / normalized_sq) : 0.0;
  const float* rm = r + size_t(blockIdx.y) * rows;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < per; i += size_t{gridDim.x} * blockDim.x) {
    const float row_step = static_cast<float>(double(step) * rescale * double(rm[i / cols]));
    const float w = ref.param[i] * decay - row_step * bf16_bits_to_float(om[i]);
    ref.param[i] = w;
    if (ref.mirror != nullptr) ref.mirror[i] = float_to_bf16_bits(w);
  }
}

dim3 batched_grid(size_t per_matrix, int batch) {
  // Enough blocks per matrix to fill the device when the batch is small, capped for large ones.
  const size_t per = (per_matrix + kThreads - 1) / kThreads;
  const size_t cap = batch >= 64 ? 16 : 512;
  return dim3(static_cast<unsigned>(per < 1 ? 1 : (per < cap ? per : cap)), static_cast<unsigned>(batch));
}

}  // namespace

void launch_elementwise(ElementwiseKind kind, bool grad_bf16, const DeviceChunk* chunks, int chunk_count,
                        const ElementwiseScalars& s, cudaStream_t stream) {
  if (chunk_count == 0) return;
#define SHARDOPT_LAUNCH_EW(K)                                                                          \
  do {                                                                                                 \
    if (grad_bf16)                                                                                     \
      elementwise_kernel<K, true><<<chunk_count, kThreads, 0, stream>>>(chunks, s);                    \
    else                                                                                               \
      elementwise_kernel<K, false><<<chunk_count, kThreads, 0, stream>>>(chunks, s);                   \
  } while (0)
  switch (kind) {
    case ElementwiseKind::kAdamW: SHARDOPT_LAUNCH_EW(ElementwiseKind::kAdamW); break;
    case ElementwiseKind::kLion: SHARDOPT_LAUNCH_EW(ElementwiseKind::kLion); break;
    case ElementwiseKind::kSgd: SHARDOPT_LAUNCH_EW(ElementwiseKind::kSgd); break;
  }
#undef SHARDOPT_LAUNCH_EW
}

void launch_count_nonfinite_chunks(bool grad_bf16, const DeviceChunk* chunks, int chunk_count,
                                   unsigned long long* count, cudaStream_t stream) {
  if (chunk_count == 0) return;
  if (grad_bf16)
    count_nonfinite_chunks_kernel<true><<<chunk_count, kThreads, 0, stream>>>(chunks, count);
  else
    count_nonfinite_chunks_kernel<false><<<chunk_count, kThreads, 0, stream>>>(chunks, count);
}

void launch_count_nonfinite(const void* data, bool bf16, size_t n, unsigned long long* count, cudaStream_t stream) {
  if (n == 0) return;
  if (bf16)
    count_nonfinite_kernel<true><<<blocks_for(n), kThreads, 0, stream>>>(data, n, count);
  else
    count_nonfinite_kernel<false><<<blocks_for(n), kThreads, 0, stream>>>(data, n, count);
}

void launch_to_bf16_sumsq(const void* in, bool in_bf16, uint16_t* x, float* sumsq, size_t per_matrix, int batch,
                          cudaStream_t stream) {
  const dim3 grid = batched_grid(per_matrix, batch);
  if (in_bf16)
    to_bf16_sumsq_kernel<true><<<grid, kThreads, 0, stream>>>(in, x, sumsq, per_matrix);
  else
    to_bf16_sumsq_kernel<false><<<grid, kThreads, 0, stream>>>(in, x, sumsq, per_matrix);
}

void launch_normalize(uint16_t* x, const float* sumsq, float eps, size_t per_matrix, int batch, cudaStream_t stream) {
  normalize_kernel<<<batched_grid(per_matrix, batch), kThreads, 0, stream>>>(x, sumsq, eps, per_matrix);
}

void launch_ns_combine(uint16_t* b_buf, const uint16_t* a_buf, float a, float b, int p, int block, int batch,
                       cudaStream_t stream) {
  ns_combine_kernel<<<batched_grid(size_t(p) * p, batch), kThreads, 0, stream>>>(b_buf, a_buf, a, b, p, block);
}

void launch_mirror_lower_blocks(uint16_t* a_buf, int p, int block, int batch, cudaStream_t stream) {
  mirror_lower_blocks_kernel<<<batched_grid(size_t(p) * p, batch), kThreads, 0, stream>>>(a_buf, p, block);
}

void launch_muon_momentum(const void* grad, bool grad_bf16, float* momentum, uint16_t* x, float* sumsq,
                          const MuonScalars& s, size_t per_matrix, int batch, cudaStream_t stream) {
  // The param fields are unused by the momentum kernel.
  const ContiguousMatrices mats{grad, momentum, nullptr, nullptr, per_matrix};
  const dim3 grid = batched_grid(per_matrix, batch);
  if (grad_bf16)
    muon_momentum_kernel<true><<<grid, kThreads, 0, stream>>>(mats, x, sumsq, s, per_matrix);
  else
    muon_momentum_kernel<false><<<grid, kThreads, 0, stream>>>(mats, x, sumsq, s, per_matrix);
}

void launch_muon_momentum(const MuonMatrixRefs* refs, bool grad_bf16, uint16_t* x, float* sumsq, const MuonScalars& s,
                          size_t per_matrix, int batch, cudaStream_t stream) {
  const TabledMatrices mats{refs};
  const dim3 grid = batched_grid(per_matrix, batch);
  if (grad_bf16)
    muon_momentum_kernel<true><<<grid, kThreads, 0, stream>>>(mats, x, sumsq, s, per_matrix);
  else
    muon_momentum_kernel<false><<<grid, kThreads, 0, stream>>>(mats, x, sumsq, s, per_matrix);
}

void launch_muon_apply(float* param, uint16_t* mirror, const uint16_t* ortho, float decay, float step,
                       size_t per_matrix, int batch, cudaStream_t stream) {
  if (per_matrix == 0) return;
  const ContiguousMatrices mats{nullptr, nullptr, param, mirror, per_matrix};
  muon_apply_kernel<<<batched_grid(per_matrix, batch), kThreads, 0, stream>>>(mats, ortho, decay, step, per_matrix);
}

void launch_muon_apply(const MuonMatrixRefs* refs, const uint16_t* ortho, float decay, float step, size_t per_matrix,
                       int batch, cudaStream_t stream) {
  if (per_matrix == 0) return;
  const TabledMatrices mats{refs};
  muon_apply_kernel<<<batched_grid(per_matrix, batch), kThreads, 0, stream>>>(mats, ortho, decay, step, per_matrix);
}

void launch_normuon_rows(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols, float beta2,
                         float eps, float* r, double* sums, int batch, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  normuon_rows_kernel<<<dim3(unsigned(rows), unsigned(batch)), kThreads, 0, stream>>>(refs, ortho, rows, cols, beta2,
                                                                                     eps, r, sums);
}

void launch_normuon_apply(const MuonMatrixRefs* refs, const uint16_t* ortho, int64_t rows, int64_t cols, float decay,
                          float step, const float* r, const double* sums, int batch, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  normuon_apply_kernel<<<batched_grid(size_t(rows) * size_t(cols), batch), kThreads, 0, stream>>>(
      refs, ortho, rows, cols, decay, step, r, sums);
}

}  // namespace shardopt::cuda::detail
