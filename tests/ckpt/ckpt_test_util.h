// Shared helpers for the checkpoint tests: temporary directories and a synthetic model whose global
// arrays are known, split into pieces at random boundaries as N ranks would hold them.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "checkpoint/writer.h"
#include "proto/dtype_convert.h"

namespace shardopt::ckpt::testing {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "shardopt-ckpt-test-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// One state array of one tensor with its full global bytes.
struct GlobalState {
  std::string tensor, state;
  DType dtype;
  int64_t numel;
  std::vector<unsigned char> bytes;
};

struct SyntheticModel {
  std::vector<proto::CheckpointTensor> tensors;
  std::vector<GlobalState> states;

  const GlobalState& find(const std::string& t, const std::string& s) const {
    for (const auto& g : states)
      if (g.tensor == t && g.state == s) return g;
    std::abort();
  }
};

inline proto::TensorSpec spec(const std::string& name, std::vector<int64_t> shape, proto::DType dtype = proto::BF16) {
  proto::TensorSpec s;
  s.set_name(name);
  for (int64_t d : shape) s.add_shape(d);
  s.set_dtype(dtype);
  return s;
}

// A small model with odd sizes, a 0-element tensor, a scalar, a per-row state and several dtypes.
// `scale` multiplies the big matrix's rows (for large checkpoints in the kill test).
inline SyntheticModel make_model(uint64_t seed, int64_t scale = 1) {
  std::mt19937_64 rng(seed);
  SyntheticModel m;
  auto add = [&](proto::CheckpointTensor& t, const std::string& state, DType dtype, std::vector<int64_t> shape) {
    add_state(t, state, dtype, shape);
    const auto& st = t.states(t.states_size() - 1);
    int64_t n = 1;
    for (int64_t d : st.shape()) n *= d;
    GlobalState g{t.spec().name(), state, dtype, n, std::vector<unsigned char>(n * dtype_size(dtype))};
    for (size_t i = 0; i < g.bytes.size(); i += 8) {  // 8 random bytes per draw: fast for large models
      const uint64_t r = rng();
      std::memcpy(g.bytes.data() + i, &r, std::min<size_t>(8, g.bytes.size() - i));
    }
    m.states.push_back(std::move(g));
  };
  {
    auto t = make_tensor_entry(spec("layers.0.attn.qkv", {96 * scale, 37}));
    add(t, "param", DType::kF32, {});
    add(t, "momentum", DType::kF32, {});
    add(t, "normuon_row_v", DType::kF32, {96 * scale});
    m.tensors.push_back(t);
  }
  {
    auto t = make_tensor_entry(spec("layers.0.norm.weight", {1001}));
    add(t, "param", DType::kF32, {});
    add(t, "adam_m", DType::kF32, {});
    add(t, "adam_v", DType::kF32, {});
    m.tensors.push_back(t);
  }
  {
    auto t = make_tensor_entry(spec("embed", {53, 19}));
    add(t, "param", DType::kBF16, {});
    add(t, "noloco_phi", DType::kBF16, {});
    m.tensors.push_back(t);
  }
  {
    auto t = make_tensor_entry(spec("scale", {}));
    add(t, "param", DType::kF32, {});
    m.tensors.push_back(t);
  }
  {
    auto t = make_tensor_entry(spec("empty", {0, 5}));
    add(t, "param", DType::kF32, {});
    m.tensors.push_back(t);
  }
  return m;
}

// Sorted cut points splitting [0, n) into `parts` contiguous ranges (some possibly empty).
inline std::vector<int64_t> random_cuts(std::mt19937_64& rng, int64_t n, int parts) {
  std::vector<int64_t> cuts{0, n};
  for (int i = 1; i < parts; ++i) cuts.push_back(n == 0 ? 0 : static_cast<int64_t>(rng() % (n + 1)));
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

// Pieces each of `world` ranks holds: every state is cut into 1..3 pieces per rank at random points.
inline std::vector<std::vector<SavePiece>> split_for_ranks(const SyntheticModel& m, int world, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<SavePiece>> per_rank(world);
  for (const auto& g : m.states) {
    const int parts = world * (1 + static_cast<int>(rng() % 3));
    auto cuts = random_cuts(rng, g.numel, parts);
    const size_t esize = dtype_size(g.dtype);
    for (int i = 0; i < parts; ++i) {
      const int64_t len = cuts[i + 1] - cuts[i];
      if (len == 0 && g.numel != 0) continue;  // skip empties except for 0-element states
      if (len == 0 && i != 0) continue;
      SavePiece p{g.tensor, g.state, cuts[i], len, g.dtype, g.bytes.data() + cuts[i] * esize};
      per_rank[rng() % world].push_back(p);
    }
  }
  return per_rank;
}

// Every rank writes its shard, records travel as bytes (as through a gather), rank 0 finalizes.
inline std::filesystem::path save_checkpoint(const std::filesystem::path& root, const SyntheticModel& m, int world,
                                             int64_t step, uint64_t seed, int keep_last = 0) {
  const auto tmp = temp_checkpoint_dir(root, step);
  prepare_save_dir(tmp);
  auto per_rank = split_for_ranks(m, world, seed);
  std::vector<std::string> gathered;
  for (int r = 0; r < world; ++r) gathered.push_back(serialize_shard_record(save_shard(tmp, r, per_rank[r])));
  std::vector<proto::CheckpointShardRecord> records;
  for (const auto& bytes : gathered) records.push_back(parse_shard_record(bytes));
  CheckpointInfo info;
  info.step = step;
  info.world_size = world;
  info.plan_hash = 0x1234abcdULL + world;
  info.rng.set_seed(99);
  info.rng.set_step(step);
  (*info.rng.mutable_extra())["data_cursor"] = std::to_string(step * 8);
  info.tensors = m.tensors;
  info.metadata["optimizer"] = "muon+adamw";
  return finalize_checkpoint(root, info, records, FinalizeOptions{keep_last});
}

}  // namespace shardopt::ckpt::testing
