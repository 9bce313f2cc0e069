#include <gtest/gtest.h>

#include <google/protobuf/stubs/logging.h>

#include <fstream>

#include "base/error.h"
#include "checkpoint/crc32c.h"
#include "checkpoint/format.h"
#include "checkpoint/io_util.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "tests/ckpt/ckpt_test_util.h"

namespace shardopt::ckpt {
namespace {
namespace fs = std::filesystem;
using testing::make_model;
using testing::save_checkpoint;
using testing::TempDir;

// Runs `f`, expects a CheckpointError whose message contains every one of `needles`.
template <class F>
void expect_checkpoint_error(F&& f, std::initializer_list<std::string> needles) {
  try {
    f();
    ADD_FAILURE() << "no CheckpointError thrown";
  } catch (const CheckpointError& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' not in: " << e.what();
  }
}

void overwrite_manifest(const fs::path& dir, const proto::CheckpointManifest& m) {
  const auto bytes = encode_manifest(m);
  write_file_durably(dir / "manifest.pb", bytes.data(), bytes.size());
}

class Corruption : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = save_checkpoint(tmp_.path(), model_, 3, 4, 21); }
  TempDir tmp_;
  testing::SyntheticModel model_ = make_model(20);
  fs::path dir_;
};

TEST_F(Corruption, TruncatedShardFile) {
  const auto file = dir_ / "rank-00001.bin";
  fs::resize_file(file, fs::file_size(file) - 100);
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"rank-00001.bin", "truncated"});
}

TEST_F(Corruption, BitFlippedPiece) {
  const auto m = read_manifest(dir_);
  const proto::CheckpointPiece* victim = nullptr;
  for (const auto& p : m.pieces())
    if (p.length() > 10 && p.tensor() == "layers.0.norm.weight") victim = &p;
  ASSERT_NE(victim, nullptr);
  {
    std::fstream f(dir_ / victim->file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(victim->file_offset() + 5);
    char c;
    f.read(&c, 1);
    c ^= 0x10;
    f.seekp(victim->file_offset() + 5);
    f.write(&c, 1);
  }
  CheckpointReader reader(dir_);  // opening checks sizes only: still fine
  std::vector<unsigned char> out(victim->length() * 4);
  expect_checkpoint_error([&] { reader.read(victim->tensor(), victim->state(), victim->global_offset(), 1, out.data()); },
                          {victim->file(), "checksum mismatch", victim->tensor(), victim->state()});
  expect_checkpoint_error([&] { CheckpointReader(dir_).validate_all(); }, {victim->file(), "checksum mismatch"});
  // Other tensors still read fine: only the damaged piece is rejected.
  const auto& g = model_.find("embed", "param");
  std::vector<unsigned char> ok(g.bytes.size());
  reader.read(g.tensor, g.state, 0, g.numel, ok.data());
  EXPECT_EQ(ok, g.bytes);
}

TEST_F(Corruption, MissingShardFile) {
  fs::remove(dir_ / "rank-00002.bin");
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"rank-00002.bin", "missing"});
}

TEST_F(Corruption, MissingManifest) {
  fs::remove(dir_ / "manifest.pb");
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "missing"});
}

TEST_F(Corruption, WrongVersionManifest) {
  auto m = read_manifest(dir_);
  m.set_format_version(99);
  overwrite_manifest(dir_, m);
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "unsupported format version 99"});
}

TEST_F(Corruption, WrongMagicManifest) {
  {
    std::fstream f(dir_ / "manifest.pb", std::ios::in | std::ios::out | std::ios::binary);
    f.write("NOTACKPT", 8);
  }
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "bad magic"});
}

TEST_F(Corruption, WrongMagicFieldInPayload) {
  auto m = read_manifest(dir_);
  m.set_magic("something-else");
  overwrite_manifest(dir_, m);
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "bad magic", "something-else"});
}

