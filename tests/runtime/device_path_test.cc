// The Engine's device code path, exercised without a GPU. A stand-in "device" backend registers as
// the CUDA memory space: its memory is host memory handed out as poisoned pointers (bit 62 flipped,
// never a valid host address), which only the backend and the staging copies translate back. So any
// code in the Engine or ShardState that reads or writes a buffer directly instead of through the
// StepBackend crashes here, and the communicator must be one on "device" buffers: the threads
// backend with a mover that translates the pointers (as ranks sharing a GPU exchange device memory),
// or HostStagedCommunicator over the host threads backend, its copies translating them. Its step
// arithmetic is the host kernels', so the device path must equal the host engine bit for bit; the
// real CUDA backend and its kernels are checked in tests/gpu/engine_cuda_test.cc.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <unistd.h>
#include <vector>

#include "base/error.h"
#include "comm/forwarding_communicator.h"
#include "comm/host_staged_communicator.h"
#include "comm/reduce_kernel.h"
#include "comm/thread_backend.h"
#include "optim/compact_step.h"
#include "optim/elementwise.h"
#include "optim/finite.h"
#include "optim/muon.h"
#include "runtime/checkpoint_io.h"
#include "runtime/engine.h"
#include "runtime/gossip/outer_sync.h"
#include "runtime/shard_state.h"
#include "runtime/step_backend.h"
#include "runtime/trace.h"
#include "sharding/layout.h"
#include "tests/common/engine_reference.h"
#include "tests/common/engine_training.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

constexpr uintptr_t kPoison = uintptr_t{1} << 62;
using Params = std::vector<std::vector<float>>;  // per tensor

template <typename T>
T* real(T* p) {
  return p == nullptr ? nullptr : reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) ^ kPoison);
}
template <typename T>
T* poisoned(T* p) {
  return real(p);  // the same flip
}

// Where the stream-ordering test records what the engine asked for, per rank thread (null: nothing).
thread_local std::vector<std::string>* t_stream_log = nullptr;
void log_stream_event(const std::string& what) {
  if (t_stream_log != nullptr) t_stream_log->push_back(what);
}

