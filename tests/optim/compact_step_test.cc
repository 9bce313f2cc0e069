// Optimizer steps over compact (q8 / bf16) state against a plain double-precision reference that
// decodes the same stored state, applies the formula of ALGORITHMS.md, and bounds the re-encoded
// state by the code's documented error (optim/quant8.h).
#include "optim/compact_step.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "base/error.h"
#include "base/thread_pool.h"

namespace shardopt::optim {
namespace {

// One slice with its compact slots, plus everything the reference needs.
struct CompactCase {
  std::vector<float> master, grad;
  std::vector<uint8_t> bytes[2];
  std::vector<float> absmax[2];
  CompactSlots slots;
  ElementwiseSlice slice;
};

// Random weights and gradients; state slots filled with random values (slot 1 >= 0 when
// slot1_nonnegative) already encoded in `dtype`.
CompactCase make_case(size_t n, StateDType dtype, bool slot1_nonnegative, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  CompactCase c;
  c.master.resize(n);
  c.grad.resize(n);
  for (size_t i = 0; i < n; ++i) {
    c.master[i] = normal(rng);
    // Per-block scales spread over decades, like real moments.
    c.grad[i] = normal(rng) * std::pow(10.0f, static_cast<float>(static_cast<int>(i / 256) % 4) - 2.0f);
  }
  for (int k = 0; k < 2; ++k) {
    const bool nonneg = k == 1 && slot1_nonnegative;
    std::vector<float> init(n);
    for (size_t i = 0; i < n; ++i) init[i] = nonneg ? 0.01f * c.grad[i] * c.grad[i] : 0.3f * c.grad[i];
    c.bytes[k].assign(n * (dtype == proto::STATE_BF16 ? 2 : 1), 0);
    c.absmax[k].assign(static_cast<size_t>(q8_num_blocks(static_cast<int64_t>(n))), 0.0f);
    CompactState& s = c.slots.slot[k];
    s.dtype = dtype;
    s.values = c.bytes[k].data();
    s.absmax = dtype == proto::STATE_Q8 ? c.absmax[k].data() : nullptr;
    s.nonnegative = nonneg;
    store_compact(s, static_cast<int64_t>(n), init.data());
  }
  c.slice.master = c.master.data();
  c.slice.grad = c.grad.data();
  c.slice.count = n;
  return c;
}

std::vector<float> decode(const CompactState& s, size_t n) {
  std::vector<float> out(n);
  load_compact(s, static_cast<int64_t>(n), out.data());
  return out;
}

// |stored - want| within the code's bound: q8 against the block absmax of `want`, bf16 relative.
void expect_encoded(const CompactState& s, const std::vector<double>& want, const char* what) {
  const auto got = decode(s, want.size());
  for (size_t start = 0; start < want.size(); start += kQ8BlockElems) {
    const size_t end = std::min(want.size(), start + kQ8BlockElems);
    double a = 0;
    for (size_t i = start; i < end; ++i) a = std::max(a, std::fabs(want[i]));
    for (size_t i = start; i < end; ++i) {
      const double bound = s.dtype == proto::STATE_Q8
                               ? a * q8_error_bound(Q8CodeKind::kFloat8, !s.nonnegative, want[i] / a) + 1e-5 * a
                               : std::fabs(want[i]) * 0x1p-8 + 1e-30;
      ASSERT_LE(std::fabs(got[i] - want[i]), bound) << what << " element " << i;
    }
  }
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double rel, const char* what) {
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rel * std::max(1.0, std::fabs(want[i]))) << what << " element " << i;
}

// 9000 elements: 35 q8 blocks and a short one; crosses bf16 tiles (2048).
constexpr size_t kN = 9000;

class CompactAdamW : public testing::TestWithParam<StateDType> {};

TEST_P(CompactAdamW, MatchesTheDoubleReferenceOnTheDecodedState) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_ADAMW);
  cfg.set_lr(0.01);
  cfg.set_weight_decay(0.1);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  CompactCase c = make_case(kN, GetParam(), true, 11);
  const auto m0 = decode(c.slots.slot[0], kN), v0 = decode(c.slots.slot[1], kN);
  const std::vector<float> w0 = c.master;
  const int64_t step = 3;
  const float lr = 0.01f;
  elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&c.slots, 1), lr, step);

  std::vector<double> m1(kN), v1(kN), w1(kN);
  const double bias1 = 1 - std::pow(p.beta1, step), bias2 = 1 - std::pow(p.beta2, step);
  for (size_t i = 0; i < kN; ++i) {
    const double g = c.grad[i];
    m1[i] = p.beta1 * m0[i] + (1 - p.beta1) * g;
    v1[i] = p.beta2 * v0[i] + (1 - p.beta2) * g * g;
    w1[i] = w0[i] * (1 - lr * p.weight_decay) - lr / bias1 * m1[i] / (std::sqrt(v1[i] / bias2) + p.eps);
  }
  expect_close(c.master, w1, 1e-5, "master");
  expect_encoded(c.slots.slot[0], m1, "m");
  expect_encoded(c.slots.slot[1], v1, "v");
  EXPECT_NE(c.master[0], w0[0]);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CompactAdamW, testing::Values(proto::STATE_Q8, proto::STATE_BF16),
                         [](const auto& info) { return state_dtype_name(info.param); });

