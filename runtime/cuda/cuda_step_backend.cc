#include "runtime/cuda/cuda_step_backend.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "base/env.h"
#include "base/error.h"
#include "optim/cuda/cuda_check.h"
#include "optim/cuda/compact_elementwise.h"
#include "optim/cuda/elementwise.h"
#include "optim/cuda/muon.h"
#include "runtime/cuda/step_kernels.h"
#include "runtime/shard_state.h"
#include "runtime/trace.h"

namespace shardopt::runtime {

namespace {

cuda::ElementwiseAlgorithm elementwise_algorithm(const optim::OptimizerParams& p) {
  switch (p.kind) {
    case proto::OPTIMIZER_ADAMW: return cuda::ElementwiseAlgorithm::kAdamW;
    case proto::OPTIMIZER_LION: return cuda::ElementwiseAlgorithm::kLion;
    case proto::OPTIMIZER_SGD: return cuda::ElementwiseAlgorithm::kSgd;
    default: break;
  }
  throw ConfigError("memory space cuda: element-wise optimizer " + optim::optimizer_kind_name(p.kind) +
                    " has no CUDA kernel");
}

cuda::ShapeScale shape_scale(proto::MuonShapeScale s) {
  switch (s) {
    case proto::MUON_SHAPE_SCALE_MATCH_RMS_ADAMW: return cuda::ShapeScale::kMatchRmsAdamW;
    case proto::MUON_SHAPE_SCALE_SPECTRAL: return cuda::ShapeScale::kSpectral;
    default: return cuda::ShapeScale::kOriginal;
  }
}

class CudaStepBackend final : public StepBackend {
 public:
  explicit CudaStepBackend(int device) {
    const int count = cuda::device_count();
    if (count == 0)
      throw DeviceError("memory space cuda: no CUDA device (cudaGetDeviceCount found none or failed)");
    if (device >= count)
      throw ConfigError("memory space cuda: device " + std::to_string(device) + " requested, " +
                        std::to_string(count) + " visible");
    if (device >= 0) SHARDOPT_CUDA_CHECK(cudaSetDevice(device));
    SHARDOPT_CUDA_CHECK(cudaGetDevice(&device_));
    SHARDOPT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    SHARDOPT_CUDA_CHECK(cudaEventCreateWithFlags(&producer_done_, cudaEventDisableTiming));
  }
  ~CudaStepBackend() override {
    // Owned objects holding device memory go before the stream.
    elementwise_.reset();
    compact_.reset();
    batches_.clear();
    muon_by_shape_.clear();
    momentum_codecs_.clear();
    if (momentum_f32_ != nullptr) cudaFree(momentum_f32_);
    if (pieces_ != nullptr) cudaFree(pieces_);
    if (device_refs_ != nullptr) cudaFree(device_refs_);
    if (counters_ != nullptr) cudaFree(counters_);
    if (staging_ != nullptr) cudaFree(staging_);
    if (producer_done_ != nullptr) cudaEventDestroy(producer_done_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  MemorySpace space() const override { return MemorySpace::kCuda; }

  float* allocate(size_t n) override {
    void* p = nullptr;
    SHARDOPT_CUDA_CHECK(cudaMalloc(&p, sizeof(float) * n));
    SHARDOPT_CUDA_CHECK(cudaMemsetAsync(p, 0, sizeof(float) * n, stream_));
    sync();
    return static_cast<float*>(p);
  }
  void release(float* p, size_t) noexcept override { cudaFree(p); }
  void copy(float* dst, const float* src, size_t n) override {
    if (n == 0) return;
    SHARDOPT_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(float) * n, cudaMemcpyDeviceToDevice, stream_));
    sync();
  }
  void zero(float* dst, size_t n) override {
    if (n == 0) return;
    SHARDOPT_CUDA_CHECK(cudaMemsetAsync(dst, 0, sizeof(float) * n, stream_));
    sync();
  }
  void upload(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return;
    SHARDOPT_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
    sync();
  }
  void download(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    SHARDOPT_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    sync();
  }
  void* staging(size_t bytes) override {
    if (bytes > staging_bytes_) {
      sync();
      if (staging_ != nullptr) SHARDOPT_CUDA_CHECK(cudaFree(staging_));
      staging_ = nullptr;
      SHARDOPT_CUDA_CHECK(cudaMalloc(&staging_, bytes));
      staging_bytes_ = bytes;
    }
    return staging_;
  }

