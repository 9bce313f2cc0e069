// NoLoCo / DiLoCo under mpirun: every rank runs one Engine on its shard group and one OuterSync on
// its cross-replica communicator of the MPI world, and checks its own values against the plain double
// reference of tests/gossip/gossip_reference.h (no communication in the reference). Each test runs
// two layouts of the world: (world/2 replicas x 2 shards) and (world replicas x 1 shard).
//   - beta = 0, alpha = gamma = 1 is pairwise averaging of the injected fast weights;
//   - n = N equals heavy-ball DiLoCo (lr alpha, momentum beta), both equal to the double reference;
//   - every rank reports the same groups (gathered over the world) and they partition the replicas;
//   - the outer step is point to point only (traffic counters), with the exact bytes;
//   - a partner that stalls past the timeout and then sends late cannot change later rounds.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "comm/mpi_backend.h"
#include "runtime/gossip/outer_sync.h"
#include "tests/common/mpi_suite_main.h"
#include "tests/gossip/gossip_reference.h"

namespace shardopt::runtime::gossip {
namespace {

using namespace test_ref;  // NOLINT: the gossip suites' shared reference

comm::Communicator* g_world = nullptr;  // set by main()

std::vector<int> layouts() {
  std::vector<int> replicas = {g_world->size()};
  if (g_world->size() % 2 == 0 && g_world->size() / 2 >= 2) replicas.insert(replicas.begin(), g_world->size() / 2);
  return replicas;
}

// Every rank's group of every round, gathered over the world (padded with -1).
std::vector<std::vector<int>> gather_groups(const RankRecord& rec, int replicas) {
  const size_t rounds = rec.reports.size(), width = rounds * static_cast<size_t>(replicas);
  std::vector<int> mine(width, -1);
  for (size_t k = 0; k < rounds; ++k)
    for (size_t j = 0; j < rec.reports[k].group.size(); ++j) mine[k * replicas + j] = rec.reports[k].group[j];
  const auto world = static_cast<size_t>(g_world->size());
  std::vector<int> all(width * world);
  std::vector<size_t> counts(world, width);
  g_world->all_gather(mine.data(), all.data(), counts, DType::kI32)->wait();
  std::vector<std::vector<int>> by_rank(world);
  for (size_t w = 0; w < world; ++w) by_rank[w].assign(all.begin() + w * width, all.begin() + (w + 1) * width);
  return by_rank;
}

TEST(GossipMpi, PairwiseAveragingSamePairingEverywhere) {
  for (int replicas : layouts()) {
    const int shards = g_world->size() / replicas;
    ReplicaGrid grid = split_replica_grid(*g_world, replicas);
    GossipOptions o;
    o.alpha = o.gamma = 1.0;
    o.beta = 0.0;
    o.seed = 13;
    const int rounds = 3;
    RankRecord rec = run_rounds(grid, *grid.cross, o, rounds);
    const auto groups = gather_groups(rec, replicas);
    for (int k = 0; k < rounds; ++k) {
      const auto& mine = rec.reports[static_cast<size_t>(k)].group;
      for (const auto& g : outer_groups(replicas, 2, OddGroupPolicy::kMerge, o.seed, k))
        if (std::find(g.begin(), g.end(), grid.replica) != g.end()) { ASSERT_EQ(mine, g) << "round " << k; }
      EXPECT_FALSE(rec.reports[static_cast<size_t>(k)].skipped) << rec.reports[static_cast<size_t>(k)].skip_reason;
      // Every rank of every member replica reports this very group; the groups partition the replicas.
      std::vector<int> seen(static_cast<size_t>(replicas), 0);
      for (int w = 0; w < g_world->size(); ++w) {
        std::vector<int> g;
        for (int j = 0; j < replicas; ++j)
          if (int v = groups[static_cast<size_t>(w)][static_cast<size_t>(k * replicas + j)]; v >= 0) g.push_back(v);
        const int r = w / shards;
        ASSERT_NE(std::find(g.begin(), g.end(), r), g.end()) << "rank " << w << " round " << k;
        if (w % shards == 0 && g.front() == r)
          for (int m : g) ++seen[static_cast<size_t>(m)];
        if (std::find(mine.begin(), mine.end(), r) != mine.end()) {
          ASSERT_EQ(g, mine) << "rank " << w << " disagrees with rank " << g_world->rank() << " in round " << k;
        }
      }
      for (int r = 0; r < replicas; ++r) ASSERT_EQ(seen[static_cast<size_t>(r)], 1) << "round " << k;
      // beta = 0, alpha = gamma = 1: phi = mean of the group's injected theta.
      for (size_t i = 0; i < rec.ids.size(); ++i) {
        if (rec.ids[i] < 0) continue;
        double avg = 0;
        for (int m : mine) avg += theta_value(m, k, rec.ids[i]);
        avg /= static_cast<double>(mine.size());
        ASSERT_NEAR(rec.phi[static_cast<size_t>(k)][i], avg, 1e-6) << "round " << k << " element " << rec.ids[i];
      }
    }
  }
}

TEST(GossipMpi, FullGroupEqualsHeavyBallDiLoCo) {
  for (int replicas : layouts()) {
    ReplicaGrid grid = split_replica_grid(*g_world, replicas);
    GossipOptions o;
    o.group_size = replicas;
    o.gamma = 0.4;  // the two-exchange form
    const int rounds = 3;
    RankRecord noloco = run_rounds(grid, *grid.cross, o, rounds);
    GossipOptions d = o;
    d.mode = SyncMode::kDiLoCo;
    d.diloco_lr = o.alpha;
    d.diloco_momentum = o.beta;
    d.diloco_nesterov = false;
    RankRecord diloco = run_rounds(grid, *grid.cross, d, rounds);
    for (size_t i = 0; i < noloco.ids.size(); ++i) {
      const int64_t gid = noloco.ids[i];
      if (gid < 0) continue;
      RefDiLoCo ref{o.alpha, o.beta, false, init_value(gid)};
      for (int k = 0; k < rounds; ++k) {
        std::vector<double> theta;
        for (int r = 0; r < replicas; ++r) theta.push_back(theta_value(r, k, gid));
        ref.step(theta);
        ASSERT_NEAR(noloco.phi[static_cast<size_t>(k)][i], ref.phi, 3e-6) << "NoLoCo n = N, round " << k;
        ASSERT_NEAR(diloco.phi[static_cast<size_t>(k)][i], ref.phi, 3e-6) << "heavy-ball DiLoCo, round " << k;
        ASSERT_NEAR(noloco.phi[static_cast<size_t>(k)][i], diloco.phi[static_cast<size_t>(k)][i], 3e-6);
      }
    }
  }
}

TEST(GossipMpi, OuterStepIsPointToPointOnly) {
  for (int replicas : layouts())
    for (double gamma : {0.7, 0.3}) {
      ReplicaGrid grid = split_replica_grid(*g_world, replicas);
      const Model model;
      Engine engine(*grid.shard_group, model.specs, muon_options());
      GossipOptions o;
      o.gamma = gamma;
      OuterSync sync(engine, *grid.cross, o);
      const auto cross_before = grid.cross->counters();
      const auto before = sync.outer_traffic();
      const OuterReport& rep = sync.outer_step();
      const auto d = sync.outer_traffic() - before;
      const auto cross_delta = grid.cross->counters() - cross_before;
      EXPECT_EQ(cross_delta.total_sent() + cross_delta.total_received(), 0u) << "cross communicator untouched";
      using K = comm::OpKind;
      for (size_t k = 0; k < d.calls.size(); ++k) {
        const bool p2p = k == static_cast<size_t>(K::kSendRecv) || k == static_cast<size_t>(K::kSend) ||
                         k == static_cast<size_t>(K::kRecv);
        if (!p2p) { EXPECT_EQ(d.calls[k], 0u) << "collective " << comm::op_kind_name(static_cast<K>(k)); }
      }
      const uint64_t per_peer = 4 * static_cast<uint64_t>(sync.shard_numel()) * (gamma == o.alpha ? 1 : 2);
      EXPECT_EQ(rep.bytes_sent, per_peer * (rep.group.size() - 1));
      EXPECT_EQ(rep.bytes_received, per_peer * (rep.group.size() - 1));
      EXPECT_FALSE(rep.skipped) << rep.skip_reason;
    }
}

// Replica 0's round-0 partner stalls past the timeout, then takes its outer step (a late message that
// MPI may deliver into the abandoned receive). Every round of every rank equals the reference in
// which that pair skipped round 0 and never talks again.
TEST(GossipMpi, StalledPartnerThenLateSendLeavesLaterRoundsExact) {
  for (int replicas : layouts()) {
    if (replicas % 2 != 0) continue;  // pairs only: a stalled member of a group of 3 breaks a ring
    ReplicaGrid grid = split_replica_grid(*g_world, replicas);
    GossipOptions o;
    o.timeout = std::chrono::milliseconds(200);
    o.seed = 3;
    const int rounds = 3;
    int victim = -1;
    for (const auto& g : outer_groups(replicas, 2, OddGroupPolicy::kMerge, o.seed, 0))
      if (std::find(g.begin(), g.end(), 0) != g.end()) victim = g[0] == 0 ? g[1] : g[0];
    auto before = [&](int k, OuterSync&) {
      if (k == 0 && grid.replica == victim) std::this_thread::sleep_for(std::chrono::milliseconds(600));
    };
    auto after = [&](int, OuterSync&) { g_world->barrier()->wait(); };  // no timeout echo
    RankRecord rec = run_rounds(grid, *grid.cross, o, rounds, before, after);
    std::vector<std::vector<std::vector<int>>> groups;
    for (int k = 0; k < rounds; ++k)
      groups.push_back(
          groups_with_broken_links(outer_groups(replicas, 2, OddGroupPolicy::kMerge, o.seed, k), {{0, victim}}));
    EXPECT_EQ(rec.reports[0].skipped, grid.replica == 0 || grid.replica == victim) << rec.reports[0].skip_reason;
    expect_rank_matches_reference(rec, grid.replica, replicas, o, groups);
  }
}

// A late partner under real MPI timing: round 0 pairs {A, B} and {C, D}, round 1 {A, C} and {B, D}.
// A times out on B in round 0 (200 ms) and then makes no MPI call until t = 1.5 s; C enters round 1 at
// once and sends to A (it waits up to 5 s); B wakes at t = 0.6 s and takes its round-0 step (its late
// send goes out unless the abort notice from A reached it first); D times out on the late B in round 1.
// Whatever MPI delivers late, every rank's rounds equal the reference with those skips. (The
// deterministic version of a late write into an abandoned buffer is the threads suite's
// FaultTolerance.LateWriteIntoAbandonedBufferCannotChangeLaterRounds.)
TEST(GossipMpi, LatePartnerSkipsExactlyItsRounds) {
  if (g_world->size() % 4 != 0) GTEST_SKIP() << "needs 4 replicas";
  const int replicas = 4;
  ReplicaGrid grid = split_replica_grid(*g_world, replicas);
  GossipOptions o;
  auto partner = [&](int r, int k) {
    for (const auto& g : outer_groups(replicas, 2, OddGroupPolicy::kMerge, o.seed, k))
      if (g[0] == r || g[1] == r) return g[0] == r ? g[1] : g[0];
    return -1;
  };
  while (partner(0, 0) == partner(0, 1)) ++o.seed;
  const int a = 0, b = partner(a, 0), c = partner(a, 1), d = partner(c, 0);
  ASSERT_EQ(partner(b, 1), d);
  o.timeout = std::chrono::milliseconds(grid.replica == c ? 5000 : 200);
  using Clock = std::chrono::steady_clock;
  g_world->barrier()->wait();
  const auto t0 = Clock::now();
  auto before = [&](int k, OuterSync&) {
    if (k == 0 && grid.replica == b) std::this_thread::sleep_until(t0 + std::chrono::milliseconds(600));
    if (k == 1 && grid.replica == a) std::this_thread::sleep_until(t0 + std::chrono::milliseconds(1500));
  };
  size_t held_after_round1 = 99;
  auto after = [&](int k, OuterSync& sync) {
    if (k != 1) return;
    // Round 0's receive was cancelled (MPI_Cancel) and its send was eager: MPI gives the buffers back
    // within a few polls. Without the cancel, the receive would hold them for good.
    const auto deadline = Clock::now() + std::chrono::seconds(2);
    while ((held_after_round1 = sync.held_exchange_buffers()) > 0 && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  RankRecord rec = run_rounds(grid, *grid.cross, o, 2, before, after);
  EXPECT_EQ(held_after_round1, 0u) << "abandoned exchange buffers were not released";
  g_world->barrier()->wait();
  const std::vector<std::vector<std::vector<int>>> groups = {{{a}, {b}, {c, d}}, {{a, c}, {b}, {d}}};
  EXPECT_EQ(rec.reports[0].skipped, grid.replica == a || grid.replica == b) << rec.reports[0].skip_reason;
  EXPECT_EQ(rec.reports[1].skipped, grid.replica == b || grid.replica == d) << rec.reports[1].skip_reason;
  // Everyone's reference uses its own timeout: only the scalars alpha, beta, gamma matter.
  expect_rank_matches_reference(rec, grid.replica, replicas, o, groups);
}

}  // namespace
}  // namespace shardopt::runtime::gossip

int main(int argc, char** argv) {
  shardopt::comm::CommOptions options = shardopt::comm::CommOptions::from_env();
  options.checked = true;  // a desync names both sides instead of hanging
  options.timeout = std::chrono::milliseconds(60000);
  return shardopt::test_fixture::run_mpi_suite(argc, argv, "gossip MPI suite", options,
                                               &shardopt::runtime::gossip::g_world);
}
