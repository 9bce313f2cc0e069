// `shardopt ckpt inspect DIR`: prints a checkpoint's summary and verifies every checksum.
#pragma once

#include <cstdint>
#include <filesystem>
#include <ostream>

namespace shardopt::ckpt {

struct InspectOptions {
  bool verify = true;  // read every piece and check its CRC32C and coverage
};

struct InspectResult {
  std::filesystem::path dir;  // the checkpoint inspected (resolved when given a root)
  int64_t step = 0;
  int world_size = 0;
  int tensors = 0;
  int pieces = 0;
  uint64_t data_bytes = 0;      // sum of all pieces
  uint64_t verified_bytes = 0;  // 0 when !verify
};

// `dir` is a checkpoint directory, or a root holding ckpt-<step> directories (its latest is used).
// Prints the summary to `out`; throws CheckpointError (after printing "FAILED: ...") on any fault.
InspectResult inspect_checkpoint(const std::filesystem::path& dir, std::ostream& out,
                                 const InspectOptions& options = {});

}  // namespace shardopt::ckpt