  void add(float* dst, const float* src, size_t n) override {
    cuda_detail::launch_add(dst, src, n, stream_);
    SHARDOPT_CUDA_CHECK_LAUNCH();
    sync();
  }
  int64_t workspace_bytes() const override {
    size_t bytes = table_bytes_ + staging_bytes_;
    for (const auto& [shape, muon] : muon_by_shape_) bytes += muon->device_bytes();
    return static_cast<int64_t>(bytes);
  }
  void wait_stream(void* stream) override {
    SHARDOPT_CUDA_CHECK(cudaEventRecord(producer_done_, static_cast<cudaStream_t>(stream)));
    SHARDOPT_CUDA_CHECK(cudaStreamWaitEvent(stream_, producer_done_, 0));
  }
  void copy_scaled_on_stream(float* dst, const float* src, float scale, size_t n, void* stream) override {
    cuda_detail::launch_scale_copy(dst, src, scale, n, static_cast<cudaStream_t>(stream));
    SHARDOPT_CUDA_CHECK(cudaGetLastError());
  }
  void scale(float* x, float s, size_t n) override {
    cuda_detail::launch_scale(x, s, n, stream_);
    SHARDOPT_CUDA_CHECK_LAUNCH();
    sync();
  }
  void decay_add(float* w, const float* delta, float decay, size_t n) override {
    cuda_detail::launch_decay_add(w, delta, decay, n, stream_);
    SHARDOPT_CUDA_CHECK_LAUNCH();
    sync();
  }

  void bind(ShardState& state, const optim::OptimizerParams& elementwise, const optim::OptimizerParams* matrix,
            ThreadPool*) override {
    compact_momentum_ = state.matrix_state_dtype() != proto::STATE_F32;
    if (state.elementwise_state_dtype() != proto::STATE_F32) {
      (void)elementwise_algorithm(elementwise);  // names an optimizer without a CUDA kernel
      compact_ = std::make_unique<cuda::CompactElementwiseOptimizerCuda>(elementwise, state.elementwise_state_dtype(),
                                                                          DType::kF32);
      std::vector<cuda::DeviceCompactSlice> slices;
      for (size_t i = 0; i < state.elementwise_slices().size(); ++i) {
        const optim::ElementwiseSlice& s = state.elementwise_slices()[i];
        cuda::DeviceCompactSlice d;
        d.param = s.master;
        d.grad = s.grad;
        d.state[0] = state.elementwise_compact()[i].slot[0];
        d.state[1] = state.elementwise_compact()[i].slot[1];
        d.count = s.count;
        slices.push_back(d);
      }
      compact_->set_slices(slices);
    } else {
      elementwise_ = std::make_unique<cuda::ElementwiseOptimizerCuda>(elementwise_algorithm(elementwise), DType::kF32);
      std::vector<cuda::DeviceSlice> slices;
      for (const optim::ElementwiseSlice& s : state.elementwise_slices()) {
        cuda::DeviceSlice d;
        d.param = s.master;
        d.grad = s.grad;
        d.exp_avg = s.state[0];
        d.exp_avg_sq = s.state[1];
        d.count = s.count;
        slices.push_back(d);
      }
      elementwise_->set_slices(slices);
    }

    if (matrix != nullptr) {
      if (matrix->kind != proto::OPTIMIZER_MUON && matrix->kind != proto::OPTIMIZER_NORMUON)
        throw ConfigError("memory space cuda: matrix optimizer " + optim::optimizer_kind_name(matrix->kind) +
                          " has no CUDA kernel (muon and normuon have)");
      if (matrix->qk_clip) throw ConfigError("memory space cuda: QK-clip runs on the host only");
      if (matrix->ns.norm_scale != 1.0f || matrix->ns.norm_add != 0.0f)
        throw ConfigError(
            "memory space cuda: the Newton-Schulz input normalization must be G / max(||G||_F, eps) "
            "(the Polar Express schedule runs on the host only)");
      cuda::NsOptions ns;
      ns.coefficients.clear();
      for (const auto& c : matrix->ns.coefficients) ns.coefficients.push_back({c[0], c[1], c[2]});
      ns.eps = matrix->ns.norm_floor;
      build_muon_batches(state, ns);
    }

    std::vector<cuda_detail::CheckPiece> pieces;
    for (const LocalPiece& p : state.my_pieces()) {
      pieces.push_back({state.grad_shard(p.bucket) + p.segment_offset, p.length, p.tensor, 0});
      longest_piece_ = std::max(longest_piece_, p.length);
    }
    piece_count_ = static_cast<int>(pieces.size());
    num_tensors_ = static_cast<size_t>(state.plan().tensors_size());
    if (!pieces.empty()) {
      SHARDOPT_CUDA_CHECK(cudaMalloc(&pieces_, sizeof(cuda_detail::CheckPiece) * pieces.size()));
      table_bytes_ += sizeof(cuda_detail::CheckPiece) * pieces.size();
      upload(pieces_, pieces.data(), sizeof(cuda_detail::CheckPiece) * pieces.size());
    }
    // Counters: one per tensor, then the fp64 Σg² (8 bytes, like the counters).
    SHARDOPT_CUDA_CHECK(cudaMalloc(&counters_, sizeof(unsigned long long) * (num_tensors_ + 1)));
    table_bytes_ += sizeof(unsigned long long) * (num_tensors_ + 1);
    host_counters_.assign(num_tensors_ + 1, 0);
  }

