#include "tests/comm/collective_checks.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <numeric>
#include <thread>
#include <vector>

#include "base/dtype.h"
#include "base/error.h"

namespace shardopt::comm::testing {
namespace {

using Bytes = std::vector<std::byte>;
using std::chrono::milliseconds;

constexpr double kSentinel = -99;

bool is_int(DType dt) { return dt == DType::kI32 || dt == DType::kI64; }

size_t esize(DType dt) {
  switch (dt) {
    case DType::kF32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    default: return 1;
  }
}

// Input element i of rank r: a small integer pattern, scaled so every dtype holds it exactly and
// sums over up to 8 ranks stay exact (half steps for floats, wide scales for ints).
double value(DType dt, int rank, size_t i) {
  const double base = static_cast<double>((static_cast<uint64_t>(rank) * 37 + i * 11) % 29) - 14.0;
  switch (dt) {
    case DType::kI32: return base * 100003.0;
    case DType::kI64: return base * 1099511627776.0;  // 2^40: needs 64-bit accumulation
    default: return base * 0.5;
  }
}

void store(DType dt, void* buf, size_t i, double v) {
  switch (dt) {
    case DType::kF32: static_cast<float*>(buf)[i] = static_cast<float>(v); return;
    case DType::kBF16: static_cast<bf16*>(buf)[i] = float_to_bf16(static_cast<float>(v)); return;
    case DType::kF16: static_cast<_Float16*>(buf)[i] = static_cast<_Float16>(v); return;
    case DType::kI32: static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v); return;
    case DType::kI64: static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v); return;
    default: static_cast<uint8_t*>(buf)[i] = static_cast<uint8_t>(v); return;
  }
}

double load(DType dt, const void* buf, size_t i) {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(buf)[i];
    case DType::kBF16: return bf16_to_float(static_cast<const bf16*>(buf)[i]);
    case DType::kF16: return static_cast<double>(static_cast<const _Float16*>(buf)[i]);
    case DType::kI32: return static_cast<const int32_t*>(buf)[i];
    case DType::kI64: return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    default: return static_cast<const uint8_t*>(buf)[i];
  }
}

// Reference reduction of element i over ranks 0..n-1 (index is the input element index).
double expected_reduce(DType dt, ReduceOp op, int n, size_t index) {
  double sum = 0, mx = -1e300, mn = 1e300;
  for (int r = 0; r < n; ++r) {
    const double v = value(dt, r, index);
    sum += v, mx = std::max(mx, v), mn = std::min(mn, v);
  }
  switch (op) {
    case ReduceOp::kSum: return sum;
    case ReduceOp::kMax: return mx;
    case ReduceOp::kMin: return mn;
    case ReduceOp::kAvg:
      if (is_int(dt)) return static_cast<double>(static_cast<int64_t>(sum) / n);  // truncates toward zero
      return sum / n;
  }
  return 0;
}

double tolerance(DType dt, ReduceOp op, double expected) {
  if (op != ReduceOp::kAvg || is_int(dt)) return 0;  // every other result is exact
  const double rel = dt == DType::kF32 ? 1e-6 : dt == DType::kBF16 ? 1.0 / 256 : 1.0 / 1024;
  return std::abs(expected) * rel + 1e-7;
}

// Reports the first few mismatches only, so a broken kernel does not flood the log.
struct Checker {
  Communicator& comm;
  std::string what;
  int failures = 0;
  void expect(double got, double want, double tol, size_t i) {
    if (std::abs(got - want) <= tol) return;
    if (++failures <= 3)
      ADD_FAILURE() << what << " rank " << comm.rank() << "/" << comm.size() << " element " << i << ": got " << got
                    << ", expected " << want;
  }
};

std::string label(const char* op_name, DType dt, size_t count) {
  return std::string(op_name) + " " + std::string(dtype_name(dt)) + " count " + std::to_string(count);
}

Bytes filled(DType dt, size_t count, int rank) {
  Bytes b(count * esize(dt));
  for (size_t i = 0; i < count; ++i) store(dt, b.data(), i, value(dt, rank, i));
  return b;
}

