#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include "proto/dtype_convert.h"
#include "base/dtype.h"
#include "base/error.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/format.h"
#include "checkpoint/io_util.h"

namespace shardopt::ckpt {
namespace {

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}
void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}
uint64_t get_le(std::string_view bytes, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<unsigned char>(bytes[at + i])) << (8 * i);
  return v;
}

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw CheckpointError("checkpoint manifest '" + where + "': " + what);
}

bool valid_dtype(proto::DType d) {
  return d == proto::F32 || d == proto::BF16 || d == proto::F16 || d == proto::I32 || d == proto::I64 ||
         d == proto::U8;
}

// A shard file name must stay inside the checkpoint directory.
bool valid_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

std::string shard_file_name(int rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "rank-%05d.bin", rank);
  return buf;
}

int64_t shape_numel(const google::protobuf::RepeatedField<int64_t>& shape, const std::string& where) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw CheckpointError(where + ": negative dimension in shape " + shape_string(shape));
    if (d != 0 && n > (int64_t{1} << 56) / d)
      throw CheckpointError(where + ": shape " + shape_string(shape) + " has too many elements");
    n *= d;
  }
  return n;
}

std::string shape_string(const google::protobuf::RepeatedField<int64_t>& shape) {
  std::string s = "[";
  for (int i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string encode_manifest(const proto::CheckpointManifest& manifest) {
  std::string payload;
  if (!manifest.SerializeToString(&payload)) throw CheckpointError("checkpoint: cannot serialize manifest");
  std::string out(kManifestFileMagic);
  put_u32(out, manifest.format_version());
  put_u32(out, crc32c(payload.data(), payload.size()));
  put_u64(out, payload.size());
  out += payload;
  return out;
}

proto::CheckpointManifest decode_manifest(std::string_view bytes, const std::string& where) {
  if (bytes.size() < kManifestHeaderBytes)
    fail(where, "truncated: expected at least " + std::to_string(kManifestHeaderBytes) + " header bytes, found " +
                    std::to_string(bytes.size()));
  if (bytes.substr(0, kManifestFileMagic.size()) != kManifestFileMagic)
    fail(where, "bad magic: expected \"" + std::string(kManifestFileMagic) + "\" (not a shardopt checkpoint manifest)");
  const uint32_t version = static_cast<uint32_t>(get_le(bytes, 8, 4));
  if (version != kFormatVersion)
    fail(where, "unsupported format version " + std::to_string(version) + ": this build reads version " +
                    std::to_string(kFormatVersion));
  const uint32_t expected_crc = static_cast<uint32_t>(get_le(bytes, 12, 4));
  const uint64_t payload_size = get_le(bytes, 16, 8);
  if (payload_size != bytes.size() - kManifestHeaderBytes)
    fail(where, "truncated or padded: header says " + std::to_string(payload_size) + " payload bytes, found " +
                    std::to_string(bytes.size() - kManifestHeaderBytes));
  std::string_view payload = bytes.substr(kManifestHeaderBytes);
  const uint32_t crc = crc32c(payload.data(), payload.size());
  if (crc != expected_crc)
    fail(where, "checksum mismatch: expected CRC32C " + std::to_string(expected_crc) + ", computed " +
                    std::to_string(crc) + " (corrupt file)");
  proto::CheckpointManifest manifest;
  if (!manifest.ParseFromArray(payload.data(), static_cast<int>(payload.size())))
    fail(where, "payload is not a valid CheckpointManifest protobuf");
  if (manifest.magic() != kManifestMagic)
    fail(where, "bad magic field: expected \"" + std::string(kManifestMagic) + "\", found \"" + manifest.magic() + "\"");
  if (manifest.format_version() != version)
    fail(where, "format version " + std::to_string(manifest.format_version()) + " in payload disagrees with " +
                    std::to_string(version) + " in header");
  index_manifest(manifest, where);
  return manifest;
}

proto::CheckpointManifest read_manifest(const std::filesystem::path& checkpoint_dir) {
  const std::filesystem::path path = checkpoint_dir / kManifestFileName;
  if (!std::filesystem::exists(path))
    throw CheckpointError("checkpoint '" + checkpoint_dir.string() + "': manifest file '" + path.string() +
                          "' is missing (incomplete or not a checkpoint directory)");
  return decode_manifest(read_small_file(path), path.string());
}

ManifestIndex index_manifest(const proto::CheckpointManifest& m, const std::string& where) {
  ManifestIndex index;
  for (int f = 0; f < m.files_size(); ++f) {
    const auto& file = m.files(f);
    if (!valid_file_name(file.name())) fail(where, "invalid shard file name '" + file.name() + "'");
    if (file.size_bytes() < 0) fail(where, "shard file '" + file.name() + "' has negative size");
    if (!index.file_index.emplace(file.name(), f).second)
      fail(where, "shard file '" + file.name() + "' listed twice");
  }
  for (int t = 0; t < m.tensors_size(); ++t) {
    const auto& tensor = m.tensors(t);
    const std::string& name = tensor.spec().name();
    if (name.empty()) fail(where, "tensor #" + std::to_string(t) + " has an empty name");
    shape_numel(tensor.spec().shape(), where + ": tensor '" + name + "'");
    for (int s = 0; s < tensor.states_size(); ++s) {
      const auto& state = tensor.states(s);
      const std::string what = "tensor '" + name + "' state '" + state.name() + "'";
      if (state.name().empty()) fail(where, "tensor '" + name + "' has a state with an empty name");
      if (!valid_dtype(state.dtype()))
        fail(where, what + " has invalid dtype " + std::to_string(static_cast<int>(state.dtype())));
      StateIndex si;
      si.tensor = t;
      si.state = s;
      si.numel = shape_numel(state.shape(), where + ": " + what);
      si.element_bytes = dtype_size(state.dtype());
      if (!index.states.emplace(std::make_pair(name, state.name()), std::move(si)).second)
        fail(where, what + " is declared twice");
    }
  }
  index.piece_file.resize(m.pieces_size());
  for (int p = 0; p < m.pieces_size(); ++p) {
    const auto& piece = m.pieces(p);
    const std::string what = "piece #" + std::to_string(p) + " (tensor '" + piece.tensor() + "' state '" +
                             piece.state() + "' in file '" + piece.file() + "')";
    auto it = index.states.find(std::make_pair(piece.tensor(), piece.state()));
    if (it == index.states.end()) fail(where, what + ": no such tensor/state declared");
    StateIndex& si = it->second;
    if (piece.dtype() != m.tensors(si.tensor).states(si.state).dtype())
      fail(where, what + ": dtype " + std::to_string(static_cast<int>(piece.dtype())) +
                      " differs from the state's declared dtype");
    if (piece.global_offset() < 0 || piece.length() < 0 || piece.global_offset() > si.numel ||
        piece.length() > si.numel - piece.global_offset())
      fail(where, what + ": element range [" + std::to_string(piece.global_offset()) + ", +" +
                      std::to_string(piece.length()) + ") outside the state's " + std::to_string(si.numel) +
                      " elements");
    auto fit = index.file_index.find(piece.file());
    if (fit == index.file_index.end()) fail(where, what + ": file is not listed in the manifest");
    const int64_t file_size = m.files(fit->second).size_bytes();
    const int64_t bytes = piece.length() * static_cast<int64_t>(si.element_bytes);
    if (piece.file_offset() < 0 || piece.file_offset() > file_size || bytes > file_size - piece.file_offset())
      fail(where, what + ": byte range [" + std::to_string(piece.file_offset()) + ", +" + std::to_string(bytes) +
                      ") outside the file's " + std::to_string(file_size) + " bytes");
    index.piece_file[p] = fit->second;
    si.pieces.push_back(p);
  }
  for (auto& [key, si] : index.states) {
    std::sort(si.pieces.begin(), si.pieces.end(), [&](int a, int b) {
      return m.pieces(a).global_offset() < m.pieces(b).global_offset();
    });
    for (size_t i = 1; i < si.pieces.size(); ++i) {
      const auto& prev = m.pieces(si.pieces[i - 1]);
      const auto& cur = m.pieces(si.pieces[i]);
      if (prev.global_offset() + prev.length() > cur.global_offset() && cur.length() > 0 && prev.length() > 0)
        fail(where, "tensor '" + key.first + "' state '" + key.second + "': pieces in '" + prev.file() + "' and '" +
                        cur.file() + "' overlap at element " + std::to_string(cur.global_offset()));
    }
  }
  return index;
}

void check_full_coverage(const proto::CheckpointManifest& m, const ManifestIndex& index, const std::string& where) {
  for (const auto& [key, si] : index.states) {
    int64_t covered = 0;  // elements [0, covered) are covered; pieces are sorted and disjoint
    for (int p : si.pieces) {
      const auto& piece = m.pieces(p);
      if (piece.length() == 0) continue;
      if (piece.global_offset() != covered) break;
      covered += piece.length();
    }
    if (covered == si.numel) continue;
    int64_t gap_end = si.numel;
    for (int p : si.pieces)
      if (m.pieces(p).length() > 0 && m.pieces(p).global_offset() > covered) {
        gap_end = m.pieces(p).global_offset();
        break;
      }
    fail(where, "tensor '" + key.first + "' state '" + key.second + "': elements [" + std::to_string(covered) +
                    ", " + std::to_string(gap_end) + ") of " + std::to_string(si.numel) +
                    " are in no piece (incomplete coverage)");
  }
}

}  // namespace shardopt::ckpt
