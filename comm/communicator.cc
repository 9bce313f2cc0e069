#include "comm/communicator.h"

#include "base/env.h"

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
  counters_.bytes_sent[k] += bytes_sent;
  counters_.bytes_received[k] += bytes_received;
  counters_.calls[k] += 1;
}

}  // namespace shardopt::comm
