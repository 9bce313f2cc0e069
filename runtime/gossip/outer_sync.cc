#include "runtime/gossip/outer_sync.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/clock.h"
#include "base/error.h"
#include "runtime/checkpoint_io.h"

namespace shardopt::runtime::gossip {
namespace {

using clock::seconds_since;

// splitmix64: a portable seeded generator, so every rank (and every build) draws the same permutation.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Round-robin tournament (circle method): partner of replica i in round k of M-1 rounds, M even
// (M = N + 1 with a dummy for odd N; being paired with the dummy = sitting out).
int tournament_partner(int i, int k, int m) {
  const int last = m - 1;
  if (i == last) return k;
  const int p = ((2 * k - i) % last + last) % last;
  return p == i ? last : p;
}

constexpr int kStateTag = 1 << 20;

}  // namespace

void validate_gossip_options(const GossipOptions& o, int replicas) {
  if (replicas < 1) throw ConfigError("gossip: replicas must be >= 1, got " + std::to_string(replicas));
  if (o.outer_every < 1) throw ConfigError("gossip: outer_every (H) must be >= 1, got " + std::to_string(o.outer_every));
  if (o.group_size < 1)
    throw ConfigError("gossip: group_size must be >= 1, got " + std::to_string(o.group_size));
  for (auto [name, v] : {std::pair{"alpha", o.alpha}, {"beta", o.beta}, {"gamma", o.gamma}, {"diloco_lr", o.diloco_lr},
                         {"diloco_momentum", o.diloco_momentum}})
    if (!std::isfinite(v) || v < 0)
      throw ConfigError(std::string("gossip: ") + name + " must be finite and >= 0, got " + std::to_string(v));
  if (o.timeout.count() <= 0) throw ConfigError("gossip: timeout must be > 0 ms");
}

ReplicaGrid split_replica_grid(comm::Communicator& world, int replicas) {
  if (replicas < 1 || world.size() % replicas != 0)
    throw ConfigError("split_replica_grid: world size " + std::to_string(world.size()) +
                      " is not a multiple of replicas = " + std::to_string(replicas));
  ReplicaGrid g;
  g.replicas = replicas;
  g.shards = world.size() / replicas;
  g.replica = world.rank() / g.shards;
  g.shard = world.rank() % g.shards;
  g.shard_group = world.split(g.replica, g.shard);
  g.cross = world.split(g.shard, g.replica);
  return g;
}

std::vector<std::vector<int>> outer_groups(int replicas, int group_size, OddGroupPolicy policy, uint64_t seed,
                                           int64_t outer_step) {
  std::vector<int> perm(static_cast<size_t>(replicas));
  for (int i = 0; i < replicas; ++i) perm[static_cast<size_t>(i)] = i;
  uint64_t state = seed * 0x2545F4914F6CDD1Dull + static_cast<uint64_t>(outer_step) + 1;
  for (int i = replicas - 1; i > 0; --i) {  // Fisher-Yates
    const auto j = static_cast<int>(splitmix64(state) % static_cast<uint64_t>(i + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  std::vector<std::vector<int>> groups;
  const int n = std::max(1, group_size);
  if (policy == OddGroupPolicy::kMerge) {
    const int g = std::max(1, replicas / n);
    groups.resize(static_cast<size_t>(g));
    for (int p = 0; p < replicas; ++p) groups[static_cast<size_t>(p % g)].push_back(perm[static_cast<size_t>(p)]);
  } else {
    for (int p = 0; p < replicas; p += n)
      groups.emplace_back(perm.begin() + p, perm.begin() + std::min(replicas, p + n));
  }
  return groups;
}

OuterSync::OuterSync(Engine& engine, comm::Communicator& cross, GossipOptions options)
    : engine_(engine), cross_(cross), options_(options), replica_(cross.rank()), replicas_(cross.size()) {
  validate_gossip_options(options_, replicas_);
  // phi, m and the exchange buffers are host memory; a device engine's theta is copied through its
  // step backend once each way per outer step.
  if (cross_.device_buffers())
    throw ConfigError("OuterSync: the cross-replica communicator (" + std::string(cross_.backend()) +
                      ") moves device memory; the outer step exchanges host buffers: give it a host communicator "
                      "(threads or MPI), also when the engines run on GPUs");
  ShardState& st = engine_.shard_state();
  for (int b = 0; b < st.num_buckets(); ++b) count_ += st.my_segment(b).count();
  for (const LocalPiece& p : st.my_pieces()) tensor_elems_ += p.length;  // segments minus padding

  // Every replica's rank of this shard index must hold the same segments (same plan).
  int64_t mine[2] = {count_, -count_}, ext[2] = {0, 0};
  cross_.all_reduce(mine, ext, 2, DType::kI64, comm::ReduceOp::kMax)->wait();
  if (ext[0] != count_ || -ext[1] != count_)
    throw ConfigError("OuterSync: replicas hold different shard sizes (this rank " + std::to_string(count_) +
                      " elements, largest " + std::to_string(ext[0]) + ", smallest " + std::to_string(-ext[1]) +
                      "): every shard group must use the same model, options and size");

  const auto n = static_cast<size_t>(count_);
  phi_.resize(n);
  momentum_.assign(n, 0.0f);
  read_theta(phi_.data());
  const bool two = options_.mode == SyncMode::kNoLoCo && options_.gamma != options_.alpha;
  exchange_values_ = two ? 2 * n : n;
  acc_.resize(exchange_values_);

  link_broken_.assign(static_cast<size_t>(replicas_), false);
  if (options_.mode == SyncMode::kNoLoCo && options_.private_links && replicas_ > 1) {
    links_.resize(static_cast<size_t>(replicas_));
    const int m = replicas_ + (replicas_ % 2);
    for (int k = 0; k < m - 1; ++k) {
      const int p = tournament_partner(replica_, k, m);
      const bool real = p < replicas_;
      // Pair colors are the smaller replica id; sitting out gets a color no pair uses.
      auto c = cross_.split(real ? std::min(replica_, p) : replicas_ + replica_, replica_);
      if (real) links_[static_cast<size_t>(p)] = std::move(c);
    }
  }
}

OuterSync::~OuterSync() = default;

void OuterSync::read_theta(float* dst) {
  ShardState& st = engine_.shard_state();
  for (int b = 0; b < st.num_buckets(); ++b) {
    const auto c = static_cast<size_t>(st.my_segment(b).count());
    if (c > 0) engine_.step_backend().download(dst, st.master_shard(b), sizeof(float) * c);
    dst += c;
  }
}

void OuterSync::write_theta(const float* src) {
  ShardState& st = engine_.shard_state();
  for (int b = 0; b < st.num_buckets(); ++b) {
    const auto c = static_cast<size_t>(st.my_segment(b).count());
    if (c > 0) engine_.step_backend().upload(st.master_shard(b), src, sizeof(float) * c);
    src += c;
  }
}

void OuterSync::refresh_params() { engine_.refresh_params(); }

void OuterSync::restore_counters(int64_t outer_steps, int64_t inner_steps_since_outer, int64_t skipped_rounds) {
  if (outer_steps < 0 || skipped_rounds < 0 || inner_steps_since_outer < 0 ||
      inner_steps_since_outer >= options_.outer_every)
    throw ConfigError("OuterSync::restore_counters: outer steps " + std::to_string(outer_steps) + ", inner steps " +
                      std::to_string(inner_steps_since_outer) + " (H = " + std::to_string(options_.outer_every) +
                      "), skipped " + std::to_string(skipped_rounds) + " are not a saved state");
  outer_step_ = outer_steps;
  inner_since_outer_ = inner_steps_since_outer;
  skipped_ = skipped_rounds;
}

bool OuterSync::after_inner_step() {
  if (++inner_since_outer_ < options_.outer_every) return false;
  inner_since_outer_ = 0;
  outer_step();
  return true;
}

comm::Communicator& OuterSync::link(int peer_replica, int& peer_rank) {
  if (!links_.empty()) {
    peer_rank = replica_ < peer_replica ? 1 : 0;  // 2-rank link ordered by replica
    return *links_[static_cast<size_t>(peer_replica)];
  }
  peer_rank = peer_replica;
  return cross_;
}

comm::TrafficCounters OuterSync::outer_traffic() const {
  comm::TrafficCounters t = cross_.counters();
  for (const auto& l : links_) {
    if (!l) continue;
    const auto& c = l->counters();
    for (size_t k = 0; k < t.calls.size(); ++k) {
      t.bytes_sent[k] += c.bytes_sent[k];
      t.bytes_received[k] += c.bytes_received[k];
      t.calls[k] += c.calls[k];
    }
  }
  return t;
}

const OuterReport& OuterSync::outer_step() {
  const auto t0 = clock::now();
  const comm::TrafficCounters before = outer_traffic();
  report_ = OuterReport{};
  report_.outer_step = outer_step_;
  if (options_.mode == SyncMode::kNoLoCo)
    noloco_step(report_);
  else
    diloco_step(report_);
  write_theta(phi_.data());  // theta = phi
  refresh_params();
  const comm::TrafficCounters d = outer_traffic() - before;
  report_.bytes_sent = d.total_sent();
  report_.bytes_received = d.total_received();
  if (report_.skipped) ++skipped_;
  ++outer_step_;
  report_.seconds = seconds_since(t0);
  return report_;
}

void OuterSync::reclaim_released_buffers() {
  for (auto it = held_.begin(); it != held_.end();) {
    auto& works = (*it)->works;
    if (std::all_of(works.begin(), works.end(), [](const comm::WorkPtr& w) { return w->buffers_released(); })) {
      works.clear();
      spare_.push_back(std::move(*it));
      it = held_.erase(it);
    } else {
      ++it;
    }
  }
}

size_t OuterSync::held_exchange_buffers() {
  reclaim_released_buffers();
  return held_.size();
}

OuterSync::ExchangeBuffers& OuterSync::take_exchange_buffers() {
  if (current_) return *current_;
  reclaim_released_buffers();
  if (!spare_.empty()) {
    current_ = std::move(spare_.back());
    spare_.pop_back();
  } else {
    current_ = std::make_unique<ExchangeBuffers>();
    current_->send.resize(exchange_values_);
    current_->recv.resize(exchange_values_);
  }
  return *current_;
}

void OuterSync::return_exchange_buffers(bool abandoned) {
  if (!current_) return;
  if (abandoned) {
    held_.push_back(std::move(current_));
  } else {
    current_->works.clear();
    spare_.push_back(std::move(current_));
  }
}

bool OuterSync::exchange(const std::vector<int>& group, size_t values, OuterReport& report) {
  const int n = static_cast<int>(group.size());
  const int pos = static_cast<int>(std::find(group.begin(), group.end(), replica_) - group.begin());
  // Tag by round (mod 2^20) so a late message of an earlier round never matches this one.
  const int tag = static_cast<int>(outer_step_ % kStateTag);
  ExchangeBuffers& buf = take_exchange_buffers();
  std::copy(buf.send.begin(), buf.send.begin() + static_cast<ptrdiff_t>(values), acc_.begin());
  for (int s = 1; s < n; ++s) {  // ring schedule: step s sends to pos+s, receives from pos-s
    const int dst = group[static_cast<size_t>((pos + s) % n)];
    const int src = group[static_cast<size_t>((pos - s + n) % n)];
    for (int peer : {dst, src})
      if (link_broken_[static_cast<size_t>(peer)]) {
        report.skip_reason = "link to replica " + std::to_string(peer) + " failed in an earlier round";
        return false;
      }
    try {
      int dst_rank = 0, src_rank = 0;
      comm::Communicator& dl = link(dst, dst_rank);
      comm::Communicator& sl = link(src, src_rank);
      // The handles stay with the buffers: an abandoned exchange is held until they release them.
      buf.works.clear();
      if (dst == src) {
        buf.works.push_back(
            dl.sendrecv(buf.send.data(), values, dst_rank, buf.recv.data(), values, src_rank, DType::kF32, tag));
        buf.works[0]->wait(options_.timeout);
      } else {
        buf.works.push_back(dl.send(buf.send.data(), values, DType::kF32, dst_rank, tag));
        buf.works.push_back(sl.recv(buf.recv.data(), values, DType::kF32, src_rank, tag));
        buf.works[1]->wait(options_.timeout);
        buf.works[0]->wait(options_.timeout);
      }
    } catch (const TimeoutError& e) {
      link_broken_[static_cast<size_t>(dst)] = link_broken_[static_cast<size_t>(src)] = true;
      report.skip_reason = std::string("timeout: ") + e.what();
      return false;
    } catch (const PeerError& e) {
      link_broken_[static_cast<size_t>(dst)] = link_broken_[static_cast<size_t>(src)] = true;
      report.skip_reason = std::string("peer failed: ") + e.what();
      return false;
    }
    for (size_t i = 0; i < values; ++i) acc_[i] += buf.recv[i];
  }
  return true;
}

void OuterSync::noloco_step(OuterReport& report) {
  const auto groups = outer_groups(replicas_, options_.group_size, options_.odd_policy, options_.seed, outer_step_);
  for (const auto& g : groups)
    if (std::find(g.begin(), g.end(), replica_) != g.end()) report.group = g;
  const size_t n = static_cast<size_t>(count_);
  const bool one_exchange = options_.gamma == options_.alpha;
  const size_t values = one_exchange ? n : 2 * n;
  ExchangeBuffers& buf = take_exchange_buffers();
  read_theta(buf.send.data());  // [theta] or [theta | phi]
  if (!one_exchange) std::copy(phi_.begin(), phi_.end(), buf.send.begin() + static_cast<ptrdiff_t>(n));
  // Own values, kept here: an abandoned exchange's send buffer is not read again.
  std::copy(buf.send.begin(), buf.send.begin() + static_cast<ptrdiff_t>(values), acc_.begin());

  bool averaged = true;
  if (report.group.size() <= 1) {
    report.skipped = replicas_ > 1;
    if (report.skipped) report.skip_reason = "singleton group";
    return_exchange_buffers(false);
  } else {
    const auto t0 = clock::now();
    averaged = exchange(report.group, values, report);
    report.exchange_seconds = seconds_since(t0);
    if (!averaged) {  // own pseudo-gradient only: G = {self}
      report.skipped = true;
      read_theta(acc_.data());
      if (!one_exchange) std::copy(phi_.begin(), phi_.end(), acc_.begin() + static_cast<ptrdiff_t>(n));
    }
    if (averaged) {  // own theta is still in the send buffer; the group's sum in acc_
      const double inv_g = 1.0 / static_cast<double>(report.group.size());
      double sq = 0;
      for (size_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(buf.send[i]) - acc_[i] * inv_g;
        sq += d * d;
      }
      report.group_distance_sq = sq;
      report.group_distance_numel = tensor_elems_;
    }
    return_exchange_buffers(!averaged);
  }
  const double inv = averaged ? 1.0 / static_cast<double>(report.group.size()) : 1.0;
  const double a = options_.alpha, b = options_.beta, c = options_.gamma;
  for (size_t i = 0; i < n; ++i) {
    const double phi = phi_[i];
    const double theta_bar = acc_[i] * inv;
    double mom = b * momentum_[i];
    if (one_exchange) {
      mom += a * (theta_bar - phi);
    } else {
      const double phi_bar = acc_[n + i] * inv;
      mom += a * (theta_bar - phi_bar) + c * (phi_bar - phi);
    }
    momentum_[i] = static_cast<float>(mom);
    phi_[i] = static_cast<float>(phi + mom);
  }
}

void OuterSync::diloco_step(OuterReport& report) {
  report.group.resize(static_cast<size_t>(replicas_));
  for (int r = 0; r < replicas_; ++r) report.group[static_cast<size_t>(r)] = r;
  const size_t n = static_cast<size_t>(count_);
  ExchangeBuffers& buf = take_exchange_buffers();
  float* delta = buf.send.data();
  read_theta(delta);
  for (size_t i = 0; i < n; ++i) delta[i] = phi_[i] - delta[i];  // delta = phi - theta
  const auto t0 = clock::now();
  if (replicas_ > 1) {
    buf.works = {cross_.all_reduce(delta, delta, n, DType::kF32, comm::ReduceOp::kAvg)};
    // A collective cannot be abandoned on MPI (no cancel, no ULFM in OpenMPI 4.1): a failure ends the
    // job on every replica alike (the cross communicator is aborted, so the others fail fast) with phi,
    // m and theta untouched; the latest checkpoint is the place to resume from.
    auto fail = [&](const std::string& what) {
      return "DiLoCo outer step " + std::to_string(outer_step_) + " stopped: its all-reduce over " +
             std::to_string(replicas_) + " replicas failed (" + what +
             "); a collective cannot be abandoned, so the job ends; resume from the latest checkpoint";
    };
    try {
      buf.works[0]->wait(options_.timeout);
    } catch (const TimeoutError& e) {
      return_exchange_buffers(true);  // MPI may still write the buffer
      throw TimeoutError(fail(e.what()));
    } catch (const PeerError& e) {
      return_exchange_buffers(true);
      throw PeerError(fail(e.what()));
    }
  }
  report.exchange_seconds = seconds_since(t0);
  std::copy(delta, delta + n, acc_.begin());
  return_exchange_buffers(false);
  const double lr = options_.diloco_lr, mu = options_.diloco_momentum;
  for (size_t i = 0; i < n; ++i) {
    const double g = acc_[i];
    const double buf = mu * momentum_[i] + g;
    momentum_[i] = static_cast<float>(buf);
    const double step = options_.diloco_nesterov ? g + mu * buf : buf;
    phi_[i] = static_cast<float>(phi_[i] - lr * step);
  }
}

double OuterSync::consensus_distance() {
  const size_t n = static_cast<size_t>(count_);
  std::vector<float> theta(n), mean(n);  // logging only: its own buffers, never an exchange's
  read_theta(theta.data());
  mean = theta;
  cross_.all_reduce(mean.data(), mean.data(), n, DType::kF32, comm::ReduceOp::kAvg)->wait();
  double local = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(theta[i]) - mean[i];
    local += d * d;
  }
  // [sum of squares, numel] summed over replicas and shards.
  float sums[2] = {static_cast<float>(local), replica_ == 0 ? static_cast<float>(tensor_elems_) : 0.0f};
  cross_.all_reduce(sums, sums, 2, DType::kF32, comm::ReduceOp::kSum)->wait();
  engine_.collective_on_host_values(sums, sizeof(sums), [&](void* p) {
    return engine_.comm().all_reduce(p, p, 2, DType::kF32, comm::ReduceOp::kSum);
  });
  const double numel = sums[1];
  return numel > 0 ? std::sqrt(sums[0] / (replicas_ * numel)) : 0.0;
}

namespace {
// [phi | m | engine state (master pieces and optimizer slots)] of this rank, and the sizes.
size_t rejoin_values(size_t count, const std::vector<std::span<float>>& engine_state) {
  size_t n = 2 * count;
  for (const auto& r : engine_state) n += r.size();
  return n;
}
}  // namespace

void OuterSync::send_state(comm::Communicator& link, int peer, int tag) {
  const size_t n = static_cast<size_t>(count_);
  const auto engine_state = engine_state_arrays(engine_);
  std::vector<float> buf(rejoin_values(n, engine_state));  // restart path: not hot
  std::copy(phi_.begin(), phi_.end(), buf.begin());
  std::copy(momentum_.begin(), momentum_.end(), buf.begin() + static_cast<ptrdiff_t>(n));
  float* dst = buf.data() + 2 * n;
  for (const auto& r : engine_state) {
    if (!r.empty()) engine_.step_backend().download(dst, r.data(), r.size_bytes());
    dst += r.size();
  }
  const int64_t step = engine_.optimizer_step();  // bias corrections and schedules continue from it
  auto data = link.send(buf.data(), buf.size(), DType::kF32, peer, tag);
  auto counter = link.send(&step, 1, DType::kI64, peer, tag);
  data->wait(options_.timeout);
  counter->wait(options_.timeout);
}

void OuterSync::receive_state(comm::Communicator& link, int peer, int tag) {
  const size_t n = static_cast<size_t>(count_);
  const auto engine_state = engine_state_arrays(engine_);
  std::vector<float> buf(rejoin_values(n, engine_state));
  int64_t step = 0;
  auto data = link.recv(buf.data(), buf.size(), DType::kF32, peer, tag);
  auto counter = link.recv(&step, 1, DType::kI64, peer, tag);
  data->wait(options_.timeout);
  counter->wait(options_.timeout);
  std::copy(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(n), phi_.begin());
  std::copy(buf.begin() + static_cast<ptrdiff_t>(n), buf.begin() + static_cast<ptrdiff_t>(2 * n), momentum_.begin());
  const float* src = buf.data() + 2 * n;
  for (const auto& r : engine_state) {
    if (!r.empty()) engine_.step_backend().upload(r.data(), src, r.size_bytes());
    src += r.size();
  }
  engine_.set_optimizer_step(step);
  refresh_params();
}

}  // namespace shardopt::runtime::gossip
