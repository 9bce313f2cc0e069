// The NCCL backend of comm::Communicator: collectives on device buffers, ordered on one CUDA
// stream per communicator.
//
// Choices (see also the notes on each method):
// - Uneven counts. reduce_scatter / all_gather with equal counts use ncclReduceScatter /
//   ncclAllGather; with uneven counts they run as one NCCL group of size() ncclReduce (root r
//   receives segment r) or ncclBroadcast (root r sends its piece) calls. No padding, no staging
//   memory, and the bytes on the wire are the logical ones; the price is size() smaller operations.
// - bf16 / f16 sum and avg accumulate in fp32, as the contract asks: the input is converted to fp32
//   in a staging buffer on the stream, reduced as fp32 and converted back (the wire carries fp32:
//   twice the bytes of a native 16-bit reduction). max / min are exact and run natively.
//   Integer avg = sum, then division truncating toward zero.
// - Work handles are CUDA events recorded on the stream after each operation. wait(timeout)
//   polls cudaEventQuery and ncclCommGetAsyncError; on timeout the communicator is aborted
//   (ncclCommAbort) and TimeoutError names the operation and its sequence number (NCCL cannot tell
//   which ranks did not arrive). After an abort every operation's wait() throws PeerError.
//   CUDA failures are DeviceError, NCCL failures PeerError (ConfigError for invalid arguments).
// - Tags of send/recv are not matched: NCCL delivers the messages between two ranks in issue order,
//   so only tag 0 is accepted (ConfigError otherwise).
// - Threading (the Communicator contract): one issuing thread at a time; Work and abort() from any
//   thread. Every use of the NCCL communicator handle (enqueue, split, async-error query) and
//   abort()'s ncclCommAbort hold one mutex, so abort() cannot free it under an enqueue.
// - Checked mode: make_nccl_communicator_mpi wraps the communicator in a CheckedCommunicator with an
//   MPI side channel for the fingerprints (they are host data; NCCL buffers are device memory).
//   The constructor refuses options.checked (ConfigError): it has no host channel to use.
// - The Work of an operation keeps no reference to the caller's buffers; they must stay valid
//   until it completes.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "comm/communicator.h"

namespace shardopt::comm {

namespace detail {
struct NcclShared;  // comm handle + abort state shared by the communicator and its Work handles
}

class NcclCommunicator final : public Communicator {
 public:
  // Joins the clique `id` as `rank` of `size` on CUDA device `device` (blocking until every rank
  // joined). Throws ConfigError for bad rank/size/device, PeerError when NCCL fails.
  NcclCommunicator(const ncclUniqueId& id, int rank, int size, int device, CommOptions options = CommOptions{});
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "nccl"; }
  bool device_buffers() const override { return true; }
  // The stream every operation of this communicator runs on (owned by it).
  cudaStream_t stream() const { return stream_; }
  // stream() waits on an event recorded on `stream` (no host wait).
  void wait_stream(void* stream) override;
  int device() const { return device_; }

  // NCCL matches send/recv between two ranks by issue order only: tags other than 0 are refused.
  Capabilities capabilities() const override { return {.tags = false}; }
  void abort(const std::string& reason) override;

 protected:
  // ncclCommSplit. A negative color means "in no group": returns nullptr on that rank.
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
  NcclCommunicator(ncclComm_t comm, int device, CommOptions options);  // for split
  void init_resources();
  template <typename Enqueue>
  WorkPtr issue(OpKind kind, Enqueue&& enqueue);
  // Grows the fp32 staging buffer (stream-ordered) to hold n floats; returns it.
  float* staging(size_t n);
  void reduce_in_fp32(OpKind kind, const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root);

  std::shared_ptr<detail::NcclShared> shared_;
  int rank_ = 0, size_ = 1, device_ = 0;
  cudaStream_t stream_ = nullptr;
  uint64_t next_seq_ = 0;
  float* staging_ = nullptr;
  size_t staging_floats_ = 0;
  int32_t* barrier_word_ = nullptr;     // device scratch for barrier()
  cudaEvent_t producer_done_ = nullptr;  // wait_stream's event on the producer's stream
};

// Rank `root` of `comm` creates an NCCL unique id and broadcasts it over MPI; every rank returns it.
ncclUniqueId nccl_unique_id_over_mpi(MPI_Comm comm, int root = 0);

// For mpirun jobs: an NcclCommunicator spanning `comm`'s ranks, wrapped in a CheckedCommunicator
// (side channel: an MPI communicator over `comm`) when options.checked. device < 0 picks
// (rank among the ranks on this host) mod (visible devices).
std::unique_ptr<Communicator> make_nccl_communicator_mpi(MPI_Comm comm, int device = -1,
                                                             CommOptions options = CommOptions{});

}  // namespace shardopt::comm
