// Plan utilities: a stable hash (ranks compare it at init), a description of the first difference
// between two plans or requests (shown when ranks disagree), and a human-readable summary.
#pragma once

#include <cstdint>
#include <string>

#include "google/protobuf/message.h"
#include "proto/plan.pb.h"

namespace shardopt::sharding {

// Deterministic protobuf serialization (stable field order, no map reordering).
std::string deterministic_bytes(const google::protobuf::Message& message);
// 64-bit FNV-1a of deterministic_bytes: equal plans give equal hashes on every rank and build.
uint64_t stable_hash(const google::protobuf::Message& message);
inline uint64_t plan_hash(const proto::ShardPlan& plan) { return stable_hash(plan); }

// "" when equal; otherwise names the first differing field with both values, e.g.
// "1 difference; first: modified: request.world_size: 4 -> 8". Works on any two messages of the
// same type (plans, requests).
std::string describe_difference(const google::protobuf::Message& a, const google::protobuf::Message& b);

// Text summary for `shardopt plan`: configuration, balance, per-rank memory, buckets
// (at most max_buckets listed; 0 = all).
std::string plan_summary(const proto::ShardPlan& plan, int max_buckets = 16);

}  // namespace shardopt::sharding
