// Engine checkpoints: train, save, load at another world size / stage / layout, continue, and compare
// with an uninterrupted run. The invariant: resuming from a checkpoint is indistinguishable from never
// stopping. Gradients are dyadic with rank offsets that sum to zero, so the averaged gradient is exact
// at every world size; the owned layout then runs the same arithmetic per element and per matrix
// whatever the sharding, and must be bit-identical. The dim0 layout applies Muon updates differently
// (W(1 - lr wd) + delta), so it is held to 1e-6 relative.
#include "runtime/checkpoint_io.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include <gtest/gtest.h>

#include "base/error.h"
#include "checkpoint/format.h"
#include "checkpoint/inspect.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "comm/thread_backend.h"
#include "optim/quant8.h"
#include "tests/common/engine_fixture.h"
#include "tests/common/engine_training.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

namespace fs = std::filesystem;
using Params = std::vector<std::vector<float>>;



EngineOptions options(int stage, proto::ShardLayout layout, const std::string& matrix = "muon",
                      const std::string& elementwise = "adamw") {
  EngineOptions o;
  o.zero_stage = stage;
  o.layout = layout;
  o.bucket_bytes = 600;
  o.matrix_optimizer.set_kind(matrix == "normuon" ? proto::OPTIMIZER_NORMUON : proto::OPTIMIZER_MUON);
  o.matrix_optimizer.set_lr(0.02f);
  o.elementwise_optimizer.set_kind(elementwise == "lion" ? proto::OPTIMIZER_LION : proto::OPTIMIZER_ADAMW);
  o.elementwise_optimizer.set_lr(0.01f);
  return o;
}

void init(Engine& e, const std::vector<proto::TensorSpec>& specs) {
  e.set_params([&](size_t t, float* dst) {
    for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
  });
}

// Optimizer steps first+1 .. last with the deterministic gradients.
Params full_params(Engine& e) {
  e.gather_all();
  Params p(e.num_tensors());
  for (size_t t = 0; t < e.num_tensors(); ++t) p[t].assign(e.param(t), e.param(t) + numel(e.spec(t)));
  e.release_all();
  return p;
}

comm::CommOptions comm_options() {
  comm::CommOptions o;
  o.checked = true;
  o.timeout = std::chrono::milliseconds(60000);
  return o;
}

// Runs fn on `world` thread ranks (checked, 60 s timeout); returns rank 0's value.
template <typename T>
T on_ranks(int world, const std::function<T(comm::Communicator&)>& fn) {
  return rank0_result<T>(world, fn, comm_options());
}

void expect_params_match(const Params& got, const Params& want, bool bit_identical, const std::string& where) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t t = 0; t < want.size(); ++t) {
    ASSERT_EQ(got[t].size(), want[t].size());
    double max_rel = 0;
    bool identical = true;
    for (size_t i = 0; i < want[t].size(); ++i) {
      const double a = got[t][i], b = want[t][i];
      max_rel = std::max(max_rel, std::abs(a - b) / std::max(1e-3, std::abs(b)));
      identical = identical && std::memcmp(&got[t][i], &want[t][i], sizeof(float)) == 0;
    }
    EXPECT_LE(max_rel, 1e-6) << where << " tensor " << t;
    if (bit_identical) EXPECT_TRUE(identical) << where << ": tensor " << t << " not bit-identical";
  }
}

