#include "proto/dtype_convert.h"
#include "sharding/planner.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <utility>
#include <set>
#include <string>

#include "base/dtype.h"
#include "base/error.h"
#include "sharding/lpt.h"
#include "sharding/routing.h"
#include "sharding/zero_math.h"

namespace shardopt::sharding {
namespace {

int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

std::string where(const proto::TensorSpec& s, int index) {
  return "parameter #" + std::to_string(index) + " '" + s.name() + "'";
}

std::string shape_str(const proto::TensorSpec& s) {
  std::string out = "[";
  for (int i = 0; i < s.shape_size(); ++i) out += (i ? ", " : "") + std::to_string(s.shape(i));
  return out + "]";
}

// Per-bucket working state while placing tensors.
struct BucketBuild {
  proto::DType dtype = proto::DTYPE_UNSPECIFIED;
  int64_t payload_bytes = 0;
  std::vector<int> members;  // tensor indices, in reverse registration order
};

void add_padding(proto::Bucket& b, int rank, int64_t offset, int64_t length) {
  if (length <= 0) return;
  auto* p = b.add_padding();
  p->set_rank(rank);
  p->set_offset(offset);
  p->set_length(length);
}

void add_piece(proto::TensorPlacement& t, int rank, int bucket, int64_t bucket_offset, int64_t tensor_offset,
               int64_t length) {
  if (length <= 0) return;
  auto* p = t.add_pieces();
  p->set_rank(rank);
  p->set_bucket(bucket);
  p->set_bucket_offset(bucket_offset);
  p->set_tensor_offset(tensor_offset);
  p->set_length(length);
}

int segment_of(const std::vector<int64_t>& bounds, int64_t offset) {
  // bounds[r] = start of segment r, bounds[N] = numel; the last r with bounds[r] <= offset.
  auto it = std::upper_bound(bounds.begin(), bounds.end() - 1, offset);
  return static_cast<int>(it - bounds.begin()) - 1;
}

// Given the placement (matrix positions fixed), chooses the segment boundaries that minimize the
// largest segment: boundary r+1 must lie in [lo_r, hi_r] (after every matrix of ranks <= r, before
// every matrix of ranks > r), aligned, with every segment >= a. Binary search on the largest segment
// size S with a greedy "as far right as the later segments allow" sweep. `fallback` (the first-pass
// boundaries) is feasible, so the result is never worse.
std::vector<int64_t> optimize_boundaries(const proto::ShardPlan& plan, const std::vector<std::vector<int>>& muon_of,
                                         const std::vector<int64_t>& fallback, int64_t a) {
  const int world = static_cast<int>(muon_of.size());
  const int64_t total = fallback[world];
  if (world == 1) return fallback;
  std::vector<int64_t> first_start(world, total), last_end(world, 0);
  for (int r = 0; r < world; ++r)
    for (int idx : muon_of[r]) {
      const auto& t = plan.tensors(idx);
      first_start[r] = std::min(first_start[r], t.bucket_offset());
      last_end[r] = std::max(last_end[r], round_up(t.bucket_offset() + t.numel(), a));
    }
  // lo[r], hi[r]: limits of boundary r+1 (r = 0..N-2).
  std::vector<int64_t> lo(world - 1), hi(world - 1);
  int64_t running_end = 0;
  for (int r = 0; r + 1 < world; ++r) {
    running_end = std::max(running_end, last_end[r]);
    lo[r] = running_end;
  }
  int64_t running_start = total - a;  // the last segment needs at least a elements
  for (int r = world - 2; r >= 0; --r) {
    running_start = std::min(running_start, first_start[r + 1] / a * a);
    hi[r] = running_start;
    running_start -= a;  // the segment before needs at least a elements too
  }
  auto sweep = [&](int64_t cap, std::vector<int64_t>* out) {
    int64_t b = 0;
    for (int r = 0; r + 1 < world; ++r) {
      const int64_t next = std::min(hi[r], (b + cap) / a * a);
      if (next < std::max(lo[r], b + a)) return false;
      if (out) (*out)[r + 1] = next;
      b = next;
    }
    return total - b <= cap && total - b >= a;
  };
  int64_t worst = 0;
  for (int r = 0; r < world; ++r) worst = std::max(worst, fallback[r + 1] - fallback[r]);
  int64_t low = std::max(a, (total + world - 1) / world / a * a), high = worst;  // high is feasible
  if (!sweep(high, nullptr)) return fallback;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2 / a * a;
    if (mid >= high) break;
    if (sweep(mid, nullptr))
      high = mid;
    else
      low = mid + a;
  }
  std::vector<int64_t> out(world + 1, 0);
  out[world] = total;
  sweep(high, &out);
  return out;
}

// Owned layout of one bucket. Buffer order: muon(0) ew... muon(1) ew... muon(N-1) ew..., where
// rank r's Muon matrices lie whole inside segment r and element-wise tensors fill the gaps; a
// segment boundary may cut an element-wise tensor (at an aligned offset) but never a matrix. The
// targets come from water-filling: segment r aims at max(M_r, L) elements with L chosen so that the
// targets add up to the bucket's total.
void layout_owned(proto::ShardPlan& plan, proto::Bucket& bucket, const std::vector<int>& members, int world) {
  const int64_t a = bucket.align_elems();
  std::vector<std::vector<int>> muon_of(world);
  std::vector<int> elementwise;
  std::vector<int64_t> muon_elems(world, 0);
  int64_t total = 0;
  for (int idx : members) {
    const auto& t = plan.tensors(idx);
    const int64_t sz = round_up(t.numel(), a);
    total += sz;
    if (t.muon()) {
      muon_of[t.owner()].push_back(idx);
      muon_elems[t.owner()] += sz;
    } else {
      elementwise.push_back(idx);
    }
  }
  // Water level L: sum_r max(M_r, L) == total. Pin the largest M_r above the level one by one.
  std::vector<int64_t> sorted = muon_elems;
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  double level = 0;
  int64_t pinned = 0;
  for (int j = 0; j < world; ++j) {
    const double share = static_cast<double>(total - pinned) / (world - j);
    if (static_cast<double>(sorted[j]) <= share) {
      level = share;
      break;
    }
    pinned += sorted[j];
  }

  std::vector<int64_t> bounds(world + 1, 0);
  int64_t pos = 0;
  double cumulative = 0;
  size_t next_ew = 0;
  auto place = [&](int idx) {
    auto& t = *plan.mutable_tensors(idx);
    t.set_bucket_offset(pos);
    bucket.add_tensors(idx);
    pos += round_up(t.numel(), a);
  };
  for (int r = 0; r < world; ++r) {
    for (int idx : muon_of[r]) place(idx);
    if (r == world - 1) {
      while (next_ew < elementwise.size()) place(elementwise[next_ew++]);
      if (pos < bounds[r] + a) pos = bounds[r] + a;  // minimum segment: filled by padding below
      bounds[r + 1] = pos;
      break;
    }
    cumulative += std::max(static_cast<double>(muon_elems[r]), level);
    const int64_t target = static_cast<int64_t>(std::llround(cumulative / static_cast<double>(a))) * a;
    const int64_t desired = std::max({target, pos, bounds[r] + a});
    while (pos < desired && next_ew < elementwise.size()) place(elementwise[next_ew++]);
    if (pos >= desired) {
      bounds[r + 1] = desired;
    } else {
      bounds[r + 1] = std::max(pos, bounds[r] + a);
      pos = bounds[r + 1];
    }
  }
  const int64_t numel = bounds[world];
  bounds = optimize_boundaries(plan, muon_of, bounds, a);
  bucket.set_numel(numel);
  for (int r = 0; r < world; ++r) {
    auto* s = bucket.add_segments();
    s->set_rank(r);
    s->set_offset(bounds[r]);
    s->set_count(bounds[r + 1] - bounds[r]);
  }
  // Pieces, and padding: the gaps between tensors (alignment, minimum segment size), cut at
  // segment boundaries.
  int64_t cursor = 0;
  auto pad_until = [&](int64_t end) {
    while (cursor < end) {
      const int r = segment_of(bounds, cursor);
      const int64_t stop = std::min(end, bounds[r + 1]);
      add_padding(bucket, r, cursor, stop - cursor);
      cursor = stop;
    }
  };
  for (int idx : bucket.tensors()) {
    auto& t = *plan.mutable_tensors(idx);
    const int64_t start = t.bucket_offset();
    pad_until(start);
    int64_t off = start;
    const int64_t end = start + t.numel();
    while (off < end) {
      const int r = segment_of(bounds, off);
      const int64_t stop = std::min(end, bounds[r + 1]);
      SHARDOPT_ASSERT(!t.muon() || (r == t.owner() && stop == end), "owned layout split a Muon matrix");
      add_piece(t, r, bucket.index(), off, off - start, stop - off);
      off = stop;
    }
    cursor = end;
  }
  pad_until(numel);
}

// dim0 rows of tensor t on rank r: (row_begin, row count). Rows are dealt in units as evenly as
// possible (the first units % N ranks get one more): a unit is one row, or, for an element-wise
// tensor under state_block_elems B, the fewest rows whose element count is a multiple of B, so that
// every piece starts on a state block (the last rank may get a short unit, or nothing).
std::pair<int64_t, int64_t> dim0_rows_of(const proto::TensorPlacement& t, int r, int world, int64_t block) {
  int64_t unit = 1;
  if (block > 0 && !t.muon()) unit = block / std::gcd(block, t.cols());
  const int64_t units = (t.rows() + unit - 1) / unit;
  const int64_t base = units / world, extra = units % world;
  const int64_t begin = std::min(t.rows(), (r * base + std::min<int64_t>(r, extra)) * unit);
  const int64_t end = std::min(t.rows(), begin + (base + (r < extra ? 1 : 0)) * unit);
  return {begin, end - begin};
}

// dim0 layout of one bucket: each tensor's rows are split as evenly as possible over the ranks
// (the first rows % N ranks get one more); every rank's slot of a tensor has the same padded size
// round_up(ceil(rows/N) * cols, align), so all segments are equal and the buffer is rank-major.
void layout_dim0(proto::ShardPlan& plan, proto::Bucket& bucket, const std::vector<int>& members, int world) {
  const int64_t a = bucket.align_elems();
  const int64_t block = plan.request().state_block_elems();
  std::vector<int64_t> slot_offset;
  int64_t segment = 0;
  for (int idx : members) {
    const auto& t = plan.tensors(idx);
    slot_offset.push_back(segment);
    int64_t max_rows = 0;
    for (int r = 0; r < world; ++r) max_rows = std::max(max_rows, dim0_rows_of(t, r, world, block).second);
    segment += round_up(max_rows * t.cols(), a);
  }
  bucket.set_numel(segment * world);
  for (int r = 0; r < world; ++r) {
    auto* s = bucket.add_segments();
    s->set_rank(r);
    s->set_offset(segment * r);
    s->set_count(segment);
  }
  for (size_t k = 0; k < members.size(); ++k) {
    auto& t = *plan.mutable_tensors(members[k]);
    bucket.add_tensors(members[k]);
    t.set_bucket_offset(-1);
    for (int r = 0; r < world; ++r) {
      const auto [row_begin, rows] = dim0_rows_of(t, r, world, block);
      auto* rr = t.add_row_ranges();
      rr->set_rank(r);
      rr->set_row_begin(row_begin);
      rr->set_row_end(row_begin + rows);
      const int64_t at = segment * r + slot_offset[k];
      add_piece(t, r, bucket.index(), at, row_begin * t.cols(), rows * t.cols());
    }
  }
  // Padding in buffer order: per rank, per slot, the tail after the rows.
  for (int r = 0; r < world; ++r)
    for (size_t k = 0; k < members.size(); ++k) {
      const auto& t = plan.tensors(members[k]);
      const int64_t rows = dim0_rows_of(t, r, world, block).second;
      const int64_t slot_end = k + 1 < members.size() ? slot_offset[k + 1] : segment;
      add_padding(bucket, r, segment * r + slot_offset[k] + rows * t.cols(),
                  slot_end - slot_offset[k] - rows * t.cols());
    }
}

void fill_stats(proto::ShardPlan& plan, const LptResult& lpt) {
  const auto& req = plan.request();
  const int world = req.world_size();
  auto& st = *plan.mutable_stats();
  std::vector<proto::RankStats> ranks(world);
  for (int r = 0; r < world; ++r) {
    ranks[r].set_rank(r);
    ranks[r].set_ns_load(lpt.load[r]);
  }
  int64_t buffer_bytes = 0, largest_bucket = 0, padding = 0, padding_bytes = 0;
  double max_imbalance = 1.0;
  for (auto& b : *plan.mutable_buckets()) {
    const int64_t esize = static_cast<int64_t>(dtype_size(b.dtype()));
    int64_t pad = 0, max_seg = 0;
    for (const auto& p : b.padding()) {
      pad += p.length();
      ranks[p.rank()].set_padding_elems(ranks[p.rank()].padding_elems() + p.length());
    }
    for (const auto& s : b.segments()) {
      max_seg = std::max(max_seg, s.count());
      auto& rs = ranks[s.rank()];
      rs.set_segment_elems(rs.segment_elems() + s.count());
      rs.set_segment_bytes(rs.segment_bytes() + s.count() * esize);
    }
    b.set_bytes(b.numel() * esize);
    b.set_padding_elems(pad);
    b.set_payload_elems(b.numel() - pad);
    b.set_max_segment_elems(max_seg);
    b.set_segment_imbalance(static_cast<double>(max_seg) * world / static_cast<double>(b.numel()));
    max_imbalance = std::max(max_imbalance, b.segment_imbalance());
    buffer_bytes += b.bytes();
    largest_bucket = std::max(largest_bucket, b.bytes());
    padding += pad;
    padding_bytes += pad * esize;
  }
  int64_t total = 0, muon_params = 0;
  int muon_matrices = 0;
  uint64_t total_cost = 0, max_cost = 0;
  for (const auto& t : plan.tensors()) {
    total += t.numel();
    if (t.muon()) {
      ++muon_matrices;
      muon_params += t.numel();
      total_cost += t.ns_cost();
      max_cost = std::max(max_cost, t.ns_cost());
      auto& o = ranks[t.owner()];
      o.set_owned_matrices(o.owned_matrices() + 1);
      o.set_owned_muon_elems(o.owned_muon_elems() + t.numel());
      if (req.layout() == proto::SHARD_LAYOUT_DIM0)
        for (const auto& p : t.pieces())
          if (p.rank() != t.owner())
            ranks[p.rank()].set_dim0_alltoall_send_elems(ranks[p.rank()].dim0_alltoall_send_elems() + p.length());
    } else {
      for (const auto& p : t.pieces())
        ranks[p.rank()].set_elementwise_elems(ranks[p.rank()].elementwise_elems() + p.length());
    }
  }
  st.set_total_params(total);
  st.set_muon_params(muon_params);
  st.set_elementwise_params(total - muon_params);
  st.set_muon_matrices(muon_matrices);
  st.set_total_ns_cost(total_cost);
  st.set_max_ns_cost(max_cost);
  const double lb = std::max(static_cast<double>(total_cost) / world, static_cast<double>(max_cost));
  st.set_ns_lower_bound(lb);
  const uint64_t max_load = *std::max_element(lpt.load.begin(), lpt.load.end());
  st.set_max_ns_load(max_load);
  st.set_ns_balance_ratio(lb > 0 ? static_cast<double>(max_load) / lb : 1.0);
  st.set_padding_elems(padding);
  st.set_padding_bytes(padding_bytes);
  st.set_buffer_bytes(buffer_bytes);
  st.set_largest_bucket_bytes(largest_bucket);
  st.set_max_segment_imbalance(max_imbalance);
  for (auto& rs : ranks) {
    rs.set_optimizer_state_bytes(req.muon_state_bytes_per_param() * static_cast<double>(rs.owned_muon_elems()) +
                                 req.elementwise_state_bytes_per_param() * static_cast<double>(rs.elementwise_elems()));
    // Resident working copies under the stage (ZeRO table): stage 3 also keeps one gathered bucket live.
    const double full = static_cast<double>(buffer_bytes), mine = static_cast<double>(rs.segment_bytes());
    rs.set_param_bytes(req.zero_stage() >= 3 ? mine + static_cast<double>(largest_bucket) : full);
    rs.set_grad_bytes(req.zero_stage() >= 2 ? mine : full);
    *st.add_ranks() = rs;
  }
}

}  // namespace

