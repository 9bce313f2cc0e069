// Element-wise optimizers (AdamW, Lion, SGD with momentum) over compact state on the GPU: q8
// (block-wise float8 code, one fp32 absmax per 256 elements) or bf16, in exactly the format and
// arithmetic of the CPU step optim::elementwise_step_compact (optim/compact_step.h, optim/quant8.h),
// so that a device engine's state is interchangeable with a host engine's.
//
// Each step decodes, updates and re-encodes in one pass, one launch over all slices (two under the
// vector kernel when some slices are misaligned for it; the chunk table is built and uploaded once,
// in set_slices). A slice's state starts on a q8 block boundary
// of its tensor, as in the CPU layout: block j of a slice covers its elements [256 j, 256 j + 256),
// the last block may be short. The per-call constants come from the CPU step's own prologue
// (optim::detail::prepare_elementwise_step), and the kernel evaluates the CPU formulas in the same
// order with explicitly rounded operations (no fused multiply-adds): the result equals the CPU's
// portable build bit for bit; the CPU's AVX-512 build may differ in the last bit of an update (its
// loops contract into FMAs), which can move a q8 code whose value sits at a rounding boundary.
// The bf16 mirror of a NaN parameter is the canonical bf16 NaN (the CPU keeps the payload).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "base/dtype.h"
#include "optim/config.h"
#include "optim/quant8.h"

namespace shardopt::cuda {

// The kernel behind CompactElementwiseOptimizerCuda and CompactCodecCuda. Both compute every element
// with the same operations in the same order (equal results bit for bit); they differ in the work
// split and the memory access width (optim/cuda/compact_kernels.cu explains both):
//   kWarp: lane l of a warp holds elements l, l + 32, ..., l + 224 of a q8 block, one element's
//     loads and stores after another, codes a byte at a time. Verified and measured on an H200.
//   kVector: lane l holds runs 4l..4l+3 and 128 + 4l..128 + 4l + 3, all of a block's loads issued
//     before its first update, runs moved with one 16-, 8- or 4-byte access when the slice's pointers
//     are aligned for it (element by element otherwise). Not yet measured on a device.
enum class CompactKernel { kWarp, kVector };

std::string_view compact_kernel_name(CompactKernel kernel);  // "warp" | "vector"
// "warp" | "vector"; ConfigError naming `what` (where the text came from) otherwise.
CompactKernel parse_compact_kernel(std::string_view name, std::string_view what);
// The process default: SHARDOPT_CUDA_COMPACT_KERNEL (unset = warp), read on the first call.
CompactKernel default_compact_kernel();

// One contiguous range of a parameter on the device; all pointers are device pointers. state[k] as
// the CPU's CompactSlots: values (q8 codes or bf16) and, for q8, absmax with q8_num_blocks(count)
// entries; slot 1 (AdamW's v) with nonnegative = true (optim::q8_slot_is_nonnegative).
struct DeviceCompactSlice {
  float* param = nullptr;
  const void* grad = nullptr;   // fp32 or bf16 (the optimizer's grad dtype)
  bf16* param_bf16 = nullptr;   // optional bf16 copy of the updated param, written in the same pass
  optim::CompactState state[2];
  size_t count = 0;
};

class CompactElementwiseOptimizerCuda {
 public:
  // kind: AdamW, Lion or SGD with momentum != 0 (there is state to store); state_dtype: bf16 or q8;
  // grad_dtype: F32 or BF16. ConfigError otherwise.
  CompactElementwiseOptimizerCuda(const optim::OptimizerParams& params, optim::StateDType state_dtype,
                                  DType grad_dtype, CompactKernel kernel = default_compact_kernel());
  ~CompactElementwiseOptimizerCuda();
  CompactElementwiseOptimizerCuda(const CompactElementwiseOptimizerCuda&) = delete;
  CompactElementwiseOptimizerCuda& operator=(const CompactElementwiseOptimizerCuda&) = delete;

  // Builds the chunk table and uploads it (blocking). ConfigError names the slice and what is
  // missing or of the wrong storage.
  void set_slices(std::span<const DeviceCompactSlice> slices);

  // One step on `stream` with params (same kind as at construction; its hyper-parameters may
  // change between steps, as a schedule's lr does). step >= 1.
  void step(const optim::OptimizerParams& params, float lr, int64_t step, cudaStream_t stream);

  size_t chunk_count() const { return chunk_count_; }
  // Chunks whose pointers are all aligned for the vector kernel's wide accesses (the others move
  // element by element under kVector; kWarp ignores alignment).
  size_t aligned_chunk_count() const { return aligned_chunk_count_; }
  CompactKernel kernel() const { return kernel_; }
  // Elements per chunk (one thread block each): 64 q8 blocks.
  static constexpr size_t kChunkElements = 64 * optim::kQ8BlockElems;

 private:
  optim::OptimizerKind kind_;
  optim::StateDType state_dtype_;
  bool grad_bf16_;
  int state_slots_;
  CompactKernel kernel_;
  void* device_table_ = nullptr;
  size_t table_bytes_ = 0;  // capacity of device_table_
  size_t chunk_count_ = 0, aligned_chunk_count_ = 0;
};

// Compact arrays (Muon's momentum: signed q8 code or bf16) decoded into fp32 working copies on the
// device before a step and encoded back after it: optim::load_compact / store_compact bit for bit
// (a NaN's bf16 payload aside). All pointers are device pointers; an array starts on a q8 block
// boundary of its tensor (block j covers its elements [256 j, 256 j + 256)).
struct DeviceCompactArray {
  optim::CompactState state;  // bf16 values, or q8 codes + absmax (signed code)
  float* f32 = nullptr;       // the working copy, count floats
  size_t count = 0;
};

class CompactCodecCuda {
 public:
  explicit CompactCodecCuda(CompactKernel kernel = default_compact_kernel()) : kernel_(kernel) {}
  ~CompactCodecCuda();
  CompactCodecCuda(const CompactCodecCuda&) = delete;
  CompactCodecCuda& operator=(const CompactCodecCuda&) = delete;

  // Builds and uploads the chunk table (blocking). ConfigError: arrays of different dtypes, f32
  // state, a null buffer, or q8 with the unsigned code.
  void set_arrays(std::span<const DeviceCompactArray> arrays);
  void decode(cudaStream_t stream) const;  // f32 = decoded state
  void encode(cudaStream_t stream) const;  // state = encoded f32 (absmax per block, then the codes)

  size_t chunk_count() const { return chunk_count_; }
  size_t aligned_chunk_count() const { return aligned_chunk_count_; }  // as the optimizer's
  CompactKernel kernel() const { return kernel_; }

 private:
  CompactKernel kernel_;
  bool q8_ = false;
  void* device_table_ = nullptr;
  size_t table_bytes_ = 0;  // capacity of device_table_
  size_t chunk_count_ = 0, aligned_chunk_count_ = 0;
};

}  // namespace shardopt::cuda