class PoisonedDeviceBackend final : public StepBackend {
 public:
  MemorySpace space() const override { return MemorySpace::kCuda; }
  float* allocate(size_t n) override { return poisoned(new float[n]()); }
  void release(float* p, size_t) noexcept override { delete[] real(p); }
  void zero(float* dst, size_t n) override { std::memset(real(dst), 0, 4 * n); }
  void upload(void* dst, const void* host, size_t bytes) override { std::memcpy(real(dst), host, bytes); }
  void download(void* host, const void* src, size_t bytes) override { std::memcpy(host, real(src), bytes); }
  void* staging(size_t bytes) override {
    if (staging_.size() < bytes) staging_.resize(bytes);
    return poisoned(staging_.data());
  }
  void wait_stream(void* stream) override {
    log_stream_event("backend waits " + std::to_string(reinterpret_cast<uintptr_t>(stream)));
  }
  void copy_scaled_on_stream(float* dst, const float* src, float scale, size_t n, void*) override {
    for (size_t i = 0; i < n; ++i) real(dst)[i] = scale * real(src)[i];
  }
  void copy(float* dst, const float* src, size_t n) override {
    log_stream_event("backend copy");
    std::memcpy(real(dst), real(src), 4 * n);
  }
  void add(float* dst, const float* src, size_t n) override {
    for (size_t i = 0; i < n; ++i) real(dst)[i] += real(src)[i];
  }
  void scale(float* x, float s, size_t n) override {
    for (size_t i = 0; i < n; ++i) real(x)[i] *= s;
  }
  void decay_add(float* w, const float* delta, float decay, size_t n) override {
    for (size_t i = 0; i < n; ++i) real(w)[i] = real(w)[i] * decay + real(delta)[i];
  }
  void bind(ShardState& state, const optim::OptimizerParams&, const optim::OptimizerParams* matrix,
            ThreadPool*) override {
    if (state.matrix_state_dtype() != proto::STATE_F32)
      throw ConfigError("poisoned device backend: f32 matrix state only");
    for (optim::ElementwiseSlice s : state.elementwise_slices()) {
      s.master = real(s.master);
      s.mirror = real(s.mirror);
      s.grad = real(s.grad);
      s.state[0] = real(s.state[0]);
      s.state[1] = real(s.state[1]);
      slices_.push_back(s);
    }
    if (state.elementwise_state_dtype() != proto::STATE_F32)
      for (optim::CompactSlots slots : state.elementwise_compact()) {
        for (optim::CompactState& c : slots.slot) {
          c.values = real(c.values);
          c.absmax = real(c.absmax);
        }
        compact_.push_back(slots);
      }
    for (const OwnedMatrix& om : state.owned_matrices()) {
      optim::MuonMatrix m = om.matrix;
      m.master = real(m.master);
      m.grad = real(m.grad);
      m.momentum = real(m.momentum);
      m.row_second_moment = real(m.row_second_moment);
      matrices_.push_back(m);
    }
    if (matrix == nullptr) return;
    std::vector<std::pair<int64_t, int64_t>> shapes;
    std::vector<std::span<const int64_t>> blocks;
    for (const auto& m : matrices_) {
      shapes.emplace_back(m.rows, m.cols);
      blocks.push_back(m.block_rows);
      matrix_ptrs_.push_back(&m);
    }
    muon_.emplace(nullptr, shapes, blocks, matrix->ns.precision);
  }
  void check_gradients(ShardState& state, std::span<float> result) override {
    double sumsq = 0;
    bool any_bad = false;
    for (const LocalPiece& p : state.my_pieces()) {
      const float* g = real(state.grad_shard(p.bucket)) + p.segment_offset;
      if (optim::count_nonfinite(g, static_cast<size_t>(p.length)) != 0) {
        result[static_cast<size_t>(p.tensor)] += 1.0f;
        any_bad = true;
      }
      if (any_bad) continue;
      double s = 0;
      for (int64_t i = 0; i < p.length; ++i) s += static_cast<double>(g[i]) * g[i];
      sumsq += s;
    }
    result.back() = static_cast<float>(sumsq);
  }
  void elementwise_step(ShardState&, const optim::OptimizerParams& params, float lr, int64_t step) override {
    if (compact_.empty()) optim::elementwise_step(params, slices_, lr, step);
    else optim::elementwise_step_compact(params, slices_, compact_, lr, step);
  }
  void matrix_step(ShardState&, const optim::OptimizerParams& params, float lr, TraceRecorder&) override {
    muon_->step(params, matrix_ptrs_, lr);
  }

 private:
  std::vector<unsigned char> staging_;
  std::vector<optim::ElementwiseSlice> slices_;
  std::vector<optim::CompactSlots> compact_;  // bf16 / q8 element-wise state; empty for f32
  std::vector<optim::MuonMatrix> matrices_;
  std::vector<const optim::MuonMatrix*> matrix_ptrs_;
  std::optional<optim::ParallelMuon> muon_;
};

// The threads backend's reductions and copies on poisoned buffers: so no path of the backend may
// touch a rank's buffer except through the mover.
class PoisonedMover final : public comm::ThreadBufferMover {
 public:
  bool device() const override { return true; }
  size_t chunk_bytes() const override { return 4096; }
  void reduce(DType dtype, comm::ReduceOp op, std::span<const void* const> inputs, std::span<void* const> outputs,
              size_t len) override {
    std::vector<const void*> in(inputs.begin(), inputs.end());
    std::vector<void*> out(outputs.begin(), outputs.end());
    for (auto& p : in) p = real(p);
    for (auto& p : out) p = real(p);
    comm::detail::reduce_elements(dtype, op, in, out, len);
  }
  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(real(dst), real(src), bytes); }
};

comm::StagingCopies poisoned_copies() {
  return {[](void* host, const void* device, size_t bytes) { std::memcpy(host, real(device), bytes); },
          [](void* device, const void* host, size_t bytes) { std::memcpy(real(device), host, bytes); },
          [](void* to, const void* from, size_t bytes) { std::memmove(real(to), real(from), bytes); }};
}

struct Case {
  int world;
  int stage;
  proto::ShardLayout layout;
  std::string optimizer;
  int accumulation = 1;
  GradMemory grad_memory = GradMemory::kSharded;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "N" << c.world << " stage " << c.stage << " " << sharding::layout_name(c.layout) << " " << c.optimizer
      << " acc " << c.accumulation << (c.grad_memory == GradMemory::kFull ? " full grads" : "");
}

