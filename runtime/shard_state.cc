#include "runtime/shard_state.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"

namespace shardopt::runtime {

namespace {

int64_t numel_of(const proto::TensorPlacement& t) { return t.numel(); }

}  // namespace

ShardState::ShardState(proto::ShardPlan plan, int rank, const optim::OptimizerParams* matrix_optimizer,
                       const optim::OptimizerParams& elementwise_optimizer, GradBuffers grad_buffers,
                       StepBackend& memory)
    : plan_(std::move(plan)), rank_(rank), grad_buffers_(grad_buffers), memory_(&memory) {
  const int nb = num_buckets();
  const size_t nt = static_cast<size_t>(plan_.tensors_size());
  grads_.resize(grad_buffers_.pooled ? 0 : nb);
  grad_shards_.resize(nb);
  master_.resize(nb);
  params_.resize(nb);
  segment_counts_.resize(nb);
  for (int b = 0; b < nb; ++b) {
    const auto& bucket = plan_.buckets(b);
    if (!grad_buffers_.pooled) grads_[b] = SpaceArray(*memory_, static_cast<size_t>(bucket.numel()));
    const auto count = static_cast<size_t>(my_segment(b).count());
    master_[b] = SpaceArray(*memory_, count);
    grad_shards_[b] = SpaceArray(*memory_, count);
    if (stage() <= 2) params_[b] = SpaceArray(*memory_, static_cast<size_t>(bucket.numel()));
    for (const auto& seg : bucket.segments()) segment_counts_[b].push_back(static_cast<size_t>(seg.count()));
    largest_bucket_ = std::max(largest_bucket_, bucket.numel());
    largest_segment_ = std::max(largest_segment_, my_segment(b).count());
  }
  param_view_.assign(nt, nullptr);
  grad_view_.assign(nt, nullptr);
  if (dim0()) {
    user_params_.resize(nt);
    if (!grad_buffers_.pooled) user_grads_.resize(nt);
    for (size_t t = 0; t < nt; ++t) {
      user_params_[t] = SpaceArray(*memory_, static_cast<size_t>(numel_of(plan_.tensors(static_cast<int>(t)))));
      if (!grad_buffers_.pooled) user_grads_[t] = SpaceArray(*memory_, user_params_[t].size());
    }
  }
  if (grad_buffers_.pooled) {
    SHARDOPT_ASSERT(grad_buffers_.slots >= 1, "a gradient pool needs at least one slot");
    open_slot_.assign(static_cast<size_t>(nb), -1);
    if (dim0()) {
      tensor_major_offset_.assign(nt, 0);
      tensor_major_numel_.assign(static_cast<size_t>(nb), 0);
      for (int b = 0; b < nb; ++b)
        for (int t : plan_.buckets(b).tensors()) {
          tensor_major_offset_[static_cast<size_t>(t)] = tensor_major_numel_[static_cast<size_t>(b)];
          tensor_major_numel_[static_cast<size_t>(b)] += numel_of(plan_.tensors(t));
        }
    }
    for (int i = 0; i < grad_buffers_.slots; ++i) add_grad_slot();
  }
  build_views(matrix_optimizer, elementwise_optimizer);
  if (dim0()) build_dim0_exchange();
}

ShardState::GradSlot ShardState::make_grad_slot() const {
  GradSlot s;
  s.reduce_input = SpaceArray(*memory_, static_cast<size_t>(largest_bucket_));
  if (dim0()) {
    int64_t largest = 0;
    for (int64_t n : tensor_major_numel_) largest = std::max(largest, n);
    s.tensor_major = SpaceArray(*memory_, static_cast<size_t>(largest));
  }
  if (grad_buffers_.reduce_scratch) s.reduced = SpaceArray(*memory_, static_cast<size_t>(largest_segment_));
  return s;
}

void ShardState::add_grad_slot() {
  SHARDOPT_ASSERT(grad_buffers_.pooled, "add_grad_slot: this state keeps full gradient buffers");
  slots_.push_back(make_grad_slot());
  // Room for every slot on the free stack: free_grad_slot() then never allocates.
  free_slots_.reserve(slots_.size());
  free_slots_.push_back(static_cast<int>(slots_.size()) - 1);
}

bool ShardState::open_grad_slot(int b) {
  SHARDOPT_ASSERT(grad_buffers_.pooled && open_slot_[b] < 0, "open_grad_slot: bucket already has a slot");
  if (free_slots_.empty()) return false;
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  open_slot_[b] = slot;
  // A fresh micro-batch: tensors (and padding) start from zero, so writers may overwrite or add.
  GradSlot& s = slots_[static_cast<size_t>(slot)];
  memory_->zero(s.reduce_input.data(), static_cast<size_t>(plan_.buckets(b).numel()));
  if (dim0()) memory_->zero(s.tensor_major.data(), static_cast<size_t>(tensor_major_numel_[static_cast<size_t>(b)]));
  return true;
}

int ShardState::close_grad_slot(int b) {
  const int slot = open_slot_[b];
  SHARDOPT_ASSERT(slot >= 0, "close_grad_slot: bucket has no open slot");
  open_slot_[b] = -1;
  return slot;
}

void ShardState::free_grad_slot(int slot) { free_slots_.push_back(slot); }

float* ShardState::bucket_grads(int b) {
  if (!grad_buffers_.pooled) return grads_[b].data();
  return open_slot_[b] < 0 ? nullptr : slots_[static_cast<size_t>(open_slot_[b])].reduce_input.data();
}

void ShardState::acquire_params(int b) {
  if (!params_[b].empty()) return;
  const auto n = static_cast<size_t>(plan_.buckets(b).numel());
  // Reuse a pooled buffer when one is large enough: steady-state gathers allocate nothing.
  for (size_t i = 0; i < param_pool_.size(); ++i) {
    if (param_pool_[i].capacity() >= n) {
      params_[b] = std::move(param_pool_[i]);
      param_pool_.erase(param_pool_.begin() + static_cast<std::ptrdiff_t>(i));
      params_[b].resize_within_capacity(n);
      return;
    }
  }
  params_[b] = SpaceArray(*memory_, n);
}

void ShardState::drop_params(int b) {
  if (params_[b].empty()) return;
  param_pool_.push_back(std::move(params_[b]));
  params_[b] = {};
}

float* ShardState::param(size_t t) {
  if (dim0()) return user_params_[t].data();
  const auto& placement = plan_.tensors(static_cast<int>(t));
  float* base = bucket_params(placement.bucket());
  if (base == nullptr)
    throw ConfigError("parameter '" + placement.name() + "' is not gathered: stage 3 needs gather(bucket " +
                      std::to_string(placement.bucket()) + ") before param()");
  return base + placement.bucket_offset();
}

float* ShardState::grad(size_t t) {
  const auto& placement = plan_.tensors(static_cast<int>(t));
  const int b = placement.bucket();
  if (!grad_buffers_.pooled) {
    if (dim0()) return user_grads_[t].data();
    return grads_[b].data() + placement.bucket_offset();
  }
  SHARDOPT_ASSERT(open_slot_[b] >= 0, "grad: bucket of " + placement.name() + " has no open gradient slot");
  GradSlot& s = slots_[static_cast<size_t>(open_slot_[b])];
  if (dim0()) return s.tensor_major.data() + tensor_major_offset_[t];
  return s.reduce_input.data() + placement.bucket_offset();
}

const float* ShardState::tensor_grad_source(int t, int b) const {
  if (!grad_buffers_.pooled) return user_grads_[static_cast<size_t>(t)].data();
  return slots_[static_cast<size_t>(open_slot_[b])].tensor_major.data() + tensor_major_offset_[static_cast<size_t>(t)];
}

void ShardState::copy_in_grads(int b) {
  float* dst = bucket_grads(b);
  SHARDOPT_ASSERT(dst != nullptr, "copy_in_grads: bucket has no gradient buffer");
  for (int t : plan_.buckets(b).tensors()) {
    const auto& placement = plan_.tensors(t);
    const float* src = tensor_grad_source(t, b);
    for (const auto& p : placement.pieces())
      memory_->copy(dst + p.bucket_offset(), src + p.tensor_offset(), static_cast<size_t>(p.length()));
  }
}

void ShardState::copy_out_params(int b) {
  for (int t : plan_.buckets(b).tensors()) {
    const auto& placement = plan_.tensors(t);
    for (const auto& p : placement.pieces())
      memory_->copy(user_params_[t].data() + p.tensor_offset(), params_[b].data() + p.bucket_offset(),
                    static_cast<size_t>(p.length()));
  }
}

void ShardState::build_views(const optim::OptimizerParams* matrix_optimizer,
                             const optim::OptimizerParams& elementwise) {
  const int ew_slots = optim::state_values_per_element(elementwise);
  const int mx_slots = matrix_optimizer ? optim::state_values_per_element(*matrix_optimizer) : 0;
  const int mx_row_slots = matrix_optimizer ? optim::state_values_per_row(*matrix_optimizer) : 0;
  SHARDOPT_ASSERT(mx_slots <= 1, "matrix optimizers keep one momentum buffer");

  // My pieces of every tensor, and the element-wise element count for the state arrays.
  int64_t ew_elems = 0;
  for (const auto& placement : plan_.tensors()) {
    for (const auto& p : placement.pieces()) {
      if (p.rank() != rank_) continue;
      const int64_t seg_off = p.bucket_offset() - my_segment(p.bucket()).offset();
      SHARDOPT_ASSERT(seg_off >= 0 && seg_off + p.length() <= my_segment(p.bucket()).count(),
                      "piece outside my segment of " + placement.name());
      my_pieces_.push_back(LocalPiece{placement.index(), p.bucket(), seg_off, p.tensor_offset(), p.length()});
      if (!placement.muon()) ew_elems += p.length();
    }
  }

  // Owned Muon matrices: momentum (numel each) then NorMuon row states (rows each).
  int64_t mx_elems = 0, mx_rows = 0, assembled = 0;
  for (const auto& placement : plan_.tensors()) {
    if (!placement.muon() || placement.owner() != rank_) continue;
    mx_elems += placement.numel();
    mx_rows += placement.rows();
    if (dim0()) assembled += placement.numel();
  }
  // Compact (bf16 / q8) moments: element-wise slots slot-major, then the owned matrices' momenta.
  ew_dtype_ = ew_slots > 0 ? elementwise.state_dtype : proto::STATE_F32;
  mx_dtype_ = mx_slots > 0 ? matrix_optimizer->state_dtype : proto::STATE_F32;
  const bool ew_compact = ew_dtype_ != proto::STATE_F32, mx_compact = mx_dtype_ != proto::STATE_F32;
  auto value_bytes = [](optim::StateDType d) -> int64_t { return d == proto::STATE_BF16 ? 2 : 1; };
  auto absmax_count = [](optim::StateDType d, int64_t n) { return d == proto::STATE_Q8 ? optim::q8_num_blocks(n) : 0; };
  int64_t compact_values = 0, compact_absmax = 0, largest_matrix = 0;
  if (ew_compact)
    for (const LocalPiece& lp : my_pieces_) {
      if (plan_.tensors(lp.tensor).muon()) continue;
      SHARDOPT_ASSERT(ew_dtype_ != proto::STATE_Q8 || lp.tensor_offset % optim::kQ8BlockElems == 0,
                      "q8 state: a piece of '" + plan_.tensors(lp.tensor).name() +
                          "' does not start on a quantization block (plan without state_block_elems?)");
      compact_values += ew_slots * lp.length * value_bytes(ew_dtype_);
      compact_absmax += ew_slots * absmax_count(ew_dtype_, lp.length);
    }
  if (mx_compact)
    for (const auto& placement : plan_.tensors()) {
      if (!placement.muon() || placement.owner() != rank_) continue;
      compact_values += placement.numel() * value_bytes(mx_dtype_);
      compact_absmax += absmax_count(mx_dtype_, placement.numel());
      largest_matrix = std::max(largest_matrix, placement.numel());
    }
  // Zero-filled: all-zero codes with absmax 0 decode to 0 (bf16: +0).
  compact_value_bytes_ = compact_values;
  compact_values_ = SpaceArray(*memory_, static_cast<size_t>((compact_values + 3) / 4));
  compact_absmax_ = SpaceArray(*memory_, static_cast<size_t>(compact_absmax));
  momentum_scratch_.assign(static_cast<size_t>(largest_matrix), 0.0f);
  int64_t value_cursor = 0, absmax_cursor = 0;
  auto take_compact = [&](optim::StateDType d, int64_t n, bool nonnegative) {
    optim::CompactState c;
    c.dtype = d;
    c.values = reinterpret_cast<unsigned char*>(compact_values_.data()) + value_cursor;
    c.absmax = d == proto::STATE_Q8 ? compact_absmax_.data() + absmax_cursor : nullptr;
    c.nonnegative = nonnegative;
    value_cursor += n * value_bytes(d);
    absmax_cursor += absmax_count(d, n);
    return c;
  };

  elementwise_state_ = SpaceArray(*memory_, static_cast<size_t>(ew_compact ? 0 : ew_elems * ew_slots));
  muon_state_ =
      SpaceArray(*memory_, static_cast<size_t>((mx_compact ? 0 : mx_elems * mx_slots) + mx_rows * mx_row_slots));
  dim0_assembled_ = SpaceArray(*memory_, static_cast<size_t>(2 * assembled));

  int64_t ew_cursor = 0;
  for (const LocalPiece& lp : my_pieces_) {
    const auto& placement = plan_.tensors(lp.tensor);
    if (placement.muon()) continue;
    optim::ElementwiseSlice s;
    s.master = master_[lp.bucket].data() + lp.segment_offset;
    s.grad = grad_shard(lp.bucket) + lp.segment_offset;
    s.grad_dtype = DType::kF32;
    if (!ew_compact)
      for (int k = 0; k < ew_slots; ++k) s.state[k] = elementwise_state_.data() + k * ew_elems + ew_cursor;
    s.count = static_cast<size_t>(lp.length);
    ew_cursor += lp.length;
    elementwise_slices_.push_back(s);
  }
  if (ew_compact) {
    elementwise_compact_.resize(elementwise_slices_.size());
    for (int k = 0; k < ew_slots; ++k)
      for (size_t i = 0; i < elementwise_slices_.size(); ++i)
        elementwise_compact_[i].slot[k] = take_compact(ew_dtype_, static_cast<int64_t>(elementwise_slices_[i].count),
                                                       optim::q8_slot_is_nonnegative(elementwise.kind, k));
  }

  int64_t mom_cursor = 0, row_cursor = mx_compact ? 0 : mx_elems * mx_slots, asm_cursor = 0;
  for (const auto& placement : plan_.tensors()) {
    if (!placement.muon() || placement.owner() != rank_) continue;
    OwnedMatrix om;
    om.tensor = placement.index();
    om.block_rows.assign(placement.block_rows().begin(), placement.block_rows().end());
    optim::MuonMatrix& m = om.matrix;
    m.rows = placement.rows();
    m.cols = placement.cols();
    if (mx_compact) {
      om.momentum = take_compact(mx_dtype_, placement.numel(), false);
      m.momentum = momentum_scratch_.data();
    } else {
      m.momentum = muon_state_.data() + mom_cursor;
      mom_cursor += placement.numel();
    }
    if (mx_row_slots > 0) {
      m.row_second_moment = muon_state_.data() + row_cursor;
      row_cursor += placement.rows();
    }
    if (dim0()) {
      // Gradient assembled from row shards; "master" receives the update -lr*s*O (see engine).
      m.grad = dim0_assembled_.data() + asm_cursor;
      m.master = dim0_assembled_.data() + assembled + asm_cursor;
      asm_cursor += placement.numel();
    } else {
      SHARDOPT_ASSERT(placement.pieces_size() == 1 && placement.pieces(0).rank() == rank_,
                      "owned layout: Muon matrix " + placement.name() + " must lie whole in its owner's segment");
      const auto& p = placement.pieces(0);
      const int64_t seg_off = p.bucket_offset() - my_segment(p.bucket()).offset();
      m.master = master_[p.bucket()].data() + seg_off;
      m.grad = grad_shard(p.bucket()) + seg_off;
    }
    m.grad_dtype = DType::kF32;
    // The CPU Newton-Schulz scratch; a device backend keeps its own workspace.
    if (memory_->space() == MemorySpace::kHost) workspace_.reserve(m.rows, m.cols);
    owned_.push_back(std::move(om));
  }
  // block_rows spans point into the vectors now that owned_ no longer moves.
  for (auto& om : owned_) om.matrix.block_rows = om.block_rows;
}

void ShardState::build_dim0_exchange() {
  const int n = plan_.request().world_size();
  dim0_send_counts_.assign(n, 0);
  dim0_recv_counts_.assign(n, 0);
  for (const auto& placement : plan_.tensors()) {
    if (!placement.muon()) continue;
    for (const auto& p : placement.pieces()) {
      if (p.rank() == rank_) {
        dim0_my_shards_.push_back(Dim0Shard{placement.index(), placement.owner(), p.bucket(),
                                            p.bucket_offset() - my_segment(p.bucket()).offset(), p.length()});
        dim0_send_counts_[placement.owner()] += static_cast<size_t>(p.length());
      }
      if (placement.owner() == rank_) dim0_recv_counts_[p.rank()] += static_cast<size_t>(p.length());
    }
  }
  size_t send_total = 0, recv_total = 0;
  for (int p = 0; p < n; ++p) {
    send_total += dim0_send_counts_[p];
    recv_total += dim0_recv_counts_[p];
  }
  dim0_send_ = SpaceArray(*memory_, send_total);
  dim0_recv_ = SpaceArray(*memory_, recv_total);
  dim0_cursor_.assign(static_cast<size_t>(n), 0);
}

// Send layout: peer-major (owner order), and within a peer the Muon tensors in tensor order.
void ShardState::dim0_pack_grads() {
  const int n = plan_.request().world_size();
  std::vector<size_t>& cursor = dim0_cursor_;
  cursor[0] = 0;
  for (int p = 1; p < n; ++p) cursor[p] = cursor[p - 1] + dim0_send_counts_[p - 1];
  for (const Dim0Shard& s : dim0_my_shards_) {
    memory_->copy(dim0_send_.data() + cursor[s.owner], grad_shard(s.bucket) + s.segment_offset,
                  static_cast<size_t>(s.length));
    cursor[s.owner] += static_cast<size_t>(s.length);
  }
}

// Receive layout from peer q: the pieces q holds of my matrices, in tensor order.
void ShardState::dim0_unpack_to_owned() {
  const int n = plan_.request().world_size();
  std::vector<size_t>& cursor = dim0_cursor_;
  cursor[0] = 0;
  for (int p = 1; p < n; ++p) cursor[p] = cursor[p - 1] + dim0_recv_counts_[p - 1];
  for (OwnedMatrix& om : owned_) {
    const auto& placement = plan_.tensors(om.tensor);
    auto* grad = const_cast<float*>(static_cast<const float*>(om.matrix.grad));
    for (const auto& p : placement.pieces()) {
      memory_->copy(grad + p.tensor_offset(), dim0_recv_.data() + cursor[p.rank()], static_cast<size_t>(p.length()));
      cursor[p.rank()] += static_cast<size_t>(p.length());
    }
    // The update lands in matrix.master: start from zero so muon_step leaves exactly -lr*s*O there.
    memory_->zero(om.matrix.master, static_cast<size_t>(placement.numel()));
  }
}

void ShardState::dim0_pack_updates() {
  // The reverse exchange reuses the receive buffer as its send buffer (same counts, reversed roles).
  const int n = plan_.request().world_size();
  std::vector<size_t>& cursor = dim0_cursor_;
  cursor[0] = 0;
  for (int p = 1; p < n; ++p) cursor[p] = cursor[p - 1] + dim0_recv_counts_[p - 1];
  for (OwnedMatrix& om : owned_) {
    const auto& placement = plan_.tensors(om.tensor);
    for (const auto& p : placement.pieces()) {
      memory_->copy(dim0_recv_.data() + cursor[p.rank()], om.matrix.master + p.tensor_offset(),
                    static_cast<size_t>(p.length()));
      cursor[p.rank()] += static_cast<size_t>(p.length());
    }
  }
}

void ShardState::dim0_apply_updates(float lr, float weight_decay) {
  const int n = plan_.request().world_size();
  std::vector<size_t>& cursor = dim0_cursor_;
  cursor[0] = 0;
  for (int p = 1; p < n; ++p) cursor[p] = cursor[p - 1] + dim0_send_counts_[p - 1];
  const float decay = 1.0f - lr * weight_decay;
  for (const Dim0Shard& s : dim0_my_shards_) {
    float* w = master_[s.bucket].data() + s.segment_offset;
    const float* delta = dim0_send_.data() + cursor[s.owner];
    memory_->decay_add(w, delta, decay, static_cast<size_t>(s.length));
    cursor[s.owner] += static_cast<size_t>(s.length);
  }
}

optim::StepResult ShardState::elementwise_step(const optim::OptimizerParams& params, float lr, int64_t step,
                                               const optim::KernelOptions& exec) {
  if (ew_dtype_ == proto::STATE_F32)
    return optim::elementwise_step(params, elementwise_slices_, lr, step, optim::FiniteCheck::kNone, exec);
  return optim::elementwise_step_compact(params, elementwise_slices_, elementwise_compact_, lr, step,
                                         optim::FiniteCheck::kNone, exec);
}

optim::StepResult ShardState::muon_step(const optim::OptimizerParams& params, OwnedMatrix& om, float lr,
                                        const optim::KernelOptions& exec) {
  if (mx_dtype_ == proto::STATE_F32) return optim::muon_step(params, om.matrix, lr, workspace_);
  return optim::muon_step_compact(params, om.matrix, om.momentum, lr, workspace_, optim::FiniteCheck::kNone, exec);
}

MemoryReport ShardState::memory() const {
  MemoryReport r;
  auto bytes = [](const std::vector<SpaceArray>& v) {
    int64_t b = 0;
    for (const auto& x : v) b += static_cast<int64_t>(x.size() * sizeof(float));
    return b;
  };
  r.param_bytes = bytes(params_) + bytes(user_params_);
  r.grad_buffer_bytes = bytes(grads_) + bytes(user_grads_);
  for (const GradSlot& s : slots_)
    r.grad_buffer_bytes +=
        static_cast<int64_t>((s.reduce_input.size() + s.tensor_major.size() + s.reduced.size()) * sizeof(float));
  r.grad_slots = num_grad_slots();
  r.grad_shard_bytes = bytes(grad_shards_);
  r.master_bytes = bytes(master_);
  r.state_bytes = static_cast<int64_t>((elementwise_state_.size() + muon_state_.size() + compact_absmax_.size()) *
                                       sizeof(float) + compact_value_bytes_);
  int64_t row_state = 0;
  for (const auto& om : owned_) row_state += om.matrix.row_second_moment ? om.matrix.rows : 0;
  r.moment_bytes = r.state_bytes - row_state * static_cast<int64_t>(sizeof(float));
  r.exchange_bytes = static_cast<int64_t>((dim0_assembled_.size() + dim0_send_.size() + dim0_recv_.size()) *
                                          sizeof(float));
  r.workspace_bytes = static_cast<int64_t>(workspace_.bytes() + momentum_scratch_.size() * sizeof(float));
  r.formula_optimizer_bytes = plan_.stats().ranks(rank_).optimizer_state_bytes();
  return r;
}

}  // namespace shardopt::runtime
