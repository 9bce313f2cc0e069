#include "comm/forwarding_communicator.h"

#include <numeric>

namespace shardopt::comm {
namespace {
uint64_t sum(std::span<const size_t> counts) { return std::accumulate(counts.begin(), counts.end(), uint64_t{0}); }
}  // namespace

WorkPtr ForwardingCommunicator::forward(const ForwardedOp&, IssueRef issue) { return issue(); }

std::unique_ptr<Communicator> ForwardingCommunicator::start_split(int color, int key) {
  auto child = inner_->split(color, key);
  if (!child) return nullptr;
  return wrap_child(std::move(child));
}

WorkPtr ForwardingCommunicator::start_all_reduce(const void* s, void* r, size_t c, DType d, ReduceOp op) {
  auto issue = [&] { return inner_->all_reduce(s, r, c, d, op); };
  return forward({OpKind::kAllReduce, c, d}, issue);
}
WorkPtr ForwardingCommunicator::start_reduce_scatter(const void* s, void* r, std::span<const size_t> c, DType d,
                                                     ReduceOp op) {
  auto issue = [&] { return inner_->reduce_scatter(s, r, c, d, op); };
  return forward({OpKind::kReduceScatter, sum(c), d}, issue);
}
WorkPtr ForwardingCommunicator::start_all_gather(const void* s, void* r, std::span<const size_t> c, DType d) {
  auto issue = [&] { return inner_->all_gather(s, r, c, d); };
  return forward({OpKind::kAllGather, sum(c), d}, issue);
}
WorkPtr ForwardingCommunicator::start_reduce(const void* s, void* r, size_t c, DType d, ReduceOp op, int root) {
  auto issue = [&] { return inner_->reduce(s, r, c, d, op, root); };
  return forward({OpKind::kReduce, c, d, root}, issue);
}
WorkPtr ForwardingCommunicator::start_broadcast(void* b, size_t c, DType d, int root) {
  auto issue = [&] { return inner_->broadcast(b, c, d, root); };
  return forward({OpKind::kBroadcast, c, d, root}, issue);
}
WorkPtr ForwardingCommunicator::start_all_to_all(const void* s, std::span<const size_t> sc, void* r,
                                                 std::span<const size_t> rc, DType d) {
  auto issue = [&] { return inner_->all_to_all(s, sc, r, rc, d); };
  return forward({OpKind::kAllToAll, sum(sc), d}, issue);
}
WorkPtr ForwardingCommunicator::start_send(const void* b, size_t c, DType d, int peer, int tag) {
  auto issue = [&] { return inner_->send(b, c, d, peer, tag); };
  return forward({OpKind::kSend, c, d, peer, tag}, issue);
}
WorkPtr ForwardingCommunicator::start_recv(void* b, size_t c, DType d, int peer, int tag) {
  auto issue = [&] { return inner_->recv(b, c, d, peer, tag); };
  return forward({OpKind::kRecv, c, d, peer, tag}, issue);
}
WorkPtr ForwardingCommunicator::start_sendrecv(const void* s, size_t sc, int dst, void* r, size_t rc, int src, DType d,
                                               int tag) {
  auto issue = [&] { return inner_->sendrecv(s, sc, dst, r, rc, src, d, tag); };
  return forward({OpKind::kSendRecv, sc, d, dst, tag}, issue);
}
WorkPtr ForwardingCommunicator::start_barrier() {
  auto issue = [&] { return inner_->barrier(); };
  return forward({OpKind::kBarrier, 0, DType::kU8}, issue);
}

}  // namespace shardopt::comm