// Chunks on a pool of 3 threads, several slices (one spanning many chunks, one shorter than a
// block), three steps: the same master, codes and absmax bit for bit as one thread with the same
// loops (the invariant N threads == 1 thread); the steps did move the weights.
TEST(CompactStep, PoolAndVectorLoopsGiveTheSingleThreadResultBitForBit) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_ADAMW);
  cfg.set_weight_decay(0.1);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  const size_t sizes[] = {9000, 40000, 100};
  auto run = [&](const KernelOptions& exec) {
    std::vector<CompactCase> cases;
    for (size_t i = 0; i < 3; ++i) cases.push_back(make_case(sizes[i], proto::STATE_Q8, true, 40 + static_cast<uint32_t>(i)));
    std::vector<ElementwiseSlice> slices;
    std::vector<CompactSlots> slots;
    for (CompactCase& c : cases) slices.push_back(c.slice), slots.push_back(c.slots);
    for (int64_t step = 1; step <= 3; ++step) elementwise_step_compact(p, slices, slots, 0.01f, step, FiniteCheck::kNone, exec);
    return cases;
  };
  ThreadPool pool(3);
  // Per build: the fp32 update differs between the portable and the FMA builds.
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
    if (!cpu_supports(isa)) continue;
    const auto want = run(KernelOptions{nullptr, isa}), got = run(KernelOptions{&pool, isa});
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].master, want[i].master) << "slice " << i << " " << isa_name(isa);
      for (int k = 0; k < 2; ++k) {
        ASSERT_EQ(got[i].bytes[k], want[i].bytes[k]) << "slice " << i << " slot " << k;
        ASSERT_EQ(got[i].absmax[k], want[i].absmax[k]) << "slice " << i << " slot " << k;
      }
      ASSERT_NE(want[i].master[0], make_case(sizes[i], proto::STATE_Q8, true, 40 + static_cast<uint32_t>(i)).master[0]);
    }
  }
}

TEST(CompactLion, MatchesTheDoubleReferenceOnTheDecodedState) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_LION);
  cfg.set_weight_decay(0.1);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  CompactCase c = make_case(kN, proto::STATE_Q8, false, 12);
  const auto m0 = decode(c.slots.slot[0], kN);
  const std::vector<float> w0 = c.master;
  const float lr = 1e-3f;
  elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&c.slots, 1), lr, 5);
  std::vector<double> m1(kN), w1(kN);
  for (size_t i = 0; i < kN; ++i) {
    const double g = c.grad[i], cc = p.beta1 * m0[i] + (1 - p.beta1) * g;
    w1[i] = w0[i] * (1 - lr * p.weight_decay) - lr * ((cc > 0) - (cc < 0));
    m1[i] = p.beta2 * m0[i] + (1 - p.beta2) * g;
  }
  expect_close(c.master, w1, 1e-6, "master");
  expect_encoded(c.slots.slot[0], m1, "m");
}

TEST(CompactSgd, MomentumMatchesTheDoubleReferenceOnTheDecodedState) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_SGD);
  cfg.set_momentum(0.9);
  cfg.set_nesterov(true);
  cfg.set_weight_decay(0.01);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  CompactCase c = make_case(kN, proto::STATE_Q8, false, 13);
  const auto b0 = decode(c.slots.slot[0], kN);
  const std::vector<float> w0 = c.master;
  const float lr = 0.05f;
  elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&c.slots, 1), lr, 4);
  std::vector<double> b1(kN), w1(kN);
  for (size_t i = 0; i < kN; ++i) {
    const double g = c.grad[i] + p.weight_decay * w0[i];
    b1[i] = p.momentum * b0[i] + g;
    w1[i] = w0[i] - lr * (g + p.momentum * b1[i]);
  }
  expect_close(c.master, w1, 1e-5, "master");
  expect_encoded(c.slots.slot[0], b1, "buf");
}

