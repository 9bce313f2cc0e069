#include "proto/dtype_convert.h"
#include "checkpoint/writer.h"

#include <stdio.h>  // renameat2
#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>

#include "base/error.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/format.h"
#include "checkpoint/io_util.h"

namespace shardopt::ckpt {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kDirPrefix = "ckpt-";
constexpr std::string_view kTempSuffix = ".tmp";
constexpr std::string_view kDeletingSuffix = ".deleting";

// Parses "ckpt-<digits><suffix>" into the step; nullopt if the name has another form.
std::optional<int64_t> parse_dir_step(std::string_view name, std::string_view suffix) {
  if (name.size() <= kDirPrefix.size() + suffix.size() || name.substr(0, kDirPrefix.size()) != kDirPrefix ||
      name.substr(name.size() - suffix.size()) != suffix)
    return std::nullopt;
  std::string_view digits = name.substr(kDirPrefix.size(), name.size() - kDirPrefix.size() - suffix.size());
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  int64_t step = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || ptr != digits.data() + digits.size()) return std::nullopt;
  return step;
}

void write_zeros(File& f, size_t n) {
  static const char zeros[kPieceAlignment] = {};
  while (n > 0) {
    size_t k = std::min(n, sizeof zeros);
    f.write_all(zeros, k);
    n -= k;
  }
}

// Renames a directory out of the way (atomically) then deletes it, so a crash mid-delete never
// leaves a half-deleted directory under a name list_checkpoints() accepts.
void remove_dir_safely(const fs::path& dir) {
  fs::path trash = dir;
  trash += std::string(kDeletingSuffix);
  std::error_code ec;
  fs::remove_all(trash, ec);
  fs::rename(dir, trash, ec);
  if (ec) throw CheckpointError("checkpoint: cannot rename '" + dir.string() + "' for deletion: " + ec.message());
  fs::remove_all(trash, ec);
  if (ec) throw CheckpointError("checkpoint: cannot delete '" + trash.string() + "': " + ec.message());
}

// Publishes `from` as `to` atomically. If `to` exists (re-save of the same step), the two are
// exchanged in one step and the old one deleted afterwards.
void publish_dir(const fs::path& from, const fs::path& to) {
  if (::rename(from.c_str(), to.c_str()) == 0) return;
  int err = errno;
  if (err != ENOTEMPTY && err != EEXIST) throw_errno("rename to '" + to.string() + "' of", from, err);
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) != 0)
    throw_errno("atomic exchange with '" + to.string() + "' of", from, errno);
  fs::remove_all(from);  // now holds the replaced checkpoint
}

}  // namespace

fs::path checkpoint_dir(const fs::path& root, int64_t step) { return root / (std::string(kDirPrefix) + std::to_string(step)); }

fs::path temp_checkpoint_dir(const fs::path& root, int64_t step) {
  return root / (std::string(kDirPrefix) + std::to_string(step) + std::string(kTempSuffix));
}

void prepare_save_dir(const fs::path& dir_tmp) {
  std::error_code ec;
  fs::remove_all(dir_tmp, ec);
  if (ec) throw CheckpointError("checkpoint: cannot clear '" + dir_tmp.string() + "': " + ec.message());
  fs::create_directories(dir_tmp, ec);
  if (ec) throw CheckpointError("checkpoint: cannot create '" + dir_tmp.string() + "': " + ec.message());
}

std::vector<SavePiece> snapshot_pieces(std::span<const SavePiece> pieces, std::vector<unsigned char>& buffer,
                                       const ReadBytes& read) {
  constexpr size_t kAlign = 64;
  size_t total = 0;
  for (const auto& p : pieces) {
    if (p.length < 0) throw ConfigError("snapshot_pieces: negative length for tensor '" + p.tensor + "'");
    total += (static_cast<size_t>(p.length) * dtype_size(p.dtype) + kAlign - 1) & ~(kAlign - 1);
  }
  if (buffer.size() < total) buffer.resize(total);
  std::vector<SavePiece> out(pieces.begin(), pieces.end());
  size_t at = 0;
  for (auto& p : out) {
    const size_t bytes = static_cast<size_t>(p.length) * dtype_size(p.dtype);
    if (bytes > 0) {
      if (read) read(buffer.data() + at, p.data, bytes);
      else std::memcpy(buffer.data() + at, p.data, bytes);
    }
    p.data = buffer.data() + at;
    at += (bytes + kAlign - 1) & ~(kAlign - 1);
  }
  return out;
}