  void check_gradients(ShardState&, std::span<float> result) override {
    const size_t bytes = sizeof(unsigned long long) * (num_tensors_ + 1);
    SHARDOPT_CUDA_CHECK(cudaMemsetAsync(counters_, 0, bytes, stream_));
    auto* sumsq = reinterpret_cast<double*>(counters_ + num_tensors_);
    cuda_detail::launch_check_pieces(static_cast<const cuda_detail::CheckPiece*>(pieces_), piece_count_,
                                     longest_piece_, counters_, sumsq, stream_);
    SHARDOPT_CUDA_CHECK_LAUNCH();
    download(host_counters_.data(), counters_, bytes);
    bool any_bad = false;
    for (size_t t = 0; t < num_tensors_; ++t)
      if (host_counters_[t] != 0) {
        result[t] = 1.0f;
        any_bad = true;
      }
    double s = 0;
    std::memcpy(&s, &host_counters_[num_tensors_], sizeof(double));
    result.back() = any_bad ? 0.0f : static_cast<float>(s);
  }

  void elementwise_step(ShardState&, const optim::OptimizerParams& p, float lr, int64_t step) override {
    if (compact_) {
      compact_->step(p, lr, step, stream_);
      sync();
      return;
    }
    switch (p.kind) {
      case proto::OPTIMIZER_ADAMW:
        elementwise_->step(cuda::AdamWHyper{lr, float(p.beta1), float(p.beta2), float(p.eps), float(p.weight_decay)},
                           step, stream_);
        break;
      case proto::OPTIMIZER_LION:
        elementwise_->step(cuda::LionHyper{lr, float(p.beta1), float(p.beta2), float(p.weight_decay)}, step, stream_);
        break;
      default:
        elementwise_->step(
            cuda::SgdHyper{lr, float(p.momentum), float(p.dampening), float(p.weight_decay), p.nesterov}, step,
            stream_);
        break;
    }
    sync();
  }

