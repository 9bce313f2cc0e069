#include "comm/host_staged_communicator.h"

#include <cuda_runtime.h>

#include <mutex>
#include <numeric>
#include <vector>

#include "base/error.h"

namespace shardopt::comm {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw DeviceError(std::string("host-staged communicator: ") + what + ": " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
}

// Host copy of a device input, taken at issue.
std::vector<std::byte> stage_in(const StagingCopies& copies, const void* device, size_t bytes) {
  std::vector<std::byte> host(bytes);
  if (bytes > 0) copies.to_host(host.data(), device, bytes);
  return host;
}

size_t total(std::span<const size_t> counts) { return std::accumulate(counts.begin(), counts.end(), size_t{0}); }

// The inner operation's Work plus the host buffers it uses; the output goes to the device once.
class StagedWork final : public Work {
 public:
  StagedWork(const StagingCopies& copies, std::vector<std::byte> in, std::vector<std::byte> out, void* device_out)
      : copies_(copies), in_(std::move(in)), out_(std::move(out)), device_out_(device_out) {}
  void start(WorkPtr inner) { inner_ = std::move(inner); }
  std::byte* in() { return in_.data(); }
  std::byte* out() { return out_.data(); }

  void wait(std::chrono::milliseconds timeout) override {
    inner_->wait(timeout);
    copy_out();
  }
  void wait() override {
    inner_->wait();
    copy_out();
  }
  bool done() override {
    if (!inner_->done()) return false;
    if (inner_->error() == nullptr) copy_out();
    return true;
  }
  bool buffers_released() override { return inner_->buffers_released(); }
  std::exception_ptr error() const override { return inner_->error(); }
  uint64_t seq() const override { return inner_->seq(); }

 private:
  void copy_out() {
    std::lock_guard<std::mutex> lock(mu_);
    if (copied_) return;
    if (device_out_ != nullptr && !out_.empty()) copies_.to_device(device_out_, out_.data(), out_.size());
    copied_ = true;
  }

  StagingCopies copies_;
  std::vector<std::byte> in_, out_;
  void* device_out_;
  WorkPtr inner_;
  std::mutex mu_;
  bool copied_ = false;
};

template <typename Issue>
WorkPtr staged(const StagingCopies& copies, const void* device_in, size_t in_bytes, void* device_out,
               size_t out_bytes, Issue&& issue) {
  auto work = std::make_shared<StagedWork>(
      copies, device_in ? stage_in(copies, device_in, in_bytes) : std::vector<std::byte>{},
      std::vector<std::byte>(out_bytes), device_out);
  work->start(issue(work->in(), work->out()));
  return work;
}

}  // namespace

StagingCopies cuda_staging_copies() {
  return {[](void* host, const void* device, size_t bytes) {
            check(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "copy of an input to host");
          },
          [](void* device, const void* host, size_t bytes) {
            check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "copy of an output to device");
          },
          [](void* to, const void* from, size_t bytes) {
            // Synchronized: the caller's non-blocking streams do not wait for the legacy stream.
            check(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, cudaStreamLegacy), "device copy");
            check(cudaStreamSynchronize(cudaStreamLegacy), "device copy");
          },
          [](void* stream) {
            check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "synchronizing the producer's stream");
          }};
}

void HostStagedCommunicator::wait_stream(void* stream) {
  if (copies_.sync_stream != nullptr) copies_.sync_stream(stream);
}

namespace {
// The wrapped communicator must move host memory: staging onto a device communicator would be wrong.
Communicator& require_host_buffers(Communicator& inner) {
  if (inner.device_buffers())
    throw ConfigError("HostStagedCommunicator: the wrapped '" + std::string(inner.backend()) +
                      "' communicator already moves device memory");
  return inner;
}
}  // namespace

HostStagedCommunicator::HostStagedCommunicator(Communicator& inner, StagingCopies copies)
    : ForwardingCommunicator(require_host_buffers(inner)), copies_(copies) {}

HostStagedCommunicator::HostStagedCommunicator(std::unique_ptr<Communicator> inner, StagingCopies copies)
    : ForwardingCommunicator((require_host_buffers(*inner), std::move(inner))), copies_(copies) {}

template <typename IssueEmpty>
WorkPtr HostStagedCommunicator::local(const void* send, void* recv, size_t bytes, IssueEmpty&& empty) {
  if (bytes > 0 && send != recv) copies_.on_device(recv, send, bytes);
  auto work = std::make_shared<StagedWork>(copies_, std::vector<std::byte>{}, std::vector<std::byte>{}, nullptr);
  work->start(empty(dummy_));
  return work;
}

std::unique_ptr<Communicator> HostStagedCommunicator::start_split(int color, int key) {
  auto child = inner().split(color, key);
  if (!child) return nullptr;
  return std::make_unique<HostStagedCommunicator>(std::move(child), copies_);
}

