#include "sharding/layout.h"

#include <utility>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

constexpr std::pair<const char*, proto::ShardLayout> kLayouts[] = {
    {"owned", proto::SHARD_LAYOUT_OWNED},
    {"dim0", proto::SHARD_LAYOUT_DIM0},
};

}  // namespace

const char* layout_name(proto::ShardLayout layout) {
  if (layout == proto::SHARD_LAYOUT_UNSPECIFIED) return kLayouts[0].first;
  for (const auto& [name, value] : kLayouts)
    if (value == layout) return name;
  throw ConfigError("unknown shard layout value " + std::to_string(static_cast<int>(layout)) + " (known: " +
                    layout_names() + ")");
}

proto::ShardLayout parse_layout(std::string_view name) {
  for (const auto& [known, value] : kLayouts)
    if (name == known) return value;
  throw ConfigError("unknown shard layout '" + std::string(name) + "' (known: " + layout_names() + ")");
}

std::string layout_names() {
  std::string out;
  for (const auto& [name, value] : kLayouts) out += (out.empty() ? "" : " | ") + std::string(name);
  return out;
}

}  // namespace shardopt::sharding
