// Error types shared by every layer.
//
// Two tiers: a typed exception (subclass of shardopt::Error) for faults a caller can handle
// (timeout, peer gone, desync, bad config, corrupt file, non-finite numbers), and
// SHARDOPT_ASSERT for broken internal invariants, which aborts with the location.
// Messages say what was expected, what was found, and where.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace shardopt {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad input from the caller: shapes, options, configs that disagree.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A communication operation did not complete in time. The message names the operation,
// its sequence number and the ranks that never arrived.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// Ranks disagree about the collective they are in (op, dtype, count): a desync.
class DesyncError : public Error {
 public:
  using Error::Error;
};

// A peer failed or disappeared (process died, communicator aborted).
class PeerError : public Error {
 public:
  using Error::Error;
};

// A device (GPU) runtime or library call failed: no device, out of memory, a failed kernel
// launch or a sticky CUDA error. One type for every layer (optim/cuda, the NCCL backend), so a
// caller can tell a broken device from a lost peer (PeerError) or bad input (ConfigError).
class DeviceError : public Error {
 public:
  using Error::Error;
};

// A file is missing, truncated, corrupt or of the wrong version.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

// NaN or Inf found where finite values are required.
class NumericError : public Error {
 public:
  using Error::Error;
};

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "shardopt: internal invariant broken at %s:%d: %s %s\n", file, line, expr, msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace shardopt

// Invariant check that stays on in release builds: these guard memory safety.
#define SHARDOPT_ASSERT(cond, msg)                                                   \
  do {                                                                               \
    if (!(cond)) ::shardopt::assert_fail(#cond, __FILE__, __LINE__, std::string(msg)); \
  } while (0)