Bytes sentinel(DType dt, size_t count) {
  Bytes b(count * esize(dt));
  for (size_t i = 0; i < count; ++i) store(dt, b.data(), i, kSentinel);
  return b;
}

std::vector<size_t> offsets_of(const std::vector<size_t>& counts) {
  std::vector<size_t> off(counts.size() + 1, 0);
  for (size_t r = 0; r < counts.size(); ++r) off[r + 1] = off[r] + counts[r];
  return off;
}

// Elements rank p sends to rank q in the all_to_all checks: uneven, about `count` per rank in total.
size_t pair_count(int p, int q, size_t count, int n) {
  return count * static_cast<size_t>((p + 2 * q) % 3 + 1) / (2 * static_cast<size_t>(n));
}

template <class E>
void expect_throw_containing(const std::function<void()>& fn, const std::vector<std::string>& needles,
                             const std::string& where) {
  try {
    fn();
    ADD_FAILURE() << where << ": expected " << typeid(E).name() << ", nothing was thrown";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << where << ": '" << msg << "' lacks '" << n << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << where << ": expected " << typeid(E).name() << ", got " << typeid(e).name() << ": " << e.what();
  }
}

}  // namespace

std::vector<DType> dtypes_for(size_t count) {
  if (count >= (1u << 16)) return {DType::kF32, DType::kBF16};
  return {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64};
}

std::vector<ReduceOp> ops_for(size_t count) {
  if (count >= (1u << 16)) return {ReduceOp::kSum};
  return {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin};
}

std::vector<size_t> skewed_counts(size_t total, int world) {
  std::vector<size_t> counts(static_cast<size_t>(world));
  const size_t denom = static_cast<size_t>(world) * static_cast<size_t>(world + 1) / 2;
  size_t given = 0;
  for (int r = 0; r + 1 < world; ++r) {
    counts[r] = total * static_cast<size_t>(r + 1) / denom;
    given += counts[r];
  }
  counts[world - 1] = total - given;
  return counts;
}

void check_all_reduce(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  for (DType dt : dtypes_for(count))
    for (ReduceOp op : ops_for(count)) {
      Bytes send = filled(dt, count, me), recv = sentinel(dt, count);
      comm.all_reduce(send.data(), recv.data(), count, dt, op)->wait();
      Checker c{comm, label("all_reduce", dt, count) + " " + std::string(reduce_op_name(op))};
      for (size_t i = 0; i < count; ++i) {
        const double want = expected_reduce(dt, op, n, i);
        c.expect(load(dt, recv.data(), i), want, tolerance(dt, op, want), i);
      }
      // The send buffer is input only.
      for (size_t i = 0; i < count; ++i) c.expect(load(dt, send.data(), i), value(dt, me, i), 0, i);
    }
}

void check_all_reduce_in_place(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  for (DType dt : dtypes_for(count)) {
    Bytes buf = filled(dt, count, me);
    comm.all_reduce(buf.data(), buf.data(), count, dt, ReduceOp::kSum)->wait();
    Checker c{comm, label("all_reduce in place", dt, count)};
    for (size_t i = 0; i < count; ++i) c.expect(load(dt, buf.data(), i), expected_reduce(dt, ReduceOp::kSum, n, i), 0, i);
  }
}

void check_reduce_scatter(Communicator& comm, size_t total) {
  const int n = comm.size(), me = comm.rank();
  const auto counts = skewed_counts(total, n);
  const auto off = offsets_of(counts);
  for (DType dt : dtypes_for(total))
    for (ReduceOp op : ops_for(total)) {
      Bytes send = filled(dt, total, me), recv = sentinel(dt, counts[me]);
      comm.reduce_scatter(send.data(), recv.data(), counts, dt, op)->wait();
      Checker c{comm, label("reduce_scatter", dt, total) + " " + std::string(reduce_op_name(op))};
      for (size_t k = 0; k < counts[me]; ++k) {
        const double want = expected_reduce(dt, op, n, off[me] + k);
        c.expect(load(dt, recv.data(), k), want, tolerance(dt, op, want), k);
      }
    }
}

