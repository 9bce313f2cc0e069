#include "comm/halving_schedule.h"

#include <algorithm>

#include "base/error.h"

namespace shardopt::comm {

HalvingSchedule halving_schedule(std::span<const size_t> counts, int rank) {
  const int n = static_cast<int>(counts.size());
  SHARDOPT_ASSERT(n >= 1 && rank >= 0 && rank < n, "halving_schedule: rank outside the counts");
  std::vector<size_t> offset(static_cast<size_t>(n) + 1, 0);
  for (int q = 0; q < n; ++q) offset[q + 1] = offset[q] + counts[q];
  const size_t total = offset[n];

  HalvingSchedule s;
  s.own_begin = offset[rank];
  s.own_end = offset[rank + 1];
  if (n == 1) return s;

  int p = 1;
  while (p * 2 <= n) p *= 2;
  const int extra = n - p;  // ranks 0, 2, .., 2(extra-1) are folded into their right neighbours
  // Participant v's rank, and the first rank whose segment it answers for.
  const auto participant_rank = [extra](int v) { return v < extra ? 2 * v + 1 : v + extra; };
  const auto first_rank = [extra](int v) { return v < extra ? 2 * v : v + extra; };
  // Element offset where participant v's segments begin (v = p: the end of the vector).
  const auto begin_of = [&](int v) { return v == p ? total : offset[first_rank(v)]; };

  if (rank < 2 * extra && rank % 2 == 0) {
    s.folded = true;
    HalvingStep give;
    give.peer = rank + 1;
    give.send = HalvingStep::Send::kInput;
    give.send_end = total;
    HalvingStep take;
    take.peer = rank + 1;
    take.receive = HalvingStep::Receive::kOutput;
    take.recv_begin = s.own_begin;
    take.recv_end = s.own_end;
    s.steps = {give, take};
    return s;
  }

  const int v = rank < 2 * extra ? rank / 2 : rank - extra;
  bool combined = false;  // whether the accumulator holds anything yet
  const auto add_combine = [&](HalvingStep step) {
    if (!combined) s.acc_begin = step.recv_begin, s.acc_end = step.recv_end;
    combined = true;
    s.max_receive = std::max(s.max_receive, step.recv_end - step.recv_begin);
    s.combined_elements += step.recv_end - step.recv_begin;
    s.steps.push_back(step);
  };
  if (v < extra) {  // take the folded rank's whole vector first
    HalvingStep fold;
    fold.peer = 2 * v;
    fold.receive = HalvingStep::Receive::kCombine;
    fold.recv_end = total;
    add_combine(fold);
  }
  int lo = 0, hi = p;  // this participant's current range of participants
  for (int mask = p / 2; mask >= 1; mask /= 2) {
    const int mid = lo + mask;
    const bool upper = (v & mask) != 0;
    HalvingStep round;
    round.peer = participant_rank(v ^ mask);
    round.send = combined ? HalvingStep::Send::kAccumulator : HalvingStep::Send::kInput;
    round.send_begin = begin_of(upper ? lo : mid);
    round.send_end = begin_of(upper ? mid : hi);
    round.receive = HalvingStep::Receive::kCombine;
    round.recv_begin = begin_of(upper ? mid : lo);
    round.recv_end = begin_of(upper ? hi : mid);
    add_combine(round);
    if (upper) lo = mid;
    else hi = mid;
  }
  if (v < extra) {  // hand the folded rank its segment
    HalvingStep back;
    back.peer = 2 * v;
    back.send = HalvingStep::Send::kAccumulator;
    back.send_begin = offset[2 * v];
    back.send_end = offset[2 * v + 1];
    s.steps.push_back(back);
  }
  return s;
}

std::vector<DoublingStep> doubling_schedule(std::span<const size_t> counts, int rank) {
  const HalvingSchedule rs = halving_schedule(counts, rank);
  std::vector<DoublingStep> steps;
  const size_t total = [&] {
    size_t t = 0;
    for (size_t c : counts) t += c;
    return t;
  }();
  for (auto it = rs.steps.rbegin(); it != rs.steps.rend(); ++it) {
    DoublingStep d;
    d.peer = it->peer;
    if (it->receive == HalvingStep::Receive::kOutput) {  // folded rank: its segment goes out first
      d.send_begin = it->recv_begin, d.send_end = it->recv_end;
    } else if (it->receive == HalvingStep::Receive::kCombine) {
      // The range it reduced is the range it now holds whole and sends (the fold's: the whole vector).
      d.send_begin = it->recv_begin, d.send_end = it->recv_end;
    }
    if (it->send == HalvingStep::Send::kInput && rs.folded) {  // folded rank: the whole vector comes back last
      d.recv_begin = 0, d.recv_end = total;
    } else if (it->send != HalvingStep::Send::kNothing) {
      d.recv_begin = it->send_begin, d.recv_end = it->send_end;
    }
    steps.push_back(d);
  }
  return steps;
}

}  // namespace shardopt::comm
