#include "sharding/routing.h"

#include <algorithm>
#include <cctype>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

std::string lowercase(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

}  // namespace

const std::vector<std::string>& default_elementwise_patterns() {
  static const std::vector<std::string> patterns = {"embed", "lm_head", "head", "norm", "bias", "wte", "wpe"};
  return patterns;
}

proto::RoutingRules normalize_routing(const proto::RoutingRules& rules) {
  proto::RoutingRules out = rules;
  if (out.muon_group().empty()) out.set_muon_group(kDefaultMuonGroup);
  if (out.elementwise_group().empty()) out.set_elementwise_group(kDefaultElementwiseGroup);
  if (out.muon_group() == out.elementwise_group())
    throw ConfigError("routing: the Muon group and the element-wise group must differ, both are '" +
                      out.muon_group() + "'");
  if (out.elementwise_patterns().empty())
    for (const auto& p : default_elementwise_patterns()) out.add_elementwise_patterns(p);
  for (auto& p : *out.mutable_elementwise_patterns()) {
    if (p.empty()) throw ConfigError("routing: an element-wise name pattern is empty (it would match every tensor)");
    p = lowercase(p);
  }
  return out;
}

Route route_tensor(const proto::TensorSpec& spec, const proto::RoutingRules& rules) {
  const bool is_matrix = spec.shape_size() == 2;
  if (!spec.group().empty()) {
    const bool muon = spec.group() == rules.muon_group();
    if (muon && rules.elementwise_only())
      throw ConfigError("routing: tensor '" + spec.name() + "' asks for group '" + spec.group() +
                        "' but the run is element-wise only");
    if (muon && !is_matrix)
      throw ConfigError("routing: tensor '" + spec.name() + "' asks for group '" + spec.group() +
                        "', which needs a 2-D matrix, but its shape has " + std::to_string(spec.shape_size()) +
                        " dimensions");
    return {spec.group(), muon};
  }
  if (rules.elementwise_only() || !is_matrix) return {rules.elementwise_group(), false};
  const std::string name = lowercase(spec.name());
  for (const auto& p : rules.elementwise_patterns())
    if (name.find(p) != std::string::npos) return {rules.elementwise_group(), false};
  return {rules.muon_group(), true};
}

}  // namespace shardopt::sharding
