// The CUDA StepBackend (MemorySpace::kCuda): the Engine's buffers in one device's memory, its step
// on the kernels of optim/cuda. Programs get it by linking the shardopt_runtime_cuda object library
// (built when the CUDA toolkit is found), which registers it with make_step_backend().
//
// What runs where:
//   - every persistent buffer: cudaMalloc'd, zero-filled (cudaMemset)
//   - element-wise optimizer (AdamW/Lion/SGD): ElementwiseOptimizerCuda over the owned slices, one
//     launch for all of them (its chunk table is built once, in bind()); with compact state (bf16 /
//     q8) CompactElementwiseOptimizerCuda, in the host step's format and arithmetic
//     (optim/cuda/compact_elementwise.h): the state buffers are ShardState's, in device memory
//   - Muon / NorMuon: MuonCuda (bf16 NS5 on cuBLAS with fp32 accumulation). The owned matrices of one
//     shape (and gradient dtype) run as one batch through a device table of pointers into the shard
//     (no gather), one NS workspace per shape; a matrix with row blocks (fused QKV) contributes each
//     block as a matrix of its own shape. SHARDOPT_CUDA_NS_SYMMETRIC_BLOCKS selects blocked
//     symmetric products, SHARDOPT_CUDA_NS_COMBINE the GEMM-epilogue combine (docs/gpu.md). Compact (bf16 / q8) momentum: each batch's momenta are decoded
//     into one fp32 scratch (the largest batch's size, <= 64 Mi elements), stepped and encoded back
//     (optim/cuda/compact_elementwise.h CompactCodecCuda); with q8, every row block of a matrix must
//     start on a 256-element block (always true without row blocks)
//   - non-finite count + Σg² over my pieces, clipping scale, accumulation and dim0's update
//     application: this backend's kernels (step_kernels.cu)
// Ordering: the backend runs on its own non-blocking compute stream and every call returns with that
// stream drained (cudaStreamSynchronize). Communication runs on the communicator's stream and its
// Work::wait() returns once the operation finished, so inside a step host order is stream order (a
// host synchronization at each hand-over, a few per step). The trainer's stream is ordered with
// events, so backward never waits on the host: a gradient it hands over is copied by a kernel on its
// own stream (copy_scaled_on_stream), and what reads a finished bucket waits for that stream on the
// device (Engine::grad_ready(t, stream): the communicator's wait_stream, or this backend's for the
// dim0 copy). step() returns with everything finished, so the updated parameters are ready for any
// stream.
// Host round trips that stay by design: the check results (num_tensors + 1 values) are read back for
// the skip decision and the clipping scale, which the host computes.
//
// Not supported (ConfigError from bind(), naming it): QK-clip,
// Newton-Schulz schedules whose input normalization is not G / max(||G||_F, eps) (Polar Express).
// The NS always runs with bf16 operands here, whatever OptimizerParams::ns.precision says.
#pragma once

#include <memory>

#include "runtime/step_backend.h"

namespace shardopt::runtime {

// device < 0: the current device. DeviceError when there is no CUDA device; ConfigError for a
// device index out of range.
std::unique_ptr<StepBackend> make_cuda_step_backend(int device);

}  // namespace shardopt::runtime
