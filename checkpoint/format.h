// On-disk format of a shardopt checkpoint (format version 1).
//
// A checkpoint is a directory `<root>/ckpt-<step>` holding:
//   manifest.pb       24-byte header + serialized proto::CheckpointManifest (proto/checkpoint.proto)
//                       bytes 0..7   "SHOCKPTM"          file magic
//                       bytes 8..11  format version      uint32 little-endian
//                       bytes 12..15 CRC32C of payload   uint32 little-endian
//                       bytes 16..23 payload size        uint64 little-endian
//   rank-XXXXX.bin    one per writer rank: a 64-byte header ("SHOCKSHD", version u32, rank u32, zero
//                     padding) followed by pieces, each at a 64-byte aligned offset. Each piece is the
//                     raw little-endian bytes of a contiguous element range of one state of one tensor.
// Every piece in the manifest has its file, byte offset and CRC32C. Pieces address elements of the
// row-major flattened global array, so nothing depends on buckets, padding, stage or world size.
// Pieces of one (tensor, state) never overlap; gaps are legal in the format (a read that needs a
// missing range fails naming it) but the writer refuses to finalize a checkpoint with gaps.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "proto/checkpoint.pb.h"

namespace shardopt::ckpt {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr std::string_view kManifestMagic = "shardopt-checkpoint";
inline constexpr std::string_view kManifestFileMagic = "SHOCKPTM";
inline constexpr std::string_view kShardFileMagic = "SHOCKSHD";
inline constexpr size_t kManifestHeaderBytes = 24;
inline constexpr size_t kShardHeaderBytes = 64;
inline constexpr size_t kPieceAlignment = 64;
inline constexpr std::string_view kManifestFileName = "manifest.pb";
// State name of the fp32 master copy of a parameter.
inline constexpr std::string_view kParamState = "param";

std::string shard_file_name(int rank);  // "rank-00003.bin"

// Element count of a shape; throws CheckpointError (naming `where`) on negative dims or overflow.
int64_t shape_numel(const google::protobuf::RepeatedField<int64_t>& shape, const std::string& where);
std::string shape_string(const google::protobuf::RepeatedField<int64_t>& shape);  // "[4, 8]"

// Manifest file bytes: header + payload.
std::string encode_manifest(const proto::CheckpointManifest& manifest);
// Parses and validates manifest file bytes; `where` (the file path) is named in every error.
proto::CheckpointManifest decode_manifest(std::string_view bytes, const std::string& where);
proto::CheckpointManifest read_manifest(const std::filesystem::path& checkpoint_dir);

// Lookup tables over a validated manifest: pieces of each (tensor, state) sorted by offset.
struct StateIndex {
  int tensor = -1;         // index into manifest.tensors()
  int state = -1;          // index into tensors(tensor).states()
  int64_t numel = 0;
  size_t element_bytes = 0;
  std::vector<int> pieces;  // indices into manifest.pieces(), sorted by global_offset, non-overlapping
};
struct ManifestIndex {
  std::map<std::pair<std::string, std::string>, StateIndex, std::less<>> states;
  std::unordered_map<std::string, int> file_index;  // file name -> index into manifest.files()
  std::vector<int> piece_file;                       // piece index -> file index
};
// Checks every invariant the reader relies on (names, dtypes, ranges, file bounds, no overlap) and
// builds the index; throws CheckpointError naming `where` and the offending tensor/state/file.
ManifestIndex index_manifest(const proto::CheckpointManifest& manifest, const std::string& where);
// The other half of "every element of every state is covered exactly once" (index_manifest already
// rejects overlaps): throws CheckpointError naming `where`, the tensor, the state and the first element
// range [a, b) that no piece covers. The writer refuses such a manifest; the reader's full validation too.
void check_full_coverage(const proto::CheckpointManifest& manifest, const ManifestIndex& index,
                         const std::string& where);

}  // namespace shardopt::ckpt
