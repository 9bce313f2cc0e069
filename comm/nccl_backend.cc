#include "comm/nccl_backend.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "comm/checked_communicator.h"
#include "comm/mpi_backend.h"
#include "comm/nccl_convert.h"

namespace shardopt::comm {

namespace detail {
struct NcclShared {
  ncclComm_t comm = nullptr;
  std::mutex mutex;  // guards every use of `comm` (enqueue, split, async-error query) and abort
  std::atomic<bool> aborted{false};
  std::string abort_reason;  // under mutex
  int rank = 0, size = 1;

  // Aborts once; later calls keep the first reason.
  void abort(const std::string& reason) {
    std::lock_guard<std::mutex> lock(mutex);
    if (aborted.load()) return;
    abort_reason = reason;
    aborted.store(true);
    ncclCommAbort(comm);  // frees the communicator; kernels in flight are stopped
  }
};
}  // namespace detail

namespace {

using Clock = std::chrono::steady_clock;

std::string where(OpKind kind, uint64_t seq, int rank, int size) {
  return "nccl " + std::string(op_kind_name(kind)) + " seq " + std::to_string(seq) + " (rank " +
         std::to_string(rank) + " of " + std::to_string(size) + ")";
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess)
    throw DeviceError(what + ": CUDA error " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

void check_nccl(ncclResult_t result, ncclComm_t comm, const std::string& what) {
  if (result == ncclSuccess) return;
  const char* last = comm != nullptr ? ncclGetLastError(comm) : "";
  const std::string msg = what + ": " + ncclGetErrorString(result) + (last && *last ? std::string(" (") + last + ")" : "");
  if (result == ncclInvalidArgument || result == ncclInvalidUsage) throw ConfigError(msg);
  throw PeerError(msg);
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return ncclFloat32;
    case DType::kBF16: return ncclBfloat16;
    case DType::kF16: return ncclFloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
    case DType::kU8: return ncclUint8;
    default: break;
  }
  throw ConfigError("NcclCommunicator: unsupported dtype " + std::string(dtype_name(dtype)) +
                    " (expected f32, bf16, f16, i32, i64 or u8)");
}

bool is_half(DType d) { return d == DType::kBF16 || d == DType::kF16; }
bool is_int(DType d) { return d == DType::kI32 || d == DType::kI64 || d == DType::kU8; }

ncclRedOp_t nccl_op(ReduceOp op, DType dtype) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kAvg: return is_int(dtype) ? ncclSum : ncclAvg;  // integers: sum, then divide
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

detail::IntKind int_kind(DType d) {
  return d == DType::kI32 ? detail::IntKind::kI32 : (d == DType::kI64 ? detail::IntKind::kI64 : detail::IntKind::kU8);
}

detail::HalfKind half_kind(DType d) { return d == DType::kBF16 ? detail::HalfKind::kBf16 : detail::HalfKind::kF16; }

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<detail::NcclShared> shared, OpKind kind, uint64_t seq, std::chrono::milliseconds timeout)
      : shared_(std::move(shared)), kind_(kind), seq_(seq), default_timeout_(timeout) {
    check_cuda(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), name() + ": cudaEventCreate");
  }
  ~NcclWork() override {
    if (event_ != nullptr) cudaEventDestroy(event_);
  }
  cudaEvent_t event() const { return event_; }

  void wait(std::chrono::milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    while (!poll()) {
      if (Clock::now() >= deadline) {
        const std::string msg = name() + " did not complete within " + std::to_string(timeout.count()) +
                                " ms; the communicator was aborted (NCCL does not report which ranks are missing)";
        shared_->abort("timeout of " + name());
        finish(std::make_exception_ptr(TimeoutError(msg)));
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (error_) std::rethrow_exception(error_);
  }
  void wait() override { wait(default_timeout_); }
  bool done() override { return poll(); }
  std::exception_ptr error() const override { return error_; }
  uint64_t seq() const override { return seq_; }

 private:
  std::string name() const { return where(kind_, seq_, shared_->rank, shared_->size); }
  void finish(std::exception_ptr e) {
    finished_ = true;
    error_ = e;
  }
  // One non-blocking look: true once finished (successfully or not). The communicator handle is
  // used under the shared mutex, so a concurrent abort() cannot free it in between.
  bool poll() {
    if (finished_) return true;
    std::string async_failure;
    {
      std::lock_guard<std::mutex> lock(shared_->mutex);
      if (shared_->aborted.load()) {
        finish(std::make_exception_ptr(PeerError(name() + ": communicator aborted: " + shared_->abort_reason)));
        return true;
      }
      const cudaError_t q = cudaEventQuery(event_);
      if (q == cudaSuccess) {
        finish(nullptr);
        return true;
      }
      if (q != cudaErrorNotReady) {
        finish(std::make_exception_ptr(DeviceError(name() + ": CUDA error " + cudaGetErrorName(q))));
        return true;
      }
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(shared_->comm, &async) == ncclSuccess && async != ncclSuccess &&
          async != ncclInProgress)
        async_failure = name() + ": NCCL asynchronous error " + ncclGetErrorString(async);
    }
    if (async_failure.empty()) return false;
    shared_->abort(async_failure);
    finish(std::make_exception_ptr(PeerError(async_failure)));
    return true;
  }

  std::shared_ptr<detail::NcclShared> shared_;
  OpKind kind_;
  uint64_t seq_;
  std::chrono::milliseconds default_timeout_;
  cudaEvent_t event_ = nullptr;
  bool finished_ = false;
  std::exception_ptr error_;
};

}  // namespace