void check_all_gather(Communicator& comm, size_t total) {
  const int n = comm.size(), me = comm.rank();
  const auto counts = skewed_counts(total, n);
  const auto off = offsets_of(counts);
  for (DType dt : dtypes_for(total)) {
    Bytes send = filled(dt, counts[me], me), recv = sentinel(dt, total);
    comm.all_gather(send.data(), recv.data(), counts, dt)->wait();
    Checker c{comm, label("all_gather", dt, total)};
    for (int r = 0; r < n; ++r)
      for (size_t k = 0; k < counts[r]; ++k) c.expect(load(dt, recv.data(), off[r] + k), value(dt, r, k), 0, off[r] + k);
  }
}

void check_all_gather_in_place(Communicator& comm, size_t total) {
  const int n = comm.size(), me = comm.rank();
  const auto counts = skewed_counts(total, n);
  const auto off = offsets_of(counts);
  for (DType dt : dtypes_for(total)) {
    Bytes buf = sentinel(dt, total);
    for (size_t k = 0; k < counts[me]; ++k) store(dt, buf.data(), off[me] + k, value(dt, me, k));
    comm.all_gather(buf.data() + off[me] * esize(dt), buf.data(), counts, dt)->wait();
    Checker c{comm, label("all_gather in place", dt, total)};
    for (int r = 0; r < n; ++r)
      for (size_t k = 0; k < counts[r]; ++k) c.expect(load(dt, buf.data(), off[r] + k), value(dt, r, k), 0, off[r] + k);
  }
}

void check_reduce(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  for (int root : {0, n - 1})
    for (DType dt : dtypes_for(count))
      for (ReduceOp op : ops_for(count)) {
        Bytes send = filled(dt, count, me), recv = sentinel(dt, count);
        // Non-roots pass no receive buffer: it is ignored there.
        comm.reduce(send.data(), me == root ? recv.data() : nullptr, count, dt, op, root)->wait();
        if (me != root) continue;
        Checker c{comm, label("reduce", dt, count) + " root " + std::to_string(root)};
        for (size_t i = 0; i < count; ++i) {
          const double want = expected_reduce(dt, op, n, i);
          c.expect(load(dt, recv.data(), i), want, tolerance(dt, op, want), i);
        }
      }
}

void check_broadcast(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  for (int root : {0, n / 2})
    for (DType dt : dtypes_for(count)) {
      Bytes buf = me == root ? filled(dt, count, root) : sentinel(dt, count);
      comm.broadcast(buf.data(), count, dt, root)->wait();
      Checker c{comm, label("broadcast", dt, count) + " root " + std::to_string(root)};
      for (size_t i = 0; i < count; ++i) c.expect(load(dt, buf.data(), i), value(dt, root, i), 0, i);
    }
}

void check_all_to_all(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  std::vector<size_t> send_counts(n), recv_counts(n);
  for (int q = 0; q < n; ++q) send_counts[q] = pair_count(me, q, count, n), recv_counts[q] = pair_count(q, me, count, n);
  const auto soff = offsets_of(send_counts), roff = offsets_of(recv_counts);
  for (DType dt : dtypes_for(count)) {
    // Segment q of rank p holds value(p·n + q, k): every (source, destination) pair is distinct.
    Bytes send(soff[n] * esize(dt)), recv = sentinel(dt, roff[n]);
    for (int q = 0; q < n; ++q)
      for (size_t k = 0; k < send_counts[q]; ++k) store(dt, send.data(), soff[q] + k, value(dt, me * n + q, k));
    comm.all_to_all(send.data(), send_counts, recv.data(), recv_counts, dt)->wait();
    Checker c{comm, label("all_to_all", dt, count)};
    for (int p = 0; p < n; ++p)
      for (size_t k = 0; k < recv_counts[p]; ++k)
        c.expect(load(dt, recv.data(), roff[p] + k), value(dt, p * n + me, k), 0, roff[p] + k);
  }
}