  void matrix_step(ShardState& state, const optim::OptimizerParams& p, float lr, TraceRecorder& trace) override {
    TraceRecorder::Span span(trace, "muon owned matrices", "compute");
    cuda::MuonHyper h;
    h.lr = lr;
    h.weight_decay = float(p.weight_decay);
    h.momentum = float(p.momentum);
    h.nesterov = p.nesterov;
    h.convention = p.muon_momentum == proto::MUON_MOMENTUM_SUMMED ? cuda::MomentumConvention::kSummed
                                                                   : cuda::MomentumConvention::kAveraged;
    h.shape_scale = shape_scale(p.shape_scale);
    h.normuon = p.kind == proto::OPTIMIZER_NORMUON;
    h.normuon_beta2 = float(p.normuon_beta2);
    h.normuon_eps = float(p.normuon_eps);
    if (refs_moved(state)) {  // the shard buffers moved (not expected): new tables
      host_refs_ = matrix_refs(state);
      upload(device_refs_, host_refs_.data(), host_refs_.size() * sizeof(MatrixRefs));
    }
    // Compact momentum: each batch's momenta decoded into the fp32 scratch, stepped, encoded back.
    for (size_t i = 0; i < batches_.size(); ++i) {
      const MuonBatch& b = batches_[i];
      if (compact_momentum_) momentum_codecs_[i]->decode(stream_);
      b.muon->step(device_refs_ + b.first, b.grad_dtype, static_cast<int64_t>(b.count), h, stream_);
      if (compact_momentum_) momentum_codecs_[i]->encode(stream_);
    }
    sync();
  }

