// CompactElementwiseOptimizerCuda (q8 / bf16 state on the GPU) against the CPU step
// optim::elementwise_step_compact on the same inputs, one step at a time over several steps (the
// device starts every step from the CPU's state, so each comparison is of one step), over many
// slices of lengths that end mid-block (short last blocks) and a slice longer than a chunk, placed
// at odd offsets of one buffer (most slices then miss the vector kernel's alignment: its
// element-by-element path) or at aligned ones (its wide accesses). Every device case runs under
// both kernels (CompactKernel kWarp and kVector). Skips with a message without a CUDA device.
//
// Tolerances. The device kernel evaluates the CPU formulas in the CPU source's order with
// explicitly rounded operations (no FMA), so against the CPU's portable build (max_isa = Isa::kPortable,
// the reference here) it is expected to agree bit for bit. The bounds allow what another fp32
// evaluation (fused multiply-adds, another order: a few roundings of eps = 2^-24 each) could give,
// derived per element from the magnitudes of the terms of each formula (error_bounds()), because
// a sum whose terms cancel (b1 m + (1 - b1) g) can change by an ulp of its terms, not of itself:
//   new state x (m, v, momentum): E_x = 3 eps (sum of |terms|) (+ the propagated gradient error, SGD);
//   parameters: |d - c| <= 4 eps (|w decay| + |update|) + the update's sensitivity to E_x (AdamW:
//     s E_m / den + |u| ib E_v / (2 sqrt(v) den)); Lion: 2 lr where |c| <= 3 eps (|b1 m| + |(1-b1) g|)
//     (sign(c) may flip), else 4 eps (|w decay| + lr);
//   q8 absmax: |d - c| <= the block's largest E_x + 2 eps |c|;
//   q8 codes: equal, or the adjacent code (same sign) where the boundary between the two codes lies
//     within the error of the CPU's normalized value y = x / absmax (v: sqrt(v) / sqrt(absmax)),
//     E_y = E_x / absmax + |y| E_absmax / absmax + 2 eps |y|; such flips are counted and printed;
//   bf16 state and the bf16 mirror: |d - c| <= E (of the fp32 value) + one bf16 ulp;
//   non-finite values: the same class (NaN, +Inf, -Inf) on both sides.
// These bounds were checked against a host emulation of the kernel with its update arithmetic
// contracted into FMAs (differences in 26% of AdamW parameters, all within the bounds).
// The measured counts (bitwise-equal parameters, flipped codes) are printed per case.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "base/error.h"
#include "optim/compact_step.h"
#include "optim/cuda/compact_elementwise.h"
#include "optim/cuda/compact_kernels.h"
#include "optim/quant8.h"
#include "optim/quant8_codec.h"
#include "tests/gpu/gpu_test_util.h"

