#include "comm/communicator.h"

#include "base/env.h"
#include "base/error.h"
#include "comm/backend_util.h"

namespace shardopt::comm {

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

std::string_view op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::kAllReduce: return "all_reduce";
    case OpKind::kReduceScatter: return "reduce_scatter";
    case OpKind::kAllGather: return "all_gather";
    case OpKind::kReduce: return "reduce";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kAllToAll: return "all_to_all";
    case OpKind::kSend: return "send";
    case OpKind::kRecv: return "recv";
    case OpKind::kSendRecv: return "sendrecv";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kSplit: return "split";
    case OpKind::kCount: break;
  }
  return "?";
}

uint64_t TrafficCounters::total_sent() const {
  uint64_t s = 0;
  for (uint64_t b : bytes_sent) s += b;
  return s;
}

uint64_t TrafficCounters::total_received() const {
  uint64_t s = 0;
  for (uint64_t b : bytes_received) s += b;
  return s;
}

TrafficCounters TrafficCounters::operator-(const TrafficCounters& earlier) const {
  TrafficCounters d;
  for (size_t i = 0; i < d.calls.size(); ++i) {
    d.bytes_sent[i] = bytes_sent[i] - earlier.bytes_sent[i];
    d.bytes_received[i] = bytes_received[i] - earlier.bytes_received[i];
    d.calls[i] = calls[i] - earlier.calls[i];
  }
  return d;
}

CommOptions CommOptions::from_env() {
  CommOptions o;
  o.timeout = std::chrono::milliseconds(env::get_int("SHARDOPT_COMM_TIMEOUT_MS"));
  o.checked = env::get_bool("SHARDOPT_COMM_CHECKED");
  return o;
}

void Communicator::count_traffic(OpKind kind, uint64_t bytes_sent, uint64_t bytes_received) {
  const auto k = static_cast<size_t>(kind);
  std::lock_guard lk(counters_mu_);
  counters_.bytes_sent[k] += bytes_sent;
  counters_.bytes_received[k] += bytes_received;
  counters_.calls[k] += 1;
}

TrafficCounters Communicator::counters() const {
  std::lock_guard lk(counters_mu_);
  return counters_;
}

void Communicator::check_options(OpKind kind, int tag, const CollectiveOptions& options) const {
  const Capabilities caps = capabilities();
  if (tag != 0 && !caps.tags)
    throw ConfigError(std::string(op_kind_name(kind)) + ": the " + std::string(backend()) +
                      " backend cannot honour option 'tag' (" + std::to_string(tag) +
                      "): it does not match messages by tag; pass tag 0");
  if (options.timeout && options.timeout->count() < 0)
    throw ConfigError(std::string(op_kind_name(kind)) + ": option 'timeout' is negative (" +
                      std::to_string(options.timeout->count()) + " ms)");
}

namespace {
// A backend's Work whose wait() (no argument) uses the operation's own timeout.
class TimedWork final : public Work {
 public:
  TimedWork(WorkPtr inner, std::chrono::milliseconds timeout) : inner_(std::move(inner)), timeout_(timeout) {}
  void wait(std::chrono::milliseconds timeout) override { inner_->wait(timeout); }
  void wait() override { inner_->wait(timeout_); }
  bool done() override { return inner_->done(); }
  bool buffers_released() override { return inner_->buffers_released(); }
  std::exception_ptr error() const override { return inner_->error(); }
  uint64_t seq() const override { return inner_->seq(); }

 private:
  WorkPtr inner_;
  std::chrono::milliseconds timeout_;
};
}  // namespace

WorkPtr Communicator::with_options(WorkPtr work, const CollectiveOptions& options) {
  if (!options.timeout) return work;
  return std::make_shared<TimedWork>(std::move(work), *options.timeout);
}

std::unique_ptr<Communicator> Communicator::split(int color, int key) {
  count_traffic(OpKind::kSplit, 0, 0);
  return start_split(color, key);
}

WorkPtr Communicator::all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op,
                                 const CollectiveOptions& options) {
  detail::check_all_reduce_args(send, recv, count, dtype);
  check_options(OpKind::kAllReduce, 0, options);
  const auto t = detail::all_reduce_traffic(count * dtype_size(dtype), size());
  count_traffic(OpKind::kAllReduce, t.sent, t.received);
  return with_options(start_all_reduce(send, recv, count, dtype, op), options);
}

