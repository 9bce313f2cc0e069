// The names of the shard layouts, as users type them (--layout) and as reports print them:
// "owned" (proto::SHARD_LAYOUT_OWNED) and "dim0" (proto::SHARD_LAYOUT_DIM0). The one mapping between
// the two; every flag parser and report uses it.
#pragma once

#include <string>
#include <string_view>

#include "proto/plan.pb.h"

namespace shardopt::sharding {

// "owned" or "dim0"; SHARD_LAYOUT_UNSPECIFIED prints as "owned", the layout it defaults to.
const char* layout_name(proto::ShardLayout layout);
// Inverse of layout_name; throws ConfigError naming the known names for anything else.
proto::ShardLayout parse_layout(std::string_view name);
// "owned | dim0": the known names, for help texts and errors.
std::string layout_names();

}  // namespace shardopt::sharding