TEST_F(Corruption, BitFlippedManifest) {
  std::string bytes = read_small_file(dir_ / "manifest.pb");
  bytes[bytes.size() / 2] ^= 0x01;
  write_file_durably(dir_ / "manifest.pb", bytes.data(), bytes.size());
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "checksum mismatch"});
}

TEST_F(Corruption, WrongShardMagic) {
  {
    std::fstream f(dir_ / "rank-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.write("XXXXXXXX", 8);
  }
  expect_checkpoint_error([&] { CheckpointReader(dir_).validate_all(); }, {"rank-00000.bin", "bad magic"});
}

TEST_F(Corruption, IncompleteCoverageNamesTensorAndRange) {
  auto m = read_manifest(dir_);
  // Remove the piece that covers element 0 of the norm weight's adam_v.
  for (int i = 0; i < m.pieces_size(); ++i) {
    const auto& p = m.pieces(i);
    if (p.tensor() == "layers.0.norm.weight" && p.state() == "adam_v" && p.global_offset() == 0 && p.length() > 0) {
      m.mutable_pieces()->DeleteSubrange(i, 1);
      break;
    }
  }
  overwrite_manifest(dir_, m);
  CheckpointReader reader(dir_);
  std::vector<float> out(1001);
  expect_checkpoint_error([&] { reader.plan_reads("layers.0.norm.weight", "adam_v", 0, 1001); },
                          {"layers.0.norm.weight", "adam_v", "incomplete coverage", "[0, "});
  expect_checkpoint_error([&] { reader.read("layers.0.norm.weight", "adam_v", 0, 1001, out.data()); },
                          {"layers.0.norm.weight"});
  expect_checkpoint_error([&] { reader.validate_all(); }, {"layers.0.norm.weight", "adam_v", "incomplete coverage"});
  expect_checkpoint_error([&] { reader.read("nope", "param", 0, 1, out.data()); }, {"nope", "no state"});
}

TEST_F(Corruption, ManifestPointingOutsideFileIsRejected) {
  auto m = read_manifest(dir_);
  m.mutable_pieces(0)->set_file_offset(m.files(0).size_bytes() * 10);
  overwrite_manifest(dir_, m);
  expect_checkpoint_error([&] { CheckpointReader r(dir_); }, {"manifest.pb", "outside the file"});
}

// Bounded randomized corruption of the manifest: never a crash, always CheckpointError or a manifest
// that passed every consistency check. Mutations of the payload are re-sealed with a valid CRC so the
// protobuf parser and validator see them too.
TEST_F(Corruption, RandomizedManifestMutationsNeverCrash) {
  const std::string original = read_small_file(dir_ / "manifest.pb");
  google::protobuf::LogSilencer quiet;  // protobuf logs each invalid UTF-8 string it rejects
  std::mt19937_64 rng(12345);
  int rejected = 0, accepted = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = original;
    const int kind = trial % 4;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i) {
      const size_t at = rng() % bytes.size();
      if (kind == 3) bytes.insert(bytes.begin() + at, static_cast<char>(rng()));
      else bytes[at] = static_cast<char>(kind == 0 ? bytes[at] ^ (1 << (rng() % 8)) : rng());
    }
    if (trial % 7 == 0) bytes.resize(rng() % bytes.size());
    if (trial % 2 == 1 && bytes.size() >= kManifestHeaderBytes) {
      // Re-seal: keep the real header magic/version, fix payload size and CRC.
      std::string payload = bytes.substr(kManifestHeaderBytes);
      proto::CheckpointManifest parsed;
      std::string head = original.substr(0, 12);
      const uint32_t crc = crc32c(payload.data(), payload.size());
      const uint64_t size = payload.size();
      head.append(reinterpret_cast<const char*>(&crc), 4);
      head.append(reinterpret_cast<const char*>(&size), 8);
      bytes = head + payload;
    }
    try {
      auto m = decode_manifest(bytes, "fuzz");
      index_manifest(m, "fuzz");
      ++accepted;
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("fuzz"), std::string::npos);
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 1000);
  RecordProperty("accepted", accepted);
}

}  // namespace
}  // namespace shardopt::ckpt
