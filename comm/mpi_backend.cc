#include "comm/mpi_backend.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/clock.h"
#include "base/error.h"
#include "comm/backend_util.h"
#include "comm/checked_communicator.h"
#include "comm/halving_schedule.h"
#include "comm/reduce_kernel.h"

namespace shardopt::comm {
namespace {

using detail::Fingerprint;

#ifndef SHARDOPT_SIMGRID
// Serializes every MPI call of the backend (MPI_THREAD_SERIALIZED).
std::mutex& mpi_mutex() {
  static std::mutex mu;
  return mu;
}
#else
// SimGrid SMPI (sim/, docs/simulation.md): every simulated rank runs in this one process and shares
// this function's static, but SMPI never runs two ranks at once, and a rank blocked inside MPI
// while holding a real mutex would block every other rank (the simulation would hang). A no-op.
struct SimulatedRanksLock {
  void lock() {}
  void unlock() {}
};
SimulatedRanksLock& mpi_mutex() {
  static SimulatedRanksLock mu;
  return mu;
}

// SMPI runs nonblocking collectives as linear schedules, not the algorithms its collective selector
// (smpi/coll-selector:ompi) picks for the blocking ones. The simulation build therefore issues the
// blocking collective when the operation is issued and hands back a completed request. Collectives
// are issued in the same order on every rank, so this cannot deadlock; the price is that the
// simulation never overlaps a collective with compute. (The reduce-scatter, the all-gather and the
// all-to-all are the backend's own point-to-point schedules in both builds: HalvingReduceScatter,
// DoublingAllGather, SparseAllToAll.)
int blocking_iallreduce(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c, MPI_Request* req) {
  *req = MPI_REQUEST_NULL;
  return MPI_Allreduce(s, r, n, t, op, c);
}
int blocking_ireduce(const void* s, void* r, int n, MPI_Datatype t, MPI_Op op, int root, MPI_Comm c,
                     MPI_Request* req) {
  *req = MPI_REQUEST_NULL;
  return MPI_Reduce(s, r, n, t, op, root, c);
}
int blocking_ibcast(void* b, int n, MPI_Datatype t, int root, MPI_Comm c, MPI_Request* req) {
  *req = MPI_REQUEST_NULL;
  return MPI_Bcast(b, n, t, root, c);
}
int blocking_ibarrier(MPI_Comm c, MPI_Request* req) {
  *req = MPI_REQUEST_NULL;
  return MPI_Barrier(c);
}
#define MPI_Iallreduce blocking_iallreduce
#define MPI_Ireduce blocking_ireduce
#define MPI_Ibcast blocking_ibcast
#define MPI_Ibarrier blocking_ibarrier
#endif

constexpr int kAbortTag = 1;
// Tags of the collectives run as point-to-point messages (reduce-scatter, all-gather, all-to-all) on
// the control communicator: kStepTagBase + the collective's index modulo kStepTags, so that the
// messages of collectives in flight at once never match each other's (MPI guarantees tags up to 32767).
constexpr int kStepTagBase = 2;
constexpr int kStepTags = 32000;
constexpr int kAbortText = 480;
enum AbortKind : int32_t { kAbortPeer = 1, kAbortDesync = 2 };
struct AbortNotice {
  int32_t kind = kAbortPeer;
  char text[kAbortText] = {};
};

void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw PeerError(std::string("MPI call ") + call + " failed: " + std::string(text, static_cast<size_t>(len)));
}

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kBF16:
    case DType::kF16: return MPI_UINT16_T;
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kU8: return MPI_UINT8_T;
    default: break;
  }
  throw ConfigError("mpi communicator: unsupported dtype " + std::string(dtype_name(dt)));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return MPI_SUM;  // avg divides afterwards
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

int to_int(size_t v, OpKind kind, const char* what) {
  if (v > static_cast<size_t>(INT_MAX))
    throw ConfigError(std::string(op_kind_name(kind)) + ": " + what + " " + std::to_string(v) +
                      " exceeds MPI's int count limit " + std::to_string(INT_MAX));
  return static_cast<int>(v);
}

// One issued operation.
struct MpiOp {
  enum class State : uint8_t { kPending, kDone, kFailed };
  OpKind kind = OpKind::kCount;
  uint64_t seq = 0;
  bool collective = false;
  Fingerprint fp;
  std::string what;  // for messages: the fingerprint description or the p2p description
  int peer = -1;     // p2p

  bool issued = false;
  std::function<void(std::vector<MPI_Request>&)> issue;  // starts the MPI data call(s)
  // Operations of several steps (the reduce-scatter): called when the data requests completed; posts
  // the next step's requests and returns true, or returns false when the last step has completed.
  std::function<bool(std::vector<MPI_Request>&)> next_step;
  std::function<void()> finish;                          // post-processing after completion
  std::vector<MPI_Request> data_reqs;
  std::vector<float> scratch_in, scratch_out;  // fp32 widening of 16-bit reductions
  std::vector<float> step_acc, step_recv;      // the reduce-scatter's accumulator and receive buffer
  int step = -1, steps = 0, step_peer = -1;    // the step in flight and its peer (for timeout messages)
  // Receives whose message must hold exactly `count` elements of recv_type (checked when the
  // requests completed: a different count is a desync naming the sender).
  struct ExpectedReceive {
    size_t request;  // index in data_reqs
    int peer;
    size_t count;
  };
  std::vector<ExpectedReceive> expected_receives;
  MPI_Datatype recv_type = MPI_BYTE;
  std::vector<MPI_Status> statuses;  // of data_reqs, filled when they complete
  // The peer of each data request when they are many (the all-to-all), for timeout messages.
  std::vector<int> request_peers;

  State state = State::kPending;
  std::exception_ptr error;
};
using MpiOpPtr = std::shared_ptr<MpiOp>;