TEST(CompactMuon, MomentumIsEncodedWithinTheBoundAndTheUpdateUsesTheDecodedState) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_MUON);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  const int64_t rows = 24, cols = 40;
  const auto n = static_cast<size_t>(rows * cols);
  CompactCase c = make_case(n, proto::STATE_Q8, false, 14);
  const auto m0 = decode(c.slots.slot[0], n);
  // fp32 path on the decoded state: the compact step must give exactly its weights.
  std::vector<float> w_ref = c.master, m_ref = m0;
  MuonWorkspace ws(rows, cols);
  MuonMatrix ref{w_ref.data(), nullptr, c.grad.data(), DType::kF32, m_ref.data(), nullptr, rows, cols, {}};
  muon_step(p, ref, 0.02f, ws);

  std::vector<float> scratch(n, -7.0f);
  MuonMatrix mm{c.master.data(), nullptr, c.grad.data(), DType::kF32, scratch.data(), nullptr, rows, cols, {}};
  muon_step_compact(p, mm, c.slots.slot[0], 0.02f, ws);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(c.master[i], w_ref[i]) << i;
  std::vector<double> m1(n);
  for (size_t i = 0; i < n; ++i) m1[i] = p.momentum * m0[i] + (1 - p.momentum) * c.grad[i];
  expect_encoded(c.slots.slot[0], m1, "momentum");
}