// How the ranks exchange data: host buffers, or the poisoned device buffers through the threads
// backend's mover or through a host-staged communicator.
enum class Exchange { kHost, kDeviceThreads, kHostStaged };

// Every rank's parameters after 3 steps.
std::vector<std::vector<std::vector<float>>> run(const Case& c, Exchange exchange) {
  const bool device = exchange != Exchange::kHost;
  const auto specs = mixed_model();
  std::vector<std::vector<std::vector<float>>> out(static_cast<size_t>(c.world));
  std::mutex mu;
  EngineOptions o = engine_options(c.stage, c.layout, c.optimizer);
  o.grad_accumulation_steps = c.accumulation;
  o.grad_memory = c.grad_memory;
  o.max_grad_norm = 4.0f;  // clipping scales the shard through the backend
  if (device) o.memory_space = MemorySpace::kCuda;
  comm::CommOptions copts;
  copts.checked = true;
  comm::run_ranks(
      c.world,
      [&](comm::Communicator& host) {
        std::optional<comm::HostStagedCommunicator> staged;
        if (exchange == Exchange::kHostStaged) staged.emplace(host, poisoned_copies());
        comm::Communicator& comm = staged ? static_cast<comm::Communicator&>(*staged) : host;
        Engine engine(comm, specs, o);
        auto mem = [&](float* p) { return device ? real(p) : p; };
        engine.set_params([&](size_t t, float* dst) {
          for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
        });
        for (int step = 1; step <= 3; ++step) {
          for (int micro = 0; micro < c.accumulation; ++micro) {
            for (size_t k = specs.size(); k-- > 0;) {
              const bool add = engine.grad_accumulates(k);
              float* g = mem(engine.grad(k));
              for (int64_t i = 0; i < numel(specs[k]); ++i) {
                const float v = common_grad(step, k, i) + rank_offset(comm.rank(), c.world, k, i) +
                                micro_offset(micro, c.accumulation, k, i);
                g[i] = add ? g[i] + v : v;
              }
              engine.grad_ready(k);
            }
          }
          EXPECT_TRUE(engine.step().applied);
        }
        engine.gather_all();
        std::vector<std::vector<float>> mine(specs.size());
        for (size_t t = 0; t < specs.size(); ++t) {
          const float* p = mem(engine.param(t));
          mine[t].assign(p, p + numel(specs[t]));
        }
        engine.release_all();
        std::lock_guard<std::mutex> lock(mu);
        out[static_cast<size_t>(comm.rank())] = std::move(mine);
      },
      copts, exchange == Exchange::kDeviceThreads ? std::make_shared<PoisonedMover>() : nullptr);
  return out;
}

class DevicePath : public ::testing::TestWithParam<Case> {};

TEST_P(DevicePath, EqualsTheHostEngineBitForBit) {
  const Case& c = GetParam();
  const auto host = run(c, Exchange::kHost);
  const auto specs = mixed_model();
  for (Exchange exchange : {Exchange::kDeviceThreads, Exchange::kHostStaged}) {
    const auto dev = run(c, exchange);
    for (int r = 0; r < c.world; ++r)
      for (size_t t = 0; t < specs.size(); ++t) {
        ASSERT_EQ(dev[r][t].size(), host[r][t].size());
        EXPECT_EQ(std::memcmp(dev[r][t].data(), host[r][t].data(), 4 * host[r][t].size()), 0)
            << (exchange == Exchange::kHostStaged ? "host-staged" : "device threads") << ", rank " << r << " "
            << specs[t].name();
      }
  }
  EXPECT_NE(host[0][2][0], initial_value(2, 0));  // the run moved
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (int world : {1, 2, 4})
    for (int stage : {1, 2, 3})
      for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
        for (const char* opt : {"adamw", "muon"}) out.push_back({world, stage, layout, opt});
  // Later micro-batches accumulate in the shard through the backend (ZeRO-2), or locally (full grads).
  out.push_back({2, 2, proto::SHARD_LAYOUT_OWNED, "muon", 2});
  out.push_back({2, 2, proto::SHARD_LAYOUT_DIM0, "lion", 2});
  out.push_back({2, 2, proto::SHARD_LAYOUT_OWNED, "adamw", 2, GradMemory::kFull});
  return out;
}
INSTANTIATE_TEST_SUITE_P(AllConfigurations, DevicePath, ::testing::ValuesIn(cases()));

