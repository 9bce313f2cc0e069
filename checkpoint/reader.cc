#include "proto/dtype_convert.h"
#include "checkpoint/reader.h"

#include <algorithm>
#include <cstring>

#include "base/dtype.h"
#include "base/error.h"
#include "checkpoint/crc32c.h"

namespace shardopt::ckpt {
namespace fs = std::filesystem;

CheckpointReader::CheckpointReader(fs::path dir) : dir_(std::move(dir)) {
  manifest_ = read_manifest(dir_);
  index_ = index_manifest(manifest_, (dir_ / kManifestFileName).string());
  files_.resize(manifest_.files_size());
  for (const auto& f : manifest_.files()) {
    const fs::path path = dir_ / f.name();
    std::error_code ec;
    const auto size = fs::file_size(path, ec);
    if (ec)
      throw CheckpointError("checkpoint '" + dir_.string() + "': shard file '" + path.string() + "' of rank " +
                            std::to_string(f.rank()) + " is missing or unreadable: " + ec.message());
    if (static_cast<int64_t>(size) < f.size_bytes())
      throw CheckpointError("checkpoint '" + dir_.string() + "': shard file '" + path.string() + "' is truncated: " +
                            "expected " + std::to_string(f.size_bytes()) + " bytes, found " + std::to_string(size));
    if (static_cast<int64_t>(size) != f.size_bytes())
      throw CheckpointError("checkpoint '" + dir_.string() + "': shard file '" + path.string() + "' has " +
                            std::to_string(size) + " bytes, expected " + std::to_string(f.size_bytes()));
  }
}

const StateIndex& CheckpointReader::find_state(std::string_view tensor, std::string_view state) const {
  auto it = index_.states.find(std::make_pair(std::string(tensor), std::string(state)));
  if (it == index_.states.end())
    throw CheckpointError("checkpoint '" + dir_.string() + "' has no state '" + std::string(state) +
                          "' for tensor '" + std::string(tensor) + "'");
  return it->second;
}

bool CheckpointReader::has_state(std::string_view tensor, std::string_view state) const {
  return index_.states.count(std::make_pair(std::string(tensor), std::string(state))) != 0;
}

const proto::CheckpointState& CheckpointReader::state_info(std::string_view tensor, std::string_view state) const {
  const StateIndex& si = find_state(tensor, state);
  return manifest_.tensors(si.tensor).states(si.state);
}

int64_t CheckpointReader::state_numel(std::string_view tensor, std::string_view state) const {
  return find_state(tensor, state).numel;
}

std::vector<ReadSegment> CheckpointReader::plan_reads(std::string_view tensor, std::string_view state,
                                                      int64_t global_offset, int64_t length) const {
  const StateIndex& si = find_state(tensor, state);
  const std::string what = "checkpoint '" + dir_.string() + "' tensor '" + std::string(tensor) + "' state '" +
                           std::string(state) + "'";
  if (global_offset < 0 || length < 0 || global_offset > si.numel || length > si.numel - global_offset)
    throw ConfigError(what + ": requested elements [" + std::to_string(global_offset) + ", +" +
                      std::to_string(length) + ") outside its " + std::to_string(si.numel) + " elements");
  std::vector<ReadSegment> segments;
  const int64_t end = global_offset + length;
  int64_t at = global_offset;
  // Pieces are sorted and disjoint: walk them from the first that may overlap.
  auto it = std::upper_bound(si.pieces.begin(), si.pieces.end(), global_offset, [&](int64_t off, int p) {
    return off < manifest_.pieces(p).global_offset();
  });
  if (it != si.pieces.begin()) --it;
  for (; it != si.pieces.end() && at < end; ++it) {
    const auto& piece = manifest_.pieces(*it);
    const int64_t pbegin = piece.global_offset(), pend = pbegin + piece.length();
    if (pend <= at) continue;
    if (pbegin > at) break;  // gap
    const int64_t take = std::min(pend, end) - at;
    segments.push_back(ReadSegment{*it, at - pbegin, take, at - global_offset});
    at += take;
  }
  if (at < end) {
    int64_t gap_end = end;
    if (it != si.pieces.end()) gap_end = std::min(end, manifest_.pieces(*it).global_offset());
    throw CheckpointError(what + ": elements [" + std::to_string(at) + ", " + std::to_string(gap_end) +
                          ") are in no shard file (incomplete coverage; the checkpoint has " +
                          std::to_string(si.pieces.size()) + " pieces of this state)");
  }
  return segments;
}

const File& CheckpointReader::file(int index) {
  File& f = files_[index];
  if (!f.is_open()) {
    const auto& info = manifest_.files(index);
    File opened = File::open_read(dir_ / info.name());
    char header[kShardHeaderBytes];
    opened.pread_all(header, sizeof header, 0);
    if (std::string_view(header, kShardFileMagic.size()) != kShardFileMagic)
      throw CheckpointError("checkpoint shard file '" + opened.path().string() + "': bad magic: expected \"" +
                            std::string(kShardFileMagic) + "\"");
    uint32_t version;
    std::memcpy(&version, header + 8, 4);
    if (version != kFormatVersion)
      throw CheckpointError("checkpoint shard file '" + opened.path().string() + "': format version " +
                            std::to_string(version) + ", expected " + std::to_string(kFormatVersion));
    f = std::move(opened);
  }
  return f;
}

void CheckpointReader::read_piece(int p, void* dst) {
  const auto& piece = manifest_.pieces(p);
  const File& f = file(index_.piece_file[p]);
  const size_t bytes = static_cast<size_t>(piece.length()) * dtype_size(piece.dtype());
  f.pread_all(dst, bytes, static_cast<uint64_t>(piece.file_offset()));
  bytes_read_ += bytes;
  const uint32_t crc = crc32c(dst, bytes);
  if (crc != piece.crc32c()) throw_crc_mismatch(p, f, crc);
}

uint64_t CheckpointReader::verify_piece_streaming(int p, std::vector<unsigned char>& buffer) {
  constexpr size_t kChunkBytes = size_t{16} << 20;  // bounded memory whatever the piece size
  const auto& piece = manifest_.pieces(p);
  const File& f = file(index_.piece_file[p]);
  const uint64_t bytes = static_cast<uint64_t>(piece.length()) * dtype_size(piece.dtype());
  buffer.resize(static_cast<size_t>(std::min<uint64_t>(bytes, kChunkBytes)));
  uint32_t crc = 0;
  for (uint64_t done = 0; done < bytes;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(bytes - done, kChunkBytes));
    f.pread_all(buffer.data(), n, static_cast<uint64_t>(piece.file_offset()) + done);
    crc = crc32c_extend(crc, buffer.data(), n);
    done += n;
  }
  bytes_read_ += bytes;
  if (crc != piece.crc32c()) throw_crc_mismatch(p, f, crc);
  return bytes;
}

