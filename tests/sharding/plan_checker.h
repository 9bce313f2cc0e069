// Independent checks of a ShardPlan's invariants, written from the specification (not from the
// planner's code): every element owned exactly once, pieces consistent with segments, the collective
// rule, Muon matrices whole in the owned layout, even row splits in dim0.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "proto/plan.pb.h"

namespace shardopt::sharding::testing {

inline int64_t elem_size(proto::DType d) {
  switch (d) {
    case proto::F32: case proto::I32: return 4;
    case proto::BF16: case proto::F16: return 2;
    case proto::I64: return 8;
    default: return 1;
  }
}

inline int64_t numel_of(const proto::TensorSpec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape()) n *= d;
  return n;
}

inline uint64_t ref_ns_cost(int64_t m, int64_t n) {
  const uint64_t p = static_cast<uint64_t>(std::min(m, n)), q = static_cast<uint64_t>(std::max(m, n));
  return q * p * p;
}

// Routing expected from the defaults in the specification.
inline bool expect_muon(const proto::TensorSpec& s) {
  if (!s.group().empty()) return s.group() == "muon";
  if (s.shape_size() != 2) return false;
  std::string name = s.name();
  std::transform(name.begin(), name.end(), name.begin(), ::tolower);
  for (const char* p : {"embed", "lm_head", "head", "norm", "bias", "wte", "wpe"})
    if (name.find(p) != std::string::npos) return false;
  return true;
}