// State shared by a communicator and its Work handles. Guarded by mpi_mutex().
class Core {
 public:
  Core(MPI_Comm parent, CommOptions options) : options(options) {
    mpi_check(MPI_Comm_dup(parent, &data), "MPI_Comm_dup");
    mpi_check(MPI_Comm_dup(parent, &control), "MPI_Comm_dup");
    for (MPI_Comm c : {data, control}) MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN);
    MPI_Comm_rank(data, &rank);
    MPI_Comm_size(data, &size);
    mpi_check(MPI_Irecv(&incoming_abort, sizeof incoming_abort, MPI_BYTE, MPI_ANY_SOURCE, kAbortTag, control,
                        &abort_req),
              "MPI_Irecv");
  }

  ~Core() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    std::lock_guard lk(mpi_mutex());
    if (abort_req != MPI_REQUEST_NULL) {
      MPI_Cancel(&abort_req);
      MPI_Wait(&abort_req, MPI_STATUS_IGNORE);
    }
    // After a failure, operations may still be pending inside MPI: leave those communicators and
    // the buffers of abandoned operations alone (deliberately leaked; the process is expected to exit).
    if (!aborted && abandoned.empty()) {
      for (MPI_Comm* c : {&data, &control}) MPI_Comm_free(c);
    } else {
      // Data calls of failed operations may still complete later and write into their records, and
      // abort notices may still be in flight: none of that memory is freed.
      auto* keep = new std::vector<MpiOpPtr>(std::move(abandoned));
      keep->insert(keep->end(), pending.begin(), pending.end());
      outgoing_abort.release();
    }
  }

  // Advances every pending operation: fingerprints, issue in order, completion, abort notices.
  void progress_locked() {
    poll_abort_locked();
    bool may_issue = true;  // collectives are issued in collective order on every rank
    for (auto it = pending.begin(); it != pending.end();) {
      MpiOp& op = **it;
      if (op.state == MpiOp::State::kPending) advance_locked(op, may_issue);
      if (aborted) return;  // advance_locked may have failed everything
      if (op.collective && !op.issued && op.state == MpiOp::State::kPending) may_issue = false;
      if (op.state == MpiOp::State::kDone) {
        it = pending.erase(it);
      } else if (op.state == MpiOp::State::kFailed) {
        // MPI may still write into its buffers (requests cannot be cancelled): keep it alive.
        abandoned.push_back(std::move(*it));
        it = pending.erase(it);
      } else {
        ++it;
      }
    }
  }

  void advance_locked(MpiOp& op, bool may_issue) {
    if (!op.issued) {
      if (op.state != MpiOp::State::kPending) return;
      if (op.collective && !may_issue) return;
      op.issue(op.data_reqs);
      op.issued = true;
    }
    int flag = 0;
    op.statuses.resize(op.data_reqs.size());
    if (!op.data_reqs.empty()) {
      int rc = MPI_Testall(static_cast<int>(op.data_reqs.size()), op.data_reqs.data(), &flag, op.statuses.data());
      if (rc != MPI_SUCCESS) {
        fail_locked(op, std::make_exception_ptr(PeerError(op.what + " failed in MPI")));
        return;
      }
    } else {
      flag = 1;
    }
    if (!flag) return;
    requests_done_locked(op);
  }

  // The op's posted requests completed (their statuses in op.statuses): its next step, or its completion.
  void requests_done_locked(MpiOp& op) {
    if (op.next_step && op.next_step(op.data_reqs)) return;
    complete_locked(op);
  }

  void complete_locked(MpiOp& op) {
    for (const MpiOp::ExpectedReceive& r : op.expected_receives) {
      int got = 0;
      MPI_Get_count(&op.statuses[r.request], op.recv_type, &got);
      if (static_cast<size_t>(got) != r.count) {
        fail_locked(op, std::make_exception_ptr(DesyncError(
                            "mpi communicator desync: " + op.what + " expected " + std::to_string(r.count) +
                            " elements from rank " + std::to_string(r.peer) + " but it sent " + std::to_string(got))));
        return;
      }
    }
    if (op.finish) op.finish();
    release_scratch_locked(op);
    op.state = MpiOp::State::kDone;
  }

  void fail_locked(MpiOp& op, std::exception_ptr error) {
    if (op.state != MpiOp::State::kPending) return;
    op.state = MpiOp::State::kFailed;
    op.error = std::move(error);
    // A receive that no message matched yet can be taken back: cancel it, so a late message from the
    // peer never lands in the caller's buffer. (Sends and collectives cannot be cancelled.)
    if (op.issued && !op.collective && op.kind != OpKind::kSend && !op.data_reqs.empty() &&
        op.data_reqs.back() != MPI_REQUEST_NULL)
      MPI_Cancel(&op.data_reqs.back());
    // Requests still inside MPI may write into the scratch buffers: keep them with the op.
  }

  // True once MPI holds none of the op's buffers: finished, never issued, or every data request
  // completed or was cancelled (MPI_Testall frees them).
  bool buffers_released_locked(MpiOp& op) {
    if (op.state == MpiOp::State::kPending) return false;
    if (op.state == MpiOp::State::kDone || !op.issued || op.data_reqs.empty()) return true;
    int flag = 0;
    MPI_Testall(static_cast<int>(op.data_reqs.size()), op.data_reqs.data(), &flag, MPI_STATUSES_IGNORE);
    return flag != 0;
  }

  void poll_abort_locked() {
    if (aborted || abort_req == MPI_REQUEST_NULL) return;
    if ((++abort_polls & 63) != 1) return;  // a notice can wait a few polls; MPI_Test is not free
    int flag = 0;
    MPI_Test(&abort_req, &flag, MPI_STATUS_IGNORE);
    if (!flag) return;
    incoming_abort.text[kAbortText - 1] = 0;
    fail_all_locked(incoming_abort.kind, incoming_abort.text);
  }

  void fail_all_locked(int kind, const std::string& reason) {
    aborted = true;
    abort_reason = reason;
    abort_kind = kind;
    for (auto& op : pending) fail_locked(*op, aborted_error(*op));
  }

  std::exception_ptr aborted_error(const MpiOp& op) const {
    if (abort_kind == kAbortDesync) return std::make_exception_ptr(DesyncError(abort_reason));
    return std::make_exception_ptr(
        PeerError("mpi communicator aborted (" + abort_reason + "); " + op.what + " cannot complete"));
  }

  // Fails everything locally and tells every peer.
  void abort_locked(int kind, const std::string& reason) {
    if (aborted) return;
    fail_all_locked(kind, reason);
    outgoing_abort->kind = kind;
    std::snprintf(outgoing_abort->text, kAbortText, "%s", reason.c_str());
    for (int p = 0; p < size; ++p) {
      if (p == rank) continue;
      MPI_Request req;
      if (MPI_Isend(outgoing_abort.get(), sizeof(AbortNotice), MPI_BYTE, p, kAbortTag, control, &req) == MPI_SUCCESS)
        MPI_Request_free(&req);  // the notice buffer lives as long as the Core
    }
  }

  std::string timeout_message_locked(MpiOp& op, int64_t timeout_ms, uint64_t seq) {
    const std::string head = "mpi communicator rank " + std::to_string(rank) + ": " + op.what + ", seq " +
                             std::to_string(seq) + ", timed out after " + std::to_string(timeout_ms) + " ms; ";
    if (!op.collective) return head + "rank " + std::to_string(op.peer) + " never matched it";
    if (op.step_peer >= 0)
      return head + "its step " + std::to_string(op.step + 1) + " of " + std::to_string(op.steps) + " waits on rank " +
             std::to_string(op.step_peer) + " (that rank has not reached it, or is waiting on another)";
    if (!op.request_peers.empty()) {
      std::vector<int> waiting;  // peers of the requests still pending (a completed request becomes null)
      for (size_t i = 0; i < op.data_reqs.size(); ++i) {
        int flag = 0;
        if (op.data_reqs[i] != MPI_REQUEST_NULL) MPI_Test(&op.data_reqs[i], &flag, MPI_STATUS_IGNORE);
        if (op.data_reqs[i] != MPI_REQUEST_NULL && !flag) waiting.push_back(op.request_peers[i]);
      }
      std::sort(waiting.begin(), waiting.end());
      waiting.erase(std::unique(waiting.begin(), waiting.end()), waiting.end());
      return head + "it waits on ranks " + detail::format_ranks(waiting) +
             " (they have not reached it, or are waiting on others)";
    }
    return head + "the ranks that never arrived are unknown to the MPI backend (checked mode names them: "
                  "SHARDOPT_COMM_CHECKED=1)";
  }

  // fp32 scratch buffers for 16-bit reductions, reused across calls.
  std::vector<float> take_scratch_locked(size_t n) {
    for (auto it = scratch_pool.begin(); it != scratch_pool.end(); ++it)
      if (it->capacity() >= n) {
        std::vector<float> v = std::move(*it);
        scratch_pool.erase(it);
        v.resize(n);
        return v;
      }
    return std::vector<float>(n);
  }
  void release_scratch_locked(MpiOp& op) {
    for (auto* v : {&op.scratch_in, &op.scratch_out, &op.step_acc, &op.step_recv})
      if (v->capacity() > 0 && scratch_pool.size() < 8) scratch_pool.push_back(std::move(*v));
  }

  CommOptions options;
  MPI_Comm data = MPI_COMM_NULL, control = MPI_COMM_NULL;
  int rank = 0, size = 1;
  std::list<MpiOpPtr> pending;  // issue order
  std::vector<MpiOpPtr> abandoned;  // failed while MPI may still hold their buffers
  bool aborted = false;
  int abort_kind = kAbortPeer;
  std::string abort_reason;
  MPI_Request abort_req = MPI_REQUEST_NULL;
  uint64_t abort_polls = 0;
  AbortNotice incoming_abort;
  std::unique_ptr<AbortNotice> outgoing_abort = std::make_unique<AbortNotice>();
  std::vector<std::vector<float>> scratch_pool;
};

