// Async save, consolidated export, compatibility checks, inspect.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/error.h"
#include "checkpoint/async_saver.h"
#include "checkpoint/compat.h"
#include "checkpoint/export.h"
#include "checkpoint/inspect.h"
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

std::string contents(const fs::path& p) { return read_small_file(p); }

TEST(AsyncSave, EqualsSyncSaveEvenWhenSourceChangesRightAfterStart) {
  TempDir tmp;
  auto model = make_model(30);
  const auto pristine = model;
  const int world = 3;
  auto pieces = testing::split_for_ranks(model, world, 4);
  std::vector<proto::CheckpointShardRecord> sync_records, async_records;
  for (int r = 0; r < world; ++r) sync_records.push_back(save_shard(tmp.path() / "sync", r, pieces[r]));
  AsyncShardSaver saver;
  for (int r = 0; r < world; ++r) {
    saver.start(tmp.path() / "async", r, pieces[r]);
    EXPECT_TRUE(saver.pending());
    EXPECT_THROW(saver.start(tmp.path() / "async", r, pieces[r]), ConfigError);
    // Training goes on and overwrites its buffers: the snapshot must not see it.
    for (auto& g : model.states) std::fill(g.bytes.begin(), g.bytes.end(), 0xAB);
    async_records.push_back(saver.wait());
    EXPECT_FALSE(saver.pending());
    model = pristine;
  }
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(async_records[r].SerializeAsString(), sync_records[r].SerializeAsString());
    EXPECT_EQ(contents(tmp.path() / "async" / shard_file_name(r)), contents(tmp.path() / "sync" / shard_file_name(r)));
  }
}

TEST(AsyncSave, PropagatesWriterErrors) {
  TempDir tmp;
  std::ofstream(tmp.path() / "not-a-dir") << "x";
  const float value = 1.0f;
  std::vector<SavePiece> pieces{{"w", "param", 0, 1, DType::kF32, &value}};
  AsyncShardSaver saver;
  saver.start(tmp.path() / "not-a-dir" / "sub", 0, pieces);
  EXPECT_THROW(saver.wait(), CheckpointError);
  EXPECT_THROW(saver.wait(), ConfigError);  // nothing pending any more
  // The saver is reusable after an error.
  saver.start(tmp.path() / "ok", 0, pieces);
  EXPECT_EQ(saver.wait().pieces(0).length(), 1);
}

TEST(Export, WritesSafetensorsWithConsolidatedBytes) {
  TempDir tmp;
  const auto model = make_model(31);
  const auto dir = save_checkpoint(tmp.path(), model, 4, 12, 9);
  CheckpointReader reader(dir);
  for (bool all_states : {false, true}) {
    ExportOptions options;
    options.chunk_bytes = 100;  // many chunks per array, chunks straddling pieces
    if (all_states) options.states.clear();
    const fs::path out = tmp.path() / (all_states ? "all.safetensors" : "params.safetensors");
    const auto summary = export_consolidated(reader, out, options);

    // Independent parse of the safetensors layout.
    const std::string bytes = contents(out);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
    ASSERT_EQ(n % 8, 0u);
    const auto header = nlohmann::json::parse(bytes.substr(8, n));
    EXPECT_EQ(header["__metadata__"]["step"], "12");
    const std::string data = bytes.substr(8 + n);
    int arrays = 0;
    uint64_t total = 0;
    for (const auto& g : model.states) {
      if (!all_states && g.state != "param") continue;
      const std::string name = g.state == "param" ? g.tensor : g.tensor + ":" + g.state;
      ASSERT_TRUE(header.contains(name)) << name;
      const auto& e = header[name];
      EXPECT_EQ(e["dtype"], g.dtype == DType::kF32 ? "F32" : "BF16");
      int64_t numel = 1;
      for (int64_t d : e["shape"].get<std::vector<int64_t>>()) numel *= d;
      EXPECT_EQ(numel, g.numel) << name;
      const auto off = e["data_offsets"].get<std::vector<uint64_t>>();
      ASSERT_EQ(off[1] - off[0], g.bytes.size()) << name;
      EXPECT_EQ(data.substr(off[0], off[1] - off[0]), std::string(g.bytes.begin(), g.bytes.end())) << name;
      ++arrays;
      total += g.bytes.size();
    }
    EXPECT_EQ(header.size(), static_cast<size_t>(arrays) + 1);
    EXPECT_EQ(data.size(), total);
    EXPECT_EQ(summary.arrays, arrays);
    EXPECT_EQ(summary.data_bytes, total);
    EXPECT_FALSE(fs::exists(fs::path(out.string() + ".tmp")));
  }
}

