// Loading a checkpoint at any world size, stage or layout.
//
// A rank asks for element ranges of (tensor, state) in global coordinates; the reader reads only the
// byte ranges of the pieces that overlap the request, from whichever shard files hold them.
// Every byte handed out has been checked against its piece's CRC32C: a request that covers a whole
// piece reads it straight into the destination and checks it there; a request that needs only part
// of a piece reads and checks the whole piece into a scratch buffer (kept for the next request,
// which often needs the rest of the same piece) and copies the part.
//
// All-or-nothing loading, as the runtime does it:
//   1. plan_reads() every request first: fails (CheckpointError naming tensor, state and the missing
//      element range) before any I/O if the checkpoint does not cover it;
//   2. read() everything into staging buffers (any CRC or I/O failure throws; staging is discarded);
//   3. only then copy staging into the live parameters/optimizer state.
// One reader per thread: read() uses a scratch buffer and is not thread-safe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/format.h"
#include "checkpoint/io_util.h"

namespace shardopt::ckpt {

// One contiguous copy: `length` elements from piece `piece` starting at element `piece_element`
// of the piece, to element `dst_element` of the request.
struct ReadSegment {
  int piece = -1;
  int64_t piece_element = 0;
  int64_t length = 0;
  int64_t dst_element = 0;
};

class CheckpointReader {
 public:
  // Reads and validates the manifest (magic, version, checksum, consistency) and checks that every
  // shard file exists with its recorded size. Throws CheckpointError naming the file and the fault.
  explicit CheckpointReader(std::filesystem::path dir);

  const proto::CheckpointManifest& manifest() const { return manifest_; }
  const std::filesystem::path& dir() const { return dir_; }
  int64_t step() const { return manifest_.step(); }

  bool has_state(std::string_view tensor, std::string_view state) const;
  // Throws CheckpointError naming the tensor/state if absent.
  const proto::CheckpointState& state_info(std::string_view tensor, std::string_view state) const;
  int64_t state_numel(std::string_view tensor, std::string_view state) const;

  // The copies that serve a request; throws CheckpointError if any element is not covered.
  std::vector<ReadSegment> plan_reads(std::string_view tensor, std::string_view state, int64_t global_offset,
                                      int64_t length) const;
  // Fills dst with `length` elements (in the state's dtype) starting at `global_offset`.
  void read(std::string_view tensor, std::string_view state, int64_t global_offset, int64_t length, void* dst);
  // Reads every piece and checks its CRC32C and every shard file header; checks every declared state
  // is fully covered. Throws CheckpointError on the first fault. Returns the bytes verified.
  uint64_t validate_all();

  // Bytes read from shard files so far (piece data, not headers): lets tests prove reads are partial.
  uint64_t bytes_read() const { return bytes_read_; }

 private:
  const StateIndex& find_state(std::string_view tensor, std::string_view state) const;
  const File& file(int index);
  // Reads piece `p` whole into dst and verifies its CRC.
  void read_piece(int p, void* dst);
  // Checks piece `p` in bounded chunks through `buffer`; returns its bytes.
  uint64_t verify_piece_streaming(int p, std::vector<unsigned char>& buffer);
  [[noreturn]] void throw_crc_mismatch(int p, const File& f, uint32_t crc) const;

  std::filesystem::path dir_;
  proto::CheckpointManifest manifest_;
  ManifestIndex index_;
  std::vector<File> files_;  // opened lazily, header checked on open
  std::vector<unsigned char> scratch_;
  int scratch_piece_ = -1;
  uint64_t bytes_read_ = 0;
};

}  // namespace shardopt::ckpt