NcclCommunicator::NcclCommunicator(const ncclUniqueId& id, int rank, int size, int device, CommOptions options)
    : Communicator(options), shared_(std::make_shared<detail::NcclShared>()), rank_(rank), size_(size),
      device_(device) {
  if (options.checked)
    throw ConfigError("NcclCommunicator: checked mode needs a host-memory side channel for the fingerprints; use "
                      "make_nccl_communicator_mpi, or make_checked_communicator(comm, side channel) on an unchecked "
                      "NcclCommunicator");
  if (size < 1 || rank < 0 || rank >= size)
    throw ConfigError("NcclCommunicator: expected 0 <= rank < size, got rank " + std::to_string(rank) + ", size " +
                      std::to_string(size));
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (device < 0 || device >= devices)
    throw ConfigError("NcclCommunicator: device " + std::to_string(device) + " requested, " +
                      std::to_string(devices) + " CUDA devices visible");
  check_cuda(cudaSetDevice(device_), "NcclCommunicator: cudaSetDevice");
  ncclUniqueId copy = id;
  check_nccl(ncclCommInitRank(&shared_->comm, size, copy, rank), nullptr, "NcclCommunicator: ncclCommInitRank");
  shared_->rank = rank_;
  shared_->size = size_;
  init_resources();
}

NcclCommunicator::NcclCommunicator(ncclComm_t comm, int device, CommOptions options)
    : Communicator(options), shared_(std::make_shared<detail::NcclShared>()), device_(device) {
  shared_->comm = comm;
  check_nccl(ncclCommUserRank(comm, &rank_), comm, "NcclCommunicator: ncclCommUserRank");
  check_nccl(ncclCommCount(comm, &size_), comm, "NcclCommunicator: ncclCommCount");
  shared_->rank = rank_;
  shared_->size = size_;
  init_resources();
}

void NcclCommunicator::init_resources() {
  check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "NcclCommunicator: cudaStreamCreate");
  check_cuda(cudaMalloc(&barrier_word_, sizeof(int32_t)), "NcclCommunicator: cudaMalloc");
  check_cuda(cudaMemset(barrier_word_, 0, sizeof(int32_t)), "NcclCommunicator: cudaMemset");
  check_cuda(cudaEventCreateWithFlags(&producer_done_, cudaEventDisableTiming), "NcclCommunicator: cudaEventCreate");
}

void NcclCommunicator::wait_stream(void* stream) {
  // The wait is captured when it is enqueued: later operations on stream_ start after the producer's
  // work enqueued so far, whatever is recorded on producer_done_ next.
  check_cuda(cudaSetDevice(device_), "NcclCommunicator::wait_stream: cudaSetDevice");
  check_cuda(cudaEventRecord(producer_done_, static_cast<cudaStream_t>(stream)),
             "NcclCommunicator::wait_stream: cudaEventRecord on the producer's stream");
  check_cuda(cudaStreamWaitEvent(stream_, producer_done_, 0), "NcclCommunicator::wait_stream: cudaStreamWaitEvent");
}

