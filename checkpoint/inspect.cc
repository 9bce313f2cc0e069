#include "proto/dtype_convert.h"
#include "checkpoint/inspect.h"

#include <fmt/format.h>

#include <map>

#include "base/clock.h"
#include "base/dtype.h"
#include "base/error.h"
#include "checkpoint/format.h"
#include "checkpoint/reader.h"
#include "checkpoint/writer.h"

namespace shardopt::ckpt {
namespace fs = std::filesystem;

InspectResult inspect_checkpoint(const fs::path& dir_or_root, std::ostream& out, const InspectOptions& options) {
  fs::path dir = dir_or_root;
  if (!fs::exists(dir / kManifestFileName)) {
    auto latest = latest_checkpoint(dir_or_root);
    if (!latest)
      throw CheckpointError("inspect: '" + dir_or_root.string() +
                            "' is neither a checkpoint (no manifest.pb) nor a directory holding complete checkpoints");
    dir = *latest;
  }
  try {
    CheckpointReader reader(dir);
    const auto& m = reader.manifest();
    InspectResult r;
    r.dir = dir;
    r.step = m.step();
    r.world_size = m.world_size();
    r.tensors = m.tensors_size();
    r.pieces = m.pieces_size();
    out << fmt::format("checkpoint {}\n  format version {}, step {}, saved by {} ranks, plan hash {:016x}\n",
                       dir.string(), m.format_version(), m.step(), m.world_size(), m.plan_hash());
    out << fmt::format("  rng: seed {}, step {}", m.rng().seed(), m.rng().step());
    for (const auto& [k, v] : std::map<std::string, std::string>(m.rng().extra().begin(), m.rng().extra().end()))
      out << fmt::format(", {}={}", k, v);
    out << "\n";
    for (const auto& [k, v] : std::map<std::string, std::string>(m.metadata().begin(), m.metadata().end()))
      out << fmt::format("  metadata {}: {}\n", k, v);
    std::map<std::string, std::pair<int, uint64_t>> per_state;  // state -> (tensors, bytes)
    std::map<std::pair<std::string, std::string>, int> pieces_of;
    for (const auto& p : m.pieces()) ++pieces_of[{p.tensor(), p.state()}];
    out << fmt::format("  {} tensors:\n", m.tensors_size());
    for (const auto& t : m.tensors()) {
      out << fmt::format("    {} {} {}\n", t.spec().name(), shape_string(t.spec().shape()), dtype_name(t.spec().dtype()));
      for (const auto& s : t.states()) {
        const uint64_t bytes = static_cast<uint64_t>(reader.state_numel(t.spec().name(), s.name())) * dtype_size(s.dtype());
        out << fmt::format("      {:<16} {} {} {} bytes in {} pieces\n", s.name(), dtype_name(s.dtype()),
                           shape_string(s.shape()), bytes, pieces_of[{t.spec().name(), s.name()}]);
        auto& agg = per_state[s.name()];
        ++agg.first;
        agg.second += bytes;
        r.data_bytes += bytes;
      }
    }
    out << "  states:\n";
    for (const auto& [name, agg] : per_state)
      out << fmt::format("    {:<16} {} tensors, {} bytes\n", name, agg.first, agg.second);
    uint64_t file_bytes = 0;
    for (const auto& f : m.files()) file_bytes += static_cast<uint64_t>(f.size_bytes());
    out << fmt::format("  {} shard files, {} bytes; {} pieces, {} data bytes\n", m.files_size(), file_bytes,
                       m.pieces_size(), r.data_bytes);
    if (options.verify) {
      const auto t0 = clock::now();
      r.verified_bytes = reader.validate_all();
      const double s = clock::seconds_since(t0);
      out << fmt::format("  verified: all {} pieces ({} bytes) match their CRC32C, every state fully covered "
                         "({:.2f} s)\n", m.pieces_size(), r.verified_bytes, s);
    }
    return r;
  } catch (const CheckpointError& e) {
    out << "FAILED: " << e.what() << "\n";
    throw;
  }
}

}  // namespace shardopt::ckpt