proto::CheckpointShardRecord save_shard(const fs::path& dir_tmp, int rank, std::span<const SavePiece> pieces) {
  if (rank < 0) throw ConfigError("save_shard: rank must be >= 0, got " + std::to_string(rank));
  for (const SavePiece& p : pieces) {
    if (p.tensor.empty() || p.state.empty())
      throw ConfigError("save_shard: piece with empty tensor or state name (tensor '" + p.tensor + "', state '" +
                        p.state + "')");
    if (p.global_offset < 0 || p.length < 0)
      throw ConfigError("save_shard: tensor '" + p.tensor + "' state '" + p.state + "': negative offset " +
                        std::to_string(p.global_offset) + " or length " + std::to_string(p.length));
    if (p.length > 0 && p.data == nullptr)
      throw ConfigError("save_shard: tensor '" + p.tensor + "' state '" + p.state + "': null data");
    (void)dtype_size(p.dtype);  // throws ConfigError for an unspecified dtype
  }
  std::error_code ec;
  fs::create_directories(dir_tmp, ec);
  if (ec) throw CheckpointError("checkpoint: cannot create '" + dir_tmp.string() + "': " + ec.message());

  proto::CheckpointShardRecord record;
  record.set_rank(rank);
  const std::string name = shard_file_name(rank);
  File f = File::create(dir_tmp / name);

  char header[kShardHeaderBytes] = {};
  std::memcpy(header, kShardFileMagic.data(), kShardFileMagic.size());
  const uint32_t version = kFormatVersion, urank = static_cast<uint32_t>(rank);
  std::memcpy(header + 8, &version, 4);  // little-endian hosts only (x86-64, aarch64)
  std::memcpy(header + 12, &urank, 4);
  f.write_all(header, sizeof header);
  uint64_t at = kShardHeaderBytes;

  for (const SavePiece& p : pieces) {
    const size_t bytes = static_cast<size_t>(p.length) * dtype_size(p.dtype);
    auto* rec = record.add_pieces();
    rec->set_tensor(p.tensor);
    rec->set_state(p.state);
    rec->set_global_offset(p.global_offset);
    rec->set_length(p.length);
    rec->set_dtype(to_proto(p.dtype));
    rec->set_file(name);
    rec->set_file_offset(static_cast<int64_t>(at));
    rec->set_crc32c(crc32c(p.data, bytes));
    f.write_all(p.data, bytes);
    at += bytes;
    const size_t pad = (kPieceAlignment - at % kPieceAlignment) % kPieceAlignment;
    write_zeros(f, pad);
    at += pad;
  }
  f.fsync();
  f.close();
  auto* file = record.mutable_file();
  file->set_name(name);
  file->set_rank(rank);
  file->set_size_bytes(static_cast<int64_t>(at));
  return record;
}

std::string serialize_shard_record(const proto::CheckpointShardRecord& record) {
  std::string out;
  if (!record.SerializeToString(&out)) throw CheckpointError("checkpoint: cannot serialize shard record");
  return out;
}

proto::CheckpointShardRecord parse_shard_record(std::string_view bytes) {
  proto::CheckpointShardRecord record;
  if (!record.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())))
    throw CheckpointError("checkpoint: shard record of " + std::to_string(bytes.size()) +
                          " bytes is not a valid CheckpointShardRecord");
  return record;
}

proto::CheckpointTensor make_tensor_entry(const proto::TensorSpec& spec) {
  proto::CheckpointTensor t;
  *t.mutable_spec() = spec;
  return t;
}