fs::path test_root(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("shardopt_runtime_ckpt_" + std::to_string(::getpid())) / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

constexpr int kSteps = 2;  // steps before the save and after the load

// One N=4 stage-2 owned run saved after kSteps, and the uninterrupted run to 2*kSteps.
class ResumeTest : public testing::TestWithParam<std::tuple<int, int, proto::ShardLayout>> {
 protected:
  static void SetUpTestSuite() {
    const auto specs = mixed_model();
    root_ = new fs::path(test_root("resume"));
    uninterrupted_ = new Params(on_ranks<Params>(4, [&](comm::Communicator& c) {
      Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
      init(e, specs);
      train_steps(e, 0, 2 * kSteps);
      return full_params(e);
    }));
    saved_ = new fs::path(on_ranks<fs::path>(4, [&](comm::Communicator& c) {
      Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
      init(e, specs);
      train_steps(e, 0, kSteps);
      TrainerState ts;
      ts.seed = 1234;
      ts.data_step = 77;
      ts.extra["loader"] = "shard-3:offset-19";
      return save_checkpoint(e, *root_, ts).dir;
    }));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete uninterrupted_;
    delete saved_;
  }
  static fs::path* root_;
  static fs::path* saved_;
  static Params* uninterrupted_;
};
fs::path* ResumeTest::root_ = nullptr;
fs::path* ResumeTest::saved_ = nullptr;
Params* ResumeTest::uninterrupted_ = nullptr;

TEST_P(ResumeTest, ContinuingFromTheCheckpointEqualsAnUninterruptedRun) {
  const auto [world, stage, layout] = GetParam();
  const auto specs = mixed_model();
  ASSERT_EQ(*saved_, ckpt::checkpoint_dir(*root_, kSteps));
  const auto manifest = ckpt::read_manifest(*saved_);
  EXPECT_EQ(manifest.world_size(), 4);
  EXPECT_EQ(manifest.step(), kSteps);
  EXPECT_NE(manifest.plan_hash(), 0u);

  std::vector<Params> per_rank(world);
  std::mutex mu;
  comm::run_ranks(
      world,
      [&](comm::Communicator& c) {
        Engine e(c, specs, options(stage, layout));
        init(e, specs);
        const Params before = full_params(e);
        const TrainerState ts = load_checkpoint(e, *saved_);
        EXPECT_EQ(ts.seed, 1234u);
        EXPECT_EQ(ts.data_step, 77);
        EXPECT_EQ(ts.extra.at("loader"), "shard-3:offset-19");
        EXPECT_EQ(e.optimizer_step(), kSteps);
        // The load changed the parameters (a no-op load would fail the comparison below anyway).
        EXPECT_NE(full_params(e)[2][0], before[2][0]);
        train_steps(e, kSteps, 2 * kSteps);
        Params p = full_params(e);
        std::lock_guard<std::mutex> lock(mu);
        per_rank[c.rank()] = std::move(p);
      },
      comm_options());
  for (int r = 0; r < world; ++r)
    expect_params_match(per_rank[r], *uninterrupted_, layout == proto::SHARD_LAYOUT_OWNED,
                        "N=" + std::to_string(world) + " rank " + std::to_string(r));
}

INSTANTIATE_TEST_SUITE_P(
    WorldsStagesLayouts, ResumeTest,
    testing::Values(std::make_tuple(1, 2, proto::SHARD_LAYOUT_OWNED), std::make_tuple(2, 2, proto::SHARD_LAYOUT_OWNED),
                    std::make_tuple(3, 2, proto::SHARD_LAYOUT_OWNED), std::make_tuple(8, 2, proto::SHARD_LAYOUT_OWNED),
                    std::make_tuple(4, 1, proto::SHARD_LAYOUT_OWNED), std::make_tuple(4, 3, proto::SHARD_LAYOUT_OWNED),
                    std::make_tuple(3, 3, proto::SHARD_LAYOUT_OWNED), std::make_tuple(4, 2, proto::SHARD_LAYOUT_DIM0),
                    std::make_tuple(3, 3, proto::SHARD_LAYOUT_DIM0)),
    [](const auto& info) {
      return "N" + std::to_string(std::get<0>(info.param)) + "_stage" + std::to_string(std::get<1>(info.param)) +
             (std::get<2>(info.param) == proto::SHARD_LAYOUT_DIM0 ? "_dim0" : "_owned");
    });

TEST(RuntimeCheckpoint, NorMuonAndLionStateRoundTrip) {
  const auto specs = mixed_model();
  const fs::path root = test_root("normuon_lion");
  const auto opts = options(2, proto::SHARD_LAYOUT_OWNED, "normuon", "lion");
  const Params uninterrupted = on_ranks<Params>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    train_steps(e, 0, 2 * kSteps);
    return full_params(e);
  });
  on_ranks<int>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    train_steps(e, 0, 1);
    save_checkpoint(e, root, {}, {.keep_last = 1});
    train_steps(e, 1, kSteps);
    save_checkpoint(e, root, {}, {.keep_last = 1});
    return 0;
  });
  // keep_last = 1: only the newest checkpoint survives.
  const auto list = ckpt::list_checkpoints(root);
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].first, kSteps);
  const auto manifest = ckpt::read_manifest(list[0].second);
  bool has_row_v = false, has_lion_momentum = false;
  for (const auto& t : manifest.tensors())
    for (const auto& s : t.states()) {
      if (s.name() == "normuon_row_v") {
        has_row_v = true;
        EXPECT_EQ(s.shape_size(), 1);
        EXPECT_EQ(s.shape(0), t.spec().shape(0)) << t.spec().name();
      }
      if (s.name() == "momentum" && t.spec().name() == "tok_embed") has_lion_momentum = true;
    }
  EXPECT_TRUE(has_row_v);
  EXPECT_TRUE(has_lion_momentum);

  for (auto [world, stage] : {std::pair{1, 2}, std::pair{3, 3}}) {
    const Params resumed = on_ranks<Params>(world, [&](comm::Communicator& c) {
      Engine e(c, specs, options(stage, proto::SHARD_LAYOUT_OWNED, "normuon", "lion"));
      init(e, specs);
      load_checkpoint(e, list[0].second);
      train_steps(e, kSteps, 2 * kSteps);
      return full_params(e);
    });
    expect_params_match(resumed, uninterrupted, true, "normuon+lion N=" + std::to_string(world));
  }
  fs::remove_all(root);
}