void check_send_recv(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  const int to = (me + 1) % n, from = (me + n - 1) % n;
  for (DType dt : dtypes_for(count)) {
    Bytes send = filled(dt, count, me), recv = sentinel(dt, count);
    // Also a second message on another tag, posted in the opposite order: tags keep them apart.
    Bytes send2 = filled(dt, count, me + 100), recv2 = sentinel(dt, count);
    auto r2 = comm.recv(recv2.data(), count, dt, from, 8);
    auto r1 = comm.recv(recv.data(), count, dt, from, 7);
    auto s1 = comm.send(send.data(), count, dt, to, 7);
    auto s2 = comm.send(send2.data(), count, dt, to, 8);
    s1->wait(), s2->wait(), r1->wait(), r2->wait();
    Checker c{comm, label("send/recv", dt, count)};
    for (size_t i = 0; i < count; ++i) c.expect(load(dt, recv.data(), i), value(dt, from, i), 0, i);
    for (size_t i = 0; i < count; ++i) c.expect(load(dt, recv2.data(), i), value(dt, from + 100, i), 0, i);
  }
}

void check_sendrecv(Communicator& comm, size_t count) {
  const int n = comm.size(), me = comm.rank();
  const int to = (me + 1) % n, from = (me + n - 1) % n;
  for (DType dt : dtypes_for(count)) {
    Bytes send = filled(dt, count, me), recv = sentinel(dt, count);
    comm.sendrecv(send.data(), count, to, recv.data(), count, from, dt, 3)->wait();
    Checker c{comm, label("sendrecv", dt, count)};
    for (size_t i = 0; i < count; ++i) c.expect(load(dt, recv.data(), i), value(dt, from, i), 0, i);
  }
}

void check_barrier(Communicator& comm) {
  comm.barrier()->wait();
  if (comm.rank() == 0) std::this_thread::sleep_for(milliseconds(150));
  const auto t0 = std::chrono::steady_clock::now();
  comm.barrier()->wait();
  const double waited_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  // Nobody leaves the barrier before rank 0 entered it (150 ms after the others, less start skew).
  if (comm.rank() != 0 && comm.size() > 1) {
    EXPECT_GE(waited_ms, 100.0) << "rank " << comm.rank();
  }
}

void check_bf16_fp32_accumulation(Communicator& comm) {
  const int n = comm.size(), me = comm.rank();
  const size_t count = 5;
  std::vector<bf16> send(count, float_to_bf16(me == 0 ? 256.0f : 1.0f)), recv(count);
  comm.all_reduce(send.data(), recv.data(), count, DType::kBF16, ReduceOp::kSum)->wait();
  // fp32 sum 256 + (n-1), rounded once to bf16 (spacing 2 at 256). Pairwise bf16 sums give 256.
  const float want = bf16_to_float(float_to_bf16(256.0f + static_cast<float>(n - 1)));
  if (n >= 3) {
    ASSERT_NE(want, 256.0f);
  }
  for (size_t i = 0; i < count; ++i) EXPECT_EQ(bf16_to_float(recv[i]), want) << "rank " << me << " element " << i;
  // The same through reduce_scatter.
  std::vector<size_t> counts(n, 2);
  std::vector<bf16> rs_send(2 * n, float_to_bf16(me == 0 ? 256.0f : 1.0f)), rs_recv(2);
  comm.reduce_scatter(rs_send.data(), rs_recv.data(), counts, DType::kBF16, ReduceOp::kSum)->wait();
  for (bf16 v : rs_recv) EXPECT_EQ(bf16_to_float(v), want) << "reduce_scatter rank " << me;
}

