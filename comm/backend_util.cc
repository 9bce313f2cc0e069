#include "comm/backend_util.h"

#include <cstdio>
#include <string>

#include "base/error.h"
#include "base/hash.h"

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
  uint64_t h = kFnv1a64OffsetBasis;  // FNV-1a over the counts as 8-byte little-endian words
  for (size_t c : counts) h = fnv1a64_update_u64(h, c);
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

void check_dtype(OpKind kind, DType dtype) {
  if (dtype == DType::kUnspecified)
    throw ConfigError(std::string(op_kind_name(kind)) + ": dtype is unspecified");
  (void)dtype_size(dtype);  // ConfigError for any other unknown dtype
}

void check_all_reduce_args(const void* send, const void* recv, size_t count, DType dtype) {
  check_reducible(OpKind::kAllReduce, dtype);
  check_buffer(OpKind::kAllReduce, send, count, "send buffer");
  check_buffer(OpKind::kAllReduce, recv, count, "recv buffer");
}

void check_reduce_scatter_args(const void* send, const void* recv, std::span<const size_t> counts, DType dtype,
                               int rank, int world) {
  check_reducible(OpKind::kReduceScatter, dtype);
  check_counts_size(OpKind::kReduceScatter, counts, world, "counts");
  check_buffer(OpKind::kReduceScatter, send, sum_counts(counts), "send buffer");
  check_buffer(OpKind::kReduceScatter, recv, counts[static_cast<size_t>(rank)], "recv buffer");
}

void check_all_gather_args(const void* send, const void* recv, std::span<const size_t> counts, DType dtype, int rank,
                           int world) {
  check_dtype(OpKind::kAllGather, dtype);
  check_counts_size(OpKind::kAllGather, counts, world, "counts");
  check_buffer(OpKind::kAllGather, send, counts[static_cast<size_t>(rank)], "send buffer");
  check_buffer(OpKind::kAllGather, recv, sum_counts(counts), "recv buffer");
}

void check_reduce_args(const void* send, const void* recv, size_t count, DType dtype, int root, int rank, int world) {
  check_reducible(OpKind::kReduce, dtype);
  check_rank_arg(OpKind::kReduce, root, world, "root");
  check_buffer(OpKind::kReduce, send, count, "send buffer");
  if (rank == root) check_buffer(OpKind::kReduce, recv, count, "recv buffer");
}

void check_broadcast_args(const void* buf, size_t count, DType dtype, int root, int world) {
  check_dtype(OpKind::kBroadcast, dtype);
  check_rank_arg(OpKind::kBroadcast, root, world, "root");
  check_buffer(OpKind::kBroadcast, buf, count, "buffer");
}

void check_all_to_all_args(const void* send, std::span<const size_t> send_counts, const void* recv,
                           std::span<const size_t> recv_counts, DType dtype, int world) {
  check_dtype(OpKind::kAllToAll, dtype);
  check_counts_size(OpKind::kAllToAll, send_counts, world, "send_counts");
  check_counts_size(OpKind::kAllToAll, recv_counts, world, "recv_counts");
  check_buffer(OpKind::kAllToAll, send, sum_counts(send_counts), "send buffer");
  check_buffer(OpKind::kAllToAll, recv, sum_counts(recv_counts), "recv buffer");
}

void check_p2p_args(OpKind kind, const void* send, size_t send_count, int dst, const void* recv, size_t recv_count,
                    int src, DType dtype, int world) {
  check_dtype(kind, dtype);
  if (kind != OpKind::kRecv) check_rank_arg(kind, dst, world, kind == OpKind::kSend ? "peer" : "destination");
  if (kind != OpKind::kSend) check_rank_arg(kind, src, world, kind == OpKind::kRecv ? "peer" : "source");
  if (kind != OpKind::kRecv) check_buffer(kind, send, send_count, kind == OpKind::kSend ? "buffer" : "send buffer");
  if (kind != OpKind::kSend) check_buffer(kind, recv, recv_count, kind == OpKind::kRecv ? "buffer" : "recv buffer");
}

Traffic p2p_traffic(size_t send_count, int dst, size_t recv_count, int src, DType dtype, int self) {
  const uint64_t esz = dtype_size(dtype);
  return {dst >= 0 && dst != self ? send_count * esz : 0, src >= 0 && src != self ? recv_count * esz : 0};
}

}  // namespace shardopt::comm::detail