void CheckpointReader::throw_crc_mismatch(int p, const File& f, uint32_t crc) const {
  const auto& piece = manifest_.pieces(p);
  throw CheckpointError("checkpoint shard file '" + f.path().string() + "': checksum mismatch in piece of tensor '" +
                        piece.tensor() + "' state '" + piece.state() + "' (elements [" +
                        std::to_string(piece.global_offset()) + ", +" + std::to_string(piece.length()) +
                        "), bytes at offset " + std::to_string(piece.file_offset()) + "): expected CRC32C " +
                        std::to_string(piece.crc32c()) + ", computed " + std::to_string(crc) + " (corrupt data)");
}

void CheckpointReader::read(std::string_view tensor, std::string_view state, int64_t global_offset, int64_t length,
                            void* dst) {
  const auto segments = plan_reads(tensor, state, global_offset, length);
  auto* out = static_cast<unsigned char*>(dst);
  for (const ReadSegment& s : segments) {
    const auto& piece = manifest_.pieces(s.piece);
    const size_t esize = dtype_size(piece.dtype());
    unsigned char* to = out + static_cast<size_t>(s.dst_element) * esize;
    if (s.piece_element == 0 && s.length == piece.length()) {
      read_piece(s.piece, to);
      continue;
    }
    if (scratch_piece_ != s.piece) {
      scratch_piece_ = -1;
      scratch_.resize(static_cast<size_t>(piece.length()) * esize);
      read_piece(s.piece, scratch_.data());
      scratch_piece_ = s.piece;
    }
    std::memcpy(to, scratch_.data() + static_cast<size_t>(s.piece_element) * esize,
                static_cast<size_t>(s.length) * esize);
  }
}

uint64_t CheckpointReader::validate_all() {
  uint64_t verified = 0;
  for (int f = 0; f < manifest_.files_size(); ++f) file(f);
  std::vector<unsigned char> buffer;
  check_full_coverage(manifest_, index_, (dir_ / kManifestFileName).string());
  for (const auto& [key, si] : index_.states)
    for (int p : si.pieces) verified += verify_piece_streaming(p, buffer);
  return verified;
}

}  // namespace shardopt::ckpt
