// Outer synchronization of replicas: NoLoCo gossip (no all-reduce) and DiLoCo (all-reduce baseline).
//
// World = replicas x shard group. World rank w = replica * shards + shard. Each replica runs the ordinary
// sharded Engine on its shard-group communicator (same replica); ranks with the same shard index form
// the cross-replica communicator. Every shard group uses the same plan, so rank (r, s) and (r', s) hold
// the same segments and exchange only their master shards.
//
// Per rank, sharded like the optimizer state and over all of this rank's master shards (every bucket's
// segment; owned-layout Muon matrices live in their owner's segment, dim0 row shards in their holder's,
// so the segments cover the whole model in both layouts):
//   theta = the engine's master shards (fast weights), phi = slow weights, m = outer momentum (phi = theta,
//   m = 0 at construction).
// Every H inner steps (docs/algorithms.md, "NoLoCo and DiLoCo"):
//   NoLoCo: groups from a permutation seeded by (seed, outer step index), identical on every rank;
//           D = mean_G(theta - phi), phibar = mean_G(phi); m = beta m + alpha D + gamma (phibar - phi);
//           phi += m; theta = phi. gamma == alpha: only theta travels (alpha (thetabar_G - phi)).
//           Point-to-point only (sendrecv / send+recv), no collective.
//   DiLoCo: delta = phi - mean_all(theta) (all-reduce avg on the cross communicator); outer SGD on phi
//           with momentum (Nesterov by default; heavy-ball optional); theta = phi.
// After either, theta = phi in the master shards and the full parameters are refreshed by an all-gather
// inside the shard group (stage 3: gathered buckets are released instead, they gather on demand).
//
// Memory: phi, m and the exchange buffers are host memory, and the cross-replica communicator must move
// host buffers (threads or MPI; ConfigError for a device communicator such as NCCL). The engine may run
// in either memory space: a device engine's master shards are copied through its step backend (theta
// down and the new theta up once per outer step: this rank's Ψ/N floats each way every H steps, next to
// the exchange's own traffic), as is its state in send_state / receive_state.
//
// Fault tolerance (NoLoCo): every pair of replicas talks over its own 2-rank communicator (split once at
// construction, N-1 splits by a round-robin tournament). The threads backend aborts a communicator when
// a wait times out, so a private link confines the damage to that pair: the waiting side gets
// TimeoutError, the late side PeerError when it arrives; both skip averaging for this round (apply the
// update with G = {self}: their own pseudo-gradient, no averaging), record the skip and go on. A broken
// link makes later rounds with that peer skip at once. No wait is longer than options.timeout.
// An abandoned exchange keeps its send/receive buffers and Work handles until the backend releases
// them (Work::buffers_released(): on MPI a late message may still land in a receive buffer that could
// not be cancelled); later rounds take other buffers (a spare one, or a fresh one while it is held).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/engine.h"

namespace shardopt::runtime::gossip {

enum class SyncMode { kNoLoCo, kDiLoCo };

// How NoLoCo groups the leftover replicas when group_size does not divide the replica count.
enum class OddGroupPolicy {
  kMerge,      // groups G_j = {P[j], P[j+g], ...} with g = N / n: leftovers join groups (e.g. a group of 3)
  kSingleton,  // consecutive chunks of P of size n; the last, smaller chunk is its own group (a singleton
               // applies its own pseudo-gradient without averaging: no traffic)
};

struct GossipOptions {
  SyncMode mode = SyncMode::kNoLoCo;
  int outer_every = 50;  // H inner steps per outer step
  // NoLoCo
  int group_size = 2;
  OddGroupPolicy odd_policy = OddGroupPolicy::kMerge;
  double alpha = 0.7, beta = 0.5, gamma = 0.7;
  uint64_t seed = 0;
  // false: all pairs share the cross-replica communicator (no N-1 setup splits; a timeout then aborts
  // it for every replica of this shard index, so later rounds all skip).
  bool private_links = true;
  // DiLoCo
  double diloco_lr = 0.7, diloco_momentum = 0.9;
  bool diloco_nesterov = true;
  // Longest wait for a partner in an outer step.
  std::chrono::milliseconds timeout{60000};
};

void validate_gossip_options(const GossipOptions& options, int replicas);

// The 2-D layout: split of a world communicator into replicas x shards.
struct ReplicaGrid {
  int replicas = 1, shards = 1;
  int replica = 0, shard = 0;
  std::unique_ptr<comm::Communicator> shard_group;  // same replica, rank = shard
  std::unique_ptr<comm::Communicator> cross;        // same shard, rank = replica
};
// Collective on `world`: world.size() must be a multiple of `replicas` (ConfigError otherwise).
ReplicaGrid split_replica_grid(comm::Communicator& world, int replicas);

// NoLoCo groups of outer step `outer_step`: a partition of 0..replicas-1, the same on every caller.
std::vector<std::vector<int>> outer_groups(int replicas, int group_size, OddGroupPolicy policy, uint64_t seed,
                                           int64_t outer_step);

struct OuterReport {
  int64_t outer_step = 0;        // index of this outer step (0, 1, ...)
  std::vector<int> group;        // NoLoCo: replicas averaged with (incl. self); DiLoCo: all
  bool skipped = false;          // averaging skipped (partner timed out / failed / singleton)
  std::string skip_reason;
  uint64_t bytes_sent = 0, bytes_received = 0;  // this rank's outer-step traffic
  double seconds = 0;                           // outer step wall time (exchange + update + gather)
  double exchange_seconds = 0;                  // of which: waiting for the exchange / all-reduce
  // NoLoCo, when averaged: sum over this rank's master elements of (theta - mean_G theta)^2 before the
  // update, and the tensor elements it covers (0 when skipped). The trainer sums both over the shard
  // group for the replica's distance to its group's mean: a consensus measure that needs no collective
  // across replicas (the global consensus_distance() does).
  double group_distance_sq = 0;
  int64_t group_distance_numel = 0;
};

class OuterSync {
 public:
  // Collective on `cross` (and, with private links, N-1 splits of it). `engine` runs on this replica's
  // shard group. Checks that every replica holds the same number of master elements (ConfigError).
  OuterSync(Engine& engine, comm::Communicator& cross, GossipOptions options);
  ~OuterSync();
  OuterSync(const OuterSync&) = delete;
  OuterSync& operator=(const OuterSync&) = delete;

