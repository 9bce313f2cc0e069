// HostStagedCommunicator: device buffers over a host communicator. It presents device_buffers() =
// true and runs every operation on the wrapped host communicator (threads or MPI) through host
// copies: inputs are copied device -> host when the operation is issued, outputs host -> device when
// its Work finishes (wait(), or done() returning true).
//
// Its purpose is correctness, not speed: N ranks of the threads backend sharing one GPU, each with a
// device Engine (EngineOptions::memory_space = cuda), so the N-rank = 1-rank suites run on one GPU.
// NCCL cannot put two ranks on one device; one GPU per rank stays NCCL's job. Each operation costs a
// synchronous cudaMemcpy each way and host staging buffers allocated per operation.
// One rank (size() == 1): a collective's result is its input, so the bytes move device to device and
// never visit the host; the inner communicator still sees the operation, with no elements, so its
// sequence numbers, checks and flight recorder stay as with more ranks.
// Device buffers must hold their final values when an operation is issued (the caller has
// synchronized the stream that wrote them, or called wait_stream with it).
#pragma once

#include <cstddef>
#include <memory>

#include "comm/forwarding_communicator.h"

namespace shardopt::comm {

// How bytes cross between the caller's (device) buffers and the host staging buffers. The default is
// cudaMemcpy; tests on machines without a GPU pass plain memcpy to check the staging logic.
struct StagingCopies {
  void (*to_host)(void* host, const void* device, size_t bytes);
  void (*to_device)(void* device, const void* host, size_t bytes);
  void (*on_device)(void* to, const void* from, size_t bytes);  // one rank: send buffer -> recv buffer
  // wait_stream: returns once the work enqueued on the CUDA stream so far is done (null: nothing).
  void (*sync_stream)(void* stream) = nullptr;
};
StagingCopies cuda_staging_copies();

// Derives from ForwardingCommunicator for the wrapper plumbing (ownership, rank/size/abort); it stages
// the buffers of every operation, so it overrides every start_* rather than forward().
class HostStagedCommunicator final : public ForwardingCommunicator {
 public:
  // `inner` must move host memory (ConfigError otherwise); it outlives this communicator.
  explicit HostStagedCommunicator(Communicator& inner, StagingCopies copies = cuda_staging_copies());
  // Owns `inner` (split children).
  explicit HostStagedCommunicator(std::unique_ptr<Communicator> inner, StagingCopies copies = cuda_staging_copies());

  std::string_view backend() const override { return "host-staged"; }
  bool device_buffers() const override { return true; }
  // Inputs are copied to the host when an operation is issued: the stream is synchronized here.
  void wait_stream(void* stream) override;

 protected:
  std::unique_ptr<Communicator> start_split(int color, int key) override;
  WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override;
  WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                               ReduceOp op) override;
  WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override;
  WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) override;
  WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override;
  WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts, DType dtype) override;
  WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override;
  WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override;
  WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                         DType dtype, int tag) override;
  WorkPtr start_barrier() override;

 private:
  // One rank: copies `bytes` from send to recv on the device, then issues `empty` (the inner operation
  // with no elements) for its Work.
  template <typename IssueEmpty>
  WorkPtr local(const void* send, void* recv, size_t bytes, IssueEmpty&& empty);

  StagingCopies copies_;
  std::byte dummy_[8] = {};  // the buffers of the empty inner operations
};

}  // namespace shardopt::comm