// An engine buffer as host code reads it (the stand-in device's pointers are poisoned).
float* host_view(Engine& e, float* p) { return e.memory_space() == MemorySpace::kHost ? p : real(p); }

// Every tensor's full parameters, read through host_view.
Params full_params(Engine& e) {
  e.gather_all();
  Params p(e.num_tensors());
  for (size_t t = 0; t < e.num_tensors(); ++t) {
    const float* v = host_view(e, e.param(t));
    p[t].assign(v, v + numel(e.spec(t)));
  }
  e.release_all();
  return p;
}

// Records the ordering calls and reduce-scatters an engine issues (into t_stream_log).
class StreamRecordingCommunicator final : public comm::ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;
  void wait_stream(void* stream) override {
    log_stream_event("comm waits " + std::to_string(reinterpret_cast<uintptr_t>(stream)));
    ForwardingCommunicator::wait_stream(stream);
  }

 protected:
  comm::WorkPtr forward(const comm::ForwardedOp& op, comm::IssueRef issue) override {
    if (op.kind == comm::OpKind::kReduceScatter) log_stream_event("reduce-scatter");
    return issue();
  }
};

// Engine::grad_ready(t, stream): before a bucket's gradients are read, whatever reads them first
// waited for every distinct stream its tensors were announced with since its last launch (the
// communicator before the reduce-scatter; the backend before its dim0 copy), once each; a host engine
// orders nothing. Tensors alternate between two stand-in stream handles (never dereferenced here).
TEST(DevicePath, BucketReadsWaitForTheStreamsOfTheirGradients) {
  const auto specs = mixed_model();
  struct Run {
    int stage;
    proto::ShardLayout layout;
    bool device;
  };
  for (const Run& run : {Run{2, proto::SHARD_LAYOUT_OWNED, true}, Run{1, proto::SHARD_LAYOUT_OWNED, true},
                         Run{2, proto::SHARD_LAYOUT_DIM0, true}, Run{2, proto::SHARD_LAYOUT_OWNED, false}}) {
    const std::string where = std::string(run.device ? "device" : "host") + " stage " + std::to_string(run.stage) +
                              " " + sharding::layout_name(run.layout);
    comm::run_ranks(2, [&](comm::Communicator& host) {
      std::vector<std::string> log;
      t_stream_log = &log;
      std::optional<comm::HostStagedCommunicator> staged;
      if (run.device) staged.emplace(host, poisoned_copies());
      StreamRecordingCommunicator comm(staged ? static_cast<comm::Communicator&>(*staged) : host);
      EngineOptions o = engine_options(run.stage, run.layout, "muon");
      o.grad_accumulation_steps = 2;
      if (run.device) o.memory_space = MemorySpace::kCuda;
      Engine engine(comm, specs, o);
      // Micro-batch m's tensor k comes from stream 0x100 m + k % 2.
      auto stream_of = [](int micro, size_t k) { return reinterpret_cast<void*>(uintptr_t{0x100} * (micro + 1) + k % 2); };
      // The streams each launch should wait for, in launch order: the bucket's streams since its last
      // launch (sharded: a launch per micro-batch; full buffers: one, in the last micro-batch).
      const size_t buckets = static_cast<size_t>(engine.plan().buckets_size());
      std::vector<int> tensors(buckets, 0), missing(buckets, 0);
      for (size_t k = 0; k < specs.size(); ++k) ++tensors[static_cast<size_t>(engine.bucket_of(k))];
      std::vector<std::set<std::string>> since_launch(buckets), expected;
      log.clear();
      for (int micro = 0; micro < 2; ++micro) {
        missing = tensors;
        for (size_t k = specs.size(); k-- > 0;) {
          const bool add = engine.grad_accumulates(k);
          float* g = engine.grad(k);
          float* h = run.device ? real(g) : g;
          for (int64_t i = 0; i < numel(specs[k]); ++i) h[i] = (add ? h[i] : 0.0f) + common_grad(1 + micro, k, i);
          engine.grad_ready(k, stream_of(micro, k));
          const auto b = static_cast<size_t>(engine.bucket_of(k));
          since_launch[b].insert(std::to_string(reinterpret_cast<uintptr_t>(stream_of(micro, k))));
          if (--missing[b] == 0 && (engine.sharded_grads() || micro == 1)) {
            expected.push_back(since_launch[b]);
            since_launch[b].clear();
          }
        }
      }
      ASSERT_TRUE(engine.step().applied) << where;
      t_stream_log = nullptr;

      // Each reduce-scatter of a launch (and, for dim0, the backend copy before it) and the waits before it.
      const std::string waiter = run.layout == proto::SHARD_LAYOUT_DIM0 ? "backend waits " : "comm waits ";
      std::vector<std::multiset<std::string>> waited;
      std::multiset<std::string> since_last;
      bool copied_after_wait = false;  // dim0: the backend's copy into the exchange layout follows the waits
      for (const std::string& e : log) {
        if (e.rfind("comm waits ", 0) == 0 || e.rfind("backend waits ", 0) == 0) {
          EXPECT_EQ(e.rfind(waiter, 0), 0u) << where << ": " << e;
          since_last.insert(e.substr(e.rfind(' ') + 1));
          copied_after_wait = false;
        } else if (e == "backend copy") {
          copied_after_wait = true;
        } else if (e == "reduce-scatter" && waited.size() < expected.size()) {
          if (run.layout == proto::SHARD_LAYOUT_DIM0 && !since_last.empty()) {
            EXPECT_TRUE(copied_after_wait) << where << ": the dim0 copy did not follow the waits";
          }
          waited.push_back(since_last);
          since_last.clear();
        }
      }
      if (!run.device) {
        EXPECT_TRUE(since_last.empty() && std::all_of(waited.begin(), waited.end(), [](auto& w) { return w.empty(); }))
            << where << ": a host engine ordered after a stream";
        return;
      }
      ASSERT_EQ(waited.size(), expected.size()) << where;
      for (size_t i = 0; i < expected.size(); ++i)
        EXPECT_EQ(waited[i], std::multiset<std::string>(expected[i].begin(), expected[i].end()))
            << where << ": launch " << i;
    });
  }
}

