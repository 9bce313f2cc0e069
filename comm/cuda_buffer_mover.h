// The threads backend on device buffers: ranks of one process sharing one GPU (or several GPUs of
// one machine) exchange device memory directly, without staging through the host.
//
// Copies are cudaMemcpyAsync (device to device; peers' memory through unified addressing); a
// reduction is one kernel that reads every rank's input and writes every output, with the host
// reduction's arithmetic (comm/reduce_kernel.h: rank order, bf16/f16 accumulated in fp32 and rounded
// once, integer sums wrapped to the element width, avg truncating integers), so a device world and a
// host world give the same bits. Each chunk runs on a stream taken from the mover's pool and is
// synchronized before the chunk counts as done, so Work::wait() returns with the data in place.
// Device buffers must hold their final values when an operation is issued (the caller has
// synchronized the stream that wrote them, or called Communicator::wait_stream with it, which
// synchronizes it: ranks' buffers are read by whichever rank's thread runs the chunk).
#pragma once

#include <memory>

#include "comm/thread_backend.h"

namespace shardopt::comm {

// Largest number of ranks in a device world (the reduction kernel takes the ranks' pointers as
// kernel arguments).
inline constexpr int kMaxCudaThreadWorld = 64;

// A mover for buffers on CUDA device `device` (kernels and copies run there). DeviceError when the
// device cannot be used.
std::shared_ptr<ThreadBufferMover> cuda_buffer_mover(int device);

// make_thread_world with cuda_buffer_mover(device): n ranks whose buffers are on `device`.
// ConfigError above kMaxCudaThreadWorld ranks.
std::vector<std::unique_ptr<Communicator>> make_cuda_thread_world(int n, int device, CommOptions options = {});

}  // namespace shardopt::comm