// The compact momentum's decode and encode on pools of 1, 2 and 3 threads and in every build: the
// same weights, codes / bf16 values and absmax bit for bit as the definition computed in one call
// each (q8_dequantize or bf16 widening of the whole matrix, the fp32 muon_step, q8_quantize or bf16
// rounding of the whole matrix). 131 x 777 = 101787 elements: 4 pool tasks, the last one short and
// ending in a short q8 block. Muon and NorMuon, three steps. Also called from inside pool tasks.
TEST(CompactMuon, PoolDecodeAndEncodeGiveTheOneCallResultBitForBit) {
  const int64_t rows = 131, cols = 777;
  const auto n = static_cast<size_t>(rows * cols);
  ASSERT_GT(static_cast<int64_t>(n), 3 * kCompactChunkElems);
  ASSERT_NE(static_cast<int64_t>(n) % kQ8BlockElems, 0);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  for (auto kind : {proto::OPTIMIZER_MUON, proto::OPTIMIZER_NORMUON})
    for (StateDType dtype : {proto::STATE_Q8, proto::STATE_BF16}) {
      proto::OptimizerConfig cfg;
      cfg.set_kind(kind);
      cfg.set_weight_decay(0.1);
      const OptimizerParams p = resolve_optimizer_config(cfg);
      const CompactCase start = make_case(n, dtype, false, 70);
      MuonWorkspace ws(rows, cols);
      std::vector<float> grads[3];  // a new gradient each step, so the codes change, not only the scales
      for (int step = 0; step < 3; ++step) grads[step] = make_case(n, dtype, false, 71 + step).grad;

      // The definition: whole-matrix codec calls around the fp32 step.
      std::vector<float> w_ref = start.master, m(n), v_ref(static_cast<size_t>(rows), 0.0f);
      std::vector<uint8_t> bytes_ref = start.bytes[0];
      std::vector<float> absmax_ref = start.absmax[0];
      for (int step = 0; step < 3; ++step) {
        if (dtype == proto::STATE_Q8) {
          q8_dequantize(bytes_ref.data(), absmax_ref.data(), static_cast<int64_t>(n), false, m.data());
        } else {
          const auto* b = reinterpret_cast<const bf16*>(bytes_ref.data());
          for (size_t i = 0; i < n; ++i) m[i] = bf16_to_float(b[i]);
        }
        MuonMatrix ref{w_ref.data(), nullptr, grads[step].data(), DType::kF32, m.data(), v_ref.data(), rows, cols, {}};
        muon_step(p, ref, 0.02f, ws);
        if (dtype == proto::STATE_Q8) {
          q8_quantize(m.data(), static_cast<int64_t>(n), false, bytes_ref.data(), absmax_ref.data());
        } else {
          auto* b = reinterpret_cast<bf16*>(bytes_ref.data());
          for (size_t i = 0; i < n; ++i) b[i] = float_to_bf16(m[i]);
        }
      }
      size_t codes_changed = 0;  // the momentum moved
      for (size_t i = 0; i < bytes_ref.size(); ++i) codes_changed += bytes_ref[i] != start.bytes[0][i];
      ASSERT_GT(codes_changed, bytes_ref.size() / 2);

      for (ThreadPool& pool : pools)
        for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
          if (!cpu_supports(isa)) continue;
          SCOPED_TRACE(testing::Message() << optimizer_kind_name(kind) << " " << state_dtype_name(dtype) << " threads "
                                          << pool.size() << " " << isa_name(isa));
          CompactCase c = start;
          c.slots.slot[0].values = c.bytes[0].data();
          c.slots.slot[0].absmax = dtype == proto::STATE_Q8 ? c.absmax[0].data() : nullptr;
          std::vector<float> scratch(n, -7.0f), v(static_cast<size_t>(rows), 0.0f);
          MuonMatrix mm{c.master.data(), nullptr, nullptr, DType::kF32, scratch.data(), v.data(), rows, cols, {}};
          for (int step = 0; step < 3; ++step) {
            mm.grad = grads[step].data();
            muon_step_compact(p, mm, c.slots.slot[0], 0.02f, ws, FiniteCheck::kNone, KernelOptions{&pool, isa});
          }
          ASSERT_EQ(c.master, w_ref);
          ASSERT_EQ(c.bytes[0], bytes_ref);
          ASSERT_EQ(c.absmax[0], absmax_ref);
          ASSERT_EQ(v, v_ref);
        }

      // Three matrices at once as tasks of the 3-thread pool, each passing that pool: the nested
      // decode and encode run inline on the task's thread (no deadlock, no oversubscription), same result.
      std::vector<CompactCase> copies(3, start);
      std::vector<std::vector<float>> scratch(3, std::vector<float>(n)), v(3, std::vector<float>(rows, 0.0f));
      std::vector<MuonWorkspace> workspaces;
      for (int i = 0; i < 3; ++i) workspaces.emplace_back(rows, cols);
      ThreadPool& pool = pools[2];
      pool.parallel_for(3, [&](int64_t task, int) {
        const auto t = static_cast<size_t>(task);
        CompactCase& c = copies[t];
        c.slots.slot[0].values = c.bytes[0].data();
        c.slots.slot[0].absmax = dtype == proto::STATE_Q8 ? c.absmax[0].data() : nullptr;
        MuonMatrix mm{c.master.data(), nullptr, nullptr, DType::kF32, scratch[t].data(), v[t].data(), rows, cols, {}};
        for (int step = 0; step < 3; ++step) {
          mm.grad = grads[step].data();
          muon_step_compact(p, mm, c.slots.slot[0], 0.02f, workspaces[t], FiniteCheck::kNone, KernelOptions{&pool});
        }
      });
      for (const CompactCase& c : copies) {
        ASSERT_EQ(c.master, w_ref) << "nested";
        ASSERT_EQ(c.bytes[0], bytes_ref) << "nested";
        ASSERT_EQ(c.absmax[0], absmax_ref) << "nested";
      }
    }
}

// Bit patterns (NaN == NaN; -0 != +0).
std::vector<uint32_t> bits_of(const std::vector<float>& x) {
  std::vector<uint32_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = std::bit_cast<uint32_t>(x[i]);
  return out;
}

