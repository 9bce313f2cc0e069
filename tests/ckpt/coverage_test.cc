// check_full_coverage + index_manifest: every element of every state is covered by exactly one piece.
// Manifests are built by hand here (piece ranges written out), independent of the writer.
#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "base/error.h"
#include "checkpoint/format.h"

namespace shardopt::ckpt {
namespace {

// One tensor "w" of 10 f32 elements with state "param", pieces given as (offset, length), all in
// one file large enough for any of them.
proto::CheckpointManifest manifest_with(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  proto::CheckpointManifest m;
  auto* t = m.add_tensors();
  t->mutable_spec()->set_name("w");
  t->mutable_spec()->add_shape(10);
  t->mutable_spec()->set_dtype(proto::F32);
  auto* s = t->add_states();
  s->set_name(std::string(kParamState));
  s->set_dtype(proto::F32);
  s->add_shape(10);
  auto* f = m.add_files();
  f->set_name(shard_file_name(0));
  f->set_size_bytes(1 << 12);
  for (const auto& [offset, length] : ranges) {
    auto* p = m.add_pieces();
    p->set_tensor("w");
    p->set_state(std::string(kParamState));
    p->set_global_offset(offset);
    p->set_length(length);
    p->set_dtype(proto::F32);
    p->set_file(shard_file_name(0));
    p->set_file_offset(64);
  }
  return m;
}

// "" when the manifest is accepted, else the error text.
std::string check(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  const auto m = manifest_with(ranges);
  try {
    check_full_coverage(m, index_manifest(m, "where"), "where");
    return "";
  } catch (const CheckpointError& e) {
    return e.what();
  }
}

TEST(Coverage, ExactTilingsAreAcceptedInAnyOrder) {
  EXPECT_EQ(check({{0, 10}}), "");
  EXPECT_EQ(check({{0, 3}, {3, 7}}), "");
  EXPECT_EQ(check({{6, 4}, {0, 2}, {2, 4}}), "") << "pieces listed out of order";
  EXPECT_EQ(check({{0, 4}, {4, 0}, {4, 6}, {10, 0}}), "") << "empty pieces cover nothing and overlap nothing";
}

TEST(Coverage, GapsAreNamedWithTheirRange) {
  struct Case {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    std::string range;
  };
  for (const Case& c : {Case{{}, "[0, 10)"}, Case{{{1, 9}}, "[0, 1)"}, Case{{{0, 3}, {5, 5}}, "[3, 5)"},
                        Case{{{0, 9}}, "[9, 10)"}, Case{{{0, 2}, {2, 0}, {7, 3}}, "[2, 7)"}}) {
    const std::string what = check(c.ranges);
    EXPECT_NE(what.find("incomplete coverage"), std::string::npos) << what;
    EXPECT_NE(what.find("elements " + c.range + " of 10"), std::string::npos) << c.range << ": " << what;
    EXPECT_NE(what.find("tensor 'w' state 'param'"), std::string::npos) << what;
    EXPECT_NE(what.find("where"), std::string::npos) << what;
  }
}

TEST(Coverage, OverlapsAreRejected) {
  for (const auto& ranges : std::vector<std::vector<std::pair<int64_t, int64_t>>>{
           {{0, 10}, {0, 10}}, {{0, 6}, {5, 5}}, {{0, 10}, {9, 1}}, {{2, 3}, {0, 10}}}) {
    const std::string what = check(ranges);
    EXPECT_NE(what.find("overlap"), std::string::npos) << "ranges " << ranges.size() << ": '" << what << "'";
  }
}

}  // namespace
}  // namespace shardopt::ckpt