int64_t tensor_numel(const proto::TensorSpec& spec) {
  int64_t n = 1;
  for (int64_t d : spec.shape()) {
    if (d < 1) throw ConfigError("tensor '" + spec.name() + "': every dimension must be >= 1, shape is " + shape_str(spec));
    if (n > std::numeric_limits<int64_t>::max() / d)
      throw ConfigError("tensor '" + spec.name() + "': element count of shape " + shape_str(spec) + " overflows");
    n *= d;
  }
  return n;
}

proto::PlanRequest make_plan_request(const std::vector<proto::TensorSpec>& params, int world_size, int zero_stage,
                                     proto::ShardLayout layout, int64_t bucket_bytes) {
  proto::PlanRequest r;
  for (const auto& p : params) *r.add_params() = p;
  r.set_world_size(world_size);
  r.set_zero_stage(zero_stage);
  r.set_layout(layout);
  r.set_bucket_bytes(bucket_bytes);
  r.set_align_bytes(kDefaultAlignBytes);
  return r;
}

proto::PlanRequest normalize_request(const proto::PlanRequest& in) {
  proto::PlanRequest r = in;
  if (r.world_size() < 1) throw ConfigError("plan request: world_size must be >= 1, got " + std::to_string(r.world_size()));
  if (r.zero_stage() < 1 || r.zero_stage() > 3)
    throw ConfigError("plan request: zero_stage must be 1, 2 or 3, got " + std::to_string(r.zero_stage()));
  if (r.bucket_bytes() <= 0)
    throw ConfigError("plan request: bucket_bytes must be > 0, got " + std::to_string(r.bucket_bytes()));
  if (r.memory_cap_bytes() < 0)
    throw ConfigError("plan request: memory_cap_bytes must be >= 0 (0 = no cap), got " +
                      std::to_string(r.memory_cap_bytes()));
  if (r.align_bytes() == 0) r.set_align_bytes(kDefaultAlignBytes);
  if (r.align_bytes() < 0 || (r.align_bytes() & (r.align_bytes() - 1)) != 0)
    throw ConfigError("plan request: align_bytes must be a power of two, got " + std::to_string(r.align_bytes()));
  if (r.layout() == proto::SHARD_LAYOUT_UNSPECIFIED) r.set_layout(proto::SHARD_LAYOUT_OWNED);
  if (r.layout() != proto::SHARD_LAYOUT_OWNED && r.layout() != proto::SHARD_LAYOUT_DIM0)
    throw ConfigError("plan request: unknown layout " + std::to_string(static_cast<int>(r.layout())) +
                      ", expected owned (1) or dim0 (2)");
  *r.mutable_routing() = normalize_routing(r.routing());
  if (r.muon_state_bytes_per_param() == 0) r.set_muon_state_bytes_per_param(kMuonStateBytes);
  if (r.elementwise_state_bytes_per_param() == 0) {
    // Unknown group names (a custom optimizer) fall back to Adam's K: the conservative figure.
    double k = kAdamStateBytes;
    try {
      k = state_bytes_per_param(r.routing().elementwise_group());
    } catch (const ConfigError&) {
    }
    r.set_elementwise_state_bytes_per_param(k);
  }
  if (r.state_block_elems() < 0)
    throw ConfigError("plan request: state_block_elems must be >= 0 (0 = none), got " +
                      std::to_string(r.state_block_elems()));
  if (r.muon_state_bytes_per_param() < 0 || r.elementwise_state_bytes_per_param() < 0)
    throw ConfigError("plan request: state bytes per parameter must be >= 0");
  if (r.params_size() == 0) throw ConfigError("plan request: no parameters given");
  std::set<std::string> names;
  for (int i = 0; i < r.params_size(); ++i) {
    const auto& s = r.params(i);
    if (s.name().empty()) throw ConfigError("plan request: parameter #" + std::to_string(i) + " has an empty name");
    if (!names.insert(s.name()).second)
      throw ConfigError("plan request: duplicate parameter name '" + s.name() + "' (again at #" + std::to_string(i) + ")");
    for (int64_t d : s.shape())
      if (d < 1)
        throw ConfigError("plan request: " + where(s, i) + " has a zero-size or negative dimension, shape " +
                          shape_str(s) + "; every dimension must be >= 1");
    tensor_numel(s);
    try {
      dtype_size(s.dtype());
    } catch (const ConfigError&) {
      throw ConfigError("plan request: " + where(s, i) + " has no dtype (expected f32, bf16, f16, ...)");
    }
    if (s.block_rows_size() > 0) {
      if (s.shape_size() != 2)
        throw ConfigError("plan request: " + where(s, i) + " has block_rows but is not 2-D, shape " + shape_str(s));
      int64_t sum = 0;
      for (int64_t b : s.block_rows()) {
        if (b < 1) throw ConfigError("plan request: " + where(s, i) + " has a block of " + std::to_string(b) + " rows");
        sum += b;
      }
      if (sum != s.shape(0))
        throw ConfigError("plan request: " + where(s, i) + ": block_rows sum to " + std::to_string(sum) +
                          " but the matrix has " + std::to_string(s.shape(0)) + " rows");
    }
  }
  return r;
}