void check_overlap(Communicator& comm) {
  const int n = comm.size(), me = comm.rank();
  const size_t count = 1 << 18;
  std::vector<float> a(count, static_cast<float>(me)), b(count, 1.0f), c(count, 2.0f * me);
  auto wa = comm.all_reduce(a.data(), a.data(), count, DType::kF32, ReduceOp::kSum);
  auto wb = comm.all_reduce(b.data(), b.data(), count, DType::kF32, ReduceOp::kSum);
  auto wc = comm.all_reduce(c.data(), c.data(), count, DType::kF32, ReduceOp::kMax);
  EXPECT_EQ(wb->seq(), wa->seq() + 1);
  EXPECT_EQ(wc->seq(), wb->seq() + 1);
  // Compute while the operations are in flight. The threads backend progresses without being
  // polled (done() only reads state there), so the three finish while this rank merely sleeps.
  if (comm.backend() == "threads") {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!(wa->done() && wb->done() && wc->done()) && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(milliseconds(5));
    EXPECT_TRUE(wa->done() && wb->done() && wc->done()) << "rank " << me << ": no progress without wait()";
  } else {
    std::this_thread::sleep_for(milliseconds(50));
  }
  wc->wait(), wb->wait(), wa->wait();
  EXPECT_TRUE(wa->done() && wb->done() && wc->done());
  EXPECT_EQ(wa->error(), nullptr);
  const float sum_ranks = static_cast<float>(n * (n - 1) / 2);
  for (size_t i = 0; i < count; i += 4099) {
    EXPECT_EQ(a[i], sum_ranks);
    EXPECT_EQ(b[i], static_cast<float>(n));
    EXPECT_EQ(c[i], 2.0f * (n - 1));
  }
}

void check_reduce_scatters_in_flight(Communicator& comm) {
  const int n = comm.size(), me = comm.rank();
  constexpr int kOps = 3;
  std::vector<std::vector<size_t>> counts;
  std::vector<std::vector<float>> send(kOps), recv(kOps);
  std::vector<WorkPtr> work;
  for (int k = 0; k < kOps; ++k) {
    // Sizes differ, so the operations' steps complete at different times.
    counts.push_back(skewed_counts(size_t{200000} / static_cast<size_t>(k + 1) + 3, n));
    const size_t total = std::accumulate(counts[k].begin(), counts[k].end(), size_t{0});
    send[k].resize(total);
    for (size_t i = 0; i < total; ++i) send[k][i] = static_cast<float>((k + 1) * 1000 + me * 10) + static_cast<float>(i % 7);
    recv[k].assign(counts[k][me], -1.0f);
    work.push_back(comm.reduce_scatter(send[k].data(), recv[k].data(), counts[k], DType::kF32, ReduceOp::kSum));
  }
  for (int k = kOps - 1; k >= 0; --k) work[k]->wait();
  for (int k = 0; k < kOps; ++k) {
    const auto off = offsets_of(counts[k]);
    for (size_t j = 0; j < counts[k][me]; ++j) {
      const size_t i = off[me] + j;
      const double want = n * ((k + 1) * 1000.0 + static_cast<double>(i % 7)) + 10.0 * n * (n - 1) / 2;
      ASSERT_EQ(recv[k][j], static_cast<float>(want)) << "reduce-scatter " << k << " rank " << me << " element " << j;
    }
  }
}

