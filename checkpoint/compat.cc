#include "checkpoint/compat.h"

#include <set>
#include <unordered_map>

#include "base/error.h"
#include "checkpoint/format.h"

namespace shardopt::ckpt {

void check_compatible(const proto::CheckpointManifest& manifest, std::span<const ExpectedTensor> expected,
                      const std::string& where, const CompatOptions& options) {
  std::unordered_map<std::string, const proto::CheckpointTensor*> saved;
  for (const auto& t : manifest.tensors()) saved.emplace(t.spec().name(), &t);
  std::set<std::string> wanted;
  for (const auto& e : expected) {
    const std::string& name = e.spec.name();
    wanted.insert(name);
    auto it = saved.find(name);
    if (it == saved.end())
      throw CheckpointError("checkpoint '" + where + "' has no tensor '" + name + "' (model shape " +
                            shape_string(e.spec.shape()) + "); it holds " + std::to_string(saved.size()) + " tensors");
    const auto& t = *it->second;
    if (t.spec().shape().size() != e.spec.shape().size() ||
        !std::equal(t.spec().shape().begin(), t.spec().shape().end(), e.spec.shape().begin()))
      throw ConfigError("tensor '" + name + "': model shape " + shape_string(e.spec.shape()) + ", checkpoint '" + where +
                        "' shape " + shape_string(t.spec().shape()));
    for (const auto& state : e.states) {
      bool found = false;
      std::string have;
      for (const auto& s : t.states()) {
        found = found || s.name() == state;
        have += (have.empty() ? "" : ", ") + s.name();
      }
      if (!found)
        throw ConfigError("tensor '" + name + "': the optimizer needs state '" + state + "' but checkpoint '" + where +
                          "' has only {" + have + "} (optimizer changed since the save?)");
    }
  }
  if (!options.allow_extra_tensors)
    for (const auto& t : manifest.tensors())
      if (!wanted.count(t.spec().name()))
        throw ConfigError("checkpoint '" + where + "' has tensor '" + t.spec().name() + "' (shape " +
                          shape_string(t.spec().shape()) + ") that the model does not have");
}

}  // namespace shardopt::ckpt