EngineOptions with_state(EngineOptions o, proto::StateDType dtype) {
  o.elementwise_optimizer.set_state_dtype(dtype);
  o.matrix_optimizer.set_state_dtype(dtype);
  return o;
}

// All values of one state of every tensor, decoded to fp32 from the checkpoint (q8: codes x absmax).
std::map<std::string, std::vector<float>> decoded_state(const fs::path& dir, const std::string& state) {
  ckpt::CheckpointReader reader(dir);
  std::map<std::string, std::vector<float>> out;
  for (const auto& t : reader.manifest().tensors()) {
    const std::string& name = t.spec().name();
    if (!reader.has_state(name, state)) continue;
    const int64_t n = reader.state_numel(name, state);
    std::vector<float>& v = out[name];
    v.resize(static_cast<size_t>(n));
    if (reader.state_info(name, state).dtype() == proto::U8) {
      std::vector<uint8_t> codes(static_cast<size_t>(n));
      std::vector<float> absmax(static_cast<size_t>(optim::q8_num_blocks(n)));
      reader.read(name, state, 0, n, codes.data());
      reader.read(name, state + ".absmax", 0, static_cast<int64_t>(absmax.size()), absmax.data());
      optim::q8_dequantize(codes.data(), absmax.data(), n, state == "adam_v", v.data());
    } else {
      EXPECT_EQ(reader.state_info(name, state).dtype(), proto::F32);
      reader.read(name, state, 0, n, v.data());
    }
  }
  return out;
}

// q8 state saved at N=4 (codes and absmax as CRC-checked states) and loaded at N=1, 3, 8 in any stage
// and layout continues bit-identically: blocks are global, every rank holds whole ones.
TEST(RuntimeCheckpoint, Q8StateResumesBitIdenticallyAtAnyWorldSize) {
  const auto specs = q8_model();
  const fs::path root = test_root("q8");
  const auto q8 = [](int stage, proto::ShardLayout layout) {
    return with_state(options(stage, layout), proto::STATE_Q8);
  };
  const Params uninterrupted = on_ranks<Params>(4, [&](comm::Communicator& c) {
    Engine e(c, specs, q8(2, proto::SHARD_LAYOUT_OWNED));
    init(e, specs);
    train_steps(e, 0, 2 * kSteps);
    return full_params(e);
  });
  const fs::path saved = on_ranks<fs::path>(4, [&](comm::Communicator& c) {
    Engine e(c, specs, q8(2, proto::SHARD_LAYOUT_OWNED));
    init(e, specs);
    train_steps(e, 0, kSteps);
    return save_checkpoint(e, root).dir;
  });
  const auto manifest = ckpt::read_manifest(saved);
  int q8_states = 0;
  for (const auto& t : manifest.tensors())
    for (const auto& st : t.states())
      if (st.dtype() == proto::U8) {
        ++q8_states;
        bool has_absmax = false;
        for (const auto& other : t.states()) has_absmax = has_absmax || other.name() == st.name() + ".absmax";
        EXPECT_TRUE(has_absmax) << t.spec().name() << " " << st.name();
      }
  EXPECT_EQ(q8_states, 2 * 4 + 5);  // adam_m and adam_v of 4 element-wise tensors, momentum of 5 matrices
  std::ostringstream listing;
  ckpt::inspect_checkpoint(saved, listing);
  EXPECT_NE(listing.str().find("adam_v.absmax"), std::string::npos) << listing.str();

  for (auto [world, stage, layout] : {std::tuple{1, 2, proto::SHARD_LAYOUT_OWNED}, std::tuple{3, 3, proto::SHARD_LAYOUT_OWNED},
                                      std::tuple{8, 1, proto::SHARD_LAYOUT_OWNED}, std::tuple{3, 2, proto::SHARD_LAYOUT_DIM0}}) {
    const Params resumed = on_ranks<Params>(world, [&](comm::Communicator& c) {
      Engine e(c, specs, q8(stage, layout));
      init(e, specs);
      load_checkpoint(e, saved);
      train_steps(e, kSteps, 2 * kSteps);
      return full_params(e);
    });
    // Owned-layout Muon is bit-identical by the equivalence suites; dim0 Muon applies its update as
    // W(1 - lr wd) + delta, so the N=4 owned run is matched to 1e-6 there.
    expect_params_match(resumed, uninterrupted, layout == proto::SHARD_LAYOUT_OWNED,
                        "q8 N=" + std::to_string(world) + " stage " + std::to_string(stage));
  }
  fs::remove_all(root);
}