void check_counters(Communicator& comm, size_t count) {
  const uint64_t n = static_cast<uint64_t>(comm.size());
  const int me = comm.rank();
  const DType dt = DType::kF32;
  const uint64_t B = count * 4;
  auto kind = [](OpKind k) { return static_cast<size_t>(k); };
  auto check = [&](OpKind k, uint64_t sent, uint64_t received, const TrafficCounters& before) {
    const TrafficCounters d = comm.counters() - before;
    EXPECT_EQ(d.bytes_sent[kind(k)], sent) << op_kind_name(k) << " rank " << me << " count " << count;
    EXPECT_EQ(d.bytes_received[kind(k)], received) << op_kind_name(k) << " rank " << me << " count " << count;
    EXPECT_EQ(d.calls[kind(k)], 1u) << op_kind_name(k);
    EXPECT_EQ(d.total_sent(), sent) << op_kind_name(k) << ": other kinds must not move";
  };
  std::vector<float> send(count * n + 1, 1.0f), recv(count * n + 1);
  TrafficCounters t = comm.counters();
  comm.all_reduce(send.data(), recv.data(), count, dt, ReduceOp::kSum)->wait();
  check(OpKind::kAllReduce, 2 * B * (n - 1) / n, 2 * B * (n - 1) / n, t);

  const auto counts = skewed_counts(count, comm.size());
  const uint64_t own = counts[me] * 4;
  t = comm.counters();
  comm.reduce_scatter(send.data(), recv.data(), counts, dt, ReduceOp::kSum)->wait();
  check(OpKind::kReduceScatter, B - own, own * (n - 1), t);
  t = comm.counters();
  comm.all_gather(send.data(), recv.data(), counts, dt)->wait();
  check(OpKind::kAllGather, own * (n - 1), B - own, t);
  t = comm.counters();
  comm.reduce(send.data(), recv.data(), count, dt, ReduceOp::kSum, 0)->wait();
  check(OpKind::kReduce, B * (n - 1) / n, B * (n - 1) / n, t);
  t = comm.counters();
  comm.broadcast(recv.data(), count, dt, 0)->wait();
  check(OpKind::kBroadcast, B * (n - 1) / n, B * (n - 1) / n, t);

  std::vector<size_t> sc(n), rc(n);
  uint64_t to_others = 0, from_others = 0;
  for (int q = 0; q < static_cast<int>(n); ++q) {
    sc[q] = pair_count(me, q, count, static_cast<int>(n)), rc[q] = pair_count(q, me, count, static_cast<int>(n));
    if (q != me) to_others += sc[q] * 4, from_others += rc[q] * 4;
  }
  std::vector<float> a2a_send(count * 2 + 1), a2a_recv(count * 2 + 1);
  t = comm.counters();
  comm.all_to_all(a2a_send.data(), sc, a2a_recv.data(), rc, dt)->wait();
  check(OpKind::kAllToAll, to_others, from_others, t);

  const int to = (me + 1) % static_cast<int>(n), from = (me + static_cast<int>(n) - 1) % static_cast<int>(n);
  const uint64_t p2p = n > 1 ? B : 0;  // a message to oneself crosses no link
  t = comm.counters();
  comm.sendrecv(send.data(), count, to, recv.data(), count, from, dt, 1)->wait();
  check(OpKind::kSendRecv, p2p, p2p, t);
  t = comm.counters();
  comm.barrier()->wait();
  check(OpKind::kBarrier, 0, 0, t);
}

void check_split(Communicator& comm) {
  const int n = comm.size(), me = comm.rank();
  auto child = comm.split(me % 2, -me);
  ASSERT_NE(child, nullptr);
  std::vector<int> group;  // same parity, ordered by key = -rank: descending old rank
  for (int r = n - 1; r >= 0; --r)
    if (r % 2 == me % 2) group.push_back(r);
  EXPECT_EQ(child->size(), static_cast<int>(group.size()));
  const int want_rank = static_cast<int>(std::find(group.begin(), group.end(), me) - group.begin());
  EXPECT_EQ(child->rank(), want_rank);
  EXPECT_EQ(child->backend(), comm.backend());
  int64_t mine = me, sum = -1;
  child->all_reduce(&mine, &sum, 1, DType::kI64, ReduceOp::kSum)->wait();
  int64_t want = 0;
  for (int r : group) want += r;
  EXPECT_EQ(sum, want) << "rank " << me;
  // The child counts its own traffic; the parent still works.
  EXPECT_EQ(child->counters().calls[static_cast<size_t>(OpKind::kAllReduce)], 1u);
  int64_t total = -1;
  comm.all_reduce(&mine, &total, 1, DType::kI64, ReduceOp::kSum)->wait();
  EXPECT_EQ(total, static_cast<int64_t>(n) * (n - 1) / 2);
  // A negative color leaves a rank out (no communicator); the rest keep their order.
  auto rest = comm.split(me == 0 ? -1 : 7, me);
  if (me == 0) {
    EXPECT_EQ(rest, nullptr);
  } else {
    ASSERT_NE(rest, nullptr);
    EXPECT_EQ(rest->size(), n - 1);
    EXPECT_EQ(rest->rank(), me - 1);
    rest->barrier()->wait();
  }
}

