#include "comm/cuda_buffer_mover.h"

#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/device_reduce_kernel.h"

namespace shardopt::comm {
namespace {

static_assert(kMaxCudaThreadWorld == detail::kMaxDeviceReduceBuffers);

// Device chunks are large: each one costs kernel launches and a stream synchronization.
constexpr size_t kDeviceChunkBytes = size_t{64} << 20;

std::string cuda_error(cudaError_t err) {
  return std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

detail::DeviceElem device_elem(DType dtype) {
  switch (dtype) {
    case DType::kF32: return detail::DeviceElem::kF32;
    case DType::kBF16: return detail::DeviceElem::kBF16;
    case DType::kF16: return detail::DeviceElem::kF16;
    case DType::kI32: return detail::DeviceElem::kI32;
    case DType::kI64: return detail::DeviceElem::kI64;
    case DType::kU8: return detail::DeviceElem::kU8;
    default: break;
  }
  throw ConfigError("reduction on device buffers: unsupported dtype " + std::string(dtype_name(dtype)));
}

detail::DeviceReduceOp device_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return detail::DeviceReduceOp::kSum;
    case ReduceOp::kAvg: return detail::DeviceReduceOp::kAvg;
    case ReduceOp::kMax: return detail::DeviceReduceOp::kMax;
    case ReduceOp::kMin: return detail::DeviceReduceOp::kMin;
  }
  throw ConfigError("reduction on device buffers: unknown reduce op");
}

class CudaBufferMover;

// The stream the calling thread's current chunk runs on, taken from its mover's pool at the chunk's
// first call and returned by finish(). A thread runs one chunk at a time.
struct Lane {
  CudaBufferMover* owner = nullptr;
  cudaStream_t stream = nullptr;
  int previous_device = -1;  // the thread's current device before the chunk, restored by finish()
};
thread_local Lane t_lane;

class CudaBufferMover final : public ThreadBufferMover {
 public:
  explicit CudaBufferMover(int device) : device_(device) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || device < 0 || device >= count)
      throw DeviceError("threads backend on device buffers: CUDA device " + std::to_string(device) +
                        (err != cudaSuccess ? ": " + cuda_error(err) : " does not exist (" + std::to_string(count) +
                                                                           " devices)"));
  }
  ~CudaBufferMover() override {
    for (cudaStream_t s : free_) cudaStreamDestroy(s);
  }

  bool device() const override { return true; }
  size_t chunk_bytes() const override { return kDeviceChunkBytes; }

  void reduce(DType dtype, ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
              size_t len) override {
    guarded([&] {
      if (inputs.size() > static_cast<size_t>(detail::kMaxDeviceReduceBuffers) ||
          outputs.size() > static_cast<size_t>(detail::kMaxDeviceReduceBuffers))
        throw ConfigError("threads backend on device buffers: a reduction over " + std::to_string(inputs.size()) +
                          " ranks; at most " + std::to_string(detail::kMaxDeviceReduceBuffers));
      const cudaError_t err =
          detail::launch_device_reduce(device_elem(dtype), device_op(op), inputs.data(), static_cast<int>(inputs.size()),
                                       outputs.data(), static_cast<int>(outputs.size()), len, stream());
      if (err != cudaSuccess)
        throw DeviceError("threads backend on CUDA device " + std::to_string(device_) + ": reduction of " +
                          std::to_string(len) + " " + std::string(dtype_name(dtype)) + ": " + cuda_error(err));
    });
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    guarded([&] {
      const cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream());
      if (err != cudaSuccess)
        throw DeviceError("threads backend on CUDA device " + std::to_string(device_) + ": copy of " +
                          std::to_string(bytes) + " bytes: " + cuda_error(err));
    });
  }

  // Any rank's thread may move this rank's buffers once everyone arrived: the producer's stream is
  // synchronized before the operation is issued.
  void wait_stream(void* stream) override {
    const cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    if (err != cudaSuccess)
      throw DeviceError("threads backend on CUDA device " + std::to_string(device_) +
                        ": synchronizing the producer's stream: " + cuda_error(err));
  }

  void finish() override {
    if (t_lane.owner != this) return;
    const cudaError_t err = cudaStreamSynchronize(t_lane.stream);
    release_lane();
    if (err != cudaSuccess)
      throw DeviceError("threads backend on CUDA device " + std::to_string(device_) + ": " + cuda_error(err));
  }

 private:
  cudaStream_t stream() {
    if (t_lane.owner == this) return t_lane.stream;
    SHARDOPT_ASSERT(t_lane.owner == nullptr, "threads backend: a chunk of one device world inside another's");
    int previous = -1;
    cudaGetDevice(&previous);
    cudaError_t err = cudaSetDevice(device_);
    cudaStream_t s = nullptr;
    {
      std::lock_guard lk(mu_);
      if (!free_.empty()) s = free_.back(), free_.pop_back();
    }
    if (err == cudaSuccess && s == nullptr) err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      if (previous >= 0) cudaSetDevice(previous);
      throw DeviceError("threads backend on CUDA device " + std::to_string(device_) + ": " + cuda_error(err));
    }
    t_lane = {this, s, previous};
    return s;
  }

  void release_lane() {
    {
      std::lock_guard lk(mu_);
      free_.push_back(t_lane.stream);
    }
    if (t_lane.previous_device >= 0 && t_lane.previous_device != device_) cudaSetDevice(t_lane.previous_device);
    t_lane = {};
  }

  // Runs f; if it throws, the chunk's earlier work is drained (its buffers must not be written after
  // the operation fails) and the lane returned before the error goes on.
  template <class F>
  void guarded(F&& f) {
    try {
      f();
    } catch (...) {
      if (t_lane.owner == this) {
        cudaStreamSynchronize(t_lane.stream);
        release_lane();
      }
      throw;
    }
  }

  const int device_;
  std::mutex mu_;
  std::vector<cudaStream_t> free_;  // streams of finished chunks
};

}  // namespace

std::shared_ptr<ThreadBufferMover> cuda_buffer_mover(int device) { return std::make_shared<CudaBufferMover>(device); }

std::vector<std::unique_ptr<Communicator>> make_cuda_thread_world(int n, int device, CommOptions options) {
  if (n > kMaxCudaThreadWorld)
    throw ConfigError("make_cuda_thread_world: " + std::to_string(n) + " ranks; a device world holds at most " +
                      std::to_string(kMaxCudaThreadWorld));
  return make_thread_world(n, options, cuda_buffer_mover(device));
}

}  // namespace shardopt::comm