// Loading into another state dtype converts: q8 -> f32 holds exactly the decoded q8 values, and
// f32 -> q8 holds exactly the q8 encoding of the f32 values (checked through a second save).
TEST(RuntimeCheckpoint, LoadingIntoAnotherStateDtypeConverts) {
  const auto specs = q8_model();
  const fs::path root = test_root("convert");
  const auto base = options(2, proto::SHARD_LAYOUT_OWNED);
  const fs::path q8_dir = on_ranks<fs::path>(4, [&](comm::Communicator& c) {
    Engine e(c, specs, with_state(base, proto::STATE_Q8));
    init(e, specs);
    train_steps(e, 0, kSteps);
    return save_checkpoint(e, root / "q8").dir;
  });
  const fs::path f32_dir = on_ranks<fs::path>(3, [&](comm::Communicator& c) {
    Engine e(c, specs, base);
    init(e, specs);
    load_checkpoint(e, q8_dir);
    return save_checkpoint(e, root / "f32").dir;
  });
  for (const char* state : {"adam_m", "adam_v", "momentum"}) {
    const auto from = decoded_state(q8_dir, state), to = decoded_state(f32_dir, state);
    ASSERT_EQ(from.size(), to.size()) << state;
    for (const auto& [name, values] : from) {
      ASSERT_EQ(values.size(), to.at(name).size());
      EXPECT_EQ(0, std::memcmp(values.data(), to.at(name).data(), values.size() * sizeof(float))) << name << " " << state;
    }
  }
  // Back to q8 from the f32 checkpoint: the codes are the q8 encoding of those f32 values (which
  // are q8 values already, so a round trip reproduces the original codes' decoded values).
  const fs::path back_dir = on_ranks<fs::path>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, with_state(base, proto::STATE_Q8));
    init(e, specs);
    load_checkpoint(e, f32_dir);
    return save_checkpoint(e, root / "back").dir;
  });
  for (const char* state : {"adam_m", "adam_v", "momentum"}) {
    const auto f32 = decoded_state(f32_dir, state), back = decoded_state(back_dir, state);
    for (const auto& [name, values] : f32) {
      std::vector<uint8_t> codes(values.size());
      std::vector<float> absmax(static_cast<size_t>(optim::q8_num_blocks(static_cast<int64_t>(values.size())))),
          want(values.size());
      const bool nonneg = std::string(state) == "adam_v";
      optim::q8_quantize(values.data(), static_cast<int64_t>(values.size()), nonneg, codes.data(), absmax.data());
      optim::q8_dequantize(codes.data(), absmax.data(), static_cast<int64_t>(values.size()), nonneg, want.data());
      EXPECT_EQ(0, std::memcmp(want.data(), back.at(name).data(), want.size() * sizeof(float))) << name << " " << state;
    }
  }
  fs::remove_all(root);
}