  const GossipOptions& options() const { return options_; }
  int replica() const { return replica_; }
  int replicas() const { return replicas_; }
  int64_t outer_steps() const { return outer_step_; }
  int64_t skipped_rounds() const { return skipped_; }
  int64_t shard_numel() const { return count_; }

  // Call after every Engine::step(): runs the outer step every H calls and returns true when it did
  // (its report in last_report()).
  bool after_inner_step();
  // Runs one outer step now.
  const OuterReport& outer_step();
  const OuterReport& last_report() const { return report_; }

  // Flat views over this rank's master shards (bucket order): slow weights and outer momentum.
  float* phi() { return phi_.data(); }
  float* momentum() { return momentum_.data(); }
  // Checkpoint state names of phi() and momentum() (NoLoCo's m; DiLoCo's momentum buffer).
  static constexpr const char* kPhiState = "outer_phi";
  static constexpr const char* kMomentumState = "outer_m";
  int64_t inner_steps_since_outer() const { return inner_since_outer_; }
  // Resume: the saved run's counters (its phi and m are loaded into phi() / momentum() separately).
  // The pairing of the next outer step follows from (seed, outer_steps). Links start unbroken.
  void restore_counters(int64_t outer_steps, int64_t inner_steps_since_outer, int64_t skipped_rounds);
  // Copies theta (master shards) into dst[shard_numel()] / from src.
  void read_theta(float* dst);
  void write_theta(const float* src);
  // All-gathers the master shards into the full parameters within the shard group (stage 3: releases).
  void refresh_params();

  // Consensus distance Xi = sqrt(sum_i |theta_i - mean theta|^2 / (N numel)) over all replicas, for
  // logging: collective on the cross communicator and the shard group (not outer-step traffic).
  double consensus_distance();

  // Restart: the partner sends phi, m and its whole engine state (theta = master shards, the inner
  // optimizer's moments, the optimizer step) for this shard; the restarted rank receives them, writes
  // them and refreshes its parameters. `link` is any communicator joining the two (peer = its rank there).
  void send_state(comm::Communicator& link, int peer, int tag = 0);
  void receive_state(comm::Communicator& link, int peer, int tag = 0);

  // Summed traffic of the communicators the outer step may use (links and the cross communicator).
  comm::TrafficCounters outer_traffic() const;

  // Exchange buffers still held by abandoned exchanges (the backend may still write them), after
  // reclaiming those the backend released since.
  size_t held_exchange_buffers();

 private:
  // Send and receive buffers of one exchange, with the Work handles that use them.
  struct ExchangeBuffers {
    std::vector<float> send, recv;
    std::vector<comm::WorkPtr> works;
  };

  void noloco_step(OuterReport& report);
  void diloco_step(OuterReport& report);
  // This round's buffers: a spare one (after reclaiming held buffers the backend released) or a new one.
  ExchangeBuffers& take_exchange_buffers();
  void reclaim_released_buffers();
  // Ends this round's use of the buffers: back to the spares, or held while `abandoned`.
  void return_exchange_buffers(bool abandoned);
  // Exchanges `values` floats of the round's send buffer with the group; sums received into acc_.
  // False on failure (the buffers are then abandoned).
  bool exchange(const std::vector<int>& group, size_t values, OuterReport& report);
  comm::Communicator& link(int peer_replica, int& peer_rank);

  Engine& engine_;
  comm::Communicator& cross_;
  GossipOptions options_;
  int replica_ = 0, replicas_ = 1;
  int64_t count_ = 0;  // master elements of this rank (bucket padding included)
  int64_t tensor_elems_ = 0;  // of which belong to tensors (the consensus distance's numel)
  int64_t inner_since_outer_ = 0;
  int64_t outer_step_ = 0;
  int64_t skipped_ = 0;
  OuterReport report_;

  std::vector<float> phi_, momentum_;
  size_t exchange_values_ = 0;  // floats per exchange buffer (2 x count for the two-exchange form)
  std::vector<float> acc_;      // sum over the group (never handed to a communicator)
  std::unique_ptr<ExchangeBuffers> current_;                 // this round's
  std::vector<std::unique_ptr<ExchangeBuffers>> spare_, held_;  // reusable / abandoned, still in use
  std::vector<std::unique_ptr<comm::Communicator>> links_;  // by peer replica (private links)
  std::vector<bool> link_broken_;
};

}  // namespace shardopt::runtime::gossip