void add_state(proto::CheckpointTensor& tensor, std::string_view state, DType dtype, std::vector<int64_t> shape) {
  auto* s = tensor.add_states();
  s->set_name(std::string(state));
  s->set_dtype(to_proto(dtype));
  if (shape.empty())
    *s->mutable_shape() = tensor.spec().shape();
  else
    for (int64_t d : shape) s->add_shape(d);
}

fs::path finalize_checkpoint(const fs::path& root, const CheckpointInfo& info,
                             std::span<const proto::CheckpointShardRecord> records, const FinalizeOptions& options) {
  const fs::path dir_tmp = temp_checkpoint_dir(root, info.step);
  const fs::path final_dir = checkpoint_dir(root, info.step);
  if (info.step < 0) throw ConfigError("finalize_checkpoint: step must be >= 0, got " + std::to_string(info.step));

  proto::CheckpointManifest m;
  m.set_magic(std::string(kManifestMagic));
  m.set_format_version(kFormatVersion);
  m.set_world_size(info.world_size);
  m.set_plan_hash(info.plan_hash);
  m.set_step(info.step);
  *m.mutable_rng() = info.rng;
  for (const auto& t : info.tensors) *m.add_tensors() = t;
  for (const auto& [k, v] : info.metadata) (*m.mutable_metadata())[k] = v;
  for (const auto& rec : records) {
    const fs::path file = dir_tmp / rec.file().name();
    std::error_code ec;
    const auto size = fs::file_size(file, ec);
    if (ec)
      throw CheckpointError("finalize_checkpoint: shard file '" + file.string() + "' of rank " +
                            std::to_string(rec.rank()) + " is missing: " + ec.message());
    if (static_cast<int64_t>(size) != rec.file().size_bytes())
      throw CheckpointError("finalize_checkpoint: shard file '" + file.string() + "' has " + std::to_string(size) +
                            " bytes, its record says " + std::to_string(rec.file().size_bytes()));
    *m.add_files() = rec.file();
    for (const auto& p : rec.pieces()) *m.add_pieces() = p;
  }
  // Validation errors here are the caller's (pieces that do not match the declared tensors, or that
  // do not cover every element exactly once: every element must be saved by exactly one rank).
  try {
    check_full_coverage(m, index_manifest(m, dir_tmp.string()), dir_tmp.string());
  } catch (const CheckpointError& e) {
    throw ConfigError(std::string("finalize_checkpoint: ") + e.what());
  }

  const std::string bytes = encode_manifest(m);
  write_file_durably(dir_tmp / kManifestFileName, bytes.data(), bytes.size());
  fsync_directory(dir_tmp);
  publish_dir(dir_tmp, final_dir);
  fsync_directory(root);

  // Only now, with the new checkpoint durable, may older ones go.
  if (options.keep_last > 0) {
    auto all = list_checkpoints(root);
    const size_t keep = static_cast<size_t>(options.keep_last);
    for (size_t i = 0; i + keep < all.size(); ++i)
      if (all[i].second != final_dir) remove_dir_safely(all[i].second);
  }
  // Leftovers of crashed saves of earlier steps and of interrupted deletions.
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    auto tmp_step = parse_dir_step(name, kTempSuffix);
    if ((tmp_step && *tmp_step < info.step) || name.ends_with(kDeletingSuffix)) {
      std::error_code ec;
      fs::remove_all(entry.path(), ec);
    }
  }
  fsync_directory(root);
  return final_dir;
}

std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  fs::directory_iterator it(root, ec);
  if (ec) return out;
  for (const auto& entry : it) {
    auto step = parse_dir_step(entry.path().filename().string(), "");
    if (!step || !entry.is_directory(ec)) continue;
    if (!fs::exists(entry.path() / kManifestFileName, ec)) continue;
    out.emplace_back(*step, entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<fs::path> latest_checkpoint(const fs::path& root) {
  auto all = list_checkpoints(root);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      read_manifest(it->second);
      return it->second;
    } catch (const CheckpointError&) {
      // A damaged manifest: fall back to the previous checkpoint.
    }
  }
  return std::nullopt;
}

}  // namespace shardopt::ckpt
