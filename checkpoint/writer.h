// Saving a checkpoint: every rank writes its own shard file; one rank finalizes.
//
// Protocol the runtime runs (this layer does no communication):
//   1. one rank:  prepare_save_dir(temp_checkpoint_dir(root, step))   (removes leftovers of a crashed save)
//      barrier
//   2. every rank: record = save_shard(temp_dir, rank, pieces)          (writes + fsyncs rank-XXXXX.bin)
//      gather serialize_shard_record(record) to the finalizing rank
//   3. that rank: finalize_checkpoint(root, info, records, {keep_last})
//      (validates coverage, writes + fsyncs manifest.pb, fsyncs the directory, renames
//       ckpt-<step>.tmp -> ckpt-<step> atomically, fsyncs root, then deletes checkpoints beyond keep_last)
//      barrier (if ranks must know the checkpoint is complete)
// Until the rename in step 3 the previous checkpoint is untouched and latest_checkpoint() returns it;
// a crash at any point leaves either the old or the new checkpoint as the latest, both complete.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/dtype.h"
#include "proto/checkpoint.pb.h"

namespace shardopt::ckpt {

// A contiguous element range of one state of one tensor, held by this rank.
struct SavePiece {
  std::string tensor;
  std::string state;          // "param", "adam_m", "adam_v", "momentum", "normuon_row_v", ...
  int64_t global_offset = 0;  // elements into the state's row-major flattened global array
  int64_t length = 0;         // elements
  DType dtype = DType::kF32;
  const void* data = nullptr;  // length * dtype_size(dtype) bytes, valid for the duration of save_shard
};

std::filesystem::path checkpoint_dir(const std::filesystem::path& root, int64_t step);       // root/ckpt-<step>
std::filesystem::path temp_checkpoint_dir(const std::filesystem::path& root, int64_t step);  // root/ckpt-<step>.tmp

// Empties (or creates) a temporary checkpoint directory. Run on one rank before the ranks write.
void prepare_save_dir(const std::filesystem::path& dir_tmp);

// Writes this rank's pieces to dir_tmp/rank-XXXXX.bin (creating dir_tmp if needed), fsyncs the file,
// and returns what it wrote. Throws ConfigError for bad pieces, CheckpointError for I/O failures.
proto::CheckpointShardRecord save_shard(const std::filesystem::path& dir_tmp, int rank,
                                        std::span<const SavePiece> pieces);

// Copies bytes of a piece to host memory: memcpy for pieces in host memory, a device-to-host copy
// for pieces whose data points into device memory.
using ReadBytes = std::function<void(void* host_dst, const void* src, size_t bytes)>;

// Copies every piece's bytes into `buffer` (grown as needed, never shrunk; each piece 64-byte
// aligned) with `read` (memcpy when empty) and returns the pieces pointing into it. How a save takes
// pieces that save_shard cannot read directly (device memory) or that must not change while a
// background write runs.
std::vector<SavePiece> snapshot_pieces(std::span<const SavePiece> pieces, std::vector<unsigned char>& buffer,
                                       const ReadBytes& read = {});

// Bytes of a record, for sending through a gather; parse throws CheckpointError on bad bytes.
std::string serialize_shard_record(const proto::CheckpointShardRecord& record);
proto::CheckpointShardRecord parse_shard_record(std::string_view bytes);

// Everything the manifest holds besides the pieces.
struct CheckpointInfo {
  int64_t step = 0;
  int world_size = 1;
  uint64_t plan_hash = 0;
  proto::CheckpointRngState rng;
  std::vector<proto::CheckpointTensor> tensors;  // every tensor with every state saved for it
  std::map<std::string, std::string> metadata;
};

// Declares a state of a tensor entry; an empty shape means "same shape as the tensor".
void add_state(proto::CheckpointTensor& tensor, std::string_view state, DType dtype,
               std::vector<int64_t> shape = {});
proto::CheckpointTensor make_tensor_entry(const proto::TensorSpec& spec);

struct FinalizeOptions {
  int keep_last = 0;  // keep this many complete checkpoints (the new one included); 0 keeps all
};

// Writes the manifest from all ranks' records and publishes temp_checkpoint_dir(root, info.step) as
// checkpoint_dir(root, info.step). Throws ConfigError if the pieces do not cover every declared state
// exactly once, CheckpointError if a shard file is missing or has the wrong size. Returns the final path.
std::filesystem::path finalize_checkpoint(const std::filesystem::path& root, const CheckpointInfo& info,
                                          std::span<const proto::CheckpointShardRecord> records,
                                          const FinalizeOptions& options = {});

// Complete checkpoints under root (directories ckpt-<step> holding a manifest.pb), sorted by step.
// Temporary (.tmp) and half-deleted directories are ignored.
std::vector<std::pair<int64_t, std::filesystem::path>> list_checkpoints(const std::filesystem::path& root);
// The newest checkpoint whose manifest reads and validates; std::nullopt if none.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& root);

}  // namespace shardopt::ckpt