// Where a point-to-point step of a collective's own schedule goes, and what it posts.
struct StepMessages {
  OpKind kind;
  MPI_Datatype type;
  MPI_Comm comm;
  int tag;
};

// The two directions of a step: whether each happens (a message of 0 elements still does, and its
// buffer may then be null), where from or to, how many elements.
struct StepSend {
  bool active = false;
  const void* data = nullptr;
  size_t count = 0;
};
struct StepRecv {
  bool active = false;
  void* data = nullptr;
  size_t count = 0;
};

// Posts one step of a collective's own schedule: the send and then the receive, to and from `peer`;
// records the step for timeout messages.
void post_step(MpiOp& rec, const StepMessages& m, size_t step, size_t steps, int peer, StepSend send, StepRecv recv,
               std::vector<MPI_Request>& reqs) {
  rec.step = static_cast<int>(step), rec.steps = static_cast<int>(steps), rec.step_peer = peer;
  reqs.clear();
  MPI_Request r;
  if (send.active) {
    mpi_check(MPI_Isend(send.data, to_int(send.count, m.kind, "step count"), m.type, peer, m.tag, m.comm, &r),
              "MPI_Isend");
    reqs.push_back(r);
  }
  if (recv.active) {
    mpi_check(MPI_Irecv(recv.data, to_int(recv.count, m.kind, "step count"), m.type, peer, m.tag, m.comm, &r),
              "MPI_Irecv");
    reqs.push_back(r);
  }
}

