// Internal launcher of the compact-state element-wise kernel (compact_kernels.cu). Plain types only,
// so that host code compiled by the C++ compiler can call it. Not a public API: use
// compact_elementwise.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "optim/cuda/kernels.h"

namespace shardopt::cuda::detail {

// optim::kQ8BlockElems (optim/quant8.h; checked equal in compact_elementwise.cc, which sees both).
inline constexpr uint32_t kCompactBlockElems = 256;

// The vector kernel's access unit: 4 consecutive elements, one load or store per array (fp32 16
// bytes, bf16 8, q8 codes 4) when the array's pointer is aligned to that size.
inline constexpr uint32_t kCompactRunElements = 4;

// Whether p (null allowed: an absent array) is aligned for a run of elements of element_bytes each.
inline bool run_aligned(const void* p, uint32_t element_bytes) {
  return reinterpret_cast<uintptr_t>(p) % (kCompactRunElements * element_bytes) == 0;
}

// One piece of one slice, starting on a q8 block boundary of the slice (a multiple of 256 elements
// from the slice's start). Pointers are offset to the piece's first element / first block.
struct CompactChunk {
  float* param;        // fp32 master
  const void* grad;    // fp32 or bf16
  uint16_t* mirror;    // bf16 copy of the new param, or null
  void* values[2];     // slot k: q8 codes (uint8) or bf16 values; AdamW 0 = m, 1 = v; else slot 0 only
  float* absmax[2];    // q8: slot k's absmax of the piece's first block; null for bf16
  uint32_t count;      // elements in this piece
  uint32_t reserved;
};

// The per-call constants of optim/elementwise_kernels.h (computed there, copied field by field).
struct CompactScalars {
  // AdamW: beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, inv_sqrt_bias2, eps.
  // Lion: beta1, one_minus_beta1, beta2, one_minus_beta2, decay, lr.
  float beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, inv_sqrt_bias2, eps, lr;
  // SGD with momentum: lr, weight_decay, momentum and the terms keep, take, nesterov (0 or 1).
  float weight_decay, momentum, keep, take, nesterov;
};

// A piece of a compact state array and its fp32 copy, starting on a q8 block boundary of the
// array (pointers offset to the piece's first element / first block).
struct CompactCodecChunk {
  void* values;    // q8 codes (uint8, signed code) or bf16 values
  float* absmax;   // q8: absmax of the piece's first block; null for bf16
  float* f32;      // the decoded values
  uint32_t count;  // elements in this piece
  uint32_t reserved;
};

// Decodes (encode = false: f32 = decode(values) * absmax) or encodes (absmax and codes from f32,
// as optim::store_compact does) every chunk: the signed q8 code or bf16, bit for bit the host's
// load_compact / store_compact (a NaN's bf16 payload aside: the device writes the canonical NaN).
// vector: the vector kernel (compact_kernels.cu's second half), whose first aligned_count chunks
// are run-aligned (compact_codec_chunk_run_aligned; the table lists them first) and moved with wide
// accesses, the others element by element (one launch each); else the warp kernel, which ignores
// aligned_count. Same results either way.
void launch_compact_codec(bool vector, bool encode, bool q8, const CompactCodecChunk* chunks, int chunk_count,
                          int aligned_count, cudaStream_t stream);

// q8: state in the float8 block code (AdamW's v unsigned); else bf16 state. vector, aligned_count:
// as above (compact_chunk_run_aligned).
void launch_compact_elementwise(bool vector, ElementwiseKind kind, bool q8, bool grad_bf16, const CompactChunk* chunks,
                                int chunk_count, int aligned_count, const CompactScalars& s, cudaStream_t stream);

// Whether every pointer of c is aligned for the vector kernel's runs (slots: state arrays in use;
// value_bytes 1 = q8 codes, 2 = bf16; grad_bytes 4 or 2). The absmax are read one float at a time
// (always aligned). A chunk starts a multiple of 256 elements into its slice, so its alignment is
// its slice's.
inline bool compact_chunk_run_aligned(const CompactChunk& c, int slots, uint32_t value_bytes, uint32_t grad_bytes) {
  bool aligned = run_aligned(c.param, 4) && run_aligned(c.grad, grad_bytes) && run_aligned(c.mirror, 2);
  for (int k = 0; k < slots; ++k) aligned = aligned && run_aligned(c.values[k], value_bytes);
  return aligned;
}
inline bool compact_codec_chunk_run_aligned(const CompactCodecChunk& c, uint32_t value_bytes) {
  return run_aligned(c.values, value_bytes) && run_aligned(c.f32, 4);
}

}  // namespace shardopt::cuda::detail