// The fused q8 step (decode in the update loop, encode from L1; the AVX-512 AdamW range encodes each
// block during the next block's update) against its definition composed of independent parts:
// decode the state with q8_dequantize, run the fp32 elementwise_step on it, encode with q8_quantize
// in the portable build. Bit for bit (weights, mirror, codes, absmax), for `kind` with f32 or bf16
// gradients, with or without a bf16 mirror, in build `isa` (the fused step and the fp32 step of one
// build against each other). `start` holds the slice and its encoded state; its grad is fp32.
void expect_fused_step_equals_composed(const CompactCase& start, proto::OptimizerKind kind, bool bf16_grad,
                                       bool with_mirror, Isa isa, const std::string& label) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(kind);
  cfg.set_weight_decay(0.1);
  if (kind == proto::OPTIMIZER_SGD) cfg.set_momentum(0.9), cfg.set_nesterov(true);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  const int slots = state_values_per_element(p);
  CompactCase c = start;
  const size_t n = c.master.size();
  for (int k = 0; k < 2; ++k) {  // the copy's slots point at its own storage
    c.slots.slot[k].values = c.bytes[k].data();
    c.slots.slot[k].absmax = c.absmax[k].data();
  }
  c.slice.master = c.master.data();
  c.slice.grad = c.grad.data();
  std::vector<bf16> grad16(n), mirror(n), mirror_ref(n);
  for (size_t i = 0; i < n; ++i) grad16[i] = float_to_bf16(c.grad[i]);
  if (bf16_grad) c.slice.grad = grad16.data(), c.slice.grad_dtype = DType::kBF16;
  c.slice.mirror = with_mirror ? mirror.data() : nullptr;

  std::vector<float> w_ref = c.master, state[2];
  ElementwiseSlice ref = c.slice;
  ref.master = w_ref.data();
  ref.mirror = with_mirror ? mirror_ref.data() : nullptr;
  for (int k = 0; k < slots; ++k) {
    state[k] = decode(c.slots.slot[k], n);
    ref.state[k] = state[k].data();
  }
  const KernelOptions exec{nullptr, isa};
  elementwise_step(p, std::span(&ref, 1), 0.01f, 4, FiniteCheck::kNone, exec);
  elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&c.slots, 1), 0.01f, 4, FiniteCheck::kNone, exec);
  const std::string what = label + " " + optimizer_kind_name(kind) + (bf16_grad ? " bf16 grad" : " f32 grad") +
                           (with_mirror ? " mirror " : " no mirror ") + isa_name(isa);
  const auto w_bits = bits_of(c.master), w_ref_bits = bits_of(w_ref);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(w_bits[i], w_ref_bits[i]) << what << " weight " << i;
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(mirror[i].bits, mirror_ref[i].bits) << what << " mirror " << i;
  if (with_mirror) {  // the mirror was written: it holds the new weights rounded to bf16
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(mirror[i].bits, float_to_bf16(c.master[i]).bits) << what << " mirror of weight " << i;
  }
  for (int k = 0; k < slots; ++k) {
    const bool nonneg = c.slots.slot[k].nonnegative;
    std::vector<uint8_t> codes(n);
    std::vector<float> absmax(c.absmax[k].size());
    q8_quantize(state[k].data(), static_cast<int64_t>(n), nonneg, codes.data(), absmax.data(), Q8CodeKind::kFloat8,
                Isa::kPortable);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(c.bytes[k][i], codes[i]) << what << " slot " << k << " code " << i;
    const auto got = bits_of(c.absmax[k]), want = bits_of(absmax);
    for (size_t j = 0; j < want.size(); ++j) ASSERT_EQ(got[j], want[j]) << what << " slot " << k << " absmax " << j;
  }
}

TEST(CompactStep, FusedQ8StepEqualsDecodeThenFp32StepThenEncode) {
  for (auto kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD}) {
    const CompactCase c = make_case(kN, proto::STATE_Q8, kind == proto::OPTIMIZER_ADAMW, 60);
    for (bool bf16_grad : {false, true})
      for (bool with_mirror : {true, false})
        for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
          if (cpu_supports(isa)) expect_fused_step_equals_composed(c, kind, bf16_grad, with_mirror, isa, "random");
  }
}

