// Consolidated export: full (unsharded) tensors in one safetensors file.
//
// Layout (the safetensors format, readable by the `safetensors` Python package and PyTorch tools):
//   8 bytes   N, little-endian uint64: size of the JSON header
//   N bytes   JSON: {"__metadata__": {"format": "shardopt", "step": "...", "world_size": "...", ...},
//                    "<name>": {"dtype": "F32"|"BF16"|"F16"|"I32"|"I64"|"U8", "shape": [...],
//                               "data_offsets": [begin, end]}, ...}   padded with spaces to a multiple of 8
//   data      every array's row-major bytes, back to back, offsets relative to the end of the header
// Names: state "param" is exported as the tensor's own name, any other state as "<tensor>:<state>".
// Memory: arrays are streamed in chunks (ExportOptions::chunk_bytes) through the reader, so the whole
// model is never in memory; the reader holds at most one piece in its scratch buffer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/reader.h"

namespace shardopt::ckpt {

struct ExportOptions {
  std::vector<std::string> states = {std::string(kParamState)};  // empty = every state of every tensor
  size_t chunk_bytes = size_t{64} << 20;
};

struct ExportSummary {
  int arrays = 0;
  uint64_t data_bytes = 0;
  uint64_t header_bytes = 0;
};

// Name under which (tensor, state) is exported.
std::string export_name(const std::string& tensor, const std::string& state);

// Writes `out` atomically (temporary file, fsync, rename). Throws CheckpointError on read/verify or
// write failures; `out` is untouched then.
ExportSummary export_consolidated(CheckpointReader& reader, const std::filesystem::path& out,
                                  const ExportOptions& options = {});

}  // namespace shardopt::ckpt