// A q8 checkpoint whose manifest names no code was written with the dynamic table code (before
// float8): loading it decodes the codes with that table and encodes the values in float8. The
// checkpoint here is a float8 one with the "q8_code" entry removed, so its bytes are read as dynamic
// codes: the loaded state must be exactly float8(dynamic-decode(codes)), not the float8 reading.
TEST(RuntimeCheckpoint, Q8CheckpointWithoutACodeNameIsReadAsTheDynamicCodeAndConverted) {
  const auto specs = q8_model();
  const fs::path root = test_root("q8legacy");
  const auto opts = with_state(options(2, proto::SHARD_LAYOUT_OWNED), proto::STATE_Q8);
  const fs::path dir = on_ranks<fs::path>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    train_steps(e, 0, kSteps);
    return save_checkpoint(e, root / "float8").dir;
  });
  proto::CheckpointManifest manifest = ckpt::read_manifest(dir);
  ASSERT_EQ(manifest.metadata().at("q8_code"), "float8");
  manifest.mutable_metadata()->erase("q8_code");
  {
    std::ofstream out(dir / ckpt::kManifestFileName, std::ios::binary | std::ios::trunc);
    const std::string bytes = ckpt::encode_manifest(manifest);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const fs::path loaded = on_ranks<fs::path>(3, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    load_checkpoint(e, dir);
    return save_checkpoint(e, root / "loaded").dir;
  });
  ckpt::CheckpointReader reader(dir);
  int checked = 0;
  for (const char* state : {"adam_m", "adam_v", "momentum"}) {
    const bool nonneg = std::string(state) == "adam_v";
    const auto got = decoded_state(loaded, state);
    for (const auto& [name, values] : got) {
      const auto n = static_cast<int64_t>(values.size());
      std::vector<uint8_t> codes(values.size());
      std::vector<float> absmax(static_cast<size_t>(optim::q8_num_blocks(n))), legacy(values.size()),
          want(values.size()), as_float8(values.size());
      reader.read(name, state, 0, n, codes.data());
      reader.read(name, std::string(state) + ".absmax", 0, static_cast<int64_t>(absmax.size()), absmax.data());
      optim::q8_dequantize(codes.data(), absmax.data(), n, nonneg, legacy.data(), optim::Q8CodeKind::kDynamic);
      optim::q8_dequantize(codes.data(), absmax.data(), n, nonneg, as_float8.data());
      optim::q8_quantize(legacy.data(), n, nonneg, codes.data(), absmax.data());
      optim::q8_dequantize(codes.data(), absmax.data(), n, nonneg, want.data());
      EXPECT_EQ(0, std::memcmp(want.data(), values.data(), want.size() * sizeof(float))) << name << " " << state;
      EXPECT_NE(0, std::memcmp(as_float8.data(), values.data(), want.size() * sizeof(float))) << name << " " << state;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 2 * 4 + 5);
  fs::remove_all(root);
}

// The background save captures the state at start(): training on before finish() changes nothing in it.
TEST(RuntimeCheckpoint, AsyncSaveHoldsTheStateAtStart) {
  const auto specs = mixed_model();
  const fs::path root = test_root("async");
  const auto opts = options(2, proto::SHARD_LAYOUT_OWNED);
  const Params uninterrupted = on_ranks<Params>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    train_steps(e, 0, 2 * kSteps);
    return full_params(e);
  });
  const fs::path dir = on_ranks<fs::path>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, opts);
    init(e, specs);
    train_steps(e, 0, kSteps);
    AsyncCheckpointSaver saver(e);
    saver.start(root);
    EXPECT_TRUE(saver.pending());
    EXPECT_THROW(saver.start(root), ConfigError);
    train_steps(e, kSteps, kSteps + 1);  // moves masters and moments while the write runs
    const SaveResult r = saver.finish();
    EXPECT_FALSE(saver.pending());
    EXPECT_EQ(r.step, kSteps);
    EXPECT_GT(r.bytes_written_by_me, 0u);
    return r.dir;
  });
  const Params resumed = on_ranks<Params>(3, [&](comm::Communicator& c) {
    Engine e(c, specs, options(3, proto::SHARD_LAYOUT_OWNED));
    init(e, specs);
    load_checkpoint(e, dir);
    train_steps(e, kSteps, 2 * kSteps);
    return full_params(e);
  });
  expect_params_match(resumed, uninterrupted, true, "async save, resumed at N=3 stage 3");
  fs::remove_all(root);
}

