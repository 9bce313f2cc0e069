#include "base/env.h"

#include <cstdlib>
#include <string_view>

#include "base/error.h"

namespace shardopt::env {

const std::vector<Variable>& registry() {
  static const std::vector<Variable> vars = {
      {"SHARDOPT_COMM_TIMEOUT_MS", "300000",
       "Default timeout of every communication wait; a timeout names the operation and the missing ranks."},
      {"SHARDOPT_COMM_CHECKED", "0",
       "1 = every collective exchanges a fingerprint (op, dtype, counts, reduce op, root, index) first and a "
       "desync raises DesyncError at wait() naming both sides (comm/checked_communicator.h)."},
      {"SHARDOPT_LOG_LEVEL", "info", "Log verbosity: debug, info, warn, error."},
      {"SHARDOPT_SIM_BUILD_DIR", "",
       "SimGrid build holding bin/step_sim for `shardopt simulate` and scripts/simulate (default: the "
       "sim-build next to this build, then <source>/build-sim; docs/simulation.md)."},
      {"SHARDOPT_NUM_THREADS", "0",
       "Compute threads per process (optimizer kernels, matrices in parallel); 0 = the CPUs in this process's "
       "affinity mask divided by the ranks on this host (OMPI_COMM_WORLD_LOCAL_SIZE)."},
      {"SHARDOPT_NS_BF16_GEMM", "auto",
       "CPU Newton-Schulz in bf16: native = oneDNN's bf16 matmul, f32 = the bf16-rounded operands multiplied "
       "in fp32 (same numerics: bf16 x bf16 products are exact in fp32), auto = native with AMX or on AMD "
       "AVX512_BF16, f32 otherwise (optim/newton_schulz.h)."},
      {"SHARDOPT_CUDA_NS_SYMMETRIC_BLOCKS", "1",
       "Device engine: blocks k of Newton-Schulz's symmetric products (X·Xᵀ, A·A computed on the k(k+1)/2 blocks "
       "on and below the diagonal) for matrices whose smaller side k divides; 1 = full GEMMs (docs/gpu.md)."},
      {"SHARDOPT_CUDA_NS_COMBINE", "kernel",
       "Device engine: how a Newton-Schulz iteration adds b·A and a·X; kernel = a p×p pass between the GEMMs "
       "(measured), epilogue = inside cuBLASLt GEMMs with a separate input (no pass; unmeasured; docs/gpu.md). "
       "Shapes under SHARDOPT_CUDA_NS_SYMMETRIC_BLOCKS keep the kernel."},
      {"SHARDOPT_CUDA_COMPACT_KERNEL", "warp",
       "Device engine, bf16/q8 optimizer state: the kernel of the element-wise step and of Muon's momentum "
       "codec; warp = a warp per q8 block, element by element (measured), vector = runs of 4 elements per "
       "access with a block's loads issued first (same results bit for bit; unmeasured; docs/gpu.md)."},
      {"OMP_NUM_THREADS", "",
       "Read by OpenMP: threads of each oneDNN product in Newton-Schulz (the model's run one thread each; its "
       "parallelism is --model-threads). Unset: `shardopt "
       "train` gives each rank its share of the cores (SHARDOPT_NUM_THREADS's rule, divided by --ranks on the "
       "threads backend)."},
  };
  return vars;
}

static const Variable& find(const char* name) {
  for (const auto& v : registry())
    if (std::string_view(v.name) == name) return v;
  throw ConfigError(std::string("environment variable ") + name + " is not in the shardopt registry (base/env.cc)");
}

std::string get_string(const char* name) {
  const Variable& v = find(name);
  const char* value = std::getenv(name);
  return value ? std::string(value) : std::string(v.default_value);
}

int64_t get_int(const char* name) {
  std::string s = get_string(name);
  try {
    size_t pos = 0;
    int64_t out = std::stoll(s, &pos);
    if (pos == s.size()) return out;
  } catch (const std::exception&) {
  }
  throw ConfigError(std::string(name) + "='" + s + "' is not an integer");
}

bool get_bool(const char* name) {
  std::string s = get_string(name);
  if (s == "1" || s == "true" || s == "on" || s == "yes") return true;
  if (s == "0" || s == "false" || s == "off" || s == "no" || s.empty()) return false;
  throw ConfigError(std::string(name) + "='" + s + "' is not a boolean (use 0 or 1)");
}

}  // namespace shardopt::env
