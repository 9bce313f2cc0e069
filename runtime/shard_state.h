// ShardState: one rank's buffers under a ShardPlan, allocated once, and the optimizer views over
// them (element-wise slices, owned Muon matrices) built once. No communication here.
// The fp32 buffers are SpaceArrays of one StepBackend's memory space (host or device); every copy or
// fill of them goes through that backend, so the same code lays out host and device state.
//
// Per bucket b (plan.buckets(b)), with my segment [seg.offset, seg.offset + seg.count):
//   bucket_grads(b)   full bucket buffer the trainer's gradients land in (reduction input)
//   grad_shard(b)     my reduced segment (the reduce-scatter output; persistent in every mode)
//   master_shard(b)   fp32 master values of my segment (the optimizer updates these)
//   bucket_params(b)  full parameter bucket (stages 1-2: persistent; stage 3: pooled while gathered)
// Owned layout: every tensor is contiguous inside its bucket, so param(t)/grad(t) point straight into
// the bucket buffers. Dim0 layout: buckets are rank-major, so param(t)/grad(t) are separate contiguous
// buffers copied into/out of the buckets (copy-in before the reduction, copy-out after the gather).
//
// Gradient buffers come in two kinds (GradBuffers):
//   full:   one persistent buffer per bucket (plus, dim0, one per tensor): the whole model's size.
//   pooled: a few GradSlots, each big enough for the largest bucket. open_grad_slot(b) binds a free
//           slot to bucket b (zero-filled), grad(t)/bucket_grads(b) point into it until
//           close_grad_slot(b) hands it to the reduction in flight; free_grad_slot() returns it.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "optim/compact_step.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/muon.h"
#include "proto/plan.pb.h"
#include "runtime/step_backend.h"

namespace shardopt::runtime {

struct MemoryReport {
  int64_t param_bytes = 0;        // resident parameter buffers
  // Trainer-facing gradient buffers: the whole model (full buffers: stage 1, local accumulation;
  // dim0 adds per-tensor copies) or the pool of bucket slots (ZeRO-2, see GradBuffers).
  int64_t grad_buffer_bytes = 0;
  int64_t grad_shard_bytes = 0;   // reduced gradient shard (persistent fp32, every mode)
  int grad_slots = 0;             // pooled gradient slots (0 with full buffers)
  int64_t master_bytes = 0;       // fp32 master shard
  int64_t state_bytes = 0;        // optimizer moments in their storage dtype (q8: codes + absmax), NorMuon rows
  int64_t moment_bytes = 0;       // of state_bytes: the per-element moments only (no NorMuon rows)
  int64_t exchange_bytes = 0;     // dim0: owner-side assembly buffers for whole matrices
  int64_t workspace_bytes = 0;    // Newton-Schulz workspace
  // The plan's ZeRO arithmetic for this rank: K bytes per owned parameter (K = 12 AdamW, 8 Muon...).
  double formula_optimizer_bytes = 0;
  int64_t optimizer_bytes() const { return master_bytes + state_bytes; }
  int64_t grad_bytes() const { return grad_buffer_bytes + grad_shard_bytes; }
};

struct GradBuffers {
  bool pooled = false;   // false: full-size buffers
  int slots = 2;         // pooled: initial slot count (add_grad_slot() grows it)
  bool reduce_scratch = false;  // pooled: each slot gets a segment-sized reduce-scatter output
};

// A piece of a tensor that this rank holds in its segment.
struct LocalPiece {
  int tensor = 0;
  int bucket = 0;
  int64_t segment_offset = 0;  // elements from the start of my segment of the bucket
  int64_t tensor_offset = 0;
  int64_t length = 0;
};

// A Muon matrix this rank owns (owned layout: its master/grad live in my segment; dim0: assembled).
struct OwnedMatrix {
  int tensor = 0;
  optim::MuonMatrix matrix;
  std::vector<int64_t> block_rows;  // storage behind matrix.block_rows
  optim::CompactState momentum;     // dtype f32: matrix.momentum is the state itself
};

class ShardState {
 public:
  ShardState(proto::ShardPlan plan, int rank, const optim::OptimizerParams* matrix_optimizer,
             const optim::OptimizerParams& elementwise_optimizer, GradBuffers grad_buffers = {},
             StepBackend& memory = host_memory());