TEST(RuntimeCheckpoint, ChangedShapeFailsWithConfigErrorNamingTensorAndShapes) {
  const fs::path root = test_root("shape");
  const auto specs = mixed_model();
  const fs::path dir = on_ranks<fs::path>(2, [&](comm::Communicator& c) {
    Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
    init(e, specs);
    train_steps(e, 0, 1);
    return save_checkpoint(e, root).dir;
  });
  const auto other = mixed_model(20);
  comm::run_ranks(
      2,
      [&](comm::Communicator& c) {
        Engine e(c, other, options(2, proto::SHARD_LAYOUT_OWNED));
        init(e, other);
        try {
          load_checkpoint(e, dir);
          ADD_FAILURE() << "loading a checkpoint of another shape succeeded";
        } catch (const ConfigError& err) {
          const std::string msg = err.what();
          EXPECT_NE(msg.find("layer0.w_up"), std::string::npos) << msg;
          EXPECT_NE(msg.find("[20, 10]"), std::string::npos) << msg;
          EXPECT_NE(msg.find("[24, 10]"), std::string::npos) << msg;
        }
        EXPECT_EQ(e.optimizer_step(), 0);
      },
      comm_options());
  fs::remove_all(root);
}

// Every byte of this rank's optimizer state, for before/after comparisons.
std::vector<float> optimizer_state(Engine& e) {
  std::vector<float> out;
  ShardState& st = e.shard_state();
  for (int b = 0; b < st.num_buckets(); ++b)
    out.insert(out.end(), st.master_shard(b), st.master_shard(b) + st.my_segment(b).count());
  for (const auto& s : st.elementwise_slices())
    for (float* slot : s.state)
      if (slot) out.insert(out.end(), slot, slot + s.count);
  for (const auto& om : st.owned_matrices())
    out.insert(out.end(), om.matrix.momentum, om.matrix.momentum + om.matrix.rows * om.matrix.cols);
  return out;
}

TEST(RuntimeCheckpoint, CorruptShardFailsOnEveryRankAndLeavesTheEngineUntouched) {
  const fs::path root = test_root("corrupt");
  const auto specs = mixed_model();
  const fs::path dir = on_ranks<fs::path>(3, [&](comm::Communicator& c) {
    Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
    init(e, specs);
    train_steps(e, 0, 2);
    return save_checkpoint(e, root).dir;
  });
  // Flip one byte inside a piece of rank 1's shard file.
  const auto manifest = ckpt::read_manifest(dir);
  const proto::CheckpointPiece* victim = nullptr;
  for (const auto& p : manifest.pieces())
    if (p.file() == ckpt::shard_file_name(1) && p.length() > 4) victim = &p;
  ASSERT_NE(victim, nullptr);
  {
    std::fstream f(dir / victim->file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(victim->file_offset() + 5);
    char byte = 0;
    f.read(&byte, 1);
    byte ^= 0x40;
    f.seekp(victim->file_offset() + 5);
    f.write(&byte, 1);
  }
  comm::run_ranks(
      2,
      [&](comm::Communicator& c) {
        Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
        init(e, specs);
        train_steps(e, 0, 1);
        const Params params_before = full_params(e);
        const std::vector<float> state_before = optimizer_state(e);
        EXPECT_THROW(load_checkpoint(e, dir), CheckpointError);
        EXPECT_EQ(e.optimizer_step(), 1);
        EXPECT_EQ(optimizer_state(e), state_before);
        const Params params_after = full_params(e);
        for (size_t t = 0; t < specs.size(); ++t) EXPECT_EQ(params_after[t], params_before[t]) << t;
      },
      comm_options());
  fs::remove_all(root);
}

TEST(RuntimeCheckpoint, SaveFailureOnRankZeroReachesEveryRank) {
  const fs::path root = test_root("save_fail");
  const fs::path blocker = root / "not_a_directory";
  std::ofstream(blocker) << "x";
  const auto specs = mixed_model();
  comm::run_ranks(
      3,
      [&](comm::Communicator& c) {
        Engine e(c, specs, options(2, proto::SHARD_LAYOUT_OWNED));
        init(e, specs);
        train_steps(e, 0, 1);
        try {
          save_checkpoint(e, blocker);
          ADD_FAILURE() << "saving under a regular file succeeded";
        } catch (const Error& err) {
          if (c.rank() != 0) EXPECT_NE(std::string(err.what()).find("rank 0"), std::string::npos) << err.what();
        }
        // The ranks are still in step: a later collective save works.
        EXPECT_EQ(save_checkpoint(e, root / "ok").step, 1);
      },
      comm_options());
  EXPECT_EQ(ckpt::list_checkpoints(root / "ok").size(), 1u);
  fs::remove_all(root);
}

}  // namespace
}  // namespace shardopt::runtime
