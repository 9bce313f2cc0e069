// ForwardingCommunicator: the base of communicators that wrap another one (the flight recorder, test
// wrappers that pause allocation counting or inject failures). Every start_* forwards to the wrapped
// communicator's public call through one hook, forward(), so a wrapper that treats every operation
// alike overrides forward() (and wrap_child() for splits) instead of the eleven start_* methods; a
// wrapper that changes one kind of operation overrides that start_* alone.
//
// The wrapped communicator runs its own argument checks and traffic accounting again (its counters()
// are its own); this wrapper's counters() count what was issued through it.
#pragma once

#include <memory>
#include <utility>

#include "comm/communicator.h"

namespace shardopt::comm {

// What a forwarded operation is, for wrappers that record or describe it.
struct ForwardedOp {
  OpKind kind = OpKind::kBarrier;
  uint64_t count = 0;  // elements on the send side (the sum of counts for variable-count collectives)
  DType dtype = DType::kU8;
  int peer = -1;  // point to point: the peer (sendrecv: destination); rooted: the root; else -1
  int tag = -1;   // point to point only
};

// A non-owning, non-allocating reference to the call that issues the operation on the wrapped
// communicator (std::function could allocate on every operation).
class IssueRef {
 public:
  template <class F>
  IssueRef(F& f) : object_(&f), call_([](void* o) { return (*static_cast<F*>(o))(); }) {}  // NOLINT: implicit
  WorkPtr operator()() const { return call_(object_); }

 private:
  void* object_;
  WorkPtr (*call_)(void*);
};

class ForwardingCommunicator : public Communicator {
 public:
  // Wraps `inner` (not owned: the caller keeps it alive longer than this wrapper).
  explicit ForwardingCommunicator(Communicator& inner) : Communicator(inner.options()), inner_(&inner) {}
  // Wraps and owns `owned` (e.g. a child of split).
  explicit ForwardingCommunicator(std::unique_ptr<Communicator> owned)
      : Communicator(owned->options()), owned_(std::move(owned)), inner_(owned_.get()) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string_view backend() const override { return inner_->backend(); }
  bool device_buffers() const override { return inner_->device_buffers(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  void abort(const std::string& reason) override { inner_->abort(reason); }
  void wait_stream(void* stream) override { inner_->wait_stream(stream); }

  Communicator& inner() const { return *inner_; }

 protected:
  // Every forwarded operation passes here: `issue` issues it on inner(). Default: issue it as is.
  virtual WorkPtr forward(const ForwardedOp& op, IssueRef issue);
  // A child of split on inner() (null on ranks with a negative color never reach this); default: the
  // child as is. Wrappers usually wrap it in their own kind so the child is recorded / paused too.
  virtual std::unique_ptr<Communicator> wrap_child(std::unique_ptr<Communicator> child) { return child; }

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
  std::unique_ptr<Communicator> owned_;
  Communicator* inner_;
};

}  // namespace shardopt::comm