// Runs a reduce-scatter's HalvingSchedule (comm/halving_schedule.h) as a chain of point-to-point
// steps, one send and/or receive per step, on `comm` with the op's own tag. Each step is posted when
// the previous one completed (MpiOp::next_step); the combines happen inside the backend's progress
// calls, as MPI's own reductions happen inside MPI calls. kAvg is summed here and divided by finish.
//
// In the SimGrid build the buffers hold no data (docs/simulation.md: the simulation disables
// payloads; its reduction arithmetic is charged as modelled compute by sim/step_sim.cc), so the
// combines and copies are skipped and the accumulator and receive buffer point into process-wide
// blocks shared by every simulated rank: per-rank memory must not grow with the bucket size there.
class HalvingReduceScatter {
 public:
  HalvingReduceScatter(HalvingSchedule schedule, const void* input, void* output, DType dtype, ReduceOp op,
                       MPI_Comm comm, int tag)
      : s_(std::move(schedule)),
        input_(static_cast<const std::byte*>(input)),
        output_(static_cast<std::byte*>(output)),
        dtype_(dtype),
        op_(op == ReduceOp::kAvg ? ReduceOp::kSum : op),
        messages_{OpKind::kReduceScatter, mpi_type(dtype), comm, tag},
        esz_(dtype_size(dtype)) {
    for (size_t i = 0; i < s_.steps.size(); ++i)
      if (s_.steps[i].receive == HalvingStep::Receive::kCombine) last_combine_ = i;
  }

  // MpiOp::issue: the first step (N = 1: the copy, and no request).
  void start(MpiOp& rec, Core& core, std::vector<MPI_Request>& reqs) {
    if (s_.steps.empty()) {
      reqs.clear();
      if (kComputes && input_ + s_.own_begin * esz_ != output_)
        detail::copy_bytes(output_, input_ + s_.own_begin * esz_, (s_.own_end - s_.own_begin) * esz_);
      return;
    }
    if (s_.max_receive > 0) recv_ = scratch(core, rec.step_recv, s_.max_receive);
    post(rec, core, reqs);
  }

  // MpiOp::next_step: applies the completed step's receive, then posts the next step.
  bool next(MpiOp& rec, Core& core, std::vector<MPI_Request>& reqs) {
    if (step_ >= s_.steps.size()) return false;
    const HalvingStep& done = s_.steps[step_];
    if (done.receive == HalvingStep::Receive::kCombine) combine(done, step_ == last_combine_);
    if (++step_ == s_.steps.size()) return false;
    post(rec, core, reqs);
    return true;
  }

 private:
#ifdef SHARDOPT_SIMGRID
  static constexpr bool kComputes = false;
#else
  static constexpr bool kComputes = true;
#endif

  std::byte* scratch(Core& core, std::vector<float>& own, size_t elements) {
    const size_t floats = (elements * esz_ + sizeof(float) - 1) / sizeof(float);
    if constexpr (!kComputes) {
      // Grown by new blocks, never freed: other simulated ranks' steps in flight may still name an older one.
      static std::vector<std::unique_ptr<float[]>> blocks;
      static size_t largest = 0;
      if (largest < floats) {
        largest = std::max(floats, 2 * largest);
        blocks.emplace_back(new float[largest]);  // left untouched: no payload is ever written here
      }
      return reinterpret_cast<std::byte*>(blocks.back().get());
    }
    own = core.take_scratch_locked(floats);
    return reinterpret_cast<std::byte*>(own.data());
  }

  void post(MpiOp& rec, Core& core, std::vector<MPI_Request>& reqs) {
    const HalvingStep& st = s_.steps[step_];
    if (st.send == HalvingStep::Send::kAccumulator || st.receive == HalvingStep::Receive::kCombine)
      if (acc_ == nullptr && s_.acc_end > s_.acc_begin) acc_ = scratch(core, rec.step_acc, s_.acc_end - s_.acc_begin);
    const std::byte* from = st.send == HalvingStep::Send::kInput ? input_ + st.send_begin * esz_
                                                                 : acc_ + (st.send_begin - s_.acc_begin) * esz_;
    std::byte* into = st.receive == HalvingStep::Receive::kOutput ? output_ : recv_;
    post_step(rec, messages_, step_, s_.steps.size(), st.peer,
              {st.send != HalvingStep::Send::kNothing, from, st.send_end - st.send_begin},
              {st.receive != HalvingStep::Receive::kNothing, into, st.recv_end - st.recv_begin}, reqs);
  }

  // [b, e) = (input or accumulator) + received; into the accumulator, except that the last combine
  // writes this rank's own segment straight into the output.
  void combine(const HalvingStep& st, bool last) {
    if constexpr (!kComputes) return;
    const auto part = [&](size_t b, size_t e, std::byte* out) {
      if (e <= b) return;
      const void* in[2] = {combined_ ? acc_ + (b - s_.acc_begin) * esz_ : input_ + b * esz_,
                           recv_ + (b - st.recv_begin) * esz_};
      void* outs[1] = {out};
      detail::reduce_elements(dtype_, op_, in, outs, e - b);
    };
    const auto to_acc = [&](size_t b) { return acc_ + (b - s_.acc_begin) * esz_; };
    if (!last) {
      part(st.recv_begin, st.recv_end, to_acc(st.recv_begin));
    } else {
      const size_t ob = std::clamp(s_.own_begin, st.recv_begin, st.recv_end);
      const size_t oe = std::clamp(s_.own_end, ob, st.recv_end);
      part(st.recv_begin, ob, to_acc(st.recv_begin));
      part(ob, oe, output_ + (ob - s_.own_begin) * esz_);
      part(oe, st.recv_end, to_acc(oe));
    }
    combined_ = true;
  }

  HalvingSchedule s_;
  const std::byte* input_;
  std::byte* output_;
  DType dtype_;
  ReduceOp op_;
  StepMessages messages_;
  size_t esz_;
  size_t step_ = 0, last_combine_ = 0;
  std::byte* acc_ = nullptr;
  std::byte* recv_ = nullptr;
  bool combined_ = false;
};