void check_desync_count(Communicator& comm) {
  const int me = comm.rank();
  const size_t count = me == 1 ? 11 : 10;
  std::vector<float> send(11, 1.0f), recv(11);
  auto work = comm.all_reduce(send.data(), recv.data(), count, DType::kF32, ReduceOp::kSum);
  const std::vector<std::string> needles =
      me <= 1 ? std::vector<std::string>{"count 10", "count 11", "all_reduce #0"} : std::vector<std::string>{};
  expect_throw_containing<DesyncError>([&] { work->wait(std::chrono::seconds(30)); }, needles,
                                       "rank " + std::to_string(me));
  EXPECT_TRUE(work->done());
  EXPECT_NE(work->error(), nullptr);
}

void check_desync_kind(Communicator& comm) {
  const int me = comm.rank();
  std::vector<float> buf(4, 1.0f), out(4);
  WorkPtr work = me == 1 ? comm.broadcast(buf.data(), 4, DType::kF32, 0)
                         : comm.all_reduce(buf.data(), out.data(), 4, DType::kF32, ReduceOp::kSum);
  const std::vector<std::string> needles =
      me <= 1 ? std::vector<std::string>{"all_reduce #0", "broadcast #0"} : std::vector<std::string>{};
  expect_throw_containing<DesyncError>([&] { work->wait(std::chrono::seconds(30)); }, needles,
                                       "rank " + std::to_string(me));
}

void check_timeout_names_missing(Communicator& comm, int timeout_ms, int late_ms) {
  const int n = comm.size(), me = comm.rank();
  std::vector<float> send(3, 1.0f), recv(3);
  if (me == n - 1) {
    std::this_thread::sleep_for(milliseconds(late_ms));
    auto work = comm.all_reduce(send.data(), recv.data(), 3, DType::kF32, ReduceOp::kSum);
    EXPECT_THROW(work->wait(std::chrono::seconds(30)), Error) << "the late rank joins an aborted communicator";
    return;
  }
  auto work = comm.all_reduce(send.data(), recv.data(), 3, DType::kF32, ReduceOp::kSum);
  if (me == 0) {
    const auto t0 = std::chrono::steady_clock::now();
    expect_throw_containing<TimeoutError>([&] { work->wait(milliseconds(timeout_ms)); },
                                          {"all_reduce #0", "[" + std::to_string(n - 1) + "]", "never arrived"},
                                          "rank 0");
    const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_GE(took, timeout_ms * 0.9);
    EXPECT_LT(took, timeout_ms + 5000.0);
    EXPECT_TRUE(work->done());
  } else {
    // Rank 0's timeout aborts the communicator: the others fail fast instead of waiting 30 s.
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_THROW(work->wait(std::chrono::seconds(30)), Error) << "rank " << me;
    const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(took, 20000.0);
  }
}

void check_abort_propagates(Communicator& comm) {
  const int me = comm.rank();
  comm.barrier()->wait(std::chrono::seconds(30));
  if (me == 0) {
    std::this_thread::sleep_for(milliseconds(50));
    comm.abort("injected failure");
    expect_throw_containing<PeerError>([&] { comm.barrier()->wait(std::chrono::seconds(30)); }, {"injected failure"},
                                       "rank 0 after abort");
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  expect_throw_containing<PeerError>([&] { comm.barrier()->wait(std::chrono::seconds(30)); }, {"injected failure"},
                                     "rank " + std::to_string(me));
  const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(took, 10000.0) << "abort must not wait for the 30 s timeout";
}

}  // namespace shardopt::comm::testing
