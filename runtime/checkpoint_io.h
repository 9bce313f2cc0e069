// Saving and loading an Engine's state (fp32 masters + optimizer states) through checkpoint/.
//
// Saved states, per tensor, in global (row-major flattened) coordinates:
//   "param"                    fp32 master, every piece of every rank (global_offset = tensor_offset)
//   "adam_m", "adam_v"         AdamW slots of element-wise tensors
//   "momentum"                 Lion/SGD slot of element-wise tensors; Muon momentum of matrices
//   "normuon_row_v"            NorMuon row second moment, shape [rows] (always F32)
// Moments are saved in the group's state dtype: F32, BF16, or for q8 (optim/quant8.h) U8 codes under
// the state's name plus "<state>.absmax" (F32, one per 256-element block of the tensor, shape
// [ceil(numel/256)]); every piece CRC-checked like the rest. A load into another state dtype decodes
// the stored one and encodes the engine's (one log line on rank 0 names the conversions); the same
// dtype is copied byte for byte, so a q8 run resumed at any world size continues bit-identically.
//   extra states (MasterLikeState)  per-element fp32 states laid out like the master shards, e.g. the
//                              outer sync's "outer_phi" and "outer_m": saved per tensor in global
//                              coordinates exactly like "param", so they reshard like it
// Nothing in a checkpoint depends on world size, stage, layout or buckets: a load reads exactly the
// ranges its own plan needs, whatever run wrote them.
//
// Engines in either memory space (runtime/step_backend.h) save and load the same files: a device
// engine's state is copied to host memory through its step backend (one host copy of this rank's state
// while a save writes it; a load stages what it reads on the host, as for a host engine, then uploads
// it), so a checkpoint written on GPUs resumes on CPUs and the other way round.
//
// Both functions are collective over engine.comm(). Every fault (an I/O error, a bad checkpoint, an
// incompatible model) reaches every rank: the rank that hit it rethrows its own exception, the others
// throw the same error type naming that rank and its message. No rank hangs on another's failure.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "checkpoint/async_saver.h"
#include "optim/quant8.h"
#include "runtime/engine.h"

namespace shardopt::runtime {

// Names of the states the engine keeps for tensor t ("param" first), as a checkpoint stores them.
std::vector<std::string> engine_states_of(Engine& engine, size_t t);

// One contiguous range of this rank's engine state, in global coordinates of (tensor, state): fp32
// at `data`, or (data == nullptr) compact bf16 / q8 storage in `compact`, a q8 range starting on a
// block boundary (optim/quant8.h).
struct StateRange {
  int tensor;
  std::string state;
  int64_t global_offset;
  int64_t length;
  float* data;
  optim::CompactState compact = {};
};

// A per-element fp32 state kept outside the engine with the master shards' layout, in the engine's
// memory space: `data` is flat over this rank's master segments in bucket order
// (ShardState::my_segment(b).count() each, padding included), like OuterSync::phi().
struct MasterLikeState {
  std::string name;
  float* data = nullptr;
};

// Everything this rank holds: master pieces (and `extra` states laid out like them), element-wise slots
// of its pieces, owned Muon states. Over all ranks every element of every (tensor, state) appears
// exactly once. Pointers are into the engine's memory space (device memory for a device engine).
std::vector<StateRange> engine_state_ranges(Engine& engine, std::span<const MasterLikeState> extra = {});

// Trainer state stored next to the engine's: the RNG seed, the data loader position, anything else.
struct TrainerState {
  uint64_t seed = 0;
  int64_t data_step = 0;
  std::map<std::string, std::string> extra;
};

struct SaveCheckpointOptions {
  int keep_last = 0;  // complete checkpoints kept under root, the new one included; 0 keeps all
};

struct SaveResult {
  std::filesystem::path dir;  // root/ckpt-<engine step>
  int64_t step = 0;
  uint64_t bytes_written_by_me = 0;  // this rank's shard file
};

// Collective. Writes root/ckpt-<optimizer_step>: every rank its own shard file, rank 0 the manifest
// (world size, plan hash, engine step, trainer state) and the atomic publish. Throws CheckpointError
// (I/O) or ConfigError on every rank if any rank fails; the previous checkpoint stays the latest.
// `extra`: states saved next to the engine's (every tensor gets each of them).
SaveResult save_checkpoint(Engine& engine, const std::filesystem::path& root, const TrainerState& trainer = {},
                           const SaveCheckpointOptions& options = {}, std::span<const MasterLikeState> extra = {});

// Collective, in two halves so that the file writes overlap training: start() snapshots this rank's
// state (the only time training waits) and writes the shard file on a background thread; finish()
// (collective, called later, e.g. before the next save) waits for the write, then gathers the records
// and publishes the checkpoint exactly as save_checkpoint does. The checkpoint holds the state at
// start(). Errors of either half reach every rank.
class AsyncCheckpointSaver {
 public:
  explicit AsyncCheckpointSaver(Engine& engine);
  ~AsyncCheckpointSaver();  // an unfinished save is abandoned (its .tmp directory stays unpublished)
  AsyncCheckpointSaver(const AsyncCheckpointSaver&) = delete;
  AsyncCheckpointSaver& operator=(const AsyncCheckpointSaver&) = delete;

  // Throws ConfigError if the previous save was not finished.
  void start(const std::filesystem::path& root, const TrainerState& trainer = {},
             const SaveCheckpointOptions& options = {});
  SaveResult finish();
  bool pending() const { return pending_; }

 private:
  Engine& engine_;
  ckpt::AsyncShardSaver writer_;
  bool pending_ = false;
  std::filesystem::path root_;
  int64_t step_ = 0;
  TrainerState trainer_;
  SaveCheckpointOptions options_;
};

// Collective. Loads checkpoint directory `dir` (written at any world size, stage or layout) into the
// engine: checks compatibility (ConfigError naming the tensor and both shapes, or the missing state),
// reads this rank's ranges into staging (CheckpointError on any corrupt or missing byte), and only
// when every rank has succeeded commits them into the master shards and optimizer states, sets the
// optimizer step and refreshes the full parameters. On failure no rank's engine state is changed.
// Returns the trainer state that was saved. `extra`: states to load as well (ConfigError naming the
// state when the checkpoint lacks it), committed with the rest.
TrainerState load_checkpoint(Engine& engine, const std::filesystem::path& dir,
                             std::span<const MasterLikeState> extra = {});

// Every fp32 array of this rank's engine state (master pieces, element-wise optimizer slots, owned Muon
// states), in the order a save writes them. The list depends only on the plan and this rank's place in
// it, so two ranks at the same place of two shard groups get matching lists (the outer sync's rejoin
// copies one onto the other). The spans are in the engine's memory space (device memory for a device
// engine: copy them through its step backend). Not collective. ConfigError when a state is stored
// compact (bf16/q8).
std::vector<std::span<float>> engine_state_arrays(Engine& engine);

// The trainer state of checkpoint `dir` from its manifest alone (not collective, reads no shard).
TrainerState read_trainer_state(const std::filesystem::path& dir);

}  // namespace shardopt::runtime