proto::ShardPlan make_plan(const proto::PlanRequest& request) {
  proto::ShardPlan plan;
  plan.set_format_version(kPlanFormatVersion);
  *plan.mutable_request() = normalize_request(request);
  const auto& req = plan.request();
  const int world = req.world_size();

  // Routing, shapes, costs.
  std::vector<uint64_t> costs;
  std::vector<double> state;
  std::vector<std::string> names;
  std::vector<int> muon_index;
  for (int i = 0; i < req.params_size(); ++i) {
    const auto& s = req.params(i);
    auto& t = *plan.add_tensors();
    t.set_index(i);
    t.set_name(s.name());
    *t.mutable_shape() = s.shape();
    t.set_dtype(s.dtype());
    *t.mutable_block_rows() = s.block_rows();
    const Route route = route_tensor(s, req.routing());
    t.set_group(route.group);
    t.set_muon(route.muon);
    t.set_owner(-1);
    t.set_numel(tensor_numel(s));
    t.set_rows(s.shape_size() >= 2 ? s.shape(0) : t.numel());
    t.set_cols(t.numel() / t.rows());
    if (route.muon) {
      t.set_ns_cost(ns_cost_blocks(t.rows(), t.cols(), {s.block_rows().begin(), s.block_rows().end()}));
      costs.push_back(t.ns_cost());
      state.push_back(req.muon_state_bytes_per_param() * static_cast<double>(t.numel()));
      names.push_back(s.name());
      muon_index.push_back(i);
    }
  }
  const LptResult lpt =
      assign_owners_lpt(costs, state, world, static_cast<double>(req.memory_cap_bytes()), names);
  for (size_t j = 0; j < muon_index.size(); ++j) plan.mutable_tensors(muon_index[j])->set_owner(lpt.owner[j]);

  // Buckets: reverse registration order, one open bucket per dtype.
  std::vector<BucketBuild> builds;
  std::map<int, int> open;  // dtype -> index into builds (ordered map: deterministic)
  for (int i = req.params_size() - 1; i >= 0; --i) {
    const auto& t = plan.tensors(i);
    const int64_t bytes = t.numel() * static_cast<int64_t>(dtype_size(t.dtype()));
    auto it = open.find(t.dtype());
    if (it == open.end() || (builds[it->second].payload_bytes > 0 && builds[it->second].payload_bytes + bytes > req.bucket_bytes())) {
      builds.push_back({t.dtype(), 0, {}});
      open[t.dtype()] = static_cast<int>(builds.size()) - 1;
      it = open.find(t.dtype());
    }
    builds[it->second].payload_bytes += bytes;
    builds[it->second].members.push_back(i);
  }
  for (size_t bi = 0; bi < builds.size(); ++bi) {
    auto& b = *plan.add_buckets();
    b.set_index(static_cast<int>(bi));
    b.set_dtype(builds[bi].dtype);
    int64_t align = std::max<int64_t>(1, req.align_bytes() / static_cast<int64_t>(dtype_size(builds[bi].dtype)));
    // Owned layout: tensor starts and segment boundaries on state blocks (blocks never straddle ranks).
    if (req.state_block_elems() > 0 && req.layout() == proto::SHARD_LAYOUT_OWNED)
      align = std::lcm(align, req.state_block_elems());
    b.set_align_elems(align);
    for (int idx : builds[bi].members) plan.mutable_tensors(idx)->set_bucket(static_cast<int>(bi));
    if (req.layout() == proto::SHARD_LAYOUT_DIM0)
      layout_dim0(plan, b, builds[bi].members, world);
    else
      layout_owned(plan, b, builds[bi].members, world);
  }
  fill_stats(plan, lpt);

  if (req.memory_cap_bytes() > 0)
    for (const auto& rs : plan.stats().ranks())
      if (rs.optimizer_state_bytes() > static_cast<double>(req.memory_cap_bytes()))
        throw ConfigError("plan: rank " + std::to_string(rs.rank()) + " needs " +
                          std::to_string(static_cast<int64_t>(rs.optimizer_state_bytes())) +
                          " bytes of optimizer state (Muon matrices plus its element-wise share), over the per-rank cap of " +
                          std::to_string(req.memory_cap_bytes()) + " bytes");
  return plan;
}

}  // namespace shardopt::sharding