// Checks every invariant; `ctx` is printed with failures.
inline void check_plan(const proto::PlanRequest& req, const proto::ShardPlan& plan, const std::string& ctx,
                       bool default_routing = true) {
  SCOPED_TRACE(ctx);
  const int n = req.world_size();
  const bool dim0 = req.layout() == proto::SHARD_LAYOUT_DIM0;
  const int64_t align_bytes = req.align_bytes() ? req.align_bytes() : 64;
  ASSERT_EQ(plan.tensors_size(), req.params_size());
  ASSERT_EQ(plan.stats().ranks_size(), n);

  // Buckets: segment tiling and the collective rule; coverage of every buffer element.
  std::vector<std::vector<int>> covered(plan.buckets_size());
  for (int b = 0; b < plan.buckets_size(); ++b) {
    const auto& bk = plan.buckets(b);
    ASSERT_EQ(bk.index(), b);
    const int64_t a = std::max<int64_t>(1, align_bytes / elem_size(bk.dtype()));
    ASSERT_EQ(bk.align_elems(), a);
    ASSERT_EQ(bk.segments_size(), n);
    int64_t at = 0;
    for (int r = 0; r < n; ++r) {
      const auto& s = bk.segments(r);
      ASSERT_EQ(s.rank(), r);
      ASSERT_EQ(s.offset(), at) << "bucket " << b << " segments do not tile";
      ASSERT_EQ(s.offset() % a, 0) << "misaligned segment, bucket " << b << " rank " << r;
      ASSERT_EQ(s.count() % a, 0) << "misaligned segment count, bucket " << b << " rank " << r;
      ASSERT_GE(s.count(), a) << "empty segment, bucket " << b << " rank " << r;
      if (dim0) {
        ASSERT_EQ(s.count(), bk.segments(0).count()) << "dim0 segments must be equal";
      }
      at += s.count();
    }
    ASSERT_EQ(at, bk.numel());
    ASSERT_EQ(bk.bytes(), bk.numel() * elem_size(bk.dtype()));
    covered[b].assign(bk.numel(), 0);
    int64_t pad = 0;
    for (const auto& p : bk.padding()) {
      ASSERT_GT(p.length(), 0);
      ASSERT_GE(p.offset(), bk.segments(p.rank()).offset());
      ASSERT_LE(p.offset() + p.length(), bk.segments(p.rank()).offset() + bk.segments(p.rank()).count())
          << "padding outside its rank's segment";
      for (int64_t i = p.offset(); i < p.offset() + p.length(); ++i) covered[b][i]++;
      pad += p.length();
    }
    ASSERT_EQ(bk.padding_elems(), pad);
  }

  // Tensors: pieces cover the tensor exactly once and sit in the segment of their rank.
  std::vector<std::vector<int64_t>> bucket_payload(plan.buckets_size());
  for (int i = 0; i < req.params_size(); ++i) {
    const auto& spec = req.params(i);
    const auto& t = plan.tensors(i);
    SCOPED_TRACE(spec.name());
    ASSERT_EQ(t.name(), spec.name());
    const int64_t numel = numel_of(spec);
    ASSERT_EQ(t.numel(), numel);
    if (default_routing) {
      ASSERT_EQ(t.muon(), !req.routing().elementwise_only() && expect_muon(spec));
    }
    if (t.muon()) {
      ASSERT_GE(t.owner(), 0);
      ASSERT_LT(t.owner(), n);
      uint64_t cost = 0;
      if (spec.block_rows_size() == 0) cost = ref_ns_cost(spec.shape(0), spec.shape(1));
      for (int64_t br : spec.block_rows()) cost += ref_ns_cost(br, spec.shape(1));
      ASSERT_EQ(t.ns_cost(), cost);
    } else {
      ASSERT_EQ(t.owner(), -1);
    }
    ASSERT_GE(t.bucket(), 0);
    ASSERT_LT(t.bucket(), plan.buckets_size());
    const auto& bk = plan.buckets(t.bucket());
    ASSERT_EQ(bk.dtype(), spec.dtype());
    const int64_t a = bk.align_elems();
    std::vector<int> mark(numel, 0);
    int64_t slot = -1;
    for (const auto& p : t.pieces()) {
      ASSERT_EQ(p.bucket(), t.bucket());
      ASSERT_GT(p.length(), 0);
      ASSERT_GE(p.tensor_offset(), 0);
      ASSERT_LE(p.tensor_offset() + p.length(), numel);
      const auto& seg = bk.segments(p.rank());
      ASSERT_GE(p.bucket_offset(), seg.offset()) << "piece before its rank's segment";
      ASSERT_LE(p.bucket_offset() + p.length(), seg.offset() + seg.count()) << "piece past its rank's segment";
      for (int64_t k = 0; k < p.length(); ++k) {
        mark[p.tensor_offset() + k]++;
        covered[t.bucket()][p.bucket_offset() + k]++;
      }
      if (!dim0) {
        // Contiguous: the tensor's element e is at bucket_offset + e.
        ASSERT_EQ(p.bucket_offset() - t.bucket_offset(), p.tensor_offset()) << "tensor not contiguous";
      } else {
        const int64_t rel = p.bucket_offset() - seg.offset();
        if (slot < 0) slot = rel;
        ASSERT_EQ(rel, slot) << "dim0 slot differs between ranks";
        ASSERT_EQ(rel % a, 0);
      }
    }
    for (int64_t e = 0; e < numel; ++e) ASSERT_EQ(mark[e], 1) << "element " << e << " covered " << mark[e] << " times";
    if (!dim0) {
      ASSERT_EQ(t.bucket_offset() % a, 0) << "tensor start misaligned";
      if (t.muon()) {
        ASSERT_EQ(t.pieces_size(), 1) << "Muon matrix split in the owned layout";
        ASSERT_EQ(t.pieces(0).rank(), t.owner());
      }
    } else {
      const int64_t rows = spec.shape_size() >= 2 ? spec.shape(0) : numel;
      const int64_t cols = numel / rows;
      ASSERT_EQ(t.row_ranges_size(), n);
      int64_t row = 0, lo = rows, hi = 0;
      for (int r = 0; r < n; ++r) {
        const auto& rr = t.row_ranges(r);
        ASSERT_EQ(rr.rank(), r);
        ASSERT_EQ(rr.row_begin(), row);
        ASSERT_GE(rr.row_end(), rr.row_begin());
        const int64_t cnt = rr.row_end() - rr.row_begin();
        lo = std::min(lo, cnt);
        hi = std::max(hi, cnt);
        row = rr.row_end();
        // The rank's piece holds exactly its rows.
        int64_t held = 0;
        for (const auto& p : t.pieces())
          if (p.rank() == r) {
            ASSERT_EQ(p.tensor_offset(), rr.row_begin() * cols);
            held += p.length();
          }
        ASSERT_EQ(held, cnt * cols);
      }
      ASSERT_EQ(row, rows);
      ASSERT_LE(hi - lo, 1) << "rows not split as evenly as possible";
    }
  }
  for (int b = 0; b < plan.buckets_size(); ++b)
    for (size_t e = 0; e < covered[b].size(); ++e)
      ASSERT_EQ(covered[b][e], 1) << "bucket " << b << " element " << e << " covered " << covered[b][e] << " times";

  // Buckets are filled in reverse registration order, per dtype, greedily up to bucket_bytes.
  std::vector<int64_t> payload(plan.buckets_size(), 0);
  std::vector<int> count(plan.buckets_size(), 0);
  std::vector<int> last_bucket_of_dtype(16, -1);
  for (int i = req.params_size() - 1; i >= 0; --i) {
    const auto& t = plan.tensors(i);
    const int64_t bytes = t.numel() * elem_size(t.dtype());
    int& last = last_bucket_of_dtype[t.dtype()];
    if (last >= 0 && t.bucket() != last) {
      ASSERT_GT(t.bucket(), last) << "bucket order is not reverse registration order";
      ASSERT_GT(payload[last] + bytes, req.bucket_bytes()) << "a bucket was closed although the tensor fit";
    } else if (last >= 0) {
      ASSERT_LE(payload[last] + bytes, req.bucket_bytes()) << "bucket overfilled";
    }
    last = t.bucket();
    payload[t.bucket()] += bytes;
    count[t.bucket()]++;
  }
  for (int b = 0; b < plan.buckets_size(); ++b) {
    ASSERT_GT(count[b], 0) << "empty bucket " << b;
    ASSERT_EQ(plan.buckets(b).payload_elems() * elem_size(plan.buckets(b).dtype()), payload[b]);
  }

  // Statistics recomputed from the placements.
  uint64_t total = 0, largest = 0;
  std::vector<uint64_t> load(n, 0);
  std::vector<int64_t> ew(n, 0), own(n, 0);
  for (const auto& t : plan.tensors()) {
    if (t.muon()) {
      total += t.ns_cost();
      largest = std::max(largest, t.ns_cost());
      load[t.owner()] += t.ns_cost();
      own[t.owner()] += t.numel();
    } else {
      for (const auto& p : t.pieces()) ew[p.rank()] += p.length();
    }
  }
  const auto& st = plan.stats();
  ASSERT_EQ(st.total_ns_cost(), total);
  const double lb = std::max(double(total) / n, double(largest));
  ASSERT_DOUBLE_EQ(st.ns_lower_bound(), lb);
  uint64_t max_load = 0;
  for (int r = 0; r < n; ++r) {
    ASSERT_EQ(st.ranks(r).ns_load(), load[r]);
    ASSERT_EQ(st.ranks(r).elementwise_elems(), ew[r]);
    ASSERT_EQ(st.ranks(r).owned_muon_elems(), own[r]);
    max_load = std::max(max_load, load[r]);
    const double state = 8.0 * own[r] + req.elementwise_state_bytes_per_param() * ew[r];
    if (req.elementwise_state_bytes_per_param() > 0) {
      ASSERT_DOUBLE_EQ(st.ranks(r).optimizer_state_bytes(), state);
    }
    if (req.memory_cap_bytes() > 0) {
      ASSERT_LE(st.ranks(r).optimizer_state_bytes(), req.memory_cap_bytes());
    }
  }
  ASSERT_EQ(st.max_ns_load(), max_load);
  if (total > 0) {
    ASSERT_DOUBLE_EQ(st.ns_balance_ratio(), double(max_load) / lb);
    // Graham: LPT <= (4/3 - 1/(3N)) OPT, and OPT >= lb.
    ASSERT_GE(st.ns_balance_ratio(), 1.0 - 1e-12);
  }
}

}  // namespace shardopt::sharding::testing
