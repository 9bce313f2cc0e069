#include <gtest/gtest.h>

#include <fstream>
#include <thread>

#include "base/error.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "tests/ckpt/ckpt_test_util.h"

namespace shardopt::ckpt {
namespace {
using testing::make_model;
using testing::save_checkpoint;
using testing::TempDir;

class RoundTrip : public ::testing::TestWithParam<int> {};

// Written by N ranks at random boundaries, read back by M ranks at other random boundaries.
TEST_P(RoundTrip, ReadsBackEqualBytesAtAnyBoundaries) {
  const int world = GetParam();
  TempDir tmp;
  const auto model = make_model(1000 + world);
  const auto dir = save_checkpoint(tmp.path(), model, world, /*step=*/7, /*seed=*/world);
  CheckpointReader reader(dir);
  EXPECT_EQ(reader.step(), 7);
  EXPECT_EQ(reader.manifest().world_size(), world);
  EXPECT_EQ(reader.manifest().rng().extra().at("data_cursor"), "56");
  EXPECT_EQ(reader.manifest().files_size(), world);
  std::mt19937_64 rng(world * 31 + 5);
  for (int load_world = 1; load_world <= 5; ++load_world) {
    for (const auto& g : model.states) {
      const size_t esize = dtype_size(g.dtype);
      ASSERT_EQ(reader.state_numel(g.tensor, g.state), g.numel);
      ASSERT_EQ(from_proto(reader.state_info(g.tensor, g.state).dtype()), g.dtype);
      std::vector<unsigned char> assembled(g.bytes.size(), 0xEE);
      auto cuts = testing::random_cuts(rng, g.numel, load_world);
      for (int r = 0; r < load_world; ++r)
        reader.read(g.tensor, g.state, cuts[r], cuts[r + 1] - cuts[r], assembled.data() + cuts[r] * esize);
      ASSERT_EQ(assembled, g.bytes) << g.tensor << "/" << g.state << " saved at " << world << " loaded at "
                                    << load_world;
    }
  }
  EXPECT_EQ(CheckpointReader(dir).validate_all(), [&] {
    uint64_t total = 0;
    for (const auto& g : model.states) total += g.bytes.size();
    return total;
  }());
}
INSTANTIATE_TEST_SUITE_P(Worlds, RoundTrip, ::testing::Values(1, 2, 3, 4));

// A request reads only the pieces overlapping it (each whole, to check its CRC), nothing else.
TEST(Reader, ReadsOnlyOverlappingPieces) {
  TempDir tmp;
  const auto model = make_model(5);
  const auto dir = save_checkpoint(tmp.path(), model, 3, 1, 77);
  const auto manifest = CheckpointReader(dir).manifest();
  const auto& g = model.find("layers.0.attn.qkv", "param");
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t off = rng() % g.numel;
    const int64_t len = 1 + rng() % std::min<int64_t>(500, g.numel - off);
    uint64_t expected_bytes = 0;  // independent: sum of overlapping pieces' bytes
    for (const auto& p : manifest.pieces())
      if (p.tensor() == g.tensor && p.state() == g.state && p.global_offset() < off + len &&
          p.global_offset() + p.length() > off)
        expected_bytes += p.length() * 4;
    CheckpointReader reader(dir);
    std::vector<unsigned char> out(len * 4);
    reader.read(g.tensor, g.state, off, len, out.data());
    EXPECT_EQ(reader.bytes_read(), expected_bytes);
    EXPECT_EQ(0, std::memcmp(out.data(), g.bytes.data() + off * 4, out.size()));
  }
}

// Ranks write concurrently into the same temporary directory (threads standing in for processes).
TEST(Writer, ConcurrentRanksProduceALoadableCheckpoint) {
  TempDir tmp;
  const auto model = make_model(55);
  const int world = 4;
  auto per_rank = testing::split_for_ranks(model, world, 8);
  const auto dir_tmp = temp_checkpoint_dir(tmp.path(), 9);
  prepare_save_dir(dir_tmp);
  std::vector<std::string> gathered(world);
  std::vector<std::thread> ranks;
  for (int r = 0; r < world; ++r)
    ranks.emplace_back([&, r] { gathered[r] = serialize_shard_record(save_shard(dir_tmp, r, per_rank[r])); });
  for (auto& t : ranks) t.join();
  std::vector<proto::CheckpointShardRecord> records;
  for (const auto& b : gathered) records.push_back(parse_shard_record(b));
  CheckpointInfo info;
  info.step = 9;
  info.world_size = world;
  info.tensors = model.tensors;
  const auto dir = finalize_checkpoint(tmp.path(), info, records);
  EXPECT_FALSE(std::filesystem::exists(dir_tmp));
  CheckpointReader reader(dir);
  for (const auto& g : model.states) {
    std::vector<unsigned char> out(g.bytes.size());
    reader.read(g.tensor, g.state, 0, g.numel, out.data());
    EXPECT_EQ(out, g.bytes) << g.tensor << "/" << g.state;
  }
}

TEST(Writer, RecordSerializationRoundTrips) {
  TempDir tmp;
  const auto model = make_model(6);
  auto pieces = testing::split_for_ranks(model, 2, 1);
  auto rec = save_shard(tmp.path() / "x.tmp", 1, pieces[1]);
  auto back = parse_shard_record(serialize_shard_record(rec));
  EXPECT_EQ(back.SerializeAsString(), rec.SerializeAsString());
  EXPECT_EQ(back.rank(), 1);
  EXPECT_EQ(back.file().name(), "rank-00001.bin");
  EXPECT_EQ(back.file().size_bytes(), static_cast<int64_t>(std::filesystem::file_size(tmp.path() / "x.tmp" / "rank-00001.bin")));
  EXPECT_THROW(parse_shard_record("\xff\xff\xff garbage"), CheckpointError);
}

TEST(Writer, FinalizeRejectsGapsAndOverlaps) {
  TempDir tmp;
  const auto model = make_model(8);
  auto pieces = testing::split_for_ranks(model, 1, 2);
  CheckpointInfo info;
  info.step = 3;
  info.tensors = model.tensors;
  // Drop one non-empty piece: a gap.
  auto gap = pieces[0];
  for (size_t i = 0; i < gap.size(); ++i)
    if (gap[i].length > 0) {
      gap.erase(gap.begin() + i);
      break;
    }
  {
    auto tmpdir = temp_checkpoint_dir(tmp.path(), 3);
    prepare_save_dir(tmpdir);
    std::vector<proto::CheckpointShardRecord> recs{save_shard(tmpdir, 0, gap)};
    EXPECT_THROW(finalize_checkpoint(tmp.path(), info, recs), ConfigError);
  }
  // Duplicate one piece: an overlap.
  {
    auto dup = pieces[0];
    for (const auto& p : pieces[0])
      if (p.length > 0) {
        dup.push_back(p);
        break;
      }
    auto tmpdir = temp_checkpoint_dir(tmp.path(), 3);
    prepare_save_dir(tmpdir);
    std::vector<proto::CheckpointShardRecord> recs{save_shard(tmpdir, 0, dup)};
    try {
      finalize_checkpoint(tmp.path(), info, recs);
      FAIL() << "overlap accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("overlap"), std::string::npos) << e.what();
    }
  }
  EXPECT_FALSE(latest_checkpoint(tmp.path()).has_value());
}

TEST(Latest, IgnoresTemporaryAndIncompleteDirectories) {
  TempDir tmp;
  const auto model = make_model(9);
  save_checkpoint(tmp.path(), model, 2, 10, 1);
  save_checkpoint(tmp.path(), model, 2, 20, 2);
  // A crashed save of step 30 (shards, no manifest), a directory without manifest, a stray name.
  std::filesystem::create_directories(temp_checkpoint_dir(tmp.path(), 30));
  std::ofstream(temp_checkpoint_dir(tmp.path(), 30) / "rank-00000.bin") << "partial";
  std::filesystem::create_directories(checkpoint_dir(tmp.path(), 40));
  std::filesystem::create_directories(tmp.path() / "ckpt-50x");
  EXPECT_EQ(latest_checkpoint(tmp.path()), checkpoint_dir(tmp.path(), 20));
  // A damaged newest manifest falls back to the previous checkpoint.
  std::ofstream(checkpoint_dir(tmp.path(), 20) / "manifest.pb", std::ios::trunc) << "junk";
  EXPECT_EQ(latest_checkpoint(tmp.path()), checkpoint_dir(tmp.path(), 10));
  EXPECT_FALSE(latest_checkpoint(tmp.path() / "nonexistent").has_value());
}

TEST(KeepLast, DeletesOnlyOlderCheckpointsAfterTheNewOneIsComplete) {
  TempDir tmp;
  const auto model = make_model(10);
  for (int step = 1; step <= 5; ++step) {
    save_checkpoint(tmp.path(), model, 2, step * 100, step, /*keep_last=*/2);
    auto all = list_checkpoints(tmp.path());
    ASSERT_EQ(all.size(), static_cast<size_t>(std::min(step, 2)));
    EXPECT_EQ(all.back().first, step * 100);
    if (step >= 2) {
      EXPECT_EQ(all.front().first, (step - 1) * 100);
    }
    for (const auto& [s, path] : all) EXPECT_NO_THROW(CheckpointReader(path).validate_all());
  }
  // No leftover temporary or half-deleted directories.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(tmp.path())) ++entries;
  EXPECT_EQ(entries, 2);
}

TEST(Writer, ResavingTheSameStepReplacesIt) {
  TempDir tmp;
  const auto a = make_model(11), b = make_model(12);
  save_checkpoint(tmp.path(), a, 2, 5, 1);
  const auto dir = save_checkpoint(tmp.path(), b, 3, 5, 2);
  CheckpointReader reader(dir);
  EXPECT_EQ(reader.manifest().world_size(), 3);
  const auto& g = b.find("embed", "param");
  std::vector<unsigned char> out(g.bytes.size());
  reader.read(g.tensor, g.state, 0, g.numel, out.data());
  EXPECT_EQ(out, g.bytes);
}

}  // namespace
}  // namespace shardopt::ckpt