// NoLoCo and DiLoCo over device engines: the inner steps on the (stand-in) device, the outer step on
// host buffers over a host cross-replica communicator, theta crossing through the step backend. The
// outer arithmetic is the host code either way, so every rank's parameters equal the host engines'
// run bit for bit; at the end of an outer step the two replicas hold the same parameters (they were
// trained on different gradients, so only the exchange makes them equal). Then replica 0 sends its
// whole state to replica 1 (the rejoin path), which must hold replica 0's parameters afterwards.
TEST(DevicePathGossip, OuterStepsAndRejoinOverDeviceEnginesEqualTheHostRun) {
  const auto specs = mixed_model();
  for (auto mode : {gossip::SyncMode::kNoLoCo, gossip::SyncMode::kDiLoCo}) {
    const std::string where = mode == gossip::SyncMode::kNoLoCo ? "NoLoCo" : "DiLoCo";
    // [device?][world rank] -> parameters after the outer steps, then after the rejoin.
    std::vector<std::vector<Params>> trained(2, std::vector<Params>(4)), rejoined(2, std::vector<Params>(4));
    std::mutex mu;
    for (bool device : {false, true}) {
      comm::run_ranks(4, [&](comm::Communicator& world) {
        gossip::ReplicaGrid grid = gossip::split_replica_grid(world, 2);
        std::optional<comm::HostStagedCommunicator> staged;
        if (device) staged.emplace(*grid.shard_group, poisoned_copies());
        comm::Communicator& shard_comm = staged ? static_cast<comm::Communicator&>(*staged) : *grid.shard_group;
        EngineOptions o = engine_options(2, proto::SHARD_LAYOUT_OWNED, "muon");
        if (device) o.memory_space = MemorySpace::kCuda;
        Engine engine(shard_comm, specs, o);
        engine.set_params([&](size_t t, float* dst) {
          for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
        });
        gossip::GossipOptions go;
        go.mode = mode;
        go.outer_every = 3;
        gossip::OuterSync sync(engine, *grid.cross, go);
        for (int step = 1; step <= 6; ++step) {
          for (size_t k = specs.size(); k-- > 0;) {
            float* g = host_view(engine, engine.grad(k));
            for (int64_t i = 0; i < numel(specs[k]); ++i)
              g[i] = common_grad(step + 5 * grid.replica, k, i) + rank_offset(grid.shard, grid.shards, k, i);
            engine.grad_ready(k);
          }
          ASSERT_TRUE(engine.step().applied);
          sync.after_inner_step();
        }
        EXPECT_EQ(sync.outer_steps(), 2) << where;
        Params after_outer = full_params(engine);
        // Replica 1 takes more inner steps of its own, then rejoins from replica 0.
        if (grid.replica == 1) {
          for (size_t k = specs.size(); k-- > 0;) {
            float* g = host_view(engine, engine.grad(k));
            for (int64_t i = 0; i < numel(specs[k]); ++i) g[i] = common_grad(99, k, i);
            engine.grad_ready(k);
          }
          ASSERT_TRUE(engine.step().applied);
          sync.receive_state(*grid.cross, 0);
        } else {
          sync.send_state(*grid.cross, 1);
        }
        Params after_rejoin = full_params(engine);
        std::lock_guard<std::mutex> lock(mu);
        trained[device][static_cast<size_t>(world.rank())] = std::move(after_outer);
        rejoined[device][static_cast<size_t>(world.rank())] = std::move(after_rejoin);
      });
    }
    for (int r = 0; r < 4; ++r)
      for (size_t t = 0; t < specs.size(); ++t) {
        EXPECT_EQ(trained[1][r][t], trained[0][r][t]) << where << ": rank " << r << " " << specs[t].name();
        EXPECT_EQ(rejoined[1][r][t], rejoined[0][r][t]) << where << ": rejoin, rank " << r << " " << specs[t].name();
      }
    // World rank = replica * shards + shard: ranks 0 and 2 are shard 0 of replicas 0 and 1.
    EXPECT_EQ(trained[1][0], trained[1][2]) << where << ": the replicas differ after an outer step";
    EXPECT_EQ(rejoined[1][2], rejoined[1][0]) << where << ": the rejoined replica does not hold its partner's state";
  }
}

