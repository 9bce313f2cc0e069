#include "comm/backend_util.h"

#include <cstdio>
#include <string>

#include "base/error.h"

namespace shardopt::comm::detail {

Traffic all_reduce_traffic(uint64_t bytes, int world) {
  const uint64_t v = 2 * bytes * static_cast<uint64_t>(world - 1) / static_cast<uint64_t>(world);
  return {v, v};
}

Traffic reduce_scatter_traffic(uint64_t total_bytes, uint64_t own_bytes, int world) {
  return {total_bytes - own_bytes, own_bytes * static_cast<uint64_t>(world - 1)};
}

Traffic all_gather_traffic(uint64_t total_bytes, uint64_t own_bytes, int world) {
  return {own_bytes * static_cast<uint64_t>(world - 1), total_bytes - own_bytes};
}

Traffic rooted_traffic(uint64_t bytes, int world) {
  const uint64_t v = bytes * static_cast<uint64_t>(world - 1) / static_cast<uint64_t>(world);
  return {v, v};
}

Traffic all_to_all_traffic(std::span<const size_t> send_counts, std::span<const size_t> recv_counts,
                           size_t elem_bytes, int self) {
  Traffic t;
  for (size_t p = 0; p < send_counts.size(); ++p)
    if (static_cast<int>(p) != self) t.sent += send_counts[p] * elem_bytes;
  for (size_t p = 0; p < recv_counts.size(); ++p)
    if (static_cast<int>(p) != self) t.received += recv_counts[p] * elem_bytes;
  return t;
}

bool Fingerprint::same_collective(const Fingerprint& o) const {
  return index == o.index && kind == o.kind && dtype == o.dtype && op == o.op && root == o.root && count == o.count &&
         counts_hash == o.counts_hash;
}

std::string Fingerprint::describe() const {
  std::string s = std::string(op_kind_name(kind)) + " #" + std::to_string(index);
  if (kind == OpKind::kBarrier || kind == OpKind::kSplit) return s;
  s += " (" + std::string(dtype_name(dtype));
  switch (kind) {
    case OpKind::kReduceScatter:
    case OpKind::kAllGather: {
      char h[32];
      std::snprintf(h, sizeof h, "%016llx", static_cast<unsigned long long>(counts_hash));
      s += ", total count " + std::to_string(count) + ", per-rank counts hash " + h;
      break;
    }
    case OpKind::kAllToAll: break;
    default: s += ", count " + std::to_string(count);
  }
  if (kind == OpKind::kAllReduce || kind == OpKind::kReduceScatter || kind == OpKind::kReduce)
    s += ", op " + std::string(reduce_op_name(op));
  if (kind == OpKind::kReduce || kind == OpKind::kBroadcast) s += ", root " + std::to_string(root);
  return s + ")";
}

uint64_t hash_counts(std::span<const size_t> counts) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the 8-byte counts
  for (size_t c : counts) {
    uint64_t v = c;
    for (int b = 0; b < 8; ++b) {
      h ^= (v >> (8 * b)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  return h;
}

uint64_t sum_counts(std::span<const size_t> counts) {
  uint64_t s = 0;
  for (size_t c : counts) s += c;
  return s;
}

std::string format_ranks(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s + "]";
}

void check_counts_size(OpKind kind, std::span<const size_t> counts, int world, const char* what) {
  if (counts.size() != static_cast<size_t>(world))
    throw ConfigError(std::string(op_kind_name(kind)) + ": " + what + " has " + std::to_string(counts.size()) +
                      " entries, expected one per rank (" + std::to_string(world) + ")");
}

void check_rank_arg(OpKind kind, int rank, int world, const char* what) {
  if (rank < 0 || rank >= world)
    throw ConfigError(std::string(op_kind_name(kind)) + ": " + what + " " + std::to_string(rank) +
                      " is outside the communicator [0, " + std::to_string(world) + ")");
}

void check_buffer(OpKind kind, const void* ptr, size_t count, const char* what) {
  if (count > 0 && ptr == nullptr)
    throw ConfigError(std::string(op_kind_name(kind)) + ": " + what + " is null for " + std::to_string(count) +
                      " elements");
}

void check_reducible(OpKind kind, DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kBF16:
    case DType::kF16:
    case DType::kI32:
    case DType::kI64:
    case DType::kU8: return;
    default:
      throw ConfigError(std::string(op_kind_name(kind)) + ": dtype " + std::string(dtype_name(dtype)) +
                        " cannot be reduced (expected f32, bf16, f16, i32, i64 or u8)");
  }
}

}  // namespace shardopt::comm::detail