namespace shardopt::testing {
namespace {

using optim::CompactState;
using optim::OptimizerParams;

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

constexpr double kEps = 0x1p-24;

// The rounding boundary between adjacent codes k and k + 1 (magnitudes) of a float code whose grid
// keeps the bits above `shift` (optim/quant8_codec.h: code k <-> bits (k + offset) << shift).
double boundary_between(int k, uint32_t shift, int32_t offset) {
  const uint32_t b = (static_cast<uint32_t>(k + 1 + offset) << shift) - (1u << (shift - 1));
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

double bf16_ulp(double x) {
  int e = 0;
  std::frexp(x, &e);
  return std::ldexp(1.0, std::max(e, -125) - 8);
}

bool same_nonfinite_class(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b;
}

struct Layout {
  std::vector<size_t> counts, param_offset, value_offset, absmax_offset;
  size_t params = 0, values = 0, absmax = 0;  // totals (values: elements per slot)
};

// Where the slices lie in their buffers (all of them cudaMalloc'd, so 256-byte aligned).
enum class Placement {
  kOddOffsets,  // a gap of 3 before each slice's parameters, values back to back: mostly misaligned
  kAligned,     // parameters and values at multiples of 4 elements: every pointer run-aligned
};

Layout make_layout(const std::vector<size_t>& counts, Placement placement = Placement::kOddOffsets) {
  Layout l;
  l.counts = counts;
  const auto round4 = [](size_t x) { return (x + 3) / 4 * 4; };
  for (size_t n : counts) {
    l.params += 3;  // gaps: slices at arbitrary alignment in the parameter buffer
    if (placement == Placement::kAligned) {
      l.params = round4(l.params);
      l.values = round4(l.values);
    }
    l.param_offset.push_back(l.params);
    l.params += n;
    l.value_offset.push_back(l.values);
    l.values += n;
    l.absmax_offset.push_back(l.absmax);
    l.absmax += static_cast<size_t>(optim::q8_num_blocks(static_cast<int64_t>(n)));
  }
  return l;
}

// Chunks of a layout whose pointers are all aligned for the vector kernel's runs of 4 elements
// (every array: parameters, grads and mirror share the parameter offset, state values the value
// offset; 4-element runs are 16, 8 or 4 bytes, so an offset that is a multiple of 4 elements is
// aligned for every dtype here, and any other offset is misaligned for the fp32 parameters).
size_t expected_aligned_chunks(const Layout& l) {
  size_t chunks = 0;
  constexpr size_t per_chunk = cuda::CompactElementwiseOptimizerCuda::kChunkElements;
  for (size_t i = 0; i < l.counts.size(); ++i)
    if (l.param_offset[i] % 4 == 0 && l.value_offset[i] % 4 == 0) chunks += (l.counts[i] + per_chunk - 1) / per_chunk;
  return chunks;
}

struct Run {
  std::vector<float> params;
  std::vector<uint8_t> values[2];  // q8 codes or bf16 bytes
  std::vector<float> absmax[2];
  std::vector<uint16_t> mirror;
};

struct Counts {
  size_t param_equal = 0, params = 0, code_flips = 0, codes = 0, bf16_adjacent = 0;
};

struct Case {
  const char* name;
  OptimizerParams params;
  optim::StateDType state;
  DType grad_dtype;
  bool mirror;
};

OptimizerParams params_of(proto::OptimizerKind kind) {
  proto::OptimizerConfig c;
  c.set_kind(kind);
  if (kind == proto::OPTIMIZER_SGD) {
    c.set_momentum(0.9);
    c.set_nesterov(true);
    c.set_weight_decay(0.01);
  }
  if (kind == proto::OPTIMIZER_LION) c.set_weight_decay(0.1);
  return optim::resolve_optimizer_config(c);
}

class CompactStep {
 public:
  CompactStep(const Case& c, const std::vector<size_t>& counts, cuda::CompactKernel kernel,
              Placement placement = Placement::kOddOffsets)
      : c_(c), l_(make_layout(counts, placement)), kernel_(kernel) {
    slots_ = optim::state_values_per_element(c.params);
    value_bytes_ = c.state == proto::STATE_BF16 ? 2 : 1;
    host_.params.assign(l_.params, 0.0f);
    for (int k = 0; k < slots_; ++k) {
      host_.values[k].assign(l_.values * value_bytes_, 0);
      host_.absmax[k].assign(l_.absmax, 0.0f);
    }
    host_.mirror.assign(c.mirror ? l_.params : 0, 0);
    grad_.assign(l_.params * dtype_size(c.grad_dtype), 0);
  }

  const Layout& layout() const { return l_; }
  size_t aligned_chunks() const { return aligned_chunks_; }  // of the last step's chunk table
  size_t chunks() const { return chunks_; }
  std::vector<float>& params() { return host_.params; }
  const std::vector<float>& host_absmax(int k) const { return host_.absmax[k]; }
  void set_grads(const std::vector<float>& g) {
    for (size_t i = 0; i < g.size(); ++i) {
      if (c_.grad_dtype == DType::kBF16) {
        const bf16 b = float_to_bf16(g[i]);
        std::memcpy(grad_.data() + 2 * i, &b, 2);
      } else {
        std::memcpy(grad_.data() + 4 * i, &g[i], 4);
      }
    }
  }

  // One step on the CPU (portable build) and on the device from the same state; compares; the CPU
  // result becomes the state of the next step.
  void step_and_compare(float lr, int64_t t, Counts& n) {
    // Device copies of the current host state.
    DeviceBuffer<float> d_params(host_.params);
    DeviceBuffer<uint8_t> d_grad(grad_);
    DeviceBuffer<uint8_t> d_values0(host_.values[0]), d_values1(slots_ > 1 ? host_.values[1] : std::vector<uint8_t>{});
    DeviceBuffer<float> d_absmax0(host_.absmax[0]), d_absmax1(slots_ > 1 ? host_.absmax[1] : std::vector<float>{});
    DeviceBuffer<uint16_t> d_mirror(host_.mirror.size());
    const Run before = host_;

    // The CPU's fp32 values before rounding: decode, fp32 step (bit for bit the fused one's).
    std::vector<float> f32_state[2];
    std::vector<float> f32_params = host_.params;
    std::vector<optim::ElementwiseSlice> f32_slices;
    std::vector<optim::ElementwiseSlice> slices;
    std::vector<optim::CompactSlots> compact;
    std::vector<cuda::DeviceCompactSlice> device;
    for (int k = 0; k < slots_; ++k) f32_state[k].assign(l_.values, 0.0f);
    for (size_t i = 0; i < l_.counts.size(); ++i) {
      optim::ElementwiseSlice s, f;
      optim::CompactSlots cs;
      cuda::DeviceCompactSlice d;
      s.master = host_.params.data() + l_.param_offset[i];
      s.mirror = c_.mirror ? reinterpret_cast<bf16*>(host_.mirror.data()) + l_.param_offset[i] : nullptr;
      s.grad = grad_.data() + l_.param_offset[i] * dtype_size(c_.grad_dtype);
      s.grad_dtype = c_.grad_dtype;
      s.count = l_.counts[i];
      f = s;
      f.master = f32_params.data() + l_.param_offset[i];
      f.mirror = nullptr;
      d.param = d_params.get() + l_.param_offset[i];
      d.grad = d_grad.get() + l_.param_offset[i] * dtype_size(c_.grad_dtype);
      d.param_bf16 = c_.mirror ? reinterpret_cast<bf16*>(d_mirror.get()) + l_.param_offset[i] : nullptr;
      d.count = l_.counts[i];
      for (int k = 0; k < slots_; ++k) {
        CompactState st;
        st.dtype = c_.state;
        st.nonnegative = optim::q8_slot_is_nonnegative(c_.params.kind, k);
        st.values = host_.values[k].data() + l_.value_offset[i] * value_bytes_;
        st.absmax = host_.absmax[k].data() + l_.absmax_offset[i];
        cs.slot[k] = st;
        f.state[k] = f32_state[k].data() + l_.value_offset[i];
        optim::load_compact(st, static_cast<int64_t>(l_.counts[i]), f.state[k]);
        CompactState dst = st;
        dst.values = (k == 0 ? d_values0.get() : d_values1.get()) + l_.value_offset[i] * value_bytes_;
        dst.absmax = (k == 0 ? d_absmax0.get() : d_absmax1.get()) + l_.absmax_offset[i];
        d.state[k] = dst;
      }
      slices.push_back(s);
      f32_slices.push_back(f);
      compact.push_back(cs);
      device.push_back(d);
    }
    std::vector<float> old_state[2] = {f32_state[0], f32_state[1]};
    const optim::KernelOptions portable{nullptr, optim::Isa::kPortable};
    optim::elementwise_step(c_.params, f32_slices, lr, t, optim::FiniteCheck::kNone, portable);
    error_bounds(lr, t, before.params, old_state, f32_state);
    optim::elementwise_step_compact(c_.params, slices, compact, lr, t, optim::FiniteCheck::kNone, portable);

    cuda::CompactElementwiseOptimizerCuda opt(c_.params, c_.state, c_.grad_dtype, kernel_);
    opt.set_slices(device);
    // The chunks the vector kernel moves with wide accesses are those the layout aligned.
    EXPECT_EQ(opt.aligned_chunk_count(), expected_aligned_chunks(l_)) << c_.name;
    aligned_chunks_ = opt.aligned_chunk_count();
    chunks_ = opt.chunk_count();
    opt.step(c_.params, lr, t, nullptr);
    CUDA_OK(cudaDeviceSynchronize());

    Run dev;
    dev.params = d_params.download();
    dev.values[0] = d_values0.download();
    dev.absmax[0] = d_absmax0.download();
    if (slots_ > 1) {
      dev.values[1] = d_values1.download();
      dev.absmax[1] = d_absmax1.download();
    }
    dev.mirror = d_mirror.download();

    for (size_t i = 0; i < l_.counts.size(); ++i)
      for (size_t e = 0; e < l_.counts[i]; ++e) {
        const size_t p = l_.param_offset[i] + e;
        const float d = dev.params[p], h = host_.params[p], w = before.params[p];
        ++n.params;
        n.param_equal += bits(d) == bits(h);
        if (!std::isfinite(h) || !std::isfinite(d)) {
          EXPECT_TRUE(same_nonfinite_class(d, h)) << c_.name << " step " << t << " slice " << i << " element " << e
                                                  << ": device " << d << ", cpu " << h;
        } else {
          // A non-finite bound (non-finite inputs: no rounding to allow for) asks for equality.
          EXPECT_LE(std::abs(double(d) - h), std::isfinite(bound_w_[p]) ? bound_w_[p] : 0.0)
              << c_.name << " step " << t << " slice " << i << " element " << e << ": device " << d << ", cpu " << h
              << " (from " << w << ")";
        }
        if (c_.mirror) compare_bf16(dev.mirror[p], host_.mirror[p], bound_w_[p], "mirror", t, i, e, n);
      }
    for (int k = 0; k < slots_; ++k) compare_state(k, dev, f32_state[k], t, n);
  }

 private:
  // Two bf16 roundings of fp32 values at most `bound` apart.
  void compare_bf16(uint16_t d, uint16_t h, double bound, const char* what, int64_t t, size_t i, size_t e, Counts& n) {
    const float df = bf16_to_float(bf16{d}), hf = bf16_to_float(bf16{h});
    if (!std::isfinite(df) || !std::isfinite(hf)) {
      EXPECT_TRUE(same_nonfinite_class(df, hf)) << c_.name << " " << what << " step " << t << " slice " << i;
      return;
    }
    if (d == h) return;
    ++n.bf16_adjacent;
    EXPECT_TRUE(std::isfinite(bound)) << c_.name << " " << what << " step " << t << " slice " << i << " element " << e
                                      << ": differs where the inputs were not finite";
    EXPECT_LE(std::abs(double(df) - hf), bound + bf16_ulp(std::max(std::abs(df), std::abs(hf))))
        << c_.name << " " << what << " step " << t << " slice " << i << " element " << e << ": device " << df
        << ", cpu " << hf;
  }

  // Per-element bounds on how far another fp32 evaluation of this step could land (see the top):
  // bound_w_ (parameter index) and bound_x_[k] (state index), from the state before the step
  // (decoded), the gradients and the CPU's fp32 result.
  void error_bounds(float lr, int64_t t, const std::vector<float>& w_old, const std::vector<float> (&x_old)[2],
                    const std::vector<float> (&x_new)[2]) {
    const OptimizerParams& q = c_.params;
    bound_w_.assign(l_.params, 0.0);
    for (int k = 0; k < 2; ++k) bound_x_[k].assign(l_.values, 0.0);
    const double decay = 1.0 - double(lr) * q.weight_decay;
    for (size_t i = 0; i < l_.counts.size(); ++i)
      for (size_t e = 0; e < l_.counts[i]; ++e) {
        const size_t p = l_.param_offset[i] + e, v = l_.value_offset[i] + e;
        const double w = w_old[p], g = grad_at(p), m0 = x_old[0][v];
        double& ew = bound_w_[p];
        switch (q.kind) {
          case proto::OPTIMIZER_ADAMW: {
            const double v0 = x_old[1][v], m = x_new[0][v], vn = x_new[1][v];
            const double em = 3 * kEps * (std::abs(q.beta1 * m0) + std::abs((1 - q.beta1) * g));
            const double ev = 3 * kEps * (q.beta2 * v0 + (1 - q.beta2) * g * g);
            const double step_size = lr / (1 - std::pow(q.beta1, double(t)));
            const double ib = 1 / std::sqrt(1 - std::pow(q.beta2, double(t)));
            const double den = std::sqrt(vn) * ib + q.eps, u = step_size * std::abs(m) / den;
            bound_x_[0][v] = em;
            bound_x_[1][v] = ev;
            ew = 4 * kEps * (std::abs(w * decay) + u) + step_size * em / den +
                 (vn > 0 ? u * ib * ev / (2 * std::sqrt(vn) * den) : 0.0);
            break;
          }
          case proto::OPTIMIZER_LION: {
            const double c = q.beta1 * m0 + (1 - q.beta1) * g;
            const double ec = 3 * kEps * (std::abs(q.beta1 * m0) + std::abs((1 - q.beta1) * g));
            bound_x_[0][v] = 3 * kEps * (std::abs(q.beta2 * m0) + std::abs((1 - q.beta2) * g));
            ew = 4 * kEps * (std::abs(w * decay) + lr) + (std::abs(c) <= ec ? 2.0 * lr : 0.0);
            break;
          }
          default: {  // SGD with momentum (Nesterov or heavy ball), torch's first step
            const double keep = t == 1 ? 0.0 : q.momentum, take = t == 1 ? 1.0 : 1 - q.dampening;
            const double nest = q.nesterov ? 1.0 : 0.0;
            const double tg = std::abs(g) + std::abs(q.weight_decay * w), eg = 2 * kEps * tg;
            const double tb = keep * std::abs(m0) + take * tg, eb = 3 * kEps * tb + take * eg;
            const double td = nest * (tg + q.momentum * tb) + (1 - nest) * tb;
            const double ed = 4 * kEps * td + nest * (eg + q.momentum * eb) + (1 - nest) * eb;
            bound_x_[0][v] = eb;
            ew = 4 * kEps * (std::abs(w) + lr * td) + lr * ed;
            break;
          }
        }
      }
  }

  double grad_at(size_t p) const {
    if (c_.grad_dtype == DType::kBF16) {
      bf16 b;
      std::memcpy(&b, grad_.data() + 2 * p, 2);
      return bf16_to_float(b);
    }
    float f;
    std::memcpy(&f, grad_.data() + 4 * p, 4);
    return f;
  }

  void compare_state(int k, const Run& dev, const std::vector<float>& f32_new, int64_t t, Counts& n) {
    const bool unsigned_code = optim::q8_slot_is_nonnegative(c_.params.kind, k);
    for (size_t i = 0; i < l_.counts.size(); ++i) {
      const size_t count = l_.counts[i];
      if (c_.state == proto::STATE_BF16) {
        for (size_t e = 0; e < count; ++e) {
          const size_t v = (l_.value_offset[i] + e) * 2;
          uint16_t d, h;
          std::memcpy(&d, dev.values[k].data() + v, 2);
          std::memcpy(&h, host_.values[k].data() + v, 2);
          compare_bf16(d, h, bound_x_[k][l_.value_offset[i] + e], "state", t, i, e, n);
        }
        continue;
      }
      for (int64_t b = 0; b < optim::q8_num_blocks(static_cast<int64_t>(count)); ++b) {
        const float da = dev.absmax[k][l_.absmax_offset[i] + b], ha = host_.absmax[k][l_.absmax_offset[i] + b];
        const size_t first = static_cast<size_t>(b) * optim::kQ8BlockElems;
        const size_t last = std::min(count, first + optim::kQ8BlockElems);
        double ea = 0;
        for (size_t e = first; e < last; ++e) ea = std::max(ea, bound_x_[k][l_.value_offset[i] + e]);
        ea = (std::isfinite(ea) ? ea : 0.0) + 2 * kEps * std::abs(ha);
        if (!std::isfinite(ha) || !std::isfinite(da)) {
          EXPECT_TRUE(same_nonfinite_class(da, ha)) << c_.name << " absmax slot " << k << " step " << t;
        } else {
          EXPECT_LE(std::abs(double(da) - ha), ea)
              << c_.name << " absmax slot " << k << " step " << t << " slice " << i << " block " << b;
        }
        // A block whose absmax is NaN on both sides decodes to NaN whatever its codes say, and the codes
        // of NaN inputs keep the NaN's sign bit, which differs by platform (x86's default NaN is
        // negative, CUDA's positive: on an H200 the device wrote 127 where the CPU wrote 255).
        if (std::isnan(ha) && std::isnan(da)) {
          n.codes += last - first;
          continue;
        }
        for (size_t e = first; e < last; ++e) {
          const size_t v = l_.value_offset[i] + e;
          const uint8_t dc = dev.values[k][v], hc = host_.values[k][v];
          ++n.codes;
          if (dc == hc) continue;
          ++n.code_flips;
          // The CPU's normalized value before rounding and its error bound.
          const double x = f32_new[v], ex = bound_x_[k][v];
          double y, ey;
          if (unsigned_code) {
            y = std::sqrt(x / ha);
            ey = (x > 0 ? y * (ex / (2 * x)) : std::sqrt(ex / ha)) + y * ea / (2 * ha) + 2 * kEps * y;
          } else {
            y = std::abs(x) / ha;
            ey = ex / ha + y * ea / ha + 2 * kEps * y;
          }
          const bool same_sign = unsigned_code || (dc & 0x80) == (hc & 0x80);
          const int mag_d = unsigned_code ? dc : (dc & 0x7f), mag_h = unsigned_code ? hc : (hc & 0x7f);
          const double boundary =
              unsigned_code ? boundary_between(std::min(mag_d, mag_h), optim::codec::kUnsignedShift,
                                               optim::codec::kUnsignedOffset)
                            : boundary_between(std::min(mag_d, mag_h), optim::codec::kSignedShift,
                                               optim::codec::kSignedOffset);
          EXPECT_TRUE(same_sign && std::abs(mag_d - mag_h) == 1 && std::abs(y - boundary) <= ey)
              << c_.name << " code slot " << k << " step " << t << " slice " << i << " element " << e << ": device "
              << int(dc) << ", cpu " << int(hc) << ", normalized value " << y << " +- " << ey << ", boundary "
              << boundary;
        }
      }
    }
  }

  Case c_;
  Layout l_;
  cuda::CompactKernel kernel_;
  size_t aligned_chunks_ = 0, chunks_ = 0;
  int slots_ = 0;
  size_t value_bytes_ = 1;
  Run host_;
  std::vector<uint8_t> grad_;
  std::vector<double> bound_w_, bound_x_[2];
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (auto kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD}) {
    const OptimizerParams p = params_of(kind);
    cases.push_back({"q8 f32 grads", p, proto::STATE_Q8, DType::kF32, false});
    cases.push_back({"q8 bf16 grads + mirror", p, proto::STATE_Q8, DType::kBF16, true});
    cases.push_back({"bf16 state f32 grads + mirror", p, proto::STATE_BF16, DType::kF32, true});
  }
  return cases;
}

// Slices ending mid-block, exactly on a block, shorter than a block, longer than a chunk (16384).
const std::vector<size_t> kSliceCounts = {1, 255, 256, 257, 1000, 513, 4096, 16384 + 300, 70001, 37, 2048 + 129};

// Every device case runs under each kernel.
class CompactKernels : public ::testing::TestWithParam<cuda::CompactKernel> {};
std::string kernel_test_name(const ::testing::TestParamInfo<cuda::CompactKernel>& info) {
  return std::string(cuda::compact_kernel_name(info.param));
}

class CompactElementwiseCuda : public CompactKernels {};

void several_steps(cuda::CompactKernel kernel, Placement placement) {
  for (const Case& c : all_cases()) {
    CompactStep run(c, kSliceCounts, kernel, placement);
    std::mt19937 gen(17);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& w : run.params()) w = 0.5f * normal(gen);
    Counts n;
    for (int64_t t = 1; t <= 6; ++t) {
      // Heavy-tailed gradients: per-256 scale e^{N(0, 2)}, so blocks see very different absmax
      // and the codes span many binades.
      std::vector<float> g(run.layout().params);
      float scale = 1.0f;
      for (size_t i = 0; i < g.size(); ++i) {
        if (i % 256 == 0) scale = std::exp(2.0f * normal(gen));
        g[i] = scale * normal(gen);
      }
      run.set_grads(g);
      run.step_and_compare(c.params.kind == proto::OPTIMIZER_SGD ? 1e-2f : 1e-3f, t, n);
    }
    std::printf("[ %s %s, %s kernel, %zu / %zu chunks aligned ] parameters bitwise equal %zu / %zu; q8 codes "
                "differing %zu / %zu; bf16 values one ulp apart %zu\n",
                optim::optimizer_kind_name(c.params.kind).c_str(), c.name,
                std::string(cuda::compact_kernel_name(kernel)).c_str(), run.aligned_chunks(), run.chunks(),
                n.param_equal, n.params, n.code_flips, n.codes, n.bf16_adjacent);
    EXPECT_GT(n.params, 0u);
    // A handful of boundary cases at most: more means the arithmetic is not the CPU's.
    EXPECT_LE(n.code_flips, n.codes / 1000) << c.name;
    // Both kernels evaluate the portable build's operations in its order (only the work split
    // differs), so nothing may differ at all (on the H200 the warp kernel gave 0 differences here).
    EXPECT_EQ(n.param_equal, n.params) << c.name;
    EXPECT_EQ(n.code_flips, 0u) << c.name;
    EXPECT_EQ(n.bf16_adjacent, 0u) << c.name;
    // Both access paths of the vector kernel are exercised: aligned chunks only, or a mix.
    if (placement == Placement::kAligned) {
      EXPECT_EQ(run.aligned_chunks(), run.chunks()) << c.name;
    } else {
      EXPECT_LT(run.aligned_chunks(), run.chunks()) << c.name;
    }
  }
}

// Slices at odd offsets: most chunks take the vector kernel's element-by-element path.
TEST_P(CompactElementwiseCuda, MatchesTheCpuStepOverSeveralSteps) {
  SHARDOPT_REQUIRE_GPU();
  several_steps(GetParam(), Placement::kOddOffsets);
}

// Slices at aligned offsets: every chunk takes the vector kernel's wide accesses.
TEST_P(CompactElementwiseCuda, MatchesTheCpuStepOverSeveralStepsAlignedSlices) {
  SHARDOPT_REQUIRE_GPU();
  several_steps(GetParam(), Placement::kAligned);
}

// Zero, subnormal, huge (v overflows to +Inf) and non-finite gradients, two steps (the second from
// a state with +Inf / NaN absmax), against the CPU step and against the documented semantics.
TEST_P(CompactElementwiseCuda, ZeroTinyHugeAndNonFiniteValuesMatchTheCpuStep) {
  SHARDOPT_REQUIRE_GPU();
  for (Placement placement : {Placement::kOddOffsets, Placement::kAligned})
  for (auto kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD}) {
    Case c{"q8 special values", params_of(kind), proto::STATE_Q8, DType::kF32, false};
    // One slice of 7 blocks (the last one short): zeros, subnormal, tiny (g^2 subnormal), huge,
    // a NaN, a +Inf, ordinary values; misaligned (offset 3) and aligned, so that both access paths
    // of the vector kernel see them.
    CompactStep run(c, {6 * 256 + 100}, GetParam(), placement);
    for (float& w : run.params()) w = 0.25f;
    std::vector<float> g(run.layout().params, 0.0f);
    const size_t o = run.layout().param_offset[0];
    std::mt19937 gen(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t e = 0; e < 6 * 256 + 100; ++e) {
      const size_t block = e / 256;
      const float r = normal(gen);
      g[o + e] = block == 0 ? 0.0f : block == 1 ? r * 1e-40f : block == 2 ? r * 1e-22f : block == 3 ? r * 1e30f
                                                                                             : r;
    }
    g[o + 4 * 256 + 7] = std::nanf("");
    g[o + 5 * 256 + 9] = INFINITY;
    run.set_grads(g);
    Counts n;
    run.step_and_compare(1e-3f, 1, n);
    run.step_and_compare(1e-3f, 2, n);
    std::printf("[ %s special values, %s kernel, %s ] parameters bitwise equal %zu / %zu; codes differing %zu / %zu\n",
                optim::optimizer_kind_name(kind).c_str(), std::string(cuda::compact_kernel_name(GetParam())).c_str(),
                placement == Placement::kAligned ? "aligned" : "misaligned", n.param_equal, n.params, n.code_flips,
                n.codes);
    // Documented semantics, on the CPU result (the device one equals it, above): a zero block keeps
    // absmax 0 and code 0, and (AdamW, Lion: no update from a zero state and gradient) its
    // parameters only decay (SGD's coupled weight decay moves them); the NaN gradient's block gets a
    // NaN absmax and its parameter is NaN (Lion: sign(NaN) = 0);
    // the huge block's v overflows: absmax +Inf.
    const float decay = float(1.0 - double(1e-3f) * c.params.weight_decay);
    for (int k = 0; k < optim::state_values_per_element(c.params); ++k) {
      if (kind != proto::OPTIMIZER_SGD) {
        EXPECT_EQ(run.host_absmax(k)[0], 0.0f) << optim::optimizer_kind_name(kind);
      }
      EXPECT_TRUE(std::isnan(run.host_absmax(k)[4])) << optim::optimizer_kind_name(kind);
    }
    if (kind == proto::OPTIMIZER_ADAMW) {
      EXPECT_EQ(run.host_absmax(1)[3], INFINITY);
    }
    if (kind != proto::OPTIMIZER_SGD) {
      for (size_t e = 0; e < 256; ++e) ASSERT_EQ(run.params()[o + e], 0.25f * decay * decay) << e;
    }
    if (kind == proto::OPTIMIZER_LION) {  // sign(NaN) = 0: the parameter only decays, m holds the NaN
      EXPECT_EQ(run.params()[o + 4 * 256 + 7], 0.25f * decay * decay);
    } else {
      EXPECT_TRUE(std::isnan(run.params()[o + 4 * 256 + 7])) << optim::optimizer_kind_name(kind);
    }
  }
}