WorkPtr HostStagedCommunicator::start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
  const size_t bytes = count * dtype_size(dtype);
  if (size() == 1)
    return local(send, recv, bytes, [&](std::byte* d) { return inner().all_reduce(d, d, 0, dtype, op); });
  return staged(copies_, send, bytes, recv, bytes,
                [&](std::byte* in, std::byte* out) { return inner().all_reduce(in, out, count, dtype, op); });
}

WorkPtr HostStagedCommunicator::start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts,
                                                     DType dtype, ReduceOp op) {
  const size_t e = dtype_size(dtype);
  static constexpr size_t kNone[1] = {0};
  if (size() == 1)
    return local(send, recv, counts[0] * e,
                 [&](std::byte* d) { return inner().reduce_scatter(d, d, kNone, dtype, op); });
  return staged(copies_, send, total(counts) * e, recv, counts[static_cast<size_t>(rank())] * e,
                [&](std::byte* in, std::byte* out) { return inner().reduce_scatter(in, out, counts, dtype, op); });
}

WorkPtr HostStagedCommunicator::start_all_gather(const void* send, void* recv, std::span<const size_t> counts,
                                                 DType dtype) {
  const size_t e = dtype_size(dtype);
  static constexpr size_t kNone[1] = {0};
  if (size() == 1)
    return local(send, recv, counts[0] * e, [&](std::byte* d) { return inner().all_gather(d, d, kNone, dtype); });
  return staged(copies_, send, counts[static_cast<size_t>(rank())] * e, recv, total(counts) * e,
                [&](std::byte* in, std::byte* out) { return inner().all_gather(in, out, counts, dtype); });
}

WorkPtr HostStagedCommunicator::start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                                             int root) {
  const size_t bytes = count * dtype_size(dtype);
  const bool is_root = rank() == root;
  if (size() == 1)
    return local(send, recv, bytes, [&](std::byte* d) { return inner().reduce(d, d, 0, dtype, op, root); });
  return staged(copies_, send, bytes, is_root ? recv : nullptr, is_root ? bytes : 0, [&](std::byte* in, std::byte* out) {
    return inner().reduce(in, is_root ? out : nullptr, count, dtype, op, root);
  });
}

WorkPtr HostStagedCommunicator::start_broadcast(void* buf, size_t count, DType dtype, int root) {
  const size_t bytes = count * dtype_size(dtype);
  if (size() == 1) return local(buf, buf, 0, [&](std::byte* d) { return inner().broadcast(d, 0, dtype, root); });
  // In place on the host copy: the input buffer doubles as the output.
  auto work = std::make_shared<StagedWork>(copies_, std::vector<std::byte>{}, stage_in(copies_, buf, bytes), buf);
  work->start(inner().broadcast(work->out(), count, dtype, root));
  return work;
}

WorkPtr HostStagedCommunicator::start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                                                 std::span<const size_t> recv_counts, DType dtype) {
  const size_t e = dtype_size(dtype);
  static constexpr size_t kNone[1] = {0};
  if (size() == 1)
    return local(send, recv, send_counts[0] * e,
                 [&](std::byte* d) { return inner().all_to_all(d, kNone, d, kNone, dtype); });
  return staged(copies_, send, total(send_counts) * e, recv, total(recv_counts) * e, [&](std::byte* in, std::byte* out) {
    return inner().all_to_all(in, send_counts, out, recv_counts, dtype);
  });
}

WorkPtr HostStagedCommunicator::start_send(const void* buf, size_t count, DType dtype, int peer, int tag) {
  return staged(copies_, buf, count * dtype_size(dtype), nullptr, 0,
                [&](std::byte* in, std::byte*) { return inner().send(in, count, dtype, peer, tag); });
}

WorkPtr HostStagedCommunicator::start_recv(void* buf, size_t count, DType dtype, int peer, int tag) {
  return staged(copies_, nullptr, 0, buf, count * dtype_size(dtype),
                [&](std::byte*, std::byte* out) { return inner().recv(out, count, dtype, peer, tag); });
}

WorkPtr HostStagedCommunicator::start_sendrecv(const void* send, size_t send_count, int dst, void* recv,
                                               size_t recv_count, int src, DType dtype, int tag) {
  const size_t e = dtype_size(dtype);
  return staged(copies_, send, send_count * e, recv, recv_count * e, [&](std::byte* in, std::byte* out) {
    return inner().sendrecv(in, send_count, dst, out, recv_count, src, dtype, tag);
  });
}

WorkPtr HostStagedCommunicator::start_barrier() {
  return staged(copies_, nullptr, 0, nullptr, 0, [&](std::byte*, std::byte*) { return inner().barrier(); });
}

}  // namespace shardopt::comm
