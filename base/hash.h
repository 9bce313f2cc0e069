// 64-bit FNV-1a (Fowler–Noll–Vo), the one non-cryptographic hash the project uses for stable
// identities that must agree across ranks, builds and runs (plan hashes, per-rank counts).
// Constants from the FNV specification (draft-eastlake-fnv): offset basis 14695981039346656037,
// prime 1099511628211.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace shardopt {

inline constexpr uint64_t kFnv1a64OffsetBasis = 14695981039346656037ull;
inline constexpr uint64_t kFnv1a64Prime = 1099511628211ull;

// Continues a hash over more bytes: fnv1a64(a + b) == fnv1a64_update(fnv1a64(a), b).
constexpr uint64_t fnv1a64_update(uint64_t h, std::span<const unsigned char> bytes) {
  for (unsigned char c : bytes) {
    h ^= c;
    h *= kFnv1a64Prime;
  }
  return h;
}

constexpr uint64_t fnv1a64(std::span<const unsigned char> bytes) {
  return fnv1a64_update(kFnv1a64OffsetBasis, bytes);
}

inline uint64_t fnv1a64(std::string_view text) {
  return fnv1a64({reinterpret_cast<const unsigned char*>(text.data()), text.size()});
}

// Adds v as 8 little-endian bytes (the same on every host, unlike hashing its memory).
constexpr uint64_t fnv1a64_update_u64(uint64_t h, uint64_t v) {
  for (int b = 0; b < 8; ++b) {
    h ^= (v >> (8 * b)) & 0xffu;
    h *= kFnv1a64Prime;
  }
  return h;
}

}  // namespace shardopt