  const proto::ShardPlan& plan() const { return plan_; }
  int rank() const { return rank_; }
  int stage() const { return plan_.request().zero_stage(); }
  bool dim0() const { return plan_.request().layout() == proto::SHARD_LAYOUT_DIM0; }
  int num_buckets() const { return plan_.buckets_size(); }
  const proto::Segment& my_segment(int b) const { return plan_.buckets(b).segments(rank_); }
  const std::vector<size_t>& segment_counts(int b) const { return segment_counts_[b]; }
  // The backend whose memory space holds the buffers below.
  StepBackend& memory_space() const { return *memory_; }

  // Reduction input of bucket b: its full buffer, or (pooled) its open slot's, nullptr when none.
  float* bucket_grads(int b);
  float* grad_shard(int b) { return grad_shards_[b].data(); }
  float* master_shard(int b) { return master_[b].data(); }
  float* bucket_params(int b) { return params_[b].empty() ? nullptr : params_[b].data(); }
  bool params_resident(int b) const { return !params_[b].empty(); }
  // Stage 3 pool: gives bucket b a parameter buffer / returns it.
  void acquire_params(int b);
  void drop_params(int b);

  float* param(size_t t);
  // Where tensor t's gradient is written (pooled: its bucket's slot must be open).
  float* grad(size_t t);

  // Pooled gradient slots (GradBuffers::pooled).
  bool pooled_grads() const { return grad_buffers_.pooled; }
  int num_grad_slots() const { return static_cast<int>(slots_.size()); }
  bool grad_slot_open(int b) const { return open_slot_[b] >= 0; }
  // Binds a free slot (zero-filled) to bucket b; false when every slot is taken.
  bool open_grad_slot(int b);
  // Bucket b's slot leaves it (its reduction is in flight); returns the slot.
  int close_grad_slot(int b);
  void free_grad_slot(int slot);
  // One more slot (a trainer keeping more buckets open at once than the pool holds).
  void add_grad_slot();
  float* slot_reduce_input(int slot) { return slots_[slot].reduce_input.data(); }
  // Segment-sized reduce-scatter output of later micro-batches (GradBuffers::reduce_scratch).
  float* slot_reduced(int slot) { return slots_[slot].reduced.data(); }

  // Dim0: copies tensors' gradients of bucket b into its rank-major buffer / parameters out of it.
  void copy_in_grads(int b);
  void copy_out_params(int b);

  const std::vector<LocalPiece>& my_pieces() const { return my_pieces_; }
  std::vector<optim::ElementwiseSlice>& elementwise_slices() { return elementwise_slices_; }
  // One per element-wise slice when the element-wise state is compact (bf16 / q8); else empty. Its
  // pointers are in the backend's memory space (device memory for MemorySpace::kCuda).
  const std::vector<optim::CompactSlots>& elementwise_compact() const { return elementwise_compact_; }
  optim::StateDType elementwise_state_dtype() const { return ew_dtype_; }
  optim::StateDType matrix_state_dtype() const { return mx_dtype_; }
  // The optimizer steps over this rank's state, whatever its storage dtype.
  optim::StepResult elementwise_step(const optim::OptimizerParams& params, float lr, int64_t step,
                                     const optim::KernelOptions& exec = {});
  // exec: compact momentum's decode and encode run on exec.pool (optim::muon_step_compact).
  optim::StepResult muon_step(const optim::OptimizerParams& params, OwnedMatrix& om, float lr,
                              const optim::KernelOptions& exec = {});
  std::vector<OwnedMatrix>& owned_matrices() { return owned_; }
  optim::MuonWorkspace& muon_workspace() { return workspace_; }