// Blocks of every kind the block encoders tell apart, next to ordinary blocks and in runs of them, over
// two pool tasks (kCompactChunkElems) and a short last block: zero state with zero and with nonzero
// gradients, subnormal and huge state (absmax outside the normal range of 1 / absmax), a NaN and an
// infinite gradient, a zero v with a nonzero m, values that round up past the top code. Block
// pattern i % 12 picks the kind; ordinary blocks run in pairs and triples.
CompactCase special_case(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  CompactCase c;
  c.master.resize(n);
  c.grad.resize(n);
  std::vector<float> init[2] = {std::vector<float>(n), std::vector<float>(n)};
  for (size_t i = 0; i < n; ++i) {
    const size_t block = i / kQ8BlockElems, at = i % kQ8BlockElems;
    // m and v drawn apart from g: a block's codes change in the step (m = 0.3 g would keep them).
    const float z = normal(rng);
    float g = normal(rng) * 1e-2f, m = 3e-3f * normal(rng), v = 1e-6f * z * z;
    switch (block % 12) {
      case 2: g = m = v = 0.0f; break;                                   // all zero
      case 4: m = v = 0.0f; break;                                       // zero state, nonzero gradient
      case 5: g *= 1e-40f, m *= 1e-40f, v = 0x1p-140f * std::fabs(normal(rng)); break;  // subnormal
      case 7:  // huge, finite: m absmax above 2^126; v overflows to +Inf in the step
        g *= 1e38f, m = (at % 2 ? -1e38f : 1e38f) * (1.0f + static_cast<float>(at) / 512.0f), v = 3e38f;
        break;
      case 8:  // a NaN gradient, and a NaN weight whose payload's low bits round up in a bf16 mirror
        if (at == 100) g = std::numeric_limits<float>::quiet_NaN();
        break;
      case 9: if (at == 7) g = -std::numeric_limits<float>::infinity(); break;
      case 10: g = 0.0f, v = 0.0f; break;                               // v zero, m not
      case 11: if (at == 3) m = 0.99999f, g = 0.0f; break;              // rounds near the top code
      default: break;                                                    // 0, 1, 3, 6: ordinary
    }
    c.master[i] = block % 12 == 8 && at == 200 ? std::bit_cast<float>(0x7fc0ffffu) : normal(rng);
    c.grad[i] = g;
    init[0][i] = m;
    init[1][i] = v;
  }
  for (int k = 0; k < 2; ++k) {
    c.bytes[k].assign(n, 0);
    c.absmax[k].assign(static_cast<size_t>(q8_num_blocks(static_cast<int64_t>(n))), 0.0f);
    c.slots.slot[k] = {proto::STATE_Q8, c.bytes[k].data(), c.absmax[k].data(), k == 1};
    store_compact(c.slots.slot[k], static_cast<int64_t>(n), init[k].data());
  }
  c.slice.master = c.master.data();
  c.slice.grad = c.grad.data();
  c.slice.count = n;
  return c;
}

TEST(CompactStep, FusedQ8StepEqualsDecodeThenFp32StepThenEncodeOnSpecialBlocks) {
  const size_t n = static_cast<size_t>(kCompactChunkElems) + 30 * kQ8BlockElems + 77;
  const CompactCase c = special_case(n, 61);
  // The m state really has zero, subnormal and huge blocks (the encoders' other branches).
  const std::vector<float>& a = c.absmax[0];
  EXPECT_TRUE(std::any_of(a.begin(), a.end(), [](float x) { return x == 0.0f; }));
  EXPECT_TRUE(std::any_of(a.begin(), a.end(), [](float x) { return x > 0.0f && x < 0x1p-126f; }));
  EXPECT_TRUE(std::any_of(a.begin(), a.end(), [](float x) { return x > 0x1p126f && std::isfinite(x); }));
  for (auto kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD})
    for (bool bf16_grad : {false, true})
      for (bool with_mirror : {true, false})
        for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
          if (cpu_supports(isa))
            expect_fused_step_equals_composed(c, kind, bf16_grad, with_mirror, isa, "special blocks");
}

TEST(CompactStep, RejectsMissingOrMismatchedState) {
  proto::OptimizerConfig cfg;
  cfg.set_kind(proto::OPTIMIZER_ADAMW);
  const OptimizerParams p = resolve_optimizer_config(cfg);
  CompactCase c = make_case(300, proto::STATE_Q8, true, 15);
  CompactSlots none;
  EXPECT_THROW(elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&none, 1), 0.01f, 1), ConfigError);
  EXPECT_THROW(elementwise_step_compact(p, std::span(&c.slice, 1), {}, 0.01f, 1), ConfigError);
  // AdamW's v in the signed code, or m in the unsigned one: the fused loops would misread them.
  for (int k : {0, 1}) {
    CompactSlots swapped = c.slots;
    swapped.slot[k].nonnegative = !swapped.slot[k].nonnegative;
    EXPECT_THROW(elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&swapped, 1), 0.01f, 1), ConfigError);
  }
  // Mixed storage dtypes in one slice.
  CompactCase b = make_case(300, proto::STATE_BF16, true, 16);
  CompactSlots mixed = c.slots;
  mixed.slot[1] = b.slots.slot[1];
  EXPECT_THROW(elementwise_step_compact(p, std::span(&c.slice, 1), std::span(&mixed, 1), 0.01f, 1), ConfigError);
}

}  // namespace
}  // namespace shardopt::optim