// Runs an all-gather's doubling schedule (comm/halving_schedule.h) as a chain of point-to-point steps
// on `comm` with the op's own tag: every step sends and receives ranges of the output vector itself,
// so nothing is combined or staged. The simulation build runs the same messages, with their data
// (step_sim gathers per-rank figures with it outside the steps).
class DoublingAllGather {
 public:
  DoublingAllGather(std::vector<DoublingStep> steps, const void* own_segment, void* output, size_t own_offset,
                    size_t own_count, DType dtype, MPI_Comm comm, int tag)
      : steps_(std::move(steps)),
        own_(static_cast<const std::byte*>(own_segment)),
        out_(static_cast<std::byte*>(output)),
        own_offset_(own_offset),
        own_count_(own_count),
        messages_{OpKind::kAllGather, mpi_type(dtype), comm, tag},
        esz_(dtype_size(dtype)) {}

  // MpiOp::issue: this rank's segment into place, then the first step with a message.
  void start(MpiOp& rec, std::vector<MPI_Request>& reqs) {
    if (own_ != out_ + own_offset_ * esz_) detail::copy_bytes(out_ + own_offset_ * esz_, own_, own_count_ * esz_);
    post_from(rec, reqs);
  }

  // MpiOp::next_step: the next step with a message, or false when every step has completed.
  bool next(MpiOp& rec, std::vector<MPI_Request>& reqs) {
    ++step_;
    return post_from(rec, reqs);
  }

 private:
  bool post_from(MpiOp& rec, std::vector<MPI_Request>& reqs) {
    reqs.clear();
    for (; step_ < steps_.size(); ++step_) {
      const DoublingStep& st = steps_[step_];
      const bool sends = st.send_end > st.send_begin, receives = st.recv_end > st.recv_begin;
      if (!sends && !receives) continue;
      post_step(rec, messages_, step_, steps_.size(), st.peer,
                {sends, out_ + st.send_begin * esz_, st.send_end - st.send_begin},
                {receives, out_ + st.recv_begin * esz_, st.recv_end - st.recv_begin}, reqs);
      return true;
    }
    return false;
  }

  std::vector<DoublingStep> steps_;
  const std::byte* own_;
  std::byte* out_;
  size_t own_offset_, own_count_;
  StepMessages messages_;
  size_t esz_;
  size_t step_ = 0;
};

// Runs an all-to-all as point-to-point messages with the peers this rank exchanges data with: a
// receive from every rank p with recv_counts[p] > 0, a send to every rank q with send_counts[q] > 0,
// all posted at once, and its own block copied. MPI's alltoallv (OpenMPI's, and SMPI's model of it)
// posts a message for every pair, N^2 per exchange at N ranks; in the dim0 exchange each rank sends
// only to the owners of the matrices it holds rows of, so once N exceeds the number of Muon matrices
// most pairs have nothing to say and cost nothing here. Each receive's count is checked against the
// message (a desync naming the sender); a sender whose receiver expects nothing is an error MPI's
// alltoallv would not report either (the message is never received: a large one times out).
class SparseAllToAll {
 public:
  SparseAllToAll(const void* send, std::span<const size_t> send_counts, void* recv, std::span<const size_t> recv_counts,
                 DType dtype, int rank, MPI_Comm comm, int tag)
      : send_(static_cast<const std::byte*>(send)),
        recv_(static_cast<std::byte*>(recv)),
        send_counts_(send_counts.begin(), send_counts.end()),
        recv_counts_(recv_counts.begin(), recv_counts.end()),
        type_(mpi_type(dtype)),
        esz_(dtype_size(dtype)),
        rank_(rank),
        comm_(comm),
        tag_(tag) {}

  // MpiOp::issue: every receive, every send, then the own block.
  void start(MpiOp& rec, std::vector<MPI_Request>& reqs) {
    reqs.clear();
    rec.request_peers.clear();
    rec.expected_receives.clear();
    const int n = static_cast<int>(send_counts_.size());
    size_t soff = 0, roff = 0, own_send = 0, own_recv = 0;
    std::vector<size_t> send_offsets(static_cast<size_t>(n));
    for (int p = 0; p < n; ++p) {
      send_offsets[p] = soff;
      soff += send_counts_[p];
      const size_t c = recv_counts_[p];
      if (p == rank_) {
        own_recv = roff;
      } else if (c > 0) {
        MPI_Request r;
        mpi_check(MPI_Irecv(recv_ + roff * esz_, static_cast<int>(c), type_, p, tag_, comm_, &r), "MPI_Irecv");
#ifndef SHARDOPT_SIMGRID  // the simulation's messages carry no payload (sim/smpi_no_payload.h): no count to check
        rec.expected_receives.push_back({reqs.size(), p, c});
#endif
        reqs.push_back(r);
        rec.request_peers.push_back(p);
      }
      roff += c;
    }
    own_send = send_offsets[rank_];
    for (int k = 1; k < n; ++k) {  // rank + 1, rank + 2, ...: not every rank's first message to rank 0
      const int q = (rank_ + k) % n;
      if (send_counts_[q] == 0) continue;
      MPI_Request r;
      mpi_check(MPI_Isend(send_ + send_offsets[q] * esz_, static_cast<int>(send_counts_[q]), type_, q, tag_, comm_, &r),
                "MPI_Isend");
      reqs.push_back(r);
      rec.request_peers.push_back(q);
    }
    if (send_counts_[rank_] > 0 && send_ + own_send * esz_ != recv_ + own_recv * esz_)
      detail::copy_bytes(recv_ + own_recv * esz_, send_ + own_send * esz_, send_counts_[rank_] * esz_);
  }

 private:
  const std::byte* send_;
  std::byte* recv_;
  std::vector<size_t> send_counts_, recv_counts_;
  MPI_Datatype type_;
  size_t esz_;
  int rank_;
  MPI_Comm comm_;
  int tag_;
};

class MpiWork final : public Work {
 public:
  MpiWork(std::shared_ptr<Core> core, MpiOpPtr op) : core_(std::move(core)), op_(std::move(op)) {}

