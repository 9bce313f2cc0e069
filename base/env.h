// The one registry of environment variables shardopt reads. Every variable is declared in
// env.cc with its default and meaning; `shardopt env` and the README list them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardopt::env {

struct Variable {
  const char* name;
  const char* default_value;
  const char* meaning;
};

// All variables, in documentation order.
const std::vector<Variable>& registry();

// Reads a registered variable (throws ConfigError for unregistered names or unparsable values).
std::string get_string(const char* name);
int64_t get_int(const char* name);
bool get_bool(const char* name);

}  // namespace shardopt::env