 private:
  void sync() { SHARDOPT_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t producer_done_ = nullptr;  // wait_stream's event on the trainer's stream
  std::unique_ptr<cuda::ElementwiseOptimizerCuda> elementwise_;       // f32 element-wise state
  std::unique_ptr<cuda::CompactElementwiseOptimizerCuda> compact_;    // bf16 / q8 element-wise state
  using MatrixRefs = cuda::MuonCuda::MatrixRefs;
  // Matrices of one shape (and gradient dtype), run as one batch: refs device_refs_[first, first +
  // count). A matrix orthogonalized per row block (fused QKV: OwnedMatrix block_rows) contributes
  // each block as a matrix of its own shape: its rows are contiguous, the momentum is element-wise,
  // and the host step scales each block by its own shape too. The batches of a shape run one after
  // another on one NS workspace (muon_by_shape_), sized for the largest of them.
  struct MuonBatch {
    size_t first = 0, count = 0;
    DType grad_dtype = DType::kF32;
    cuda::MuonCuda* muon = nullptr;
  };
  // A matrix of a batch: rows [row0, row0 + rows) of owned matrix `owned`.
  struct MatrixPiece {
    size_t owned = 0;
    int64_t row0 = 0, rows = 0;
  };
  // At most this many elements of matrices per batch: a shape's NS workspace holds two bf16 copies of
  // a batch (plus p×p buffers), 256 MiB at this cap; larger groups run as several batches.
  static constexpr size_t kMaxBatchElements = size_t{64} << 20;

  // momentum: the fp32 momentum of the piece (f32 state: in the shard state; compact: the scratch).
  static MatrixRefs refs_of(const optim::MuonMatrix& m, const MatrixPiece& piece, float* momentum) {
    const size_t at = static_cast<size_t>(piece.row0 * m.cols);
    return {m.grad, momentum, m.master + at,
            m.mirror == nullptr ? nullptr : reinterpret_cast<uint16_t*>(m.mirror) + at, at,
            m.row_second_moment == nullptr ? nullptr : m.row_second_moment + piece.row0};
  }

  // The refs of every matrix piece, in batch order.
  std::vector<MatrixRefs> matrix_refs(ShardState& state) const {
    std::vector<MatrixRefs> refs;
    refs.reserve(order_.size());
    for (size_t k = 0; k < order_.size(); ++k) refs.push_back(refs_of(state, k));
    return refs;
  }

  MatrixRefs refs_of(ShardState& state, size_t k) const {
    const MatrixPiece& piece = order_[k];
    const optim::MuonMatrix& m = state.owned_matrices()[piece.owned].matrix;
    float* momentum = compact_momentum_ ? momentum_f32_ + scratch_offset_[k]
                                        : m.momentum + static_cast<size_t>(piece.row0 * m.cols);
    return refs_of(m, piece, momentum);
  }

  bool refs_moved(ShardState& state) const {
    for (size_t k = 0; k < order_.size(); ++k) {
      const MatrixRefs r = refs_of(state, k);
      const MatrixRefs& h = host_refs_[k];
      if (r.grad != h.grad || r.momentum != h.momentum || r.param != h.param || r.mirror != h.mirror ||
          r.row_moment != h.row_moment)
        return true;
    }
    return false;
  }

  void build_muon_batches(ShardState& state, const cuda::NsOptions& ns) {
    auto& owned = state.owned_matrices();
    const int64_t symmetric_blocks = env::get_int("SHARDOPT_CUDA_NS_SYMMETRIC_BLOCKS");
    if (symmetric_blocks < 1)
      throw ConfigError("SHARDOPT_CUDA_NS_SYMMETRIC_BLOCKS must be >= 1, got " + std::to_string(symmetric_blocks));
    const cuda::NsCombine combine =
        cuda::parse_ns_combine(env::get_string("SHARDOPT_CUDA_NS_COMBINE"), "SHARDOPT_CUDA_NS_COMBINE");
    std::map<std::tuple<int64_t, int64_t, DType>, std::vector<MatrixPiece>> groups;
    for (size_t i = 0; i < owned.size(); ++i) {
      const optim::MuonMatrix& m = owned[i].matrix;
      const std::vector<int64_t> whole{m.rows};
      int64_t row0 = 0;
      for (int64_t rows : m.block_rows.empty() ? std::span<const int64_t>(whole) : m.block_rows) {
        if (rows > 0) groups[{rows, m.cols, m.grad_dtype}].push_back({i, row0, rows});
        row0 += rows;
      }
    }
    for (const auto& [key, members] : groups) {
      const auto [rows, cols, dtype] = key;
      const size_t per = static_cast<size_t>(rows * cols);
      const size_t cap = std::max<size_t>(1, kMaxBatchElements / per);
      cuda::NsOptions shape_ns = ns;
      if (std::min(rows, cols) % symmetric_blocks == 0) shape_ns.symmetric_blocks = static_cast<int>(symmetric_blocks);
      // The epilogue combine runs on full GEMMs: shapes under symmetric blocks keep the combine kernel.
      shape_ns.combine = shape_ns.symmetric_blocks == 1 ? combine : cuda::NsCombine::kKernel;
      auto& muon = muon_by_shape_[key];
      muon = std::make_unique<cuda::MuonCuda>(rows, cols, static_cast<int64_t>(std::min(cap, members.size())),
                                              shape_ns);
      for (size_t at = 0; at < members.size(); at += cap) {
        MuonBatch b;
        b.first = order_.size();
        b.count = std::min(cap, members.size() - at);
        b.grad_dtype = dtype;
        b.muon = muon.get();
        order_.insert(order_.end(), members.begin() + static_cast<std::ptrdiff_t>(at),
                      members.begin() + static_cast<std::ptrdiff_t>(at + b.count));
        batches_.push_back(std::move(b));
      }
    }
    if (compact_momentum_) build_momentum_codecs(state);
    host_refs_ = matrix_refs(state);
    if (!host_refs_.empty()) {
      SHARDOPT_CUDA_CHECK(cudaMalloc(&device_refs_, host_refs_.size() * sizeof(MatrixRefs)));
      table_bytes_ += host_refs_.size() * sizeof(MatrixRefs);
      upload(device_refs_, host_refs_.data(), host_refs_.size() * sizeof(MatrixRefs));
    }
  }

  // Compact (q8 / bf16) momentum: batch i's pieces decode into momentum_f32_ (piece k of order_ at
  // scratch_offset_[k]), sized for the largest batch, then encode back. A q8 block must not span two
  // pieces (they may run in different batches): every piece starts on a block boundary of its matrix.
  void build_momentum_codecs(ShardState& state) {
    auto& owned = state.owned_matrices();
    scratch_offset_.assign(order_.size(), 0);
    size_t largest = 0;
    std::vector<std::vector<cuda::DeviceCompactArray>> arrays(batches_.size());
    for (size_t i = 0; i < batches_.size(); ++i) {
      size_t offset = 0;
      for (size_t k = batches_[i].first; k < batches_[i].first + batches_[i].count; ++k) {
        const MatrixPiece& piece = order_[k];
        const OwnedMatrix& om = owned[piece.owned];
        const size_t at = static_cast<size_t>(piece.row0 * om.matrix.cols);
        const bool q8 = om.momentum.dtype == proto::STATE_Q8;
        if (q8 && at % optim::kQ8BlockElems != 0)
          throw ConfigError("memory space cuda: q8 Muon momentum of " + state.plan().tensors(om.tensor).name() +
                            ": its row block at row " + std::to_string(piece.row0) + " starts at element " +
                            std::to_string(at) + ", not on a " + std::to_string(optim::kQ8BlockElems) +
                            "-element q8 block (the device orthogonalizes row blocks separately; use bf16 "
                            "momentum, or row blocks whose rows x cols are multiples of the block)");
        cuda::DeviceCompactArray a;
        a.state = om.momentum;
        a.state.values = static_cast<char*>(om.momentum.values) + at * (q8 ? 1 : 2);
        if (q8) a.state.absmax = om.momentum.absmax + at / optim::kQ8BlockElems;
        a.count = static_cast<size_t>(piece.rows * om.matrix.cols);
        scratch_offset_[k] = offset;
        offset += a.count;
        arrays[i].push_back(a);
      }
      largest = std::max(largest, offset);
    }
    if (largest > 0) SHARDOPT_CUDA_CHECK(cudaMalloc(&momentum_f32_, largest * sizeof(float)));
    table_bytes_ += largest * sizeof(float);
    for (size_t i = 0; i < batches_.size(); ++i) {
      for (size_t j = 0; j < arrays[i].size(); ++j)
        arrays[i][j].f32 = momentum_f32_ + scratch_offset_[batches_[i].first + j];
      momentum_codecs_.push_back(std::make_unique<cuda::CompactCodecCuda>());
      momentum_codecs_.back()->set_arrays(arrays[i]);
    }
  }

  bool compact_momentum_ = false;
  float* momentum_f32_ = nullptr;
  std::vector<size_t> scratch_offset_;
  std::vector<std::unique_ptr<cuda::CompactCodecCuda>> momentum_codecs_;  // one per batch
  std::map<std::tuple<int64_t, int64_t, DType>, std::unique_ptr<cuda::MuonCuda>> muon_by_shape_;
  std::vector<MuonBatch> batches_;
  std::vector<MatrixPiece> order_;     // the matrices of the batches, batch by batch
  std::vector<MatrixRefs> host_refs_;  // what device_refs_ holds
  MatrixRefs* device_refs_ = nullptr;
  void* pieces_ = nullptr;                    // CheckPiece table of my pieces
  unsigned long long* counters_ = nullptr;    // per-tensor non-finite counts, then Σg² as fp64
  std::vector<unsigned long long> host_counters_;
  int piece_count_ = 0;
  int64_t longest_piece_ = 0;
  size_t num_tensors_ = 0;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  size_t table_bytes_ = 0;  // pieces_, counters_, device_refs_ and the compact-momentum scratch
};

// Linked as an object library: this runs whenever a program links shardopt_runtime_cuda.
[[maybe_unused]] const bool registered = (detail::register_cuda_step_backend(&make_cuda_step_backend), true);

}  // namespace

std::unique_ptr<StepBackend> make_cuda_step_backend(int device) { return std::make_unique<CudaStepBackend>(device); }

}  // namespace shardopt::runtime