class CompactCodecCuda : public CompactKernels {};

// CompactCodecCuda (compact Muon momentum on the device) against the host's store_compact /
// load_compact: codes, absmax and decoded values bit for bit, over arrays at odd block offsets of
// one buffer, of lengths that end mid-block, one longer than a chunk, with zero, subnormal, huge,
// NaN and Inf blocks; on the device at aligned offsets (array i's values and f32 copy start on a
// block boundary), then shifted by i elements (only arrays 0 and 4 stay aligned for the vector
// kernel's runs). Encode rounds with the same IEEE operations (1 / absmax, x * r or x / absmax)
// and the shared code functions, so there is no tolerance: a difference is a bug.
TEST_P(CompactCodecCuda, EncodeAndDecodeEqualTheHostBitForBit) {
  SHARDOPT_REQUIRE_GPU();
  const std::vector<int64_t> lengths = {1, 255, 256, 257, 3 * 256 + 17,
                                        int64_t(cuda::CompactElementwiseOptimizerCuda::kChunkElements) + 300};
  for (bool shifted : {false, true})
  for (auto dtype : {proto::STATE_Q8, proto::STATE_BF16}) {
    SCOPED_TRACE(optim::state_dtype_name(dtype) + (shifted ? ", device arrays shifted" : ", device arrays aligned"));
    const bool q8 = dtype == proto::STATE_Q8;
    const size_t value_size = q8 ? 1 : 2;
    // Arrays laid out one after another, each starting on a block boundary of the value buffer (on
    // the host; on the device `shift` elements later, in the values and in the f32 copies).
    std::vector<int64_t> start, shift;
    int64_t total = 0, blocks = 0;
    std::vector<int64_t> first_block;
    for (int64_t n : lengths) {
      shift.push_back(shifted ? static_cast<int64_t>(start.size()) : 0);
      start.push_back(total);
      first_block.push_back(blocks);
      total += optim::q8_num_blocks(n) * 256;
      blocks += optim::q8_num_blocks(n);
    }
    const size_t device_total = static_cast<size_t>(total + shift.back());
    std::vector<float> x = random_floats(static_cast<size_t>(total), 17, 0.3f);
    // Special blocks in the long array: zeros, subnormals, huge, a NaN, an Inf.
    const int64_t at = start.back();
    for (int64_t e = 0; e < 256; ++e) {
      x[at + e] = 0.0f;
      x[at + 256 + e] *= 1e-40f;
      x[at + 512 + e] *= 1e36f;
    }
    x[at + 3 * 256 + 5] = std::nanf("");
    x[at + 4 * 256 + 9] = -INFINITY;
    std::vector<float> device_x(device_total, 0.0f);
    for (size_t i = 0; i < lengths.size(); ++i)
      std::copy_n(x.begin() + start[i], lengths[i], device_x.begin() + start[i] + shift[i]);
    std::vector<unsigned char> host_values(static_cast<size_t>(total) * value_size);
    std::vector<float> host_absmax(static_cast<size_t>(blocks));
    DeviceBuffer<unsigned char> dev_values(device_total * value_size);
    DeviceBuffer<float> dev_absmax(static_cast<size_t>(std::max<int64_t>(blocks, 1)));
    DeviceBuffer<float> dev_x(device_x);
    DeviceBuffer<float> dev_decoded(device_total);
    // Array i's storage in a values buffer and an absmax buffer, at element `at` of the values.
    auto state_of = [&](size_t i, unsigned char* values, int64_t at, float* absmax) {
      optim::CompactState st;
      st.dtype = dtype;
      st.values = values + at * value_size;
      st.absmax = q8 ? absmax + first_block[i] : nullptr;
      return st;
    };
    std::vector<cuda::DeviceCompactArray> encode_arrays, decode_arrays;
    size_t expected_aligned = 0;
    for (size_t i = 0; i < lengths.size(); ++i) {
      optim::store_compact(state_of(i, host_values.data(), start[i], host_absmax.data()), lengths[i],
                           x.data() + start[i]);
      cuda::DeviceCompactArray a;
      a.state = state_of(i, dev_values.get(), start[i] + shift[i], dev_absmax.get());
      a.count = static_cast<size_t>(lengths[i]);
      a.f32 = dev_x.get() + start[i] + shift[i];
      encode_arrays.push_back(a);
      a.f32 = dev_decoded.get() + start[i] + shift[i];
      decode_arrays.push_back(a);
      // start is a multiple of 256: aligned for runs of 4 elements exactly when the shift is.
      if (shift[i] % 4 == 0)
        expected_aligned += (a.count + cuda::CompactElementwiseOptimizerCuda::kChunkElements - 1) /
                            cuda::CompactElementwiseOptimizerCuda::kChunkElements;
    }
    cuda::CompactCodecCuda encoder(GetParam()), decoder(GetParam());
    encoder.set_arrays(encode_arrays);
    decoder.set_arrays(decode_arrays);
    EXPECT_EQ(encoder.aligned_chunk_count(), expected_aligned);
    if (shifted) {
      EXPECT_LT(encoder.aligned_chunk_count(), encoder.chunk_count());
    } else {
      EXPECT_EQ(encoder.aligned_chunk_count(), encoder.chunk_count());
    }
    encoder.encode(nullptr);
    decoder.decode(nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<unsigned char> got_values = dev_values.download();
    const std::vector<float> got_decoded = dev_decoded.download();
    std::vector<float> host_decoded(x.size(), 0.0f);
    size_t value_diffs = 0, decoded_diffs = 0, absmax_diffs = 0;
    for (size_t i = 0; i < lengths.size(); ++i) {
      optim::load_compact(state_of(i, host_values.data(), start[i], host_absmax.data()), lengths[i],
                          host_decoded.data() + start[i]);
      for (int64_t e = 0; e < lengths[i]; ++e) {
        const size_t k = static_cast<size_t>(start[i] + e), dk = static_cast<size_t>(start[i] + shift[i] + e);
        const float h = host_decoded[k], d = got_decoded[dk];
        if (!std::isfinite(x[k])) {
          // A NaN input, or -Inf / +Inf absmax = an invalid operation: its NaN's sign is the
          // platform's (x86's default NaN is negative, CUDA's positive), and the sign lands in the
          // code (docs/gpu.md). Both sides keep the value non-finite of the same kind.
          EXPECT_EQ(std::isnan(h), std::isnan(d)) << "element " << k;
          EXPECT_EQ(std::isinf(h), std::isinf(d)) << "element " << k;
          continue;
        }
        decoded_diffs += !(std::isnan(h) && std::isnan(d)) && bits(h) != bits(d);
        if (q8) {
          value_diffs += got_values[dk] != host_values[k];
        } else {
          uint16_t hv, dv;
          std::memcpy(&hv, host_values.data() + 2 * k, 2);
          std::memcpy(&dv, got_values.data() + 2 * dk, 2);
          value_diffs += hv != dv;
        }
      }
    }
    if (q8) {
      const std::vector<float> got_absmax = dev_absmax.download();
      for (int64_t b = 0; b < blocks; ++b)
        absmax_diffs += !(std::isnan(host_absmax[b]) && std::isnan(got_absmax[b])) &&
                        bits(host_absmax[b]) != bits(got_absmax[b]);
      EXPECT_TRUE(std::isnan(host_absmax[first_block.back() + 3]));
      EXPECT_EQ(host_absmax[first_block.back()], 0.0f);
    }
    EXPECT_EQ(value_diffs, 0u);
    EXPECT_EQ(absmax_diffs, 0u);
    EXPECT_EQ(decoded_diffs, 0u);
  }
}

TEST(CompactCodecCudaConfig, RefusesMixedOrUnsignedArrays) {
  // Checked on the host: no device needed.
  float dummy = 0;
  cuda::DeviceCompactArray q8, bf;
  q8.state.dtype = proto::STATE_Q8;
  q8.state.values = &dummy;
  q8.state.absmax = &dummy;
  q8.f32 = &dummy;
  q8.count = 1;
  bf = q8;
  bf.state.dtype = proto::STATE_BF16;
  cuda::CompactCodecCuda codec;
  const std::vector<cuda::DeviceCompactArray> mixed = {q8, bf};
  EXPECT_THROW(codec.set_arrays(mixed), ConfigError);
  cuda::DeviceCompactArray unsigned_code = q8;
  unsigned_code.state.nonnegative = true;
  EXPECT_THROW(codec.set_arrays({&unsigned_code, 1}), ConfigError);
  cuda::DeviceCompactArray f32 = q8;
  f32.state.dtype = proto::STATE_F32;
  EXPECT_THROW(codec.set_arrays({&f32, 1}), ConfigError);
}

TEST(CompactElementwiseCudaConfig, RefusesWhatTheCpuStepRefuses) {
  // Construction checks run on the host: no device needed.
  EXPECT_THROW({ cuda::CompactElementwiseOptimizerCuda o(params_of(proto::OPTIMIZER_ADAMW), proto::STATE_F32, DType::kF32); },
               ConfigError);
  OptimizerParams plain_sgd = params_of(proto::OPTIMIZER_SGD);
  plain_sgd.momentum = 0;
  EXPECT_THROW({ cuda::CompactElementwiseOptimizerCuda o(plain_sgd, proto::STATE_Q8, DType::kF32); }, ConfigError);
  EXPECT_THROW({ cuda::CompactElementwiseOptimizerCuda o(params_of(proto::OPTIMIZER_ADAMW), proto::STATE_Q8, DType::kU8); },
               ConfigError);
  cuda::CompactElementwiseOptimizerCuda opt(params_of(proto::OPTIMIZER_ADAMW), proto::STATE_Q8, DType::kF32);
  cuda::DeviceCompactSlice s;
  float dummy = 0;
  s.param = &dummy;
  s.grad = &dummy;
  s.count = 1;
  s.state[0].dtype = proto::STATE_Q8;
  s.state[0].values = &dummy;
  s.state[0].absmax = &dummy;
  s.state[1] = s.state[0];  // v must use the unsigned code
  EXPECT_THROW(opt.set_slices({&s, 1}), ConfigError);
}

// The vector kernel's alignment rule, on the host: a chunk is run-aligned when each of its arrays is
// aligned to 4 of its elements (fp32 16 bytes, bf16 8, q8 codes 4); an absent mirror or slot does
// not count. Each pointer is misaligned in turn by one element.
TEST(CompactKernelConfig, ChunksAreRunAlignedWhenEveryArrayIs) {
  alignas(16) static unsigned char buffer[4096];
  for (uint32_t grad_bytes : {4u, 2u})
    for (uint32_t value_bytes : {1u, 2u})
      for (int slots : {1, 2}) {
        SCOPED_TRACE(::testing::Message() << "grad bytes " << grad_bytes << ", value bytes " << value_bytes
                                          << ", slots " << slots);
        cuda::detail::CompactChunk c{};
        c.param = reinterpret_cast<float*>(buffer);
        c.grad = buffer + 1024;
        c.mirror = reinterpret_cast<uint16_t*>(buffer + 2048);
        c.values[0] = buffer + 3072;
        c.values[1] = slots > 1 ? buffer + 3584 : buffer + 1;  // an unused slot's pointer is ignored
        c.count = 100;
        EXPECT_TRUE(cuda::detail::compact_chunk_run_aligned(c, slots, value_bytes, grad_bytes));
        cuda::detail::CompactChunk no_mirror = c;
        no_mirror.mirror = nullptr;
        EXPECT_TRUE(cuda::detail::compact_chunk_run_aligned(no_mirror, slots, value_bytes, grad_bytes));
        // One element off, for each array in turn.
        cuda::detail::CompactChunk off = c;
        off.param = c.param + 1;
        EXPECT_FALSE(cuda::detail::compact_chunk_run_aligned(off, slots, value_bytes, grad_bytes)) << "param";
        off = c;
        off.grad = static_cast<const unsigned char*>(c.grad) + grad_bytes;
        EXPECT_FALSE(cuda::detail::compact_chunk_run_aligned(off, slots, value_bytes, grad_bytes)) << "grad";
        off = c;
        off.mirror = c.mirror + 1;
        EXPECT_FALSE(cuda::detail::compact_chunk_run_aligned(off, slots, value_bytes, grad_bytes)) << "mirror";
        for (int k = 0; k < slots; ++k) {
          off = c;
          off.values[k] = static_cast<unsigned char*>(c.values[k]) + value_bytes;
          EXPECT_FALSE(cuda::detail::compact_chunk_run_aligned(off, slots, value_bytes, grad_bytes)) << "slot " << k;
        }
      }
  cuda::detail::CompactCodecChunk codec{};
  codec.values = buffer;
  codec.f32 = reinterpret_cast<float*>(buffer + 1024);
  for (uint32_t value_bytes : {1u, 2u}) {
    EXPECT_TRUE(cuda::detail::compact_codec_chunk_run_aligned(codec, value_bytes));
    cuda::detail::CompactCodecChunk off = codec;
    off.values = buffer + value_bytes;
    EXPECT_FALSE(cuda::detail::compact_codec_chunk_run_aligned(off, value_bytes));
    off = codec;
    off.f32 = codec.f32 + 1;
    EXPECT_FALSE(cuda::detail::compact_codec_chunk_run_aligned(off, value_bytes));
  }
}

TEST(CompactKernelConfig, NamesParseAndBadNamesAreRefused) {
  for (cuda::CompactKernel k : {cuda::CompactKernel::kWarp, cuda::CompactKernel::kVector})
    EXPECT_EQ(cuda::parse_compact_kernel(cuda::compact_kernel_name(k), "test"), k);
  EXPECT_NE(cuda::compact_kernel_name(cuda::CompactKernel::kWarp),
            cuda::compact_kernel_name(cuda::CompactKernel::kVector));
  try {
    cuda::parse_compact_kernel("vectorized", "SHARDOPT_CUDA_COMPACT_KERNEL");
    ADD_FAILURE() << "no ConfigError for 'vectorized'";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("SHARDOPT_CUDA_COMPACT_KERNEL='vectorized'"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, CompactElementwiseCuda,
                         ::testing::Values(cuda::CompactKernel::kWarp, cuda::CompactKernel::kVector), kernel_test_name);
INSTANTIATE_TEST_SUITE_P(Kernels, CompactCodecCuda,
                         ::testing::Values(cuda::CompactKernel::kWarp, cuda::CompactKernel::kVector), kernel_test_name);

}  // namespace
}  // namespace shardopt::testing