// A cross-replica communicator on device buffers is refused by name: the outer step exchanges host buffers.
TEST(DevicePathGossip, ADeviceCrossCommunicatorIsRefused) {
  comm::run_ranks(2, [&](comm::Communicator& host) {
    comm::HostStagedCommunicator device_cross(host, poisoned_copies());
    comm::run_ranks(1, [&](comm::Communicator& one) {
      comm::HostStagedCommunicator comm(one, poisoned_copies());
      EngineOptions o = engine_options(2, proto::SHARD_LAYOUT_OWNED, "adamw");
      o.memory_space = MemorySpace::kCuda;
      Engine engine(comm, mixed_model(), o);
      try {
        gossip::OuterSync sync(engine, device_cross, gossip::GossipOptions{});
        FAIL() << "a device cross communicator was accepted";
      } catch (const ConfigError& e) {
        EXPECT_NE(std::string(e.what()).find("cross-replica communicator"), std::string::npos) << e.what();
      }
    });
  });
}

// Checkpoints of a device engine. The files do not depend on the memory space, so a run saved on the
// device resumes on the host and the other way round, at other world sizes and stages, exactly as if
// it had never stopped (resume = uninterrupted, bit for bit in the owned layout, as the host suite).
// Element-wise state q8 (codes and absmax travel through the backend's download/upload) and Muon
// momentum f32. Every rank exchanges device buffers through the threads backend's (poisoned) mover.
namespace ckpt_case {

namespace fs = std::filesystem;
constexpr int kSteps = 2;  // before the save and after the load

EngineOptions options(int stage, bool device, proto::StateDType elementwise_state) {
  EngineOptions o = engine_options(stage, proto::SHARD_LAYOUT_OWNED, "muon");
  o.elementwise_optimizer.set_state_dtype(elementwise_state);
  if (device) o.memory_space = MemorySpace::kCuda;
  return o;
}

// The fixture's training, gradients written through host_view.
void train(Engine& e, int first, int last) {
  train_steps(e, first, last,
              [](Engine& engine, size_t k, const std::vector<float>& g) { std::copy(g.begin(), g.end(), host_view(engine, engine.grad(k))); });
}

// fn on `world` ranks whose engines are on the device (the poisoned mover) or the host; rank 0's result.
template <typename T>
T on_ranks(int world, bool device, const std::function<T(comm::Communicator&)>& fn) {
  comm::CommOptions copts;
  copts.checked = true;
  return rank0_result<T>(world, fn, copts, device ? std::make_shared<PoisonedMover>() : nullptr);
}

// A run of 2 kSteps: saved after kSteps (on `save_device`, synchronously or with the background saver
// while the next step already runs), loaded at `load_world` into an engine on `load_device`, continued.
Params resumed(const fs::path& root, bool save_device, bool async, int load_world, int load_stage, bool load_device,
               proto::StateDType saved_state, proto::StateDType loaded_state) {
  const auto specs = q8_model();
  const fs::path dir = on_ranks<fs::path>(2, save_device, [&](comm::Communicator& c) {
    Engine e(c, specs, options(2, save_device, saved_state));
    e.set_params([&](size_t t, float* dst) {
      for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
    });
    train(e, 0, kSteps);
    if (!async) return save_checkpoint(e, root).dir;
    AsyncCheckpointSaver saver(e);
    saver.start(root);
    train(e, kSteps, kSteps + 1);  // the state changes before the write is finished
    return saver.finish().dir;
  });
  return on_ranks<Params>(load_world, load_device, [&](comm::Communicator& c) {
    Engine e(c, specs, options(load_stage, load_device, loaded_state));
    load_checkpoint(e, dir);
    EXPECT_EQ(e.optimizer_step(), kSteps);
    train(e, kSteps, 2 * kSteps);
    return full_params(e);
  });
}

fs::path test_root(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("shardopt_device_ckpt_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void expect_identical(const Params& got, const Params& want, const std::string& where) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t t = 0; t < want.size(); ++t) {
    ASSERT_EQ(got[t].size(), want[t].size());
    EXPECT_EQ(std::memcmp(got[t].data(), want[t].data(), 4 * want[t].size()), 0) << where << ", tensor " << t;
  }
}

}  // namespace ckpt_case

