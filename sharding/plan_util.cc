#include "proto/dtype_convert.h"
#include "sharding/plan_util.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/dtype.h"
#include "base/error.h"
#include "base/hash.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/util/message_differencer.h"
#include "sharding/layout.h"

namespace shardopt::sharding {
namespace {

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.2f} {}", b, units[u]);
}

std::string human_count(double n) {
  if (n >= 1e9) return fmt::format("{:.3f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

}  // namespace

std::string deterministic_bytes(const google::protobuf::Message& message) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream sink(&bytes);
    google::protobuf::io::CodedOutputStream out(&sink);
    out.SetSerializationDeterministic(true);
    if (!message.SerializeToCodedStream(&out))
      throw ConfigError("stable_hash: could not serialize a " + message.GetTypeName());
  }
  return bytes;
}

uint64_t stable_hash(const google::protobuf::Message& message) {
  const std::string bytes = deterministic_bytes(message);
  return fnv1a64(bytes);
}

std::string describe_difference(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  if (a.GetDescriptor() != b.GetDescriptor())
    return "different message types: " + a.GetTypeName() + " vs " + b.GetTypeName();
  std::string report;
  google::protobuf::util::MessageDifferencer differ;
  differ.ReportDifferencesToString(&report);
  if (differ.Compare(a, b)) return "";
  // One line per difference; the first is the one to show.
  const size_t lines = static_cast<size_t>(std::count(report.begin(), report.end(), '\n'));
  std::string first = report.substr(0, report.find('\n'));
  if (first.size() > 300) first = first.substr(0, 300) + "...";
  return fmt::format("{} difference{}; first: {}", lines, lines == 1 ? "" : "s", first);
}

std::string plan_summary(const proto::ShardPlan& plan, int max_buckets) {
  const auto& req = plan.request();
  const auto& st = plan.stats();
  std::string out;
  out += fmt::format("shardopt plan (format {}, hash {:016x})\n", plan.format_version(), plan_hash(plan));
  out += fmt::format("  world {}  ZeRO stage {}  layout {}  bucket {}  align {} B  groups: {} / {}{}\n",
                     req.world_size(), req.zero_stage(), layout_name(req.layout()), human_bytes(req.bucket_bytes()),
                     req.align_bytes(), req.routing().muon_group(), req.routing().elementwise_group(),
                     req.routing().elementwise_only() ? " (element-wise only)" : "");
  out += fmt::format("  parameters {} in {} tensors: {} in {} Muon matrices, {} element-wise\n",
                     human_count(st.total_params()), plan.tensors_size(), human_count(st.muon_params()),
                     st.muon_matrices(), human_count(st.elementwise_params()));
  out += fmt::format("  buckets {}  buffers {}  largest {}  padding {} ({:.3f}%)  max segment imbalance {:.3f}\n",
                     plan.buckets_size(), human_bytes(st.buffer_bytes()), human_bytes(st.largest_bucket_bytes()),
                     human_bytes(st.padding_bytes()),
                     st.buffer_bytes() ? 100.0 * st.padding_bytes() / st.buffer_bytes() : 0.0,
                     st.max_segment_imbalance());
  out += fmt::format("  NS load: max {:.4g}  lower bound {:.4g}  ratio {:.4f} (LPT guarantees <= 4/3)\n",
                     static_cast<double>(st.max_ns_load()), st.ns_lower_bound(), st.ns_balance_ratio());
  out += fmt::format("  {:>4} {:>8} {:>11} {:>11} {:>12} {:>12} {:>12} {:>12}{}\n", "rank", "matrices", "ns_load",
                     "muon elems", "segment", "opt state", "params", "grads",
                     req.layout() == proto::SHARD_LAYOUT_DIM0 ? "  a2a send" : "");
  for (const auto& r : st.ranks()) {
    out += fmt::format("  {:>4} {:>8} {:>11.4g} {:>11} {:>12} {:>12} {:>12} {:>12}", r.rank(), r.owned_matrices(),
                       static_cast<double>(r.ns_load()), human_count(r.owned_muon_elems()),
                       human_bytes(r.segment_bytes()), human_bytes(r.optimizer_state_bytes()),
                       human_bytes(r.param_bytes()), human_bytes(r.grad_bytes()));
    if (req.layout() == proto::SHARD_LAYOUT_DIM0) out += fmt::format("  {:>9}", human_count(r.dim0_alltoall_send_elems()));
    out += "\n";
  }
  const int shown = max_buckets > 0 ? std::min(max_buckets, plan.buckets_size()) : plan.buckets_size();
  for (int i = 0; i < shown; ++i) {
    const auto& b = plan.buckets(i);
    int64_t lo = b.segments(0).count(), hi = lo;
    for (const auto& s : b.segments()) {
      lo = std::min(lo, s.count());
      hi = std::max(hi, s.count());
    }
    const auto& first = plan.tensors(b.tensors(0));
    out += fmt::format("  bucket {:>3} {:>4} {:>11} {:>3} tensors  segment {}..{} elems  imbalance {:.3f}  pad {}  ({}{})\n",
                       b.index(), dtype_name(b.dtype()), human_bytes(b.bytes()), b.tensors_size(), lo, hi,
                       b.segment_imbalance(), b.padding_elems(), first.name(), b.tensors_size() > 1 ? ", ..." : "");
  }
  if (shown < plan.buckets_size()) out += fmt::format("  ... {} more buckets\n", plan.buckets_size() - shown);
  return out;
}

}  // namespace shardopt::sharding