WorkPtr Communicator::reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                                     ReduceOp op, const CollectiveOptions& options) {
  detail::check_reduce_scatter_args(send, recv, counts, dtype, rank(), size());
  check_options(OpKind::kReduceScatter, 0, options);
  const size_t esz = dtype_size(dtype);
  const auto t = detail::reduce_scatter_traffic(detail::sum_counts(counts) * esz, counts[rank()] * esz, size());
  count_traffic(OpKind::kReduceScatter, t.sent, t.received);
  return with_options(start_reduce_scatter(send, recv, counts, dtype, op), options);
}

WorkPtr Communicator::all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                                 const CollectiveOptions& options) {
  detail::check_all_gather_args(send, recv, counts, dtype, rank(), size());
  check_options(OpKind::kAllGather, 0, options);
  const size_t esz = dtype_size(dtype);
  const auto t = detail::all_gather_traffic(detail::sum_counts(counts) * esz, counts[rank()] * esz, size());
  count_traffic(OpKind::kAllGather, t.sent, t.received);
  return with_options(start_all_gather(send, recv, counts, dtype), options);
}

WorkPtr Communicator::reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root,
                             const CollectiveOptions& options) {
  detail::check_reduce_args(send, recv, count, dtype, root, rank(), size());
  check_options(OpKind::kReduce, 0, options);
  const auto t = detail::rooted_traffic(count * dtype_size(dtype), size());
  count_traffic(OpKind::kReduce, t.sent, t.received);
  return with_options(start_reduce(send, recv, count, dtype, op, root), options);
}

WorkPtr Communicator::broadcast(void* buf, size_t count, DType dtype, int root, const CollectiveOptions& options) {
  detail::check_broadcast_args(buf, count, dtype, root, size());
  check_options(OpKind::kBroadcast, 0, options);
  const auto t = detail::rooted_traffic(count * dtype_size(dtype), size());
  count_traffic(OpKind::kBroadcast, t.sent, t.received);
  return with_options(start_broadcast(buf, count, dtype, root), options);
}

WorkPtr Communicator::all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                                 std::span<const size_t> recv_counts, DType dtype, const CollectiveOptions& options) {
  detail::check_all_to_all_args(send, send_counts, recv, recv_counts, dtype, size());
  check_options(OpKind::kAllToAll, 0, options);
  const auto t = detail::all_to_all_traffic(send_counts, recv_counts, dtype_size(dtype), rank());
  count_traffic(OpKind::kAllToAll, t.sent, t.received);
  return with_options(start_all_to_all(send, send_counts, recv, recv_counts, dtype), options);
}

WorkPtr Communicator::send(const void* buf, size_t count, DType dtype, int peer, int tag,
                           const CollectiveOptions& options) {
  detail::check_p2p_args(OpKind::kSend, buf, count, peer, nullptr, 0, -1, dtype, size());
  check_options(OpKind::kSend, tag, options);
  const auto t = detail::p2p_traffic(count, peer, 0, -1, dtype, rank());
  count_traffic(OpKind::kSend, t.sent, t.received);
  return with_options(start_send(buf, count, dtype, peer, tag), options);
}

WorkPtr Communicator::recv(void* buf, size_t count, DType dtype, int peer, int tag, const CollectiveOptions& options) {
  detail::check_p2p_args(OpKind::kRecv, nullptr, 0, -1, buf, count, peer, dtype, size());
  check_options(OpKind::kRecv, tag, options);
  const auto t = detail::p2p_traffic(0, -1, count, peer, dtype, rank());
  count_traffic(OpKind::kRecv, t.sent, t.received);
  return with_options(start_recv(buf, count, dtype, peer, tag), options);
}

WorkPtr Communicator::sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                               DType dtype, int tag, const CollectiveOptions& options) {
  detail::check_p2p_args(OpKind::kSendRecv, send, send_count, dst, recv, recv_count, src, dtype, size());
  check_options(OpKind::kSendRecv, tag, options);
  const auto t = detail::p2p_traffic(send_count, dst, recv_count, src, dtype, rank());
  count_traffic(OpKind::kSendRecv, t.sent, t.received);
  return with_options(start_sendrecv(send, send_count, dst, recv, recv_count, src, dtype, tag), options);
}

WorkPtr Communicator::barrier(const CollectiveOptions& options) {
  check_options(OpKind::kBarrier, 0, options);
  count_traffic(OpKind::kBarrier, 0, 0);
  return with_options(start_barrier(), options);
}

}  // namespace shardopt::comm