TEST(DevicePathCheckpoint, SavedOnTheDeviceResumesOnTheHostAndBackAsIfNeverStopped) {
  using namespace ckpt_case;
  const auto specs = q8_model();
  const fs::path root = test_root("resume");
  const Params uninterrupted = on_ranks<Params>(2, false, [&](comm::Communicator& c) {
    Engine e(c, specs, options(2, false, proto::STATE_Q8));
    e.set_params([&](size_t t, float* dst) {
      for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
    });
    train(e, 0, 2 * kSteps);
    return full_params(e);
  });
  struct Run {
    bool save_device, async;
    int world, stage;
    bool load_device;
  };
  for (const Run& r : {Run{true, false, 3, 2, false}, Run{false, false, 4, 3, true}, Run{true, false, 1, 1, true},
                       Run{true, true, 3, 2, false}}) {
    const std::string where = std::string("saved on the ") + (r.save_device ? "device" : "host") +
                              (r.async ? " (background saver)" : "") + ", resumed at N=" + std::to_string(r.world) +
                              " stage " + std::to_string(r.stage) + " on the " + (r.load_device ? "device" : "host");
    const Params got = resumed(root / where, r.save_device, r.async, r.world, r.stage, r.load_device,
                               proto::STATE_Q8, proto::STATE_Q8);
    expect_identical(got, uninterrupted, where);
  }
  fs::remove_all(root.parent_path());
}

// A load into another state dtype converts on the host and uploads the result: a device engine ends
// with exactly what a host engine loading the same checkpoint holds (q8 -> f32 decoded, f32 -> q8
// encoded), so both continue identically.
TEST(DevicePathCheckpoint, ConvertingTheStateDtypeOnLoadEqualsTheHostConversion) {
  using namespace ckpt_case;
  const fs::path root = test_root("convert");
  for (auto [saved, loaded] : {std::pair{proto::STATE_Q8, proto::STATE_F32}, std::pair{proto::STATE_F32, proto::STATE_Q8},
                               std::pair{proto::STATE_F32, proto::STATE_BF16}}) {
    const std::string where = std::string(optim::state_dtype_name(saved)) + " -> " + optim::state_dtype_name(loaded);
    const Params on_host = resumed(root / (where + " host"), true, false, 2, 2, false, saved, loaded);
    const Params on_device = resumed(root / (where + " device"), false, false, 2, 2, true, saved, loaded);
    expect_identical(on_device, on_host, where);
  }
  fs::remove_all(root.parent_path());
}

}  // namespace

// Registered before main: this program's "CUDA" memory space is the poisoned stand-in.
[[maybe_unused]] const bool kRegistered = (detail::register_cuda_step_backend([](int) -> std::unique_ptr<StepBackend> {
  return std::make_unique<PoisonedDeviceBackend>();
}), true);

}  // namespace shardopt::runtime
