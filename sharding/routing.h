// Routing of parameters to optimizer groups: 2-D hidden matrices go to Muon (whole-matrix
// Newton-Schulz on one owner rank); embeddings, the output head, norms, biases and every other
// non-2-D tensor go to the element-wise optimizer. An explicit TensorSpec.group wins.
#pragma once

#include <string>
#include <vector>

#include "proto/plan.pb.h"
#include "proto/types.pb.h"

namespace shardopt::sharding {

inline constexpr const char* kDefaultMuonGroup = "muon";
inline constexpr const char* kDefaultElementwiseGroup = "adamw";

// Name substrings (matched case-insensitively) that send a 2-D tensor to the element-wise group.
const std::vector<std::string>& default_elementwise_patterns();

// Fills empty fields of `rules` with the defaults above.
proto::RoutingRules normalize_routing(const proto::RoutingRules& rules);

struct Route {
  std::string group;
  bool muon = false;
};

// Decides the group of one tensor under normalized rules. ConfigError when a tensor is explicitly
// put into the Muon group but is not 2-D, or the rules are element-wise only.
Route route_tensor(const proto::TensorSpec& spec, const proto::RoutingRules& normalized_rules);

}  // namespace shardopt::sharding
