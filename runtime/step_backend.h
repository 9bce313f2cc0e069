// StepBackend: where the Engine's buffers live and which kernels run its step, chosen once at
// construction (EngineOptions::memory_space). The Engine and ShardState have one code path; every
// allocation of a persistent buffer, every copy or fill of one, and every piece of step arithmetic
// goes through this interface:
//
//   memory    allocate/release zero-filled fp32 arrays (params, gradient buckets and slots, gradient
//             shards, fp32 masters, optimizer state, dim0 exchange buffers), copy/zero inside the
//             space, upload/download to and from host memory
//   step      non-finite count + squared norm over my pieces, scale (clipping), add (gradient
//             accumulation of later micro-batches), decay_add (dim0 update application), the
//             element-wise optimizer over the owned slices, Muon on the owned matrices
//
// kHost (step_backend.cc): host memory and the CPU kernels of optim/ (what the Engine always ran).
// kCuda (runtime/cuda/): device memory and the kernels of optim/cuda on one compute stream, ordered
// after a trainer's stream with events where the trainer names it (wait_stream, copy_scaled_on_stream). It is
// linked into a program through the shardopt_runtime_cuda object library (built when the CUDA
// toolkit is found); see runtime/cuda/cuda_step_backend.h for what it supports and how it orders
// work against communication.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "base/thread_pool.h"
#include "optim/config.h"

namespace shardopt::runtime {

class ShardState;
class TraceRecorder;

enum class MemorySpace {
  kHost,  // host memory, CPU kernels (default)
  kCuda,  // device memory of one CUDA device, CUDA kernels
};
std::string_view memory_space_name(MemorySpace space);
// "host" (or "cpu") / "cuda"; ConfigError naming the accepted names otherwise.
MemorySpace parse_memory_space(const std::string& name);

class StepBackend {
 public:
  virtual ~StepBackend() = default;
  virtual MemorySpace space() const = 0;

  // --- memory of the space. Pointers returned by allocate() may be dereferenced by host code only
  // in MemorySpace::kHost.
  virtual float* allocate(size_t n) = 0;  // n zero-filled floats (n > 0)
  virtual void release(float* p, size_t n) noexcept = 0;
  virtual void copy(float* dst, const float* src, size_t n) = 0;  // inside the space, non-overlapping
  virtual void zero(float* dst, size_t n) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  // Scratch in the space for small host values that go through a communicator on device memory
  // (config hashes, check results, QK-clip logits). Grows as needed; valid until the next call.
  virtual void* staging(size_t bytes) = 0;

  // --- work of the trainer's CUDA stream (`stream`: a cudaStream_t, opaque here). The host space
  // has no streams: these act at once.
  // This backend's work enqueued from now on waits (on the device) for the work enqueued on `stream`
  // so far: what the engine runs before it reads gradients the trainer's kernels may still be writing.
  virtual void wait_stream(void* stream) = 0;
  // dst = src * scale (bit for bit the host's product; a copy when scale is 1), enqueued on `stream`
  // behind the kernels that wrote src, without waiting for it: a trainer's gradient handed over in
  // its own stream order (the PyTorch adapter's hook).
  virtual void copy_scaled_on_stream(float* dst, const float* src, float scale, size_t n, void* stream) = 0;

  // --- arithmetic on the space's buffers
  virtual void add(float* dst, const float* src, size_t n) = 0;     // dst += src
  virtual void scale(float* x, float s, size_t n) = 0;              // x *= s
  virtual void decay_add(float* w, const float* delta, float decay, size_t n) = 0;  // w = w decay + delta

  // Memory the backend holds for its own kernels besides ShardState's buffers, part of the engine's
  // MemoryReport::workspace_bytes. kCuda: the NS and cuBLAS workspaces, NorMuon's row buffers, the
  // compact-momentum scratch, the check and matrix tables, the staging scratch (not the element-wise
  // kernels' chunk tables, a few KB). The host backend's NS workspace lives in ShardState: 0.
  virtual int64_t workspace_bytes() const { return 0; }

  // Called once, after ShardState built its views over this backend's buffers: prepares the
  // kernels' tables and workspaces (step() then allocates nothing). Throws ConfigError for what
  // the backend cannot run (named).
  virtual void bind(ShardState& state, const optim::OptimizerParams& elementwise,
                    const optim::OptimizerParams* matrix, ThreadPool* pool) = 0;
  // Over my pieces' reduced gradients: result[t] != 0 when tensor t has a NaN/Inf in a piece,
  // result[num_tensors] = Σ g² over my pieces (left 0 once a non-finite value was seen). result is
  // host memory of num_tensors + 1 floats, zeroed by the caller.
  virtual void check_gradients(ShardState& state, std::span<float> result) = 0;
  // The element-wise optimizer over my owned slices (step >= 1).
  virtual void elementwise_step(ShardState& state, const optim::OptimizerParams& params, float lr,
                                int64_t step) = 0;
  // Muon / NorMuon on the matrices this rank owns (their master and gradient as ShardState's views
  // say: owned layout in my segment, dim0 the assembled buffers).
  virtual void matrix_step(ShardState& state, const optim::OptimizerParams& params, float lr,
                           TraceRecorder& trace) = 0;
};

// The backend of `space` (CUDA: device `device`, < 0 = the current one). Throws ConfigError when
// the program has no such backend (CUDA: built without the toolkit, or not linked with
// shardopt_runtime_cuda) and DeviceError when the space needs a device that is not there.
std::unique_ptr<StepBackend> make_step_backend(MemorySpace space, int device = -1);

// The process-wide host backend (stateless memory functions; ShardState objects built without an
// Engine use it). Its bind()/step methods must not be used: Engines create their own host backend.
StepBackend& host_memory();

// An owning array of fp32 values in one backend's memory space, zero-filled at allocation. data() is
// a pointer into that space (host code may dereference it only for MemorySpace::kHost).
class SpaceArray {
 public:
  SpaceArray() = default;
  SpaceArray(StepBackend& backend, size_t n);
  ~SpaceArray() { reset(); }
  SpaceArray(SpaceArray&& other) noexcept;
  SpaceArray& operator=(SpaceArray&& other) noexcept;
  SpaceArray(const SpaceArray&) = delete;
  SpaceArray& operator=(const SpaceArray&) = delete;

  float* data() const { return size_ == 0 ? nullptr : data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  size_t capacity() const { return capacity_; }
  // Changes size() within capacity(), zero-filling elements that come back (std::vector::resize).
  void resize_within_capacity(size_t n);
  void reset();

 private:
  StepBackend* backend_ = nullptr;
  float* data_ = nullptr;
  size_t size_ = 0, capacity_ = 0;
};

namespace detail {
// Set by the CUDA backend's object library at static initialization (runtime/cuda/).
using StepBackendFactory = std::unique_ptr<StepBackend> (*)(int device);
void register_cuda_step_backend(StepBackendFactory factory);
}  // namespace detail

}  // namespace shardopt::runtime
