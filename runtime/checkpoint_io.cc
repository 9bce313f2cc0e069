#include "runtime/checkpoint_io.h"

#include <cstring>
#include <iostream>
#include <set>
#include <exception>
#include <string>
#include <vector>

#include "base/error.h"
#include "checkpoint/compat.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"
#include "optim/config.h"
#include "sharding/layout.h"
#include "optim/quant8.h"
#include "sharding/plan_util.h"
#include "sharding/planner.h"

namespace shardopt::runtime {
namespace {

constexpr std::string_view kMomentumState = "momentum";
constexpr std::string_view kRowSecondMomentState = "normuon_row_v";

// Names of the element-wise optimizer's per-element slots, in ElementwiseSlice::state order.
std::vector<std::string> elementwise_state_names(const optim::OptimizerParams& params) {
  std::vector<std::string> names;
  switch (params.kind) {
    case proto::OPTIMIZER_ADAMW: names = {"adam_m", "adam_v"}; break;
    case proto::OPTIMIZER_LION:
    case proto::OPTIMIZER_SGD: names = {std::string(kMomentumState)}; break;
    default: break;
  }
  names.resize(static_cast<size_t>(optim::state_values_per_element(params)));
  SHARDOPT_ASSERT(params.kind == proto::OPTIMIZER_ADAMW || names.size() <= 1, "unexpected element-wise slot count");
  return names;
}

bool has_momentum(const optim::OptimizerParams* matrix) {
  return matrix != nullptr && optim::state_values_per_element(*matrix) > 0;
}
bool has_row_state(const optim::OptimizerParams* matrix) {
  return matrix != nullptr && optim::state_values_per_row(*matrix) > 0;
}

// A q8 state "s" is saved as uint8 codes under "s" and fp32 block absmax under "s.absmax"; signed or
// unsigned follows from the state's name. The manifest's metadata "q8_code" names the code
// (optim/quant8.h: "float8"); a checkpoint without it was written with the dynamic table code, and
// loading it converts its q8 states (decoded with that code, encoded in float8).
std::string absmax_state(const std::string& state) { return state + ".absmax"; }
constexpr std::string_view kQ8CodeKey = "q8_code";

optim::Q8CodeKind stored_q8_code(const proto::CheckpointManifest& manifest) {
  const auto it = manifest.metadata().find(std::string(kQ8CodeKey));
  return it == manifest.metadata().end() ? optim::Q8CodeKind::kDynamic : optim::q8_code_from_name(it->second);
}

// Whether a q8 state of the element-wise optimizer uses the unsigned code (the checkpoint's states
// have this engine's names: check_compatible has matched them).
bool nonnegative_state(Engine& engine, const std::string& state) {
  const auto names = elementwise_state_names(engine.elementwise_params());
  for (size_t k = 0; k < names.size(); ++k)
    if (names[k] == state) return optim::q8_slot_is_nonnegative(engine.elementwise_params().kind, static_cast<int>(k));
  return false;
}

// The storage dtype this engine keeps for `state` of tensor t.
optim::StateDType engine_state_dtype(Engine& engine, size_t t, const std::string& state) {
  if (state == ckpt::kParamState || state == kRowSecondMomentState) return proto::STATE_F32;
  return engine.plan().tensors(static_cast<int>(t)).muon() ? engine.shard_state().matrix_state_dtype()
                                                           : engine.shard_state().elementwise_state_dtype();
}

DType storage_dtype(optim::StateDType d) {
  switch (d) {
    case proto::STATE_BF16: return DType::kBF16;
    case proto::STATE_Q8: return DType::kU8;
    default: return DType::kF32;
  }
}

optim::StateDType state_dtype_of(proto::DType stored) {
  switch (stored) {
    case proto::BF16: return proto::STATE_BF16;
    case proto::U8: return proto::STATE_Q8;
    default: return proto::STATE_F32;
  }
}

enum FaultKind : int64_t { kNoFault = 0, kConfigFault = 1, kCheckpointFault = 2, kOtherFault = 3 };

// All-gather of small host values: every rank's counts[r] elements of `dtype` into `all` in rank
// order, `mine` being this rank's. Through the engine, which stages them in device memory when its
// communicator moves device buffers.
void all_gather_host(Engine& engine, const void* mine, void* all, std::span<const size_t> counts, DType dtype) {
  comm::Communicator& comm = engine.comm();
  const size_t elem = dtype_size(dtype);
  size_t offset = 0, total = 0;
  for (int r = 0; r < comm.size(); ++r) {
    if (r == comm.rank()) offset = total;
    total += counts[static_cast<size_t>(r)];
  }
  std::memcpy(static_cast<unsigned char*>(all) + offset * elem, mine, counts[static_cast<size_t>(comm.rank())] * elem);
  engine.collective_on_host_values(all, total * elem, [&](void* p) {
    return comm.all_gather(static_cast<unsigned char*>(p) + offset * elem, p, counts, dtype);
  });
}

// Collective: returns only when no rank reports a fault. Otherwise the faulty ranks rethrow their own
// exception and the others throw the same error type naming the first faulty rank and its message,
// so a failure on one rank never leaves the others waiting in a later collective.
void agree(Engine& engine, std::exception_ptr local, const std::string& what) {
  int64_t mine[2] = {kNoFault, 0};
  std::string message;
  if (local) {
    try {
      std::rethrow_exception(local);
    } catch (const ConfigError& e) {
      mine[0] = kConfigFault, message = e.what();
    } catch (const CheckpointError& e) {
      mine[0] = kCheckpointFault, message = e.what();
    } catch (const std::exception& e) {
      mine[0] = kOtherFault, message = e.what();
    } catch (...) {
      mine[0] = kOtherFault, message = "unknown exception";
    }
    mine[1] = static_cast<int64_t>(message.size());
  }
  const int n = engine.comm().size();
  std::vector<int64_t> all(2 * static_cast<size_t>(n));
  const std::vector<size_t> two(static_cast<size_t>(n), 2);
  all_gather_host(engine, mine, all.data(), two, DType::kI64);
  int first = -1;
  for (int r = 0; r < n && first < 0; ++r)
    if (all[2 * r] != kNoFault) first = r;
  if (first < 0) return;

  // Messages travel with a trailing NUL so that no rank contributes zero bytes.
  std::vector<size_t> counts(static_cast<size_t>(n));
  size_t total = 0;
  for (int r = 0; r < n; ++r) total += counts[r] = static_cast<size_t>(all[2 * r + 1]) + 1;
  message.push_back('\0');
  std::string gathered(total, '\0');
  all_gather_host(engine, message.data(), gathered.data(), counts, DType::kU8);
  if (local) std::rethrow_exception(local);

  size_t offset = 0;
  for (int r = 0; r < first; ++r) offset += counts[r];
  const std::string text = what + ": rank " + std::to_string(first) + " failed: " +
                           gathered.substr(offset, counts[first] - 1);
  switch (all[2 * first]) {
    case kConfigFault: throw ConfigError(text);
    case kCheckpointFault: throw CheckpointError(text);
    default: throw Error(text);
  }
}

// All ranks' byte strings, in rank order (a gather by all_gather: every record is small).
std::vector<std::string> all_gather_strings(Engine& engine, const std::string& mine) {
  const int n = engine.comm().size();
  const int64_t my_size = static_cast<int64_t>(mine.size()) + 1;
  std::vector<int64_t> sizes(static_cast<size_t>(n));
  const std::vector<size_t> ones(static_cast<size_t>(n), 1);
  all_gather_host(engine, &my_size, sizes.data(), ones, DType::kI64);
  std::vector<size_t> counts(sizes.begin(), sizes.end());
  size_t total = 0;
  for (size_t c : counts) total += c;
  std::string send = mine;
  send.push_back('\0');
  std::string recv(total, '\0');
  all_gather_host(engine, send.data(), recv.data(), counts, DType::kU8);
  std::vector<std::string> out;
  size_t offset = 0;
  for (size_t c : counts) {
    out.push_back(recv.substr(offset, c - 1));
    offset += c;
  }
  return out;
}

}  // namespace

std::vector<std::string> engine_states_of(Engine& engine, size_t t) {
  std::vector<std::string> states = {std::string(ckpt::kParamState)};
  if (engine.plan().tensors(static_cast<int>(t)).muon()) {
    if (has_momentum(engine.matrix_params())) states.emplace_back(kMomentumState);
    if (has_row_state(engine.matrix_params())) states.emplace_back(kRowSecondMomentState);
  } else {
    for (auto& name : elementwise_state_names(engine.elementwise_params())) states.push_back(std::move(name));
  }
  return states;
}

std::vector<StateRange> engine_state_ranges(Engine& engine, std::span<const MasterLikeState> extra) {
  ShardState& st = engine.shard_state();
  const auto ew_names = elementwise_state_names(engine.elementwise_params());
  std::vector<int64_t> flat_base(static_cast<size_t>(st.num_buckets()) + 1, 0);  // bucket start in the flat layout
  for (int b = 0; b < st.num_buckets(); ++b) flat_base[b + 1] = flat_base[b] + st.my_segment(b).count();
  std::vector<StateRange> ranges;
  size_t slice = 0;  // element-wise slices follow my_pieces order, skipping Muon tensors
  for (const LocalPiece& lp : st.my_pieces()) {
    ranges.push_back({lp.tensor, std::string(ckpt::kParamState), lp.tensor_offset, lp.length,
                      st.master_shard(lp.bucket) + lp.segment_offset});
    for (const MasterLikeState& x : extra)
      ranges.push_back({lp.tensor, x.name, lp.tensor_offset, lp.length,
                        x.data + flat_base[static_cast<size_t>(lp.bucket)] + lp.segment_offset});
    if (engine.plan().tensors(lp.tensor).muon()) continue;
    const size_t index = slice++;
    const optim::ElementwiseSlice& s = st.elementwise_slices().at(index);
    SHARDOPT_ASSERT(static_cast<int64_t>(s.count) == lp.length, "element-wise slice does not match its piece");
    for (size_t k = 0; k < ew_names.size(); ++k) {
      if (st.elementwise_state_dtype() == proto::STATE_F32)
        ranges.push_back({lp.tensor, ew_names[k], lp.tensor_offset, lp.length, s.state[k]});
      else
        ranges.push_back({lp.tensor, ew_names[k], lp.tensor_offset, lp.length, nullptr,
                          st.elementwise_compact().at(index).slot[k]});
    }
  }
  SHARDOPT_ASSERT(slice == st.elementwise_slices().size(), "element-wise slices left over");
  for (OwnedMatrix& om : st.owned_matrices()) {
    const optim::MuonMatrix& m = om.matrix;
    if (has_momentum(engine.matrix_params())) {
      if (st.matrix_state_dtype() == proto::STATE_F32)
        ranges.push_back({om.tensor, std::string(kMomentumState), 0, m.rows * m.cols, m.momentum});
      else
        ranges.push_back({om.tensor, std::string(kMomentumState), 0, m.rows * m.cols, nullptr, om.momentum});
    }
    if (has_row_state(engine.matrix_params()))
      ranges.push_back({om.tensor, std::string(kRowSecondMomentState), 0, m.rows, m.row_second_moment});
  }
  return ranges;
}


namespace {

std::string save_what(const std::filesystem::path& root, int64_t step) {
  return "save_checkpoint(" + ckpt::checkpoint_dir(root, step).string() + ")";
}

// Collective: rank 0 empties root/ckpt-<step>.tmp; returns that path.
std::filesystem::path prepare(Engine& engine, const std::filesystem::path& root, int64_t step) {
  const auto tmp = ckpt::temp_checkpoint_dir(root, step);
  std::exception_ptr fault;
  if (engine.comm().rank() == 0) {
    try {
      ckpt::prepare_save_dir(tmp);
    } catch (...) {
      fault = std::current_exception();
    }
  }
  agree(engine, fault, save_what(root, step) + " preparing the directory");
  return tmp;
}

// Copies between host memory and the engine's buffers (which are in its memory space): memcpy for a
// host engine (empty ReadBytes), the step backend's download / upload otherwise.
ckpt::ReadBytes read_bytes(Engine& engine) {
  if (engine.memory_space() == MemorySpace::kHost) return {};
  StepBackend* backend = &engine.step_backend();
  return [backend](void* host, const void* src, size_t bytes) { backend->download(host, src, bytes); };
}
void write_bytes(Engine& engine, void* dst, const void* host, size_t bytes) {
  if (bytes == 0) return;
  if (engine.memory_space() == MemorySpace::kHost) std::memcpy(dst, host, bytes);
  else engine.step_backend().upload(dst, host, bytes);
}

std::vector<ckpt::SavePiece> save_pieces(Engine& engine, std::span<const MasterLikeState> extra = {}) {
  std::vector<ckpt::SavePiece> pieces;
  for (const StateRange& r : engine_state_ranges(engine, extra)) {
    const std::string& name = engine.spec(static_cast<size_t>(r.tensor)).name();
    if (r.data != nullptr) {
      pieces.push_back(ckpt::SavePiece{name, r.state, r.global_offset, r.length, DType::kF32, r.data});
      continue;
    }
    pieces.push_back(ckpt::SavePiece{name, r.state, r.global_offset, r.length, storage_dtype(r.compact.dtype),
                                     r.compact.values});
    if (r.compact.dtype == proto::STATE_Q8) {
      SHARDOPT_ASSERT(r.global_offset % optim::kQ8BlockElems == 0, "q8 state range off a block boundary");
      pieces.push_back(ckpt::SavePiece{name, absmax_state(r.state), r.global_offset / optim::kQ8BlockElems,
                                       optim::q8_num_blocks(r.length), DType::kF32, r.compact.absmax});
    }
  }
  return pieces;
}

// Collective, after every rank wrote its shard (or failed to: `fault`): gathers the records to rank 0,
// which writes the manifest and publishes the directory; every rank learns the outcome.
SaveResult finalize(Engine& engine, const std::filesystem::path& root, int64_t step, const TrainerState& trainer,
                    const SaveCheckpointOptions& options, std::exception_ptr fault,
                    const proto::CheckpointShardRecord& record, std::span<const MasterLikeState> extra = {}) {
  comm::Communicator& comm = engine.comm();
  const std::string what = save_what(root, step);
  SaveResult result;
  result.step = step;
  std::string record_bytes;
  if (!fault) {
    try {
      result.bytes_written_by_me = static_cast<uint64_t>(record.file().size_bytes());
      record_bytes = ckpt::serialize_shard_record(record);
    } catch (...) {
      fault = std::current_exception();
    }
  }
  agree(engine, fault, what + " writing shard files");

  const std::vector<std::string> all_records = all_gather_strings(engine, record_bytes);
  if (comm.rank() == 0) {
    try {
      std::vector<proto::CheckpointShardRecord> records;
      for (const auto& bytes : all_records) records.push_back(ckpt::parse_shard_record(bytes));
      ckpt::CheckpointInfo info;
      info.step = step;
      info.world_size = comm.size();
      info.plan_hash = sharding::plan_hash(engine.plan());
      info.rng.set_seed(trainer.seed);
      info.rng.set_step(trainer.data_step);
      for (const auto& [k, v] : trainer.extra) (*info.rng.mutable_extra())[k] = v;
      info.metadata["elementwise_optimizer"] = optim::optimizer_kind_name(engine.elementwise_params().kind);
      if (engine.matrix_params())
        info.metadata["matrix_optimizer"] = optim::optimizer_kind_name(engine.matrix_params()->kind);
      info.metadata["elementwise_state_dtype"] =
          optim::state_dtype_name(engine.shard_state().elementwise_state_dtype());
      info.metadata["matrix_state_dtype"] = optim::state_dtype_name(engine.shard_state().matrix_state_dtype());
      info.metadata[std::string(kQ8CodeKey)] = optim::q8_code_name(optim::Q8CodeKind::kFloat8);
      info.metadata["zero_stage"] = std::to_string(engine.options().zero_stage);
      info.metadata["layout"] = sharding::layout_name(engine.options().layout);
      for (size_t t = 0; t < engine.num_tensors(); ++t) {
        proto::CheckpointTensor entry = ckpt::make_tensor_entry(engine.spec(t));
        for (const std::string& state : engine_states_of(engine, t)) {
          std::vector<int64_t> shape;
          if (state == kRowSecondMomentState) shape = {engine.spec(t).shape(0)};
          const optim::StateDType dtype = engine_state_dtype(engine, t, state);
          ckpt::add_state(entry, state, storage_dtype(dtype), shape);
          if (dtype == proto::STATE_Q8)
            ckpt::add_state(entry, absmax_state(state), DType::kF32,
                            {optim::q8_num_blocks(sharding::tensor_numel(engine.spec(t)))});
        }
        for (const MasterLikeState& x : extra) ckpt::add_state(entry, x.name, DType::kF32, {});
        info.tensors.push_back(std::move(entry));
      }
      ckpt::finalize_checkpoint(root, info, records, ckpt::FinalizeOptions{options.keep_last});
    } catch (...) {
      fault = std::current_exception();
    }
  }
  agree(engine, fault, what + " finalizing");
  result.dir = ckpt::checkpoint_dir(root, step);
  return result;
}

}  // namespace

SaveResult save_checkpoint(Engine& engine, const std::filesystem::path& root, const TrainerState& trainer,
                           const SaveCheckpointOptions& options, std::span<const MasterLikeState> extra) {
  const int64_t step = engine.optimizer_step();
  const auto tmp = prepare(engine, root, step);
  std::exception_ptr fault;
  proto::CheckpointShardRecord record;
  try {
    const std::vector<ckpt::SavePiece> pieces = save_pieces(engine, extra);
    if (engine.memory_space() == MemorySpace::kHost) {
      record = ckpt::save_shard(tmp, engine.comm().rank(), pieces);
    } else {
      // The writer reads host memory: this rank's state goes through one host copy.
      std::vector<unsigned char> host_copy;
      record = ckpt::save_shard(tmp, engine.comm().rank(), ckpt::snapshot_pieces(pieces, host_copy, read_bytes(engine)));
    }
  } catch (...) {
    fault = std::current_exception();
  }
  return finalize(engine, root, step, trainer, options, fault, record, extra);
}

AsyncCheckpointSaver::AsyncCheckpointSaver(Engine& engine) : engine_(engine) {}
AsyncCheckpointSaver::~AsyncCheckpointSaver() = default;

void AsyncCheckpointSaver::start(const std::filesystem::path& root, const TrainerState& trainer,
                                 const SaveCheckpointOptions& options) {
  if (pending_)
    throw ConfigError("AsyncCheckpointSaver::start: the save of step " + std::to_string(step_) +
                      " under " + root_.string() + " has not been finished");
  const int64_t step = engine_.optimizer_step();
  const auto tmp = prepare(engine_, root, step);
  std::exception_ptr fault;
  try {
    writer_.start(tmp, engine_.comm().rank(), save_pieces(engine_), read_bytes(engine_));
  } catch (...) {
    fault = std::current_exception();
  }
  // A rank that could not even start must not leave the others to fail later in finish().
  agree(engine_, fault, save_what(root, step) + " starting the background write");
  root_ = root;
  step_ = step;
  trainer_ = trainer;
  options_ = options;
  pending_ = true;
}

SaveResult AsyncCheckpointSaver::finish() {
  if (!pending_) throw ConfigError("AsyncCheckpointSaver::finish: no save in progress");
  pending_ = false;
  std::exception_ptr fault;
  proto::CheckpointShardRecord record;
  try {
    record = writer_.wait();
  } catch (...) {
    fault = std::current_exception();
  }
  return finalize(engine_, root_, step_, trainer_, options_, fault, record);
}

std::vector<std::span<float>> engine_state_arrays(Engine& engine) {
  std::vector<std::span<float>> out;
  for (const StateRange& r : engine_state_ranges(engine)) {
    if (r.data == nullptr)
      throw ConfigError("engine_state_arrays: tensor '" + engine.spec(static_cast<size_t>(r.tensor)).name() +
                        "' state '" + r.state + "' is stored compact (bf16/q8); only fp32 state travels as arrays");
    out.emplace_back(r.data, static_cast<size_t>(r.length));
  }
  return out;
}

TrainerState read_trainer_state(const std::filesystem::path& dir) {
  ckpt::CheckpointReader reader(dir);
  TrainerState trainer;
  const auto& rng = reader.manifest().rng();
  trainer.seed = rng.seed();
  trainer.data_step = rng.step();
  for (const auto& [k, v] : rng.extra()) trainer.extra[k] = v;
  return trainer;
}

TrainerState load_checkpoint(Engine& engine, const std::filesystem::path& dir, std::span<const MasterLikeState> extra) {
  // Staging holds, per range, either the engine's own storage bytes (the checkpoint has the same
  // dtype: copied as is, bit-identical) or fp32 values decoded from another dtype (encoded into the
  // engine's storage at commit: the state-dtype conversion).
  struct Commit {
    StateRange range;
    bool convert;            // staging holds fp32 to encode into range's storage
    size_t values_offset;    // bytes into staging
    size_t absmax_offset;    // same dtype q8: the absmax bytes
  };
  std::vector<unsigned char> staging;
  std::vector<Commit> commits;
  std::set<std::string> conversions;
  TrainerState trainer;
  int64_t step = 0;
  auto reserve = [&](size_t bytes) {
    const size_t at = (staging.size() + 7) / 8 * 8;
    staging.resize(at + bytes);
    return at;
  };

  std::exception_ptr fault;
  try {
    ckpt::CheckpointReader reader(dir);
    std::vector<ckpt::ExpectedTensor> expected;
    for (size_t t = 0; t < engine.num_tensors(); ++t) {
      std::vector<std::string> states = engine_states_of(engine, t);
      for (const MasterLikeState& x : extra) states.push_back(x.name);
      expected.push_back({engine.spec(t), std::move(states)});
    }
    // Extra tensors would mean a different model: refuse rather than silently ignore them.
    ckpt::check_compatible(reader.manifest(), expected, dir.string());
    const optim::Q8CodeKind q8_code = stored_q8_code(reader.manifest());

    // Plan every read before any I/O: a gap fails here, naming the range.
    const std::vector<StateRange> ranges = engine_state_ranges(engine, extra);
    for (const StateRange& r : ranges) {
      const std::string& name = engine.spec(static_cast<size_t>(r.tensor)).name();
      const auto& info = reader.state_info(name, r.state);
      const auto stored = info.dtype();
      if (stored != proto::F32 && stored != proto::BF16 && stored != proto::U8)
        throw ConfigError("load_checkpoint(" + dir.string() + "): tensor '" + name + "' state '" + r.state +
                          "' has dtype " + proto::DType_Name(stored) + "; optimizer states are F32, BF16 or U8 (q8)");
      const optim::StateDType from = state_dtype_of(stored);
      const optim::StateDType to = r.data ? proto::STATE_F32 : r.compact.dtype;
      reader.plan_reads(name, r.state, r.global_offset, r.length);
      if (from == proto::STATE_Q8) {
        const int64_t first = r.global_offset / optim::kQ8BlockElems;
        const int64_t last = (r.global_offset + r.length - 1) / optim::kQ8BlockElems;
        reader.plan_reads(name, absmax_state(r.state), first, last - first + 1);
      }
      // Same dtype is copied byte for byte, except q8 codes of an older code (re-encoded).
      const bool old_code = from == proto::STATE_Q8 && q8_code != optim::Q8CodeKind::kFloat8;
      Commit c{r, from != to || old_code, 0, 0};
      if (c.convert)
        conversions.insert("'" + r.state + "' " + optim::state_dtype_name(from) +
                           (old_code ? " (" + optim::q8_code_name(q8_code) + " code)" : "") + " -> " +
                           optim::state_dtype_name(to));
      const size_t value_bytes = static_cast<size_t>(r.length) * (c.convert ? 4 : dtype_size(storage_dtype(to)));
      c.values_offset = reserve(value_bytes);
      if (!c.convert && to == proto::STATE_Q8)
        c.absmax_offset = reserve(static_cast<size_t>(optim::q8_num_blocks(r.length)) * sizeof(float));
      commits.push_back(std::move(c));
    }
    for (Commit& c : commits) {
      const StateRange& r = c.range;
      const std::string& name = engine.spec(static_cast<size_t>(r.tensor)).name();
      unsigned char* dst = staging.data() + c.values_offset;
      if (!c.convert) {
        reader.read(name, r.state, r.global_offset, r.length, dst);
        if (r.compact.dtype == proto::STATE_Q8)
          reader.read(name, absmax_state(r.state), r.global_offset / optim::kQ8BlockElems,
                      optim::q8_num_blocks(r.length), staging.data() + c.absmax_offset);
        continue;
      }
      // Decode the stored dtype to fp32 for this range (any offset: q8 blocks are global).
      auto* out = reinterpret_cast<float*>(dst);
      const proto::DType stored = reader.state_info(name, r.state).dtype();
      if (stored == proto::F32) {
        reader.read(name, r.state, r.global_offset, r.length, out);
      } else if (stored == proto::BF16) {
        std::vector<bf16> raw(static_cast<size_t>(r.length));
        reader.read(name, r.state, r.global_offset, r.length, raw.data());
        for (int64_t i = 0; i < r.length; ++i) out[i] = bf16_to_float(raw[static_cast<size_t>(i)]);
      } else {
        const int64_t first = r.global_offset / optim::kQ8BlockElems;
        const int64_t last = (r.global_offset + r.length - 1) / optim::kQ8BlockElems;
        std::vector<uint8_t> codes(static_cast<size_t>(r.length));
        std::vector<float> absmax(static_cast<size_t>(last - first + 1));
        reader.read(name, r.state, r.global_offset, r.length, codes.data());
        reader.read(name, absmax_state(r.state), first, last - first + 1, absmax.data());
        const bool is_signed = !nonnegative_state(engine, r.state);
        for (int64_t i = 0; i < r.length; ++i)
          out[i] = optim::q8_code_value(q8_code, is_signed, codes[static_cast<size_t>(i)]) *
                   absmax[static_cast<size_t>((r.global_offset + i) / optim::kQ8BlockElems - first)];
      }
    }
    const auto& rng = reader.manifest().rng();
    trainer.seed = rng.seed();
    trainer.data_step = rng.step();
    for (const auto& [k, v] : rng.extra()) trainer.extra[k] = v;
    step = reader.step();
  } catch (...) {
    fault = std::current_exception();
  }
  // All ranks read successfully, or none commits anything.
  agree(engine, fault, "load_checkpoint(" + dir.string() + ")");

  if (!conversions.empty() && engine.comm().rank() == 0) {
    std::string list;
    for (const auto& c : conversions) list += (list.empty() ? "" : ", ") + c;
    std::cerr << "load_checkpoint(" << dir.string() << "): converting optimizer state dtypes: " << list << "\n";
  }
  // Commit: host memory written in place, device memory uploaded (q8 conversions encoded on the host
  // first, into `encoded`).
  std::vector<unsigned char> encoded;
  for (const Commit& c : commits) {
    const StateRange& r = c.range;
    const unsigned char* src = staging.data() + c.values_offset;
    const auto n = static_cast<size_t>(r.length);
    if (r.data) {  // fp32 state: staged as fp32 whether converted or copied
      write_bytes(engine, r.data, src, sizeof(float) * n);
      continue;
    }
    const size_t value_bytes = n * dtype_size(storage_dtype(r.compact.dtype));
    const size_t absmax_bytes =
        r.compact.dtype == proto::STATE_Q8 ? sizeof(float) * static_cast<size_t>(optim::q8_num_blocks(r.length)) : 0;
    const unsigned char* absmax = staging.data() + c.absmax_offset;
    if (c.convert) {
      const size_t absmax_at = (value_bytes + alignof(float) - 1) / alignof(float) * alignof(float);
      encoded.resize(absmax_at + absmax_bytes);
      optim::CompactState host = r.compact;
      host.values = encoded.data();
      host.absmax = absmax_bytes ? reinterpret_cast<float*>(encoded.data() + absmax_at) : nullptr;
      optim::store_compact(host, r.length, reinterpret_cast<const float*>(src));
      src = encoded.data();
      absmax = encoded.data() + absmax_at;
    }
    write_bytes(engine, r.compact.values, src, value_bytes);
    write_bytes(engine, r.compact.absmax, absmax, absmax_bytes);
  }
  engine.set_optimizer_step(step);
  engine.refresh_params();
  return trainer;
}

}  // namespace shardopt::runtime