std::vector<ExpectedTensor> expected_for(const testing::SyntheticModel& m) {
  std::vector<ExpectedTensor> out;
  for (const auto& t : m.tensors) {
    ExpectedTensor e{t.spec(), {}};
    for (const auto& s : t.states()) e.states.push_back(s.name());
    out.push_back(e);
  }
  return out;
}

TEST(Compat, AcceptsMatchingModelAndNamesMismatches) {
  TempDir tmp;
  const auto model = make_model(32);
  const auto m = read_manifest(save_checkpoint(tmp.path(), model, 2, 1, 1));
  auto expected = expected_for(model);
  EXPECT_NO_THROW(check_compatible(m, expected, "ck"));

  auto wrong_shape = expected;
  wrong_shape[2].spec.set_shape(0, 54);  // embed [53, 19] -> [54, 19]
  try {
    check_compatible(m, wrong_shape, "ck");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'embed'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[54, 19]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[53, 19]"), std::string::npos) << msg;
  }
  auto other_optimizer = expected;
  other_optimizer[0].states = {"param", "adam_m"};  // qkv was saved with Muon momentum
  try {
    check_compatible(m, other_optimizer, "ck");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("adam_m"), std::string::npos) << msg;
    EXPECT_NE(msg.find("layers.0.attn.qkv"), std::string::npos) << msg;
    EXPECT_NE(msg.find("momentum"), std::string::npos) << msg;
  }
  auto extra = expected;
  extra.push_back(ExpectedTensor{testing::spec("lm_head", {10, 4}), {"param"}});
  EXPECT_THROW(check_compatible(m, extra, "ck"), CheckpointError);
  auto fewer = expected;
  fewer.pop_back();
  EXPECT_THROW(check_compatible(m, fewer, "ck"), ConfigError);
  EXPECT_NO_THROW(check_compatible(m, fewer, "ck", CompatOptions{.allow_extra_tensors = true}));
}

TEST(Inspect, PrintsSummaryAndVerifies) {
  TempDir tmp;
  const auto model = make_model(33);
  const auto dir = save_checkpoint(tmp.path(), model, 3, 42, 5);
  std::ostringstream out;
  const auto r = inspect_checkpoint(tmp.path(), out);  // a root resolves to its latest checkpoint
  EXPECT_EQ(r.dir, dir);
  EXPECT_EQ(r.step, 42);
  EXPECT_EQ(r.world_size, 3);
  EXPECT_EQ(r.tensors, 5);
  uint64_t total = 0;
  for (const auto& g : model.states) total += g.bytes.size();
  EXPECT_EQ(r.data_bytes, total);
  EXPECT_EQ(r.verified_bytes, total);
  const std::string text = out.str();
  for (const char* needle : {"step 42", "saved by 3 ranks", "layers.0.attn.qkv", "normuon_row_v", "verified"})
    EXPECT_NE(text.find(needle), std::string::npos) << needle << " not in:\n" << text;

  // A flipped byte in a piece: inspect reports and throws.
  const auto m = read_manifest(dir);
  const auto& victim = m.pieces(m.pieces_size() / 2);
  ASSERT_GT(victim.length(), 0);
  {
    std::fstream f(dir / victim.file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(victim.file_offset());
    char c = 0;
    f.seekg(victim.file_offset());
    f.read(&c, 1);
    c = static_cast<char>(~c);
    f.seekp(victim.file_offset());
    f.write(&c, 1);
  }
  std::ostringstream bad;
  EXPECT_THROW(inspect_checkpoint(dir, bad), CheckpointError);
  EXPECT_NE(bad.str().find("FAILED"), std::string::npos);
  EXPECT_NE(bad.str().find(victim.file()), std::string::npos);
  EXPECT_THROW(inspect_checkpoint(tmp.path() / "empty-root", bad), CheckpointError);
}

}  // namespace
}  // namespace shardopt::ckpt