NcclCommunicator::~NcclCommunicator() {
  cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (!shared_->aborted.load() && shared_->comm != nullptr) ncclCommDestroy(shared_->comm);
  if (staging_ != nullptr) cudaFree(staging_);
  if (barrier_word_ != nullptr) cudaFree(barrier_word_);
  if (producer_done_ != nullptr) cudaEventDestroy(producer_done_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

void NcclCommunicator::abort(const std::string& reason) { shared_->abort(reason); }

template <typename Enqueue>
WorkPtr NcclCommunicator::issue(OpKind kind, Enqueue&& enqueue) {
  const uint64_t seq = next_seq_++;
  const std::string name = where(kind, seq, rank_, size_);
  check_cuda(cudaSetDevice(device_), name + ": cudaSetDevice");
  auto work = std::make_shared<NcclWork>(shared_, kind, seq, options_.timeout);
  // Under the shared mutex from the aborted check through the enqueue: abort() (which frees the
  // NCCL communicator) cannot run in between. After an abort the Work reports PeerError at wait().
  std::lock_guard<std::mutex> lock(shared_->mutex);
  if (shared_->aborted.load()) return work;
  enqueue(name);
  check_cuda(cudaGetLastError(), name + ": kernel launch");
  check_cuda(cudaEventRecord(work->event(), stream_), name + ": cudaEventRecord");
  return work;
}

float* NcclCommunicator::staging(size_t n) {
  if (n > staging_floats_) {
    // Stream-ordered: earlier operations that still read the old buffer finish first.
    if (staging_ != nullptr) check_cuda(cudaFreeAsync(staging_, stream_), "NcclCommunicator: cudaFreeAsync");
    staging_ = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&staging_), n * sizeof(float), stream_),
               "NcclCommunicator: cudaMallocAsync of the fp32 staging buffer");
    staging_floats_ = n;
  }
  return staging_;
}

std::unique_ptr<Communicator> NcclCommunicator::start_split(int color, int key) {
  const std::string name = where(OpKind::kSplit, next_seq_++, rank_, size_);
  check_cuda(cudaSetDevice(device_), name);
  check_cuda(cudaStreamSynchronize(stream_), name);
  ncclComm_t child = nullptr;
  {
    // Blocking and under the shared mutex (abort() cannot free the communicator meanwhile; an
    // abort from another thread waits for the split to return).
    std::lock_guard<std::mutex> lock(shared_->mutex);
    if (shared_->aborted.load()) throw PeerError(name + ": communicator aborted: " + shared_->abort_reason);
    check_nccl(ncclCommSplit(shared_->comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr),
               shared_->comm, name + ": ncclCommSplit");
  }
  if (child == nullptr) return nullptr;
  return std::unique_ptr<Communicator>(new NcclCommunicator(child, device_, options_));
}

WorkPtr NcclCommunicator::start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
  const ncclDataType_t type = nccl_type(dtype);
  auto work = issue(OpKind::kAllReduce, [&](const std::string& name) {
    if (is_half(dtype) && (op == ReduceOp::kSum || op == ReduceOp::kAvg)) {
      float* tmp = staging(count);
      detail::launch_half_to_float(send, half_kind(dtype), tmp, count, stream_);
      check_nccl(ncclAllReduce(tmp, tmp, count, ncclFloat32, nccl_op(op, dtype), shared_->comm, stream_),
                 shared_->comm, name);
      detail::launch_float_to_half(tmp, half_kind(dtype), recv, count, stream_);
    } else {
      check_nccl(ncclAllReduce(send, recv, count, type, nccl_op(op, dtype), shared_->comm, stream_), shared_->comm,
                 name);
      if (is_int(dtype) && op == ReduceOp::kAvg) detail::launch_int_divide(recv, int_kind(dtype), count, size_, stream_);
    }
  });
  return work;
}

WorkPtr NcclCommunicator::start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                                         ReduceOp op) {
  const size_t es = dtype_size(dtype);
  const ncclDataType_t type = nccl_type(dtype);
  const size_t total = std::accumulate(counts.begin(), counts.end(), size_t{0});
  const size_t own = counts[size_t(rank_)];
  const bool equal = std::all_of(counts.begin(), counts.end(), [&](size_t c) { return c == counts[0]; });
  const bool fp32_accumulate = is_half(dtype) && (op == ReduceOp::kSum || op == ReduceOp::kAvg);
  auto work = issue(OpKind::kReduceScatter, [&](const std::string& name) {
    const void* src = send;
    ncclDataType_t wire = type;
    size_t wire_es = es;
    float* tmp = nullptr;
    if (fp32_accumulate) {
      tmp = staging(total);
      detail::launch_half_to_float(send, half_kind(dtype), tmp, total, stream_);
      src = tmp;
      wire = ncclFloat32;
      wire_es = sizeof(float);
    }
    // Where this rank's reduced segment lands: in place in the staging buffer for fp32 accumulation.
    size_t own_offset = 0;
    for (int r = 0; r < rank_; ++r) own_offset += counts[size_t(r)];
    void* dst = fp32_accumulate ? static_cast<void*>(tmp + own_offset) : recv;
    const ncclRedOp_t nop = nccl_op(op, dtype);
    if (equal) {
      check_nccl(ncclReduceScatter(src, dst, counts[0], wire, nop, shared_->comm, stream_), shared_->comm, name);
    } else {
      check_nccl(ncclGroupStart(), shared_->comm, name);
      size_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        const void* seg = static_cast<const char*>(src) + offset * wire_es;
        // recvbuff is only written on the root; other ranks pass their own destination (unused).
        check_nccl(ncclReduce(seg, r == rank_ ? dst : const_cast<void*>(seg), counts[size_t(r)], wire, nop, r,
                              shared_->comm, stream_),
                   shared_->comm, name);
        offset += counts[size_t(r)];
      }
      check_nccl(ncclGroupEnd(), shared_->comm, name);
    }
    if (fp32_accumulate) detail::launch_float_to_half(tmp + own_offset, half_kind(dtype), recv, own, stream_);
    if (is_int(dtype) && op == ReduceOp::kAvg) detail::launch_int_divide(recv, int_kind(dtype), own, size_, stream_);
  });
  return work;
}