  // Dim0 exchange layout (Muon shards to owners and back), elements per peer.
  const std::vector<size_t>& dim0_send_counts() const { return dim0_send_counts_; }
  const std::vector<size_t>& dim0_recv_counts() const { return dim0_recv_counts_; }
  float* dim0_send_buffer() { return dim0_send_.data(); }
  float* dim0_recv_buffer() { return dim0_recv_.data(); }
  // Packs my row shards of every Muon gradient into the send buffer (peer order = owner order).
  void dim0_pack_grads();
  // Owner: unpacks received shards into the assembled gradients of the matrices I own.
  void dim0_unpack_to_owned();
  // Owner: packs row shards of each owned matrix's update (in matrix.master) for their holders.
  void dim0_pack_updates();
  // Applies received updates to my master shards: W = W (1 - lr wd) + delta.
  void dim0_apply_updates(float lr, float weight_decay);

  MemoryReport memory() const;

 private:
  void build_views(const optim::OptimizerParams* matrix_optimizer, const optim::OptimizerParams& elementwise);
  void build_dim0_exchange();

  struct GradSlot {
    SpaceArray reduce_input;  // bucket layout, sized for the largest bucket
    SpaceArray tensor_major;  // dim0: the bucket's tensors back to back (where grad(t) points)
    SpaceArray reduced;       // reduce_scratch: my segment of a later micro-batch
  };
  GradSlot make_grad_slot() const;
  // Dim0: tensor t's gradient, where copy_in_grads reads it.
  const float* tensor_grad_source(int t, int b) const;

  proto::ShardPlan plan_;
  int rank_;
  GradBuffers grad_buffers_;
  StepBackend* memory_;
  std::vector<std::vector<size_t>> segment_counts_;
  std::vector<SpaceArray> grads_, grad_shards_, master_, params_;  // grads_: full buffers only
  std::vector<GradSlot> slots_;
  std::vector<int> free_slots_;         // stack of free slot indices
  std::vector<int> open_slot_;          // per bucket: its open slot, or -1
  std::vector<int64_t> tensor_major_offset_;  // dim0 pooled: tensor's offset in its bucket's tensor_major
  std::vector<int64_t> tensor_major_numel_;   // dim0 pooled: per bucket, sum of its tensors' numel
  int64_t largest_bucket_ = 0, largest_segment_ = 0;
  std::vector<SpaceArray> param_pool_;  // stage 3: free bucket-sized buffers
  std::vector<SpaceArray> user_params_, user_grads_;  // dim0 only
  std::vector<float*> param_view_, grad_view_;  // owned layout: offsets into bucket buffers
  std::vector<int64_t> tensor_bucket_offset_;

  std::vector<LocalPiece> my_pieces_;
  SpaceArray elementwise_state_;  // slots laid out slot-major
  optim::StateDType ew_dtype_ = proto::STATE_F32, mx_dtype_ = proto::STATE_F32;
  // Compact state lives in the backend's memory space like the fp32 state (the CUDA backend steps
  // compact element-wise state on the device; compact Muon momentum runs on the host only).
  SpaceArray compact_values_;           // bf16 values / q8 codes (bytes): element-wise slots, then momenta
  int64_t compact_value_bytes_ = 0;     // bytes of compact_values_ in use
  SpaceArray compact_absmax_;           // q8 absmax, same order
  std::vector<optim::CompactSlots> elementwise_compact_;
  std::vector<float> momentum_scratch_;        // compact Muon momentum, decoded for one matrix at a time
  SpaceArray muon_state_;         // momentum of owned matrices, then NorMuon row states
  SpaceArray dim0_assembled_;     // dim0 owner: gradients then updates of owned matrices
  std::vector<optim::ElementwiseSlice> elementwise_slices_;
  std::vector<OwnedMatrix> owned_;
  optim::MuonWorkspace workspace_;

  // dim0: per Muon tensor, my piece (if any) inside my segment.
  struct Dim0Shard {
    int tensor;
    int owner;
    int bucket;
    int64_t segment_offset;
    int64_t length;
  };
  std::vector<Dim0Shard> dim0_my_shards_;  // tensor order
  std::vector<size_t> dim0_send_counts_, dim0_recv_counts_;
  std::vector<size_t> dim0_cursor_;  // per-peer cursor of the pack/unpack loops (kept: step() allocates nothing)
  SpaceArray dim0_send_, dim0_recv_;
};

}  // namespace shardopt::runtime
