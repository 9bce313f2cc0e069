// The sharding planner: parameter specs + world -> ShardPlan. Pure and deterministic: the same
// request gives a byte-identical plan on every rank (no unordered iteration, stable tie-breaks).
//
// Buckets: tensors are packed in REVERSE registration order (gradients become ready last layer
// first), one open bucket per dtype, up to bucket_bytes (a larger tensor gets a bucket of its own).
// Every tensor lies contiguously in one bucket in the owned layout; every bucket buffer is split
// into N contiguous rank segments (segment r = rank r's reduce-scatter output / all-gather input).
//
// Collective rule (checked by the tests, relied on by the runtime): in every bucket the segments
// are in rank order and tile [0, numel) exactly; every segment offset and count is a multiple of the
// bucket's align_elems and every count is >= align_elems (no rank ever has an empty or misaligned
// piece of a collective). In the dim0 layout all segment counts of a bucket are equal; in the owned
// layout they differ (use variable-count collectives, or pad to max_segment_elems).
//
// Block-wise quantized optimizer state (request.state_block_elems = B > 0): every piece of an
// element-wise tensor starts at a tensor offset that is a multiple of B. Owned layout: the element
// alignment becomes lcm(align, B) (tensor starts and segment boundaries on blocks). Dim0 layout: an
// element-wise tensor's rows are dealt in units of B / gcd(B, cols) rows. Muon matrices need nothing
// (their optimizer state lives whole on the owner).
#pragma once

#include <cstdint>
#include <vector>

#include "proto/plan.pb.h"
#include "proto/types.pb.h"

namespace shardopt::sharding {

inline constexpr uint32_t kPlanFormatVersion = 1;
inline constexpr int64_t kDefaultBucketBytes = int64_t{25} << 20;
inline constexpr int64_t kDefaultAlignBytes = 64;

// A request with the usual defaults (routing defaults are filled in by normalize_request).
proto::PlanRequest make_plan_request(const std::vector<proto::TensorSpec>& params, int world_size, int zero_stage = 2,
                                     proto::ShardLayout layout = proto::SHARD_LAYOUT_OWNED,
                                     int64_t bucket_bytes = kDefaultBucketBytes);

// Validates a request and fills every default (layout, alignment, routing, state bytes). Throws
// ConfigError for N < 1, a stage outside 1..3, bucket_bytes <= 0, an alignment that is not a power of
// two, empty or duplicate names, zero-size dimensions, unspecified dtypes, block_rows that do not sum
// to the row count, or a negative memory cap.
proto::PlanRequest normalize_request(const proto::PlanRequest& request);

// Builds the plan (normalizes first). Throws ConfigError as above, and when the memory cap cannot be
// met.
proto::ShardPlan make_plan(const proto::PlanRequest& request);

// Small helpers on a plan's tensors.
int64_t tensor_numel(const proto::TensorSpec& spec);  // product of the shape (1 for a 0-D tensor)

}  // namespace shardopt::sharding