  void wait(std::chrono::milliseconds timeout) override {
    // Timeouts are measured on THE clock (simulated time in the SimGrid build).
    const auto start = clock::now();
    const auto deadline = start + timeout;
    for (;;) {
      {
        std::lock_guard lk(mpi_mutex());
        if (local_error_) std::rethrow_exception(local_error_);
        core_->progress_locked();
        if (op_->state == MpiOp::State::kDone) return;
        if (op_->state == MpiOp::State::kFailed) std::rethrow_exception(op_->error);
        if (clock::now() >= deadline) {
          const std::string msg = core_->timeout_message_locked(*op_, timeout.count(), op_->seq);
          local_error_ = std::make_exception_ptr(TimeoutError(msg));
          core_->fail_locked(*op_, local_error_);
          core_->abort_locked(kAbortPeer, "rank " + std::to_string(core_->rank) + ": " + msg);
          std::rethrow_exception(local_error_);
        }
      }
#ifndef SHARDOPT_SIMGRID
      // Spin briefly like MPI_Wait (latency of small messages), then yield the core between polls.
      if (clock::now() - start > std::chrono::microseconds(200)) std::this_thread::yield();
#else
      // Simulated time advances only inside MPI: block on the issued point-to-point requests (a
      // yield of the real thread would never let the peers run). Unissued operations (checked mode
      // waiting for fingerprints) are polled by MPI_Test, which SMPI charges simulated time for.
      std::lock_guard lk(mpi_mutex());
      if (op_->issued && op_->state == MpiOp::State::kPending && !op_->data_reqs.empty()) {
        op_->statuses.resize(op_->data_reqs.size());
        if (MPI_Waitall(static_cast<int>(op_->data_reqs.size()), op_->data_reqs.data(), op_->statuses.data()) !=
            MPI_SUCCESS)
          core_->fail_locked(*op_, std::make_exception_ptr(PeerError(op_->what + " failed in MPI")));
        else
          core_->requests_done_locked(*op_);
      }
#endif
    }
  }
  void wait() override { wait(core_->options.timeout); }
  bool done() override {
    std::lock_guard lk(mpi_mutex());
    if (op_->state == MpiOp::State::kPending) core_->progress_locked();
    return op_->state != MpiOp::State::kPending;
  }
  bool buffers_released() override {
    std::lock_guard lk(mpi_mutex());
    if (op_->state == MpiOp::State::kPending) core_->progress_locked();
    return core_->buffers_released_locked(*op_);
  }
  std::exception_ptr error() const override {
    std::lock_guard lk(mpi_mutex());
    return local_error_ ? local_error_ : op_->error;
  }
  uint64_t seq() const override { return op_->seq; }

 private:
  std::shared_ptr<Core> core_;
  MpiOpPtr op_;
  std::exception_ptr local_error_;
};

class MpiComm final : public Communicator {
 public:
  MpiComm(MPI_Comm parent, CommOptions options) : Communicator(options) {
    std::lock_guard lk(mpi_mutex());
    core_ = std::make_shared<Core>(parent, options);
  }

  int rank() const override { return core_->rank; }
  int size() const override { return core_->size; }
  std::string_view backend() const override { return "mpi"; }

  std::unique_ptr<Communicator> start_split(int color, int key) override {
    // In order after every earlier collective (they must have been issued) before the blocking MPI call.
    auto op = new_collective(make_fp(OpKind::kSplit, DType::kUnspecified, ReduceOp::kSum, -1, 0));
    op->issue = [](std::vector<MPI_Request>&) {};
    submit(op)->wait();
    MPI_Comm child = MPI_COMM_NULL;
    {
      std::lock_guard lk(mpi_mutex());
      mpi_check(MPI_Comm_split(core_->data, color < 0 ? MPI_UNDEFINED : color, key, &child), "MPI_Comm_split");
    }
    if (child == MPI_COMM_NULL) return nullptr;
    auto result = std::make_unique<MpiComm>(child, options_);
    std::lock_guard lk(mpi_mutex());
    MPI_Comm_free(&child);
    return result;
  }

