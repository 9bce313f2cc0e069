#include "runtime/step_backend.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "base/error.h"
#include "optim/finite.h"
#include "optim/muon.h"
#include "runtime/shard_state.h"
#include "runtime/trace.h"

namespace shardopt::runtime {

namespace {

detail::StepBackendFactory g_cuda_factory = nullptr;

// Host memory and the CPU kernels of optim/: the Engine's step as it always ran.
class HostStepBackend final : public StepBackend {
 public:
  MemorySpace space() const override { return MemorySpace::kHost; }

  float* allocate(size_t n) override { return new float[n](); }
  void release(float* p, size_t) noexcept override { delete[] p; }
  void copy(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, sizeof(float) * n); }
  void zero(float* dst, size_t n) override { std::fill_n(dst, n, 0.0f); }
  void upload(void* dst, const void* host_src, size_t bytes) override { std::memcpy(dst, host_src, bytes); }
  void download(void* host_dst, const void* src, size_t bytes) override { std::memcpy(host_dst, src, bytes); }
  void* staging(size_t bytes) override {
    if (staging_.size() < bytes) staging_.resize(bytes);
    return staging_.data();
  }

  void add(float* dst, const float* src, size_t n) override {
    for (size_t i = 0; i < n; ++i) dst[i] += src[i];
  }
  void scale(float* x, float s, size_t n) override {
    for (size_t i = 0; i < n; ++i) x[i] *= s;
  }
  void wait_stream(void*) override {}
  void copy_scaled_on_stream(float* dst, const float* src, float scale, size_t n, void*) override {
    for (size_t i = 0; i < n; ++i) dst[i] = scale * src[i];
  }
  void decay_add(float* w, const float* delta, float decay, size_t n) override {
    for (size_t i = 0; i < n; ++i) w[i] = w[i] * decay + delta[i];
  }

  void bind(ShardState& state, const optim::OptimizerParams&, const optim::OptimizerParams* matrix,
            ThreadPool* pool) override {
    pool_ = pool;
    if (matrix == nullptr) return;
    std::vector<std::pair<int64_t, int64_t>> shapes;
    std::vector<std::span<const int64_t>> blocks;
    for (const OwnedMatrix& om : state.owned_matrices()) {
      shapes.emplace_back(om.matrix.rows, om.matrix.cols);
      blocks.push_back(om.matrix.block_rows);
      owned_matrices_.push_back(&om.matrix);
    }
    parallel_muon_ = std::make_unique<optim::ParallelMuon>(pool_, shapes, blocks, matrix->ns.precision);
  }

  void check_gradients(ShardState& state, std::span<float> result) override {
    double sumsq = 0;
    bool any_bad = false;
    for (const LocalPiece& p : state.my_pieces()) {
      const float* g = state.grad_shard(p.bucket) + p.segment_offset;
      if (optim::count_nonfinite(g, static_cast<size_t>(p.length)) != 0) {
        result[static_cast<size_t>(p.tensor)] += 1.0f;
        any_bad = true;
      }
      if (any_bad) continue;  // the step is skipped everywhere: no norm needed
      double s = 0;
      for (int64_t i = 0; i < p.length; ++i) s += static_cast<double>(g[i]) * g[i];
      sumsq += s;
    }
    result.back() = static_cast<float>(sumsq);
  }

  void elementwise_step(ShardState& state, const optim::OptimizerParams& params, float lr, int64_t step) override {
    state.elementwise_step(params, lr, step, optim::KernelOptions{pool_});
  }

  void matrix_step(ShardState& state, const optim::OptimizerParams& params, float lr, TraceRecorder& trace) override {
    // fp32 momentum: the owned matrices run concurrently on the pool. Compact (bf16/q8) momentum is
    // decoded into one fp32 scratch that the matrices share, so they run one after another, and the
    // pool, idle meanwhile, runs each matrix's momentum decode and encode.
    if (state.matrix_state_dtype() == proto::STATE_F32) {
      TraceRecorder::Span span(trace, "muon owned matrices", "compute");
      parallel_muon_->step(params, owned_matrices_, lr);
    } else {
      for (OwnedMatrix& om : state.owned_matrices()) {
        TraceRecorder::Span span(trace, "muon ", state.plan().tensors(om.tensor).name(), "compute");
        state.muon_step(params, om, lr, optim::KernelOptions{pool_});
      }
    }
  }

 private:
  ThreadPool* pool_ = nullptr;
  std::unique_ptr<optim::ParallelMuon> parallel_muon_;    // this rank's owned matrices
  std::vector<const optim::MuonMatrix*> owned_matrices_;  // ParallelMuon's order of the matrices
  std::vector<unsigned char> staging_;
};

}  // namespace

std::string_view memory_space_name(MemorySpace space) {
  switch (space) {
    case MemorySpace::kHost: return "host";
    case MemorySpace::kCuda: return "cuda";
  }
  return "?";
}

MemorySpace parse_memory_space(const std::string& name) {
  if (name == "host" || name == "cpu") return MemorySpace::kHost;
  if (name == "cuda") return MemorySpace::kCuda;
  throw ConfigError("memory space must be host (or cpu) or cuda, got '" + name + "'");
}

std::unique_ptr<StepBackend> make_step_backend(MemorySpace space, int device) {
  switch (space) {
    case MemorySpace::kHost: return std::make_unique<HostStepBackend>();
    case MemorySpace::kCuda:
      if (g_cuda_factory == nullptr)
        throw ConfigError(
            "memory space cuda: this program has no CUDA step backend (shardopt was built without the CUDA "
            "toolkit, or the program does not link shardopt_runtime_cuda)");
      return g_cuda_factory(device);
  }
  throw ConfigError("unknown memory space " + std::to_string(static_cast<int>(space)));
}

StepBackend& host_memory() {
  static HostStepBackend backend;
  return backend;
}

void detail::register_cuda_step_backend(StepBackendFactory factory) { g_cuda_factory = factory; }

SpaceArray::SpaceArray(StepBackend& backend, size_t n) : backend_(&backend) {
  if (n == 0) return;
  data_ = backend.allocate(n);
  size_ = capacity_ = n;
}

SpaceArray::SpaceArray(SpaceArray&& other) noexcept
    : backend_(other.backend_), data_(other.data_), size_(other.size_), capacity_(other.capacity_) {
  other.data_ = nullptr;
  other.size_ = other.capacity_ = 0;
}

SpaceArray& SpaceArray::operator=(SpaceArray&& other) noexcept {
  if (this != &other) {
    reset();
    backend_ = other.backend_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

void SpaceArray::resize_within_capacity(size_t n) {
  SHARDOPT_ASSERT(n <= capacity_, "SpaceArray: resize beyond capacity");
  if (n > size_) backend_->zero(data_ + size_, n - size_);
  size_ = n;
}

void SpaceArray::reset() {
  if (data_ != nullptr) backend_->release(data_, capacity_);
  data_ = nullptr;
  size_ = capacity_ = 0;
}

}  // namespace shardopt::runtime