WorkPtr NcclCommunicator::start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) {
  const size_t es = dtype_size(dtype);
  const ncclDataType_t type = nccl_type(dtype);
  const bool equal = std::all_of(counts.begin(), counts.end(), [&](size_t c) { return c == counts[0]; });
  auto work = issue(OpKind::kAllGather, [&](const std::string& name) {
    if (equal) {
      check_nccl(ncclAllGather(send, recv, counts[0], type, shared_->comm, stream_), shared_->comm, name);
      return;
    }
    check_nccl(ncclGroupStart(), shared_->comm, name);
    size_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      void* piece = static_cast<char*>(recv) + offset * es;
      // sendbuff is read on the root only (in place when send == piece).
      check_nccl(ncclBroadcast(r == rank_ ? send : piece, piece, counts[size_t(r)], type, r, shared_->comm, stream_),
                 shared_->comm, name);
      offset += counts[size_t(r)];
    }
    check_nccl(ncclGroupEnd(), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) {
  const ncclDataType_t type = nccl_type(dtype);
  auto work = issue(OpKind::kReduce, [&](const std::string& name) {
    if (is_half(dtype) && (op == ReduceOp::kSum || op == ReduceOp::kAvg)) {
      float* tmp = staging(count);
      detail::launch_half_to_float(send, half_kind(dtype), tmp, count, stream_);
      check_nccl(ncclReduce(tmp, tmp, count, ncclFloat32, nccl_op(op, dtype), root, shared_->comm, stream_),
                 shared_->comm, name);
      if (rank_ == root) detail::launch_float_to_half(tmp, half_kind(dtype), recv, count, stream_);
    } else {
      void* dst = rank_ == root ? recv : const_cast<void*>(send);  // recvbuff is unused off the root
      check_nccl(ncclReduce(send, dst, count, type, nccl_op(op, dtype), root, shared_->comm, stream_), shared_->comm,
                 name);
      if (rank_ == root && is_int(dtype) && op == ReduceOp::kAvg)
        detail::launch_int_divide(recv, int_kind(dtype), count, size_, stream_);
    }
  });
  return work;
}

WorkPtr NcclCommunicator::start_broadcast(void* buf, size_t count, DType dtype, int root) {
  const ncclDataType_t type = nccl_type(dtype);
  auto work = issue(OpKind::kBroadcast, [&](const std::string& name) {
    check_nccl(ncclBroadcast(buf, buf, count, type, root, shared_->comm, stream_), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                                     std::span<const size_t> recv_counts, DType dtype) {
  const size_t es = dtype_size(dtype);
  const ncclDataType_t type = nccl_type(dtype);
  if (send_counts[size_t(rank_)] != recv_counts[size_t(rank_)])
    throw ConfigError("NcclCommunicator::all_to_all: rank " + std::to_string(rank_) + " sends " +
                      std::to_string(send_counts[size_t(rank_)]) + " elements to itself but expects " +
                      std::to_string(recv_counts[size_t(rank_)]));
  auto work = issue(OpKind::kAllToAll, [&](const std::string& name) {
    size_t soff = 0, roff = 0;
    check_nccl(ncclGroupStart(), shared_->comm, name);
    for (int p = 0; p < size_; ++p) {
      const size_t sc = send_counts[size_t(p)], rc = recv_counts[size_t(p)];
      const char* s = static_cast<const char*>(send) + soff * es;
      char* r = static_cast<char*>(recv) + roff * es;
      if (p == rank_) {
        if (sc > 0) check_cuda(cudaMemcpyAsync(r, s, sc * es, cudaMemcpyDeviceToDevice, stream_), name);
      } else {
        if (sc > 0) check_nccl(ncclSend(s, sc, type, p, shared_->comm, stream_), shared_->comm, name);
        if (rc > 0) check_nccl(ncclRecv(r, rc, type, p, shared_->comm, stream_), shared_->comm, name);
      }
      soff += sc;
      roff += rc;
    }
    check_nccl(ncclGroupEnd(), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_send(const void* buf, size_t count, DType dtype, int peer, int /*tag*/) {
  if (peer == rank_) throw ConfigError("NcclCommunicator::send: peer is this rank; use sendrecv to copy to itself");
  const ncclDataType_t type = nccl_type(dtype);
  auto work = issue(OpKind::kSend, [&](const std::string& name) {
    check_nccl(ncclSend(buf, count, type, peer, shared_->comm, stream_), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_recv(void* buf, size_t count, DType dtype, int peer, int /*tag*/) {
  if (peer == rank_) throw ConfigError("NcclCommunicator::recv: peer is this rank; use sendrecv to copy to itself");
  const ncclDataType_t type = nccl_type(dtype);
  auto work = issue(OpKind::kRecv, [&](const std::string& name) {
    check_nccl(ncclRecv(buf, count, type, peer, shared_->comm, stream_), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count,
                                   int src, DType dtype, int /*tag*/) {
  const size_t es = dtype_size(dtype);
  const ncclDataType_t type = nccl_type(dtype);
  if ((dst == rank_) != (src == rank_))
    throw ConfigError("NcclCommunicator::sendrecv: a copy to itself needs dst == src == rank " +
                      std::to_string(rank_) + ", got dst " + std::to_string(dst) + ", src " + std::to_string(src));
  if (dst == rank_ && send_count != recv_count)
    throw ConfigError("NcclCommunicator::sendrecv: copy to itself with send_count " + std::to_string(send_count) +
                      " != recv_count " + std::to_string(recv_count));
  auto work = issue(OpKind::kSendRecv, [&](const std::string& name) {
    if (dst == rank_) {
      if (send_count > 0)
        check_cuda(cudaMemcpyAsync(recv, send, send_count * es, cudaMemcpyDeviceToDevice, stream_), name);
      return;
    }
    check_nccl(ncclGroupStart(), shared_->comm, name);
    check_nccl(ncclSend(send, send_count, type, dst, shared_->comm, stream_), shared_->comm, name);
    check_nccl(ncclRecv(recv, recv_count, type, src, shared_->comm, stream_), shared_->comm, name);
    check_nccl(ncclGroupEnd(), shared_->comm, name);
  });
  return work;
}

WorkPtr NcclCommunicator::start_barrier() {
  auto work = issue(OpKind::kBarrier, [&](const std::string& name) {
    check_nccl(ncclAllReduce(barrier_word_, barrier_word_, 1, ncclInt32, ncclSum, shared_->comm, stream_),
               shared_->comm, name);
  });
  return work;
}

ncclUniqueId nccl_unique_id_over_mpi(MPI_Comm comm, int root) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  ncclUniqueId id{};
  if (rank == root) check_nccl(ncclGetUniqueId(&id), nullptr, "nccl_unique_id_over_mpi: ncclGetUniqueId");
  if (MPI_Bcast(&id, sizeof id, MPI_BYTE, root, comm) != MPI_SUCCESS)
    throw PeerError("nccl_unique_id_over_mpi: MPI_Bcast of the NCCL unique id failed");
  return id;
}

std::unique_ptr<Communicator> make_nccl_communicator_mpi(MPI_Comm comm, int device, CommOptions options) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  if (device < 0) {
    MPI_Comm local;
    MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    int local_rank = 0;
    MPI_Comm_rank(local, &local_rank);
    MPI_Comm_free(&local);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
      throw ConfigError("make_nccl_communicator_mpi: no CUDA device visible on rank " + std::to_string(rank));
    device = local_rank % devices;
  }
  const ncclUniqueId id = nccl_unique_id_over_mpi(comm, 0);
  CommOptions unchecked = options;
  unchecked.checked = false;
  auto nccl = std::make_unique<NcclCommunicator>(id, rank, size, device, unchecked);
  if (!options.checked) return nccl;
  // Checked mode: fingerprints travel on a host-memory MPI communicator over the same ranks.
  return make_checked_communicator(std::move(nccl), make_mpi_communicator(comm, unchecked));
}

}  // namespace shardopt::comm