  WorkPtr start_all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    const int n = to_int(count, OpKind::kAllReduce, "count");
    auto rec = new_collective(make_fp(OpKind::kAllReduce, dtype, op, -1, count));
    MPI_Comm comm = core_->data;
    const int world = size();
    if (detail::is_half_type(dtype)) {
      widen(*rec, send, count, count, dtype);
      rec->issue = [rec = rec.get(), n, op, comm](std::vector<MPI_Request>& reqs) {
        reqs.resize(1);
        mpi_check(MPI_Iallreduce(MPI_IN_PLACE, rec->scratch_out.data(), n, MPI_FLOAT, mpi_op(op), comm, &reqs[0]),
                  "MPI_Iallreduce");
      };
      rec->finish = [rec = rec.get(), recv, count, dtype, op, world] { narrow(*rec, recv, count, dtype, op, world); };
    } else {
      const void* s = send == recv ? MPI_IN_PLACE : send;
      rec->issue = [s, recv, n, dtype, op, comm](std::vector<MPI_Request>& reqs) {
        reqs.resize(1);
        mpi_check(MPI_Iallreduce(s, recv, n, mpi_type(dtype), mpi_op(op), comm, &reqs[0]), "MPI_Iallreduce");
      };
      if (op == ReduceOp::kAvg) rec->finish = [recv, count, dtype, world] { detail::divide_elements(dtype, recv, count, world); };
    }
    return submit(rec);
  }

  WorkPtr start_reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype,
                               ReduceOp op) override {
    const uint64_t total = detail::sum_counts(counts);
    const size_t own = counts[rank()];
    Fingerprint fp = make_fp(OpKind::kReduceScatter, dtype, op, -1, total);
    fp.counts_hash = detail::hash_counts(counts);
    auto rec = new_collective(fp);
    const int world = size();
    // 16-bit types are reduced in fp32 (widened here, rounded once by finish).
    const bool half = detail::is_half_type(dtype);
    if (half) widen(*rec, send, total, own, dtype);
    auto run = std::make_shared<HalvingReduceScatter>(
        halving_schedule(counts, rank()), half ? rec->scratch_in.data() : send,
        half ? static_cast<void*>(rec->scratch_out.data()) : recv, half ? DType::kF32 : dtype, op, core_->control,
        kStepTagBase + static_cast<int>(fp.index % kStepTags));
    Core* core = core_.get();
    rec->issue = [rec = rec.get(), run, core](std::vector<MPI_Request>& reqs) { run->start(*rec, *core, reqs); };
    rec->next_step = [rec = rec.get(), run, core](std::vector<MPI_Request>& reqs) {
      return run->next(*rec, *core, reqs);
    };
    if (half) {
      rec->finish = [rec = rec.get(), recv, own, dtype, op, world] { narrow(*rec, recv, own, dtype, op, world); };
    } else if (op == ReduceOp::kAvg) {
      rec->finish = [recv, own, dtype, world] { detail::divide_elements(dtype, recv, own, world); };
    }
    return submit(rec);
  }

  WorkPtr start_all_gather(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    const uint64_t total = detail::sum_counts(counts);
    const size_t own = counts[rank()];
    Fingerprint fp = make_fp(OpKind::kAllGather, dtype, ReduceOp::kSum, -1, total);
    fp.counts_hash = detail::hash_counts(counts);
    auto rec = new_collective(fp);
    size_t my_off = 0;
    for (int r = 0; r < rank(); ++r) my_off += counts[r];
    auto run = std::make_shared<DoublingAllGather>(doubling_schedule(counts, rank()), send, recv, my_off, own, dtype,
                                                   core_->control, kStepTagBase + static_cast<int>(fp.index % kStepTags));
    rec->issue = [rec = rec.get(), run](std::vector<MPI_Request>& reqs) { run->start(*rec, reqs); };
    rec->next_step = [rec = rec.get(), run](std::vector<MPI_Request>& reqs) { return run->next(*rec, reqs); };
    return submit(rec);
  }

  WorkPtr start_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op, int root) override {
    const bool is_root = rank() == root;
    const int n = to_int(count, OpKind::kReduce, "count");
    auto rec = new_collective(make_fp(OpKind::kReduce, dtype, op, root, count));
    MPI_Comm comm = core_->data;
    const int world = size();
    if (detail::is_half_type(dtype)) {
      widen(*rec, send, count, is_root ? count : 0, dtype);
      rec->issue = [rec = rec.get(), n, op, root, comm](std::vector<MPI_Request>& reqs) {
        reqs.resize(1);
        mpi_check(MPI_Ireduce(rec->scratch_in.data(), rec->scratch_out.data(), n, MPI_FLOAT, mpi_op(op), root, comm,
                              &reqs[0]),
                  "MPI_Ireduce");
      };
      if (is_root)
        rec->finish = [rec = rec.get(), recv, count, dtype, op, world] { narrow(*rec, recv, count, dtype, op, world); };
    } else {
      const void* s = (is_root && send == recv) ? MPI_IN_PLACE : send;
      rec->issue = [s, recv, n, dtype, op, root, comm](std::vector<MPI_Request>& reqs) {
        reqs.resize(1);
        mpi_check(MPI_Ireduce(s, recv, n, mpi_type(dtype), mpi_op(op), root, comm, &reqs[0]), "MPI_Ireduce");
      };
      if (op == ReduceOp::kAvg && is_root)
        rec->finish = [recv, count, dtype, world] { detail::divide_elements(dtype, recv, count, world); };
    }
    return submit(rec);
  }

  WorkPtr start_broadcast(void* buf, size_t count, DType dtype, int root) override {
    const MPI_Datatype type = mpi_type(dtype);
    const int n = to_int(count, OpKind::kBroadcast, "count");
    auto rec = new_collective(make_fp(OpKind::kBroadcast, dtype, ReduceOp::kSum, root, count));
    MPI_Comm comm = core_->data;
    rec->issue = [buf, n, type, root, comm](std::vector<MPI_Request>& reqs) {
      reqs.resize(1);
      mpi_check(MPI_Ibcast(buf, n, type, root, comm, &reqs[0]), "MPI_Ibcast");
    };
    return submit(rec);
  }

  WorkPtr start_all_to_all(const void* send, std::span<const size_t> send_counts, void* recv,
                           std::span<const size_t> recv_counts, DType dtype) override {
    if (send_counts[rank()] != recv_counts[rank()])
      throw ConfigError("all_to_all: rank " + std::to_string(rank()) + " sends " + std::to_string(send_counts[rank()]) +
                        " elements to itself but expects " + std::to_string(recv_counts[rank()]));
    Fingerprint fp = make_fp(OpKind::kAllToAll, dtype, ReduceOp::kSum, -1, 0);
    auto rec = new_collective(fp);
    for (int p = 0; p < size(); ++p) {
      to_int(send_counts[p], OpKind::kAllToAll, "send count");
      to_int(recv_counts[p], OpKind::kAllToAll, "recv count");
    }
    rec->recv_type = mpi_type(dtype);
    auto run = std::make_shared<SparseAllToAll>(send, send_counts, recv, recv_counts, dtype, rank(), core_->control,
                                                kStepTagBase + static_cast<int>(fp.index % kStepTags));
    rec->issue = [rec = rec.get(), run](std::vector<MPI_Request>& reqs) { run->start(*rec, reqs); };
    return submit(rec);
  }

  WorkPtr start_send(const void* buf, size_t count, DType dtype, int peer, int tag) override {
    auto rec = p2p(OpKind::kSend, buf, nullptr, count, 0, peer, -1, dtype, tag);
    return submit(rec);
  }
  WorkPtr start_recv(void* buf, size_t count, DType dtype, int peer, int tag) override {
    auto rec = p2p(OpKind::kRecv, nullptr, buf, 0, count, -1, peer, dtype, tag);
    return submit(rec);
  }
  WorkPtr start_sendrecv(const void* send, size_t send_count, int dst, void* recv, size_t recv_count, int src,
                         DType dtype, int tag) override {
    auto rec = p2p(OpKind::kSendRecv, send, recv, send_count, recv_count, dst, src, dtype, tag);
    return submit(rec);
  }

  WorkPtr start_barrier() override {
    auto rec = new_collective(make_fp(OpKind::kBarrier, DType::kUnspecified, ReduceOp::kSum, -1, 0));
    MPI_Comm comm = core_->data;
    rec->issue = [comm](std::vector<MPI_Request>& reqs) {
      reqs.resize(1);
      mpi_check(MPI_Ibarrier(comm, &reqs[0]), "MPI_Ibarrier");
    };
    return submit(rec);
  }

  void abort(const std::string& reason) override {
    std::lock_guard lk(mpi_mutex());
    core_->abort_locked(kAbortPeer, "rank " + std::to_string(core_->rank) + " aborted: " + reason);
  }

 private:
  Fingerprint make_fp(OpKind kind, DType dtype, ReduceOp op, int root, uint64_t count) {
    Fingerprint fp;
    fp.index = next_coll_++;
    fp.kind = kind, fp.dtype = dtype, fp.op = op, fp.root = root, fp.count = count;
    return fp;
  }

  MpiOpPtr new_collective(const Fingerprint& fp) {
    auto rec = std::make_shared<MpiOp>();
    rec->kind = fp.kind;
    rec->collective = true;
    rec->fp = fp;
    rec->what = fp.describe();
    return rec;
  }

  // Widens a 16-bit reduction input to fp32 scratch; the output scratch gets out_count elements.
  void widen(MpiOp& rec, const void* send, size_t in_count, size_t out_count, DType dtype) {
    {
      std::lock_guard lk(mpi_mutex());
      rec.scratch_out = core_->take_scratch_locked(std::max<size_t>(out_count, in_count));
      if (rec.kind != OpKind::kAllReduce) rec.scratch_in = core_->take_scratch_locked(in_count);
    }
    float* dst = rec.kind == OpKind::kAllReduce ? rec.scratch_out.data() : rec.scratch_in.data();
    detail::half_to_f32(dtype, send, dst, in_count);
  }

  // Rounds the fp32 result once to the 16-bit type (after the avg division, in fp32).
  static void narrow(MpiOp& rec, void* recv, size_t count, DType dtype, ReduceOp op, int world) {
    if (op == ReduceOp::kAvg) detail::divide_elements(DType::kF32, rec.scratch_out.data(), count, world);
    detail::f32_to_half(dtype, rec.scratch_out.data(), recv, count);
  }

  MpiOpPtr p2p(OpKind kind, const void* send, void* recv, size_t send_count, size_t recv_count, int dst, int src,
               DType dtype, int tag) {
    const MPI_Datatype type = mpi_type(dtype);
    if (tag < 0 || tag > 32767)
      throw ConfigError(std::string(op_kind_name(kind)) + ": the mpi backend cannot honour option 'tag' " +
                        std::to_string(tag) + " (outside [0, 32767], the range MPI guarantees)");
    const int sc = to_int(send_count, kind, "count"), rc = to_int(recv_count, kind, "count");
    auto rec = std::make_shared<MpiOp>();
    rec->kind = kind;
    rec->peer = kind == OpKind::kRecv ? src : dst;
    auto side = [&](const char* verb, int peer, size_t c) {
      return std::string(verb) + " rank " + std::to_string(peer) + " (tag " + std::to_string(tag) + ", " +
             std::to_string(c) + " " + std::string(dtype_name(dtype)) + ")";
    };
    if (kind == OpKind::kSend) rec->what = side("send to", dst, send_count);
    if (kind == OpKind::kRecv) rec->what = side("recv from", src, recv_count);
    if (kind == OpKind::kSendRecv) rec->what = side("sendrecv to", dst, send_count) + " and from rank " + std::to_string(src);
    if (recv) {
      // The receive is the last request (issue below).
      rec->expected_receives.push_back({kind == OpKind::kSendRecv ? size_t{1} : size_t{0}, src, recv_count});
      rec->recv_type = type;
    }
    MPI_Comm comm = core_->data;
    rec->issue = [=](std::vector<MPI_Request>& reqs) {
      reqs.clear();
      MPI_Request r;
      if (kind != OpKind::kRecv) {
        mpi_check(MPI_Isend(send, sc, type, dst, tag, comm, &r), "MPI_Isend");
        reqs.push_back(r);
      }
      if (kind != OpKind::kSend) {
        mpi_check(MPI_Irecv(recv, rc, type, src, tag, comm, &r), "MPI_Irecv");
        reqs.push_back(r);  // last: expected_receives names it
      }
    };
    return rec;
  }

  WorkPtr submit(const MpiOpPtr& rec) {
    std::lock_guard lk(mpi_mutex());
    rec->seq = next_seq_++;  // under the lock, like every change the Work handles may read
    Core& c = *core_;
    if (c.aborted) {
      rec->state = MpiOp::State::kFailed;
      rec->error = c.aborted_error(*rec);
      return std::make_shared<MpiWork>(core_, rec);
    }
    c.pending.push_back(rec);
    c.progress_locked();  // issues at once when it can
    return std::make_shared<MpiWork>(core_, rec);
  }

  std::shared_ptr<Core> core_;
  uint64_t next_seq_ = 0;
  uint64_t next_coll_ = 0;
};

}  // namespace

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided_), "MPI_Init_thread");
    owns_ = true;
  } else {
    MPI_Query_thread(&provided_);
  }
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

int MpiRuntime::world_rank() const {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int MpiRuntime::world_size() const {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

std::unique_ptr<Communicator> MpiRuntime::world(CommOptions options) const {
  return make_mpi_communicator(MPI_COMM_WORLD, options);
}

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, CommOptions options) {
  auto mpi = std::make_unique<MpiComm>(comm, options);
  if (!options.checked) return mpi;
  return make_checked_communicator(std::move(mpi), std::make_unique<MpiComm>(comm, options));
}

}  // namespace shardopt::comm
