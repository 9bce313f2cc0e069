// The MPI backend's reduce-scatter schedule (comm/halving_schedule.h), executed in one process for
// every rank count 1-13 and several splits (even, skewed, empty segments, all empty): each step's
// send is delivered only when the peer has posted the matching receive (rendezvous, so a schedule
// that could deadlock under MPI fails here), the combines follow the header's rules, and every
// rank's segment must equal the double-precision sum of all inputs. Also the cost the header
// promises: what each rank sends and combines.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "comm/halving_schedule.h"

namespace shardopt::comm {
namespace {

// Rank r's input element i: distinct integers, so every sum is exact in double.
double input_value(int r, size_t i) { return static_cast<double>((r + 1) * 100003 + static_cast<int64_t>(i) * 7); }

struct RankRun {
  HalvingSchedule s;
  std::vector<double> input, acc, recv, output;
  size_t step = 0;
  bool send_done = false, recv_done = false;
  bool combined = false;
  size_t last_combine = 0;
  size_t sent_elements = 0;
};

// Runs every rank's schedule to completion; returns the outputs (fails the test on a deadlock).
std::vector<RankRun> execute(const std::vector<size_t>& counts) {
  const int n = static_cast<int>(counts.size());
  const size_t total = std::accumulate(counts.begin(), counts.end(), size_t{0});
  std::vector<RankRun> ranks(n);
  for (int r = 0; r < n; ++r) {
    RankRun& k = ranks[r];
    k.s = halving_schedule(counts, r);
    k.input.resize(total);
    for (size_t i = 0; i < total; ++i) k.input[i] = input_value(r, i);
    k.acc.assign(k.s.acc_end - k.s.acc_begin, -1.0);
    k.recv.assign(k.s.max_receive, -1.0);
    k.output.assign(k.s.own_end - k.s.own_begin, -1.0);
    for (size_t i = 0; i < k.s.steps.size(); ++i)
      if (k.s.steps[i].receive == HalvingStep::Receive::kCombine) k.last_combine = i;
    if (k.s.steps.empty())
      std::copy(k.input.begin() + static_cast<ptrdiff_t>(k.s.own_begin),
                k.input.begin() + static_cast<ptrdiff_t>(k.s.own_end), k.output.begin());
  }
  const auto posted = [&](int r) -> const HalvingStep* {
    return ranks[r].step < ranks[r].s.steps.size() ? &ranks[r].s.steps[ranks[r].step] : nullptr;
  };
  for (bool progress = true; progress;) {
    progress = false;
    for (int r = 0; r < n; ++r) {
      RankRun& k = ranks[r];
      const HalvingStep* st = posted(r);
      if (st == nullptr) continue;
      // Deliver r's send when the peer's posted step receives from r and has not received yet.
      if (st->send != HalvingStep::Send::kNothing && !k.send_done) {
        RankRun& p = ranks[st->peer];
        const HalvingStep* ps = posted(st->peer);
        if (ps != nullptr && ps->peer == r && ps->receive != HalvingStep::Receive::kNothing && !p.recv_done) {
          const size_t len = st->send_end - st->send_begin;
          EXPECT_EQ(len, ps->recv_end - ps->recv_begin) << "rank " << r << " -> " << st->peer << " step " << k.step;
          EXPECT_EQ(st->send_begin, ps->recv_begin) << "rank " << r << " -> " << st->peer << " step " << k.step;
          for (size_t i = 0; i < len; ++i) {
            const size_t g = st->send_begin + i;
            const double v = st->send == HalvingStep::Send::kInput ? k.input[g] : k.acc[g - k.s.acc_begin];
            if (ps->receive == HalvingStep::Receive::kOutput) p.output[g - p.s.own_begin] = v;
            else p.recv[i] = v;
          }
          k.sent_elements += len;
          k.send_done = true;
          p.recv_done = true;
          progress = true;
        }
      }
    }
    for (int r = 0; r < n; ++r) {  // complete the steps whose parts have all happened
      RankRun& k = ranks[r];
      const HalvingStep* st = posted(r);
      if (st == nullptr) continue;
      const bool send_ok = st->send == HalvingStep::Send::kNothing || k.send_done;
      const bool recv_ok = st->receive == HalvingStep::Receive::kNothing || k.recv_done;
      if (!send_ok || !recv_ok) continue;
      if (st->receive == HalvingStep::Receive::kCombine) {
        for (size_t g = st->recv_begin; g < st->recv_end; ++g) {
          const double v = (k.combined ? k.acc[g - k.s.acc_begin] : k.input[g]) + k.recv[g - st->recv_begin];
          const bool own = g >= k.s.own_begin && g < k.s.own_end;
          if (k.step == k.last_combine && own) k.output[g - k.s.own_begin] = v;
          else k.acc[g - k.s.acc_begin] = v;
        }
        k.combined = true;
      }
      ++k.step;
      k.send_done = k.recv_done = false;
      progress = true;
    }
  }
  for (int r = 0; r < n; ++r)
    EXPECT_EQ(ranks[r].step, ranks[r].s.steps.size()) << "rank " << r << " of " << n << " deadlocked";
  return ranks;
}

std::vector<std::vector<size_t>> splits(int n) {
  std::vector<std::vector<size_t>> out;
  out.push_back(std::vector<size_t>(n, 5));                      // even
  std::vector<size_t> skewed(n);
  for (int r = 0; r < n; ++r) skewed[r] = static_cast<size_t>((r * 37 + 11) % 23);  // uneven, some empty
  out.push_back(skewed);
  std::vector<size_t> one(n, 0);
  one[n / 2] = 9;                                                // one rank owns everything
  out.push_back(one);
  out.push_back(std::vector<size_t>(n, 0));                      // nothing at all
  return out;
}

TEST(HalvingSchedule, EveryRankGetsTheSumOfItsSegment) {
  for (int n = 1; n <= 13; ++n)
    for (const auto& counts : splits(n)) {
      const auto ranks = execute(counts);
      size_t off = 0;
      for (int r = 0; r < n; ++r) {
        ASSERT_EQ(ranks[r].output.size(), counts[r]);
        for (size_t k = 0; k < counts[r]; ++k) {
          double want = 0;
          for (int q = 0; q < n; ++q) want += input_value(q, off + k);
          ASSERT_EQ(ranks[r].output[k], want) << "n " << n << " rank " << r << " element " << k;
        }
        off += counts[r];
      }
    }
}

// The cost of recursive halving: log2 P rounds; each round sends the half of the current range that
// the rank gives up, so a participant sends the whole vector less its final range (its own segment
// and its folded rank's); with P = N and an even split it sends and combines B (P-1)/P elements. A
// folded rank sends its whole vector once and combines nothing; its participant combines that
// vector once more and sends the folded rank's segment back.
TEST(HalvingSchedule, TrafficAndCombinesAreThoseOfRecursiveHalving) {
  constexpr size_t kSegment = 6;
  for (int n = 2; n <= 13; ++n) {
    int p = 1, rounds = 0;
    while (p * 2 <= n) p *= 2, ++rounds;
    const int extra = n - p;
    const std::vector<size_t> counts(n, kSegment);
    const size_t total = kSegment * static_cast<size_t>(n);
    const auto ranks = execute(counts);
    for (int r = 0; r < n; ++r) {
      const HalvingSchedule& s = ranks[r].s;
      const bool folded = r < 2 * extra && r % 2 == 0;
      const bool has_fold = r < 2 * extra && r % 2 == 1;
      ASSERT_EQ(s.folded, folded) << "n " << n << " rank " << r;
      if (folded) {
        EXPECT_EQ(ranks[r].sent_elements, total) << "n " << n << " rank " << r;
        EXPECT_EQ(s.combined_elements, 0u) << "n " << n << " rank " << r;
        EXPECT_EQ(s.steps.size(), 2u) << "n " << n << " rank " << r;
        continue;
      }
      const size_t final_range = has_fold ? 2 * kSegment : kSegment;
      EXPECT_EQ(s.steps.size(), static_cast<size_t>(rounds + (has_fold ? 2 : 0))) << "n " << n << " rank " << r;
      EXPECT_EQ(ranks[r].sent_elements, total - final_range + (has_fold ? kSegment : 0)) << "n " << n << " rank " << r;
      if (extra == 0) {
        EXPECT_EQ(s.combined_elements, total * (p - 1) / p) << "n " << n << " rank " << r;
      }
      if (has_fold) {
        EXPECT_GE(s.combined_elements, total) << "n " << n << " rank " << r;
      }
    }
  }
}

// The all-gather (doubling_schedule) the same way: every rank starts with only its own segment in
// place, a step's send must cover data the rank already holds, and at the end every rank holds every
// segment. Rendezvous delivery, so a step order that could deadlock under MPI fails here too.
TEST(DoublingSchedule, EveryRankEndsWithEverySegment) {
  for (int n = 1; n <= 13; ++n)
    for (const auto& counts : splits(n)) {
      const size_t total = std::accumulate(counts.begin(), counts.end(), size_t{0});
      std::vector<size_t> offset(n + 1, 0);
      for (int r = 0; r < n; ++r) offset[r + 1] = offset[r] + counts[r];
      const auto truth = [](size_t i) { return static_cast<double>(i) * 3 + 1; };
      std::vector<std::vector<DoublingStep>> steps(n);
      std::vector<std::vector<double>> out(n, std::vector<double>(total, -1.0));  // -1: not held yet
      std::vector<size_t> at(n, 0);
      std::vector<char> sent(n, 0), received(n, 0);
      for (int r = 0; r < n; ++r) {
        steps[r] = doubling_schedule(counts, r);
        for (size_t i = offset[r]; i < offset[r + 1]; ++i) out[r][i] = truth(i);
      }
      const auto posted = [&](int r) -> const DoublingStep* { return at[r] < steps[r].size() ? &steps[r][at[r]] : nullptr; };
      for (bool progress = true; progress;) {
        progress = false;
        for (int r = 0; r < n; ++r) {
          const DoublingStep* st = posted(r);
          if (st == nullptr || sent[r] || st->send_end <= st->send_begin) continue;
          const DoublingStep* ps = posted(st->peer);
          if (ps == nullptr || ps->peer != r || received[st->peer] || ps->recv_end <= ps->recv_begin) continue;
          ASSERT_EQ(st->send_begin, ps->recv_begin) << "n " << n << " rank " << r << " -> " << st->peer;
          ASSERT_EQ(st->send_end, ps->recv_end) << "n " << n << " rank " << r << " -> " << st->peer;
          for (size_t i = st->send_begin; i < st->send_end; ++i) {
            ASSERT_NE(out[r][i], -1.0) << "n " << n << " rank " << r << " sends element " << i << " it does not hold";
            out[st->peer][i] = out[r][i];
          }
          sent[r] = received[st->peer] = 1;
          progress = true;
        }
        for (int r = 0; r < n; ++r) {
          const DoublingStep* st = posted(r);
          if (st == nullptr) continue;
          if ((st->send_end > st->send_begin && !sent[r]) || (st->recv_end > st->recv_begin && !received[r])) continue;
          ++at[r];
          sent[r] = received[r] = 0;
          progress = true;
        }
      }
      for (int r = 0; r < n; ++r) {
        ASSERT_EQ(at[r], steps[r].size()) << "rank " << r << " of " << n << " deadlocked";
        for (size_t i = 0; i < total; ++i) ASSERT_EQ(out[r][i], truth(i)) << "n " << n << " rank " << r << " element " << i;
      }
    }
}

}  // namespace
}  // namespace shardopt::comm
