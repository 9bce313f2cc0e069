// The Engine on device memory (EngineOptions::memory_space = cuda) against the host engine and a
// plain double-precision reference, for every element-wise optimizer, Muon, NorMuon, ZeRO stage, layout and
// N in {1, 2, 4} ranks sharing one GPU (threads ranks exchanging device buffers through the threads
// backend's CUDA mover; the error cases use HostStagedCommunicator).
// Skips with a message without a CUDA device.
//
// Tolerances (3 steps of the model of tests/common/engine_fixture.h):
//   element-wise tensors: the CUDA kernels evaluate the same fp32 formulas as the CPU ones, in another
//     order: |a - b| <= 1e-5 max(|b|, 1e-3) (per-step relative error a few ulp, 3 steps);
//   Muon matrices: the device NS runs with bf16 operands (8 significant bits, measured 1.1e-2 to
//     1.9e-2 relative error of NS5 against a double NS, tests/gpu/optim_cuda_test.cc), the host one in
//     fp32 by default: |a - b| <= 0.05 D, D = the largest displacement of the tensor over the run
//     (the update's size), leaving room for 3 steps at 1.9e-2.
//     That bound holds for matrices without (near-)zero singular values only. bf16 NS puts rounding
//     noise into a matrix's null space, where the iteration multiplies it by a = 3.4445 per step (as
//     torch.optim.Muon's bf16 NS does): for the fixture's 10x7 layer1.w_o, whose gradient
//     ((c + 30 r + 13 j) mod 61) has rank 4 of 7, bf16 NS5 is 0.21-0.33 of the largest entry away
//     from a double NS (0.03-0.08 for full-rank fixture matrices), and the device engine measured 0.18 D
//     on an H200. The device model (device_model()) makes that matrix 10x5, full rank (smallest
//     singular value 0.17-0.27 of the largest), still tall with an odd side.
#include <cuda_runtime.h>

#include <unistd.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "base/error.h"
#include "comm/cuda_buffer_mover.h"
#include "comm/host_staged_communicator.h"
#include "comm/thread_backend.h"
#include "optim/quant8.h"
#include "runtime/checkpoint_io.h"
#include "runtime/engine.h"
#include "sharding/layout.h"
#include "tests/common/engine_reference.h"
#include "tests/common/engine_training.h"
#include "tests/gpu/device_engine_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace shardopt::runtime {
namespace {

using namespace shardopt::test_fixture;  // NOLINT: the shared fixture of the runtime suites

struct DeviceCase {
  int world;
  int stage;
  proto::ShardLayout layout;
  std::string optimizer;  // adamw, lion, sgd (momentum 0.9, Nesterov), muon or normuon (AdamW elsewhere)
  optim::StateDType state = proto::STATE_F32;         // the element-wise group's state dtype
  optim::StateDType matrix_state = proto::STATE_F32;  // the Muon group's (momentum)
};

void PrintTo(const DeviceCase& c, std::ostream* os) {
  *os << "N" << c.world << " stage " << c.stage << " " << sharding::layout_name(c.layout) << " " << c.optimizer << " "
      << optim::state_dtype_name(c.state) << " momentum " << optim::state_dtype_name(c.matrix_state);
}

std::string case_name(const ::testing::TestParamInfo<DeviceCase>& info) {
  const DeviceCase& c = info.param;
  return "N" + std::to_string(c.world) + "_stage" + std::to_string(c.stage) + "_" + sharding::layout_name(c.layout) +
         "_" + c.optimizer + (c.state == proto::STATE_F32 ? "" : "_" + optim::state_dtype_name(c.state)) +
         (c.matrix_state == proto::STATE_F32 ? "" : "_momentum_" + optim::state_dtype_name(c.matrix_state));
}

EngineOptions options_for(const DeviceCase& c, MemorySpace space) {
  EngineOptions o = engine_options(c.stage, c.layout, c.optimizer == "sgd" ? "adamw" : c.optimizer);
  if (c.optimizer == "sgd") {
    o.elementwise_optimizer.set_kind(proto::OPTIMIZER_SGD);
    o.elementwise_optimizer.set_momentum(0.9);
    o.elementwise_optimizer.set_nesterov(true);
    o.elementwise_optimizer.set_weight_decay(0.01);
  }
  o.elementwise_optimizer.set_state_dtype(c.state);
  if (c.matrix_state != proto::STATE_F32) o.matrix_optimizer.set_state_dtype(c.matrix_state);
  o.memory_space = space;
  return o;
}

// The fixture's layer1.w_o (10x7, gradient of rank 4) made 10x5, full rank (see the tolerances above).
std::vector<proto::TensorSpec> with_full_rank_w_o(std::vector<proto::TensorSpec> specs) {
  for (auto& s : specs)
    if (s.name() == "layer1.w_o") {
      s.clear_shape();
      s.add_shape(10);
      s.add_shape(5);
    }
  return specs;
}

// The fixture's mixed model with layer1.w_o full rank, plus a layer of matrices shaped like earlier
// ones, so an owner runs same-shape matrices as one NS batch, and a fused QKV matrix orthogonalized
// per row block.
std::vector<proto::TensorSpec> device_model() {
  auto specs = with_full_rank_w_o(mixed_model());
  const auto head = specs.back();
  specs.pop_back();
  // Shapes and positions picked so every Muon gradient of the run is full rank (smallest singular
  // value >= 0.13 of the largest at each of the 3 steps).
  for (const char* name : {"layer2.w_up", "layer2.w_k", "layer2.w_o"}) {
    proto::TensorSpec t = *std::find_if(specs.begin(), specs.end(), [&](const proto::TensorSpec& x) {
      return x.name() == "layer1." + std::string(name + 7) || x.name() == "layer0." + std::string(name + 7);
    });
    t.set_name(name);
    specs.push_back(t);
  }
  // A fused QKV matrix orthogonalized per row block (6 + 4 + 4 rows; the two 4-row blocks share a batch).
  proto::TensorSpec qkv = spec("layer3.w_qkv", {14, 10});
  for (int64_t rows : {6, 4, 4}) qkv.add_block_rows(rows);
  specs.push_back(qkv);
  specs.push_back(head);
  return specs;
}

// Rank r's compact state after the run, decoded to fp32: the element-wise state (slot-major over
// its slices), then the compact Muon momentum of its owned matrices; read from device memory for a
// device engine.
std::vector<float> decoded_compact_state(Engine& engine, bool device) {
  ShardState& st = engine.shard_state();
  std::vector<float> out;
  auto append = [&](const optim::CompactState& c, int64_t n) {
      std::vector<unsigned char> values(static_cast<size_t>(n) * (c.dtype == proto::STATE_BF16 ? 2 : 1));
      std::vector<float> absmax(c.dtype == proto::STATE_Q8 ? static_cast<size_t>(optim::q8_num_blocks(n)) : 0);
      if (device) {
        EXPECT_EQ(cudaMemcpy(values.data(), c.values, values.size(), cudaMemcpyDeviceToHost), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(absmax.data(), c.absmax, absmax.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      } else {
        std::memcpy(values.data(), c.values, values.size());
        std::memcpy(absmax.data(), c.absmax, absmax.size() * 4);
      }
      optim::CompactState host = c;
      host.values = values.data();
      host.absmax = absmax.data();
      const size_t at = out.size();
      out.resize(at + static_cast<size_t>(n));
      optim::load_compact(host, n, out.data() + at);
  };
  if (st.elementwise_state_dtype() != proto::STATE_F32)
    for (int k = 0; k < 2; ++k)
      for (size_t i = 0; i < st.elementwise_slices().size(); ++i) {
        const optim::CompactState& c = st.elementwise_compact()[i].slot[k];
        if (c.values != nullptr) append(c, static_cast<int64_t>(st.elementwise_slices()[i].count));
      }
  if (st.matrix_state_dtype() != proto::STATE_F32)
    for (const OwnedMatrix& om : st.owned_matrices()) append(om.momentum, om.matrix.rows * om.matrix.cols);
  return out;
}

// Steps first+1 .. last with the fixture's gradients, written into grad(t) with cudaMemcpy on a
// device engine.
void train(Engine& engine, int first, int last) {
  if (engine.memory_space() != MemorySpace::kCuda) return train_steps(engine, first, last);
  train_steps(engine, first, last, [](Engine& e, size_t k, const std::vector<float>& g) {
    ASSERT_EQ(cudaMemcpy(e.grad(k), g.data(), g.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  });
}

comm::CommOptions device_comm_options() {
  comm::CommOptions copts;
  copts.checked = true;
  copts.timeout = std::chrono::milliseconds(120000);
  return copts;
}

// Every rank's full parameters after `steps` steps (and, when asked, its decoded compact state).
std::vector<Params> run(const std::vector<proto::TensorSpec>& specs, const DeviceCase& c, MemorySpace space,
                        int steps, std::vector<std::vector<float>>* compact_states = nullptr) {
  std::vector<Params> result(static_cast<size_t>(c.world));
  if (compact_states != nullptr) compact_states->assign(static_cast<size_t>(c.world), {});
  std::mutex mu;
  const bool device = space == MemorySpace::kCuda;
  // The device engines exchange device buffers through the threads backend's CUDA mover.
  comm::run_ranks(
      c.world,
      [&](comm::Communicator& comm) {
        Engine engine(comm, specs, options_for(c, space));
        ASSERT_EQ(engine.memory_space(), space);
        init_params(engine);
        train(engine, 0, steps);
        std::vector<float> state = decoded_compact_state(engine, device);
        Params mine = full_params(engine);
        std::lock_guard<std::mutex> lock(mu);
        result[static_cast<size_t>(comm.rank())] = std::move(mine);
        if (compact_states != nullptr) (*compact_states)[static_cast<size_t>(comm.rank())] = std::move(state);
      },
      device_comm_options(), device ? comm::cuda_buffer_mover(0) : nullptr);
  return result;
}

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// NS5 in double on the wide orientation, X0 = U / max(||U||_F, eps).
MatD ns_double(MatD x, const optim::NsSchedule& ns) {
  const bool tall = x.rows() > x.cols();
  if (tall) x.transposeInPlace();
  x /= std::max(x.norm(), double(ns.norm_floor));
  for (const auto& c : ns.coefficients) {
    const MatD a = x * x.transpose();
    const MatD b = double(c[1]) * a + double(c[2]) * a * a;
    x = double(c[0]) * x + b * x;
  }
  if (tall) x.transposeInPlace();
  return x;
}

// The formulas of docs/algorithms.md on whole tensors in double, fed the averaged gradient.
std::vector<std::vector<double>> double_reference(const std::vector<proto::TensorSpec>& specs, const EngineOptions& o,
                                                  int steps) {
  const auto ew = optim::resolve_optimizer_config(o.elementwise_optimizer);
  std::optional<optim::OptimizerParams> mx;
  if (o.matrix_optimizer.kind() != proto::OPTIMIZER_KIND_UNSPECIFIED)
    mx = optim::resolve_optimizer_config(o.matrix_optimizer);
  std::vector<std::vector<double>> w(specs.size()), m(specs.size()), v(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const auto n = static_cast<size_t>(numel(specs[t]));
    w[t].resize(n);
    for (size_t i = 0; i < n; ++i) w[t][i] = initial_value(t, static_cast<int64_t>(i));
    m[t].assign(n, 0.0);
    v[t].assign(n, 0.0);
  }
  for (int step = 1; step <= steps; ++step) {
    for (size_t t = 0; t < specs.size(); ++t) {
      const auto n = static_cast<int64_t>(w[t].size());
      std::vector<double> g(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) g[i] = common_grad(step, t, i);
      if (reference_uses_muon(specs[t], o)) {
        const int64_t rows = specs[t].shape(0), cols = specs[t].shape(1);
        const double mu = mx->momentum;
        MatD u(rows, cols);
        for (int64_t i = 0; i < n; ++i) {
          m[t][i] = mu * m[t][i] + (1 - mu) * g[i];  // averaged momentum (the default)
          u.data()[i] = mx->nesterov ? (1 - mu) * g[i] + mu * m[t][i] : m[t][i];
        }
        // Each row block (the whole matrix unless the spec lists blocks) is orthogonalized and scaled on its own.
        std::vector<int64_t> blocks{rows};
        if (specs[t].block_rows_size() > 0) blocks.assign(specs[t].block_rows().begin(), specs[t].block_rows().end());
        int64_t row0 = 0;
        for (int64_t b : blocks) {
          const MatD out = ns_double(u.middleRows(row0, b), mx->ns);
          const double s = std::sqrt(std::max(1.0, double(b) / double(cols)));  // shape scale "original"
          // NorMuon: each row of the output divided by √(its second moment) + eps, then all rescaled to
          // the output's Frobenius norm; v[t] holds the row moments.
          std::vector<double> row_step(static_cast<size_t>(b), 1.0);
          if (mx->kind == proto::OPTIMIZER_NORMUON) {
            double norm_sq = 0, normalized_sq = 0;
            for (int64_t i = 0; i < b; ++i) {
              const double row_sq = out.row(i).squaredNorm();
              double& vi = v[t][static_cast<size_t>(row0 + i)];
              vi = mx->normuon_beta2 * vi + (1 - mx->normuon_beta2) * row_sq / double(cols);
              row_step[i] = 1.0 / (std::sqrt(vi) + mx->normuon_eps);
              norm_sq += row_sq;
              normalized_sq += row_step[i] * row_step[i] * row_sq;
            }
            for (double& r : row_step) r *= normalized_sq > 0 ? std::sqrt(norm_sq / normalized_sq) : 0.0;
          }
          for (int64_t i = 0; i < b * cols; ++i) {
            double& p = w[t][static_cast<size_t>(row0 * cols + i)];
            p = p * (1 - mx->lr * mx->weight_decay) - mx->lr * s * row_step[i / cols] * out.data()[i];
          }
          row0 += b;
        }
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        double& p = w[t][i];
        switch (ew.kind) {
          case proto::OPTIMIZER_ADAMW: {
            m[t][i] = ew.beta1 * m[t][i] + (1 - ew.beta1) * g[i];
            v[t][i] = ew.beta2 * v[t][i] + (1 - ew.beta2) * g[i] * g[i];
            const double bc1 = 1 - std::pow(ew.beta1, step), bc2 = 1 - std::pow(ew.beta2, step);
            p = p * (1 - ew.lr * ew.weight_decay) - ew.lr / bc1 * m[t][i] / (std::sqrt(v[t][i]) / std::sqrt(bc2) + ew.eps);
            break;
          }
          case proto::OPTIMIZER_LION: {
            const double c = ew.beta1 * m[t][i] + (1 - ew.beta1) * g[i];
            p = p * (1 - ew.lr * ew.weight_decay) - ew.lr * double((c > 0) - (c < 0));
            m[t][i] = ew.beta2 * m[t][i] + (1 - ew.beta2) * g[i];
            break;
          }
          default: {  // SGD as torch.optim.SGD
            double d = g[i] + ew.weight_decay * p;
            m[t][i] = step == 1 ? d : ew.momentum * m[t][i] + (1 - ew.dampening) * d;
            d = ew.nesterov ? d + ew.momentum * m[t][i] : m[t][i];
            p -= ew.lr * d;
            break;
          }
        }
      }
    }
  }
  return w;
}

class DeviceEngine : public ::testing::TestWithParam<DeviceCase> {};

// The largest displacement of tensor t over the run in the reference: the size of its updates, the
// unit of the Muon bound.
double displacement_of(const std::vector<double>& ref, size_t t) {
  double d = 0;
  for (size_t i = 0; i < ref.size(); ++i) d = std::max(d, std::abs(ref[i] - initial_value(t, static_cast<int64_t>(i))));
  return d;
}

// The tolerances above: |a - b| <= 0.05 D for Muon matrices, 1e-5 max(|b|, 1e-3) element-wise.
bool within_tolerance(double a, double b, bool muon, double displacement) {
  return muon ? std::abs(a - b) <= 0.05 * displacement : std::abs(a - b) <= 1e-5 * std::max(std::abs(b), 1e-3);
}

TEST_P(DeviceEngine, MatchesTheHostEngineAndTheDoubleReference) {
  SHARDOPT_REQUIRE_GPU();
  const DeviceCase& c = GetParam();
  const auto specs = device_model();
  const int steps = 3;
  const auto dev = run(specs, c, MemorySpace::kCuda, steps);
  const auto host = run(specs, c, MemorySpace::kHost, steps);
  const EngineOptions o = options_for(c, MemorySpace::kHost);
  const auto ref = double_reference(specs, o, steps);
  for (size_t t = 0; t < specs.size(); ++t) {
    const bool muon = reference_uses_muon(specs[t], o);
    const double displacement = displacement_of(ref[t], t);
    ASSERT_GT(displacement, 0.0) << "the reference did not move " << specs[t].name();
    auto within = [&](double a, double b) { return within_tolerance(a, b, muon, displacement); };
    for (int r = 0; r < c.world; ++r) {
      int bad_ref = 0, bad_host = 0, bad_host_ref = 0;
      double worst = 0;
      for (size_t i = 0; i < ref[t].size(); ++i) {
        const double d = dev[r][t][i], h = host[r][t][i], b = ref[t][i];
        bad_ref += !within(d, b);
        bad_host += !within(d, h);
        bad_host_ref += !within(h, b);
        worst = std::max(worst, std::abs(d - b));
      }
      EXPECT_EQ(bad_ref, 0) << "device vs double reference, rank " << r << " " << specs[t].name() << " (worst |diff| "
                            << worst << ", displacement " << displacement << ")";
      EXPECT_EQ(bad_host, 0) << "device vs host engine, rank " << r << " " << specs[t].name();
      EXPECT_EQ(bad_host_ref, 0) << "host engine vs double reference, rank " << r << " " << specs[t].name();
    }
  }
}

// The host half of the comparison runs everywhere: it checks the double reference and the tolerances
// the device engine is held to, on machines without a GPU too.
TEST_P(DeviceEngine, HostEngineMatchesTheDoubleReference) {
  const DeviceCase& c = GetParam();
  const auto specs = device_model();
  const int steps = 3;
  const auto host = run(specs, c, MemorySpace::kHost, steps);
  const EngineOptions o = options_for(c, MemorySpace::kHost);
  const auto ref = double_reference(specs, o, steps);
  for (size_t t = 0; t < specs.size(); ++t) {
    const bool muon = reference_uses_muon(specs[t], o);
    const double displacement = displacement_of(ref[t], t);
    ASSERT_GT(displacement, 0.0) << "the reference did not move " << specs[t].name();
    for (int r = 0; r < c.world; ++r) {
      double worst = 0;
      int bad = 0;
      for (size_t i = 0; i < ref[t].size(); ++i) {
        const double h = host[r][t][i], b = ref[t][i];
        const double diff = std::abs(h - b);
        bad += !within_tolerance(h, b, muon, displacement);
        worst = std::max(worst, muon ? diff / displacement : diff / std::max(std::abs(b), 1e-3));
      }
      EXPECT_EQ(bad, 0) << "host engine vs double reference, rank " << r << " " << specs[t].name()
                        << " (worst relative difference " << worst << ")";
    }
  }
}

std::vector<DeviceCase> all_cases() {
  std::vector<DeviceCase> cases;
  for (int world : {1, 2, 4})
    for (int stage : {1, 2, 3})
      for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
        for (const char* opt : {"adamw", "lion", "sgd", "muon", "normuon"}) cases.push_back({world, stage, layout, opt});
  return cases;
}
INSTANTIATE_TEST_SUITE_P(AllConfigurations, DeviceEngine, ::testing::ValuesIn(all_cases()), case_name);

// Compact (q8 / bf16) element-wise state on the device against the host engine with the same state,
// on q8_model() (element-wise tensors of several 256-element blocks, cut across ranks, short last
// blocks; layer1.w_o full rank as in device_model()), 4 steps. The host q8 engine is tested against
// its references in tests/runtime. Muon matrices are held to the main suite's bf16-NS bound.
//
// Tolerances. The device kernel equals the host's portable (non-FMA) build bit for bit
// (tests/gpu/optim_cuda_compact_test.cc); the host engine runs the AVX-512 build where the CPU has
// it, whose fused multiply-adds move an update by an ulp. Where that moves a q8 code across a
// rounding boundary, the element's decoded moment differs by one code step (<= 1/8 of it for m,
// <= 1/16 for v, <= 1/32 for sqrt v) in the later steps, and so its later updates:
//   every element: |d - h| <= 1e-5 max(|h|, 1e-3) (the fp32 device-vs-host bound above) + 0.25 D, D
//     = the tensor's largest displacement over the run (AdamW: an update changes by <= 1/8 + 1/32 of
//     itself per flip); Lion: + 2 lr (steps - 1), as a flipped m can flip sign(c) near c = 0;
//   elements beyond the fp32 bound (elements whose codes flipped): at most max(2, 1%) per tensor,
//     printed.
class DeviceEngineCompact : public ::testing::TestWithParam<DeviceCase> {};

TEST_P(DeviceEngineCompact, MatchesTheHostEngineWithTheSameState) {
  SHARDOPT_REQUIRE_GPU();
  const DeviceCase& c = GetParam();
  // With compact momentum, also a fused QKV matrix whose 4 x 64 row blocks are whole q8 blocks (one
  // NS batch of three pieces, each decoded and encoded on its own).
  auto specs = with_full_rank_w_o(q8_model());
  if (c.matrix_state != proto::STATE_F32) {
    proto::TensorSpec qkv = spec("layer2.w_qkv", {12, 64});
    for (int64_t rows : {4, 4, 4}) qkv.add_block_rows(rows);
    specs.insert(specs.end() - 1, qkv);
  }
  const int steps = 4;
  std::vector<std::vector<float>> dev_state, host_state;
  const auto dev = run(specs, c, MemorySpace::kCuda, steps, &dev_state);
  const auto host = run(specs, c, MemorySpace::kHost, steps, &host_state);
  const EngineOptions o = options_for(c, MemorySpace::kHost);
  const double lr = optim::resolve_optimizer_config(o.elementwise_optimizer).lr;
  // The state itself (the device engine's, read from device memory, decoded with the host's
  // decoder): same layout and code, so equal up to the same rounding effects: every element within
  // 2^-20 |h| (a few ulp of the absmax) + max(|d|, |h|) / 8 (one code step: m's 3 mantissa bits;
  // v's, 4 bits in the sqrt domain, moves v by at most 0.114 of the larger value), and
  // elements beyond 2^-20 |h| (a flipped code or bf16 rounding) at most max(2, 1%) per rank.
  size_t state_elements = 0;
  for (const auto& x : host_state) state_elements += x.size();
  ASSERT_GT(state_elements, 0u) << "no rank holds compact state";
  // The momentum (m = beta m + g, the same gradients on both engines) does not depend on the NS
  // precision, so compact momentum falls under the same state bound as the element-wise state.
  for (int r = 0; r < c.world; ++r) {
    ASSERT_EQ(dev_state[r].size(), host_state[r].size()) << "rank " << r;
    size_t beyond = 0, bad = 0;
    for (size_t i = 0; i < host_state[r].size(); ++i) {
      const double d = dev_state[r][i], h = host_state[r][i], diff = std::abs(d - h);
      const double close = 0x1p-20 * std::abs(h) + 1e-30;
      beyond += !(diff <= close);
      bad += !(diff <= close + std::max(std::abs(d), std::abs(h)) / 8);
    }
    std::printf("[ %s rank %d ] decoded state elements beyond 2^-20 relative: %zu of %zu\n", case_name({c, 0}).c_str(),
                r, beyond, host_state[r].size());
    EXPECT_EQ(bad, 0u) << "device vs host engine state, rank " << r;
    EXPECT_LE(beyond, std::max<size_t>(2, host_state[r].size() / 100)) << "device vs host engine state, rank " << r;
  }
  size_t beyond_total = 0, elements_total = 0;
  for (size_t t = 0; t < specs.size(); ++t) {
    double displacement = 0;
    for (size_t i = 0; i < host[0][t].size(); ++i)
      displacement = std::max(displacement, double(std::abs(host[0][t][i] - initial_value(t, static_cast<int64_t>(i)))));
    ASSERT_GT(displacement, 0.0) << "the host engine did not move " << specs[t].name();
    if (reference_uses_muon(specs[t], o)) {
      // Muon matrices: the main suite's bf16-NS bound, 0.05 D. The momenta are equal up to the rare
      // flipped code bounded above; a flip moves one element of the NS input by at most 1/8 of it,
      // which NS (a smooth function of the normalized input) spreads over the matrix well inside that.
      for (int r = 0; r < c.world; ++r) {
        double worst = 0;
        for (size_t i = 0; i < host[r][t].size(); ++i)
          worst = std::max(worst, std::abs(double(dev[r][t][i]) - double(host[r][t][i])));
        std::printf("[ %s rank %d ] %s: worst |device - host| = %.3g D\n", case_name({c, 0}).c_str(), r,
                    specs[t].name().c_str(), worst / displacement);
        EXPECT_LE(worst, 0.05 * displacement) << "device vs host engine, rank " << r << " " << specs[t].name()
                                              << ": worst |diff| " << worst << ", displacement " << displacement;
      }
      continue;
    }
    const double loose = 0.25 * displacement + (c.optimizer == "lion" ? 2 * lr * (steps - 1) : 0.0);
    for (int r = 0; r < c.world; ++r) {
      size_t beyond = 0, bad = 0;
      double worst = 0;
      for (size_t i = 0; i < host[r][t].size(); ++i) {
        const double d = dev[r][t][i], h = host[r][t][i], tight = 1e-5 * std::max(std::abs(h), 1e-3);
        const double diff = std::abs(d - h);
        beyond += !(diff <= tight);
        bad += !(diff <= tight + loose);
        worst = std::max(worst, diff);
      }
      EXPECT_EQ(bad, 0u) << "device vs host engine, rank " << r << " " << specs[t].name() << ": worst |diff| " << worst
                         << ", displacement " << displacement;
      EXPECT_LE(beyond, std::max<size_t>(2, host[r][t].size() / 100))
          << "device vs host engine, rank " << r << " " << specs[t].name() << ": elements beyond the fp32 bound";
      beyond_total += beyond;
      elements_total += host[r][t].size();
    }
  }
  std::printf("[ %s ] element-wise parameters beyond the fp32 device-vs-host bound: %zu of %zu\n",
              case_name({c, 0}).c_str(), beyond_total, elements_total);
}

std::vector<DeviceCase> compact_cases() {
  std::vector<DeviceCase> cases;
  for (int world : {1, 2, 4})
    for (int stage : {1, 3})
      for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
        for (const char* opt : {"adamw", "lion", "sgd", "muon"}) cases.push_back({world, stage, layout, opt, proto::STATE_Q8});
  for (const char* opt : {"adamw", "lion", "sgd"}) cases.push_back({2, 2, proto::SHARD_LAYOUT_OWNED, opt, proto::STATE_BF16});
  // Compact Muon / NorMuon momentum (decoded, stepped and encoded per NS batch on the device).
  for (int world : {1, 2, 4})
    for (auto layout : {proto::SHARD_LAYOUT_OWNED, proto::SHARD_LAYOUT_DIM0})
      for (const char* opt : {"muon", "normuon"})
        cases.push_back({world, world == 4 ? 3 : 2, layout, opt, proto::STATE_Q8, proto::STATE_Q8});
  cases.push_back({2, 2, proto::SHARD_LAYOUT_OWNED, "muon", proto::STATE_F32, proto::STATE_BF16});
  return cases;
}
INSTANTIATE_TEST_SUITE_P(CompactState, DeviceEngineCompact, ::testing::ValuesIn(compact_cases()), case_name);

TEST(DeviceEngine, NonFiniteGradientSkipsTheStepAndNamesTheTensor) {
  SHARDOPT_REQUIRE_GPU();
  const auto specs = device_model();
  comm::run_ranks(2, [&](comm::Communicator& host_comm) {
    comm::HostStagedCommunicator comm(host_comm);
    Engine engine(comm, specs, options_for({2, 2, proto::SHARD_LAYOUT_OWNED, "muon"}, MemorySpace::kCuda));
    engine.set_params([&](size_t t, float* dst) {
      for (int64_t i = 0; i < numel(specs[t]); ++i) dst[i] = initial_value(t, i);
    });
    std::vector<float> before(static_cast<size_t>(numel(specs[3])));
    ASSERT_EQ(cudaMemcpy(before.data(), engine.param(3), before.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t k = specs.size(); k-- > 0;) {
      std::vector<float> g(static_cast<size_t>(numel(specs[k])), 0.25f);
      if (k == 3 && comm.rank() == 1) g[5] = std::nanf("");
      ASSERT_EQ(cudaMemcpy(engine.grad(k), g.data(), g.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      engine.grad_ready(k);
    }
    const StepReport report = engine.step();
    EXPECT_FALSE(report.applied);
    ASSERT_EQ(report.nonfinite_tensors.size(), 1u);
    EXPECT_EQ(report.nonfinite_tensors[0], specs[3].name());
    std::vector<float> after(before.size());
    ASSERT_EQ(cudaMemcpy(after.data(), engine.param(3), after.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(after, before);
  });
}

// The device memory an engine takes (cudaMemGetInfo before and after construction) is the buffers
// its MemoryReport counts, including the Newton-Schulz workspaces, and the optimizer state is the
// ZeRO formula's (up to segment padding): at 1 rank and at 2 ranks sharing the GPU (both engines'
// reports together). The tolerance, 48 MiB per engine, covers cudaMalloc's rounding of each buffer
// and the cuBLAS handle's workspace; the model is 105 MB of parameters, so a buffer kept twice (one
// parameter copy is 105 MB) or left out of the report is well outside it.
std::vector<proto::TensorSpec> memory_model() {
  return {spec("tok_embed", {8192, 1024}),   spec("layer0.w_q", {1024, 1024}), spec("layer0.w_up", {4096, 1024}),
          spec("layer0.w_down", {1024, 4096}), spec("layer0.norm", {1024}),      spec("lm_head", {8192, 1024})};
}

// A rank's segment of a bucket is padded to an aligned length; its master and state cover the pad
// elements too (measured: 64-128 bytes per rank with this model at 2 ranks).
constexpr double kSegmentPaddingBytes = 1024;

// The host half of the memory test (runs without a GPU): with this model and these options the
// engine's optimizer bytes are the ZeRO formula's, up to segment padding, at 1 and 2 ranks.
TEST(DeviceEngineHostHalf, OptimizerBytesOfTheMemoryModelAreTheZeroFormula) {
  for (int world : {1, 2}) {
    comm::run_ranks(world, [&](comm::Communicator& comm) {
      Engine engine(comm, memory_model(), options_for({world, 2, proto::SHARD_LAYOUT_OWNED, "muon"}, MemorySpace::kHost));
      const auto m = engine.memory();
      EXPECT_NEAR(static_cast<double>(m.optimizer_bytes()), m.formula_optimizer_bytes, kSegmentPaddingBytes)
          << "world " << world;
    });
  }
}

TEST(DeviceEngine, DeviceMemoryTakenIsTheReportedBuffers) {
  SHARDOPT_REQUIRE_GPU();
  const std::vector<proto::TensorSpec> specs = memory_model();
  for (int world : {1, 2}) {
    std::mutex mu;
    size_t free_before = 0, free_after = 0, total = 0;
    int64_t reported = 0;
    double formula = 0;
    int64_t optimizer = 0;
    CUDA_OK(cudaFree(nullptr));  // the context exists before the first reading
    comm::run_ranks(
        world,
        [&](comm::Communicator& comm) {
          comm.barrier()->wait();
          if (comm.rank() == 0) cudaMemGetInfo(&free_before, &total);
          comm.barrier()->wait();
          {
            Engine engine(comm, specs, options_for({world, 2, proto::SHARD_LAYOUT_OWNED, "muon"}, MemorySpace::kCuda));
            comm.barrier()->wait();
            if (comm.rank() == 0) cudaMemGetInfo(&free_after, &total);
            const auto m = engine.memory();
            {
              std::lock_guard lk(mu);
              reported += m.param_bytes + m.grad_bytes() + m.optimizer_bytes() + m.exchange_bytes + m.workspace_bytes;
              optimizer += m.optimizer_bytes();
              formula += m.formula_optimizer_bytes;
            }
            comm.barrier()->wait();  // every engine measured before any is destroyed
          }
        },
        comm::CommOptions{}, comm::cuda_buffer_mover(0));
    const int64_t taken = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_after);
    EXPECT_NEAR(static_cast<double>(taken), static_cast<double>(reported), world * 48.0 * (1 << 20))
        << "world " << world << ": taken " << taken << " bytes, reported " << reported;
    EXPECT_NEAR(static_cast<double>(optimizer), formula, world * kSegmentPaddingBytes) << "world " << world;
    int64_t param_bytes = 0;
    for (const auto& t : specs) param_bytes += 4 * numel(t);
    EXPECT_GE(reported, world * param_bytes + optimizer) << "world " << world;  // every rank's parameters, at least
  }
}

// Checkpoints of a device engine (the host half of this, with a stand-in device, is
// tests/runtime/device_path_test.cc): resuming on the device from a checkpoint the device wrote
// continues exactly as the uninterrupted device run (same world: the same kernels on the same
// shards), and a host engine loading it holds exactly the device engine's parameters at the save.
// q8 element-wise state and q8 Muon momentum, 2 ranks on one GPU.
TEST(DeviceEngine, CheckpointResumesExactlyAndLoadsOnTheHost) {
  SHARDOPT_REQUIRE_GPU();
  namespace fs = std::filesystem;
  const auto specs = q8_model();
  const DeviceCase c{2, 2, proto::SHARD_LAYOUT_OWNED, "muon", proto::STATE_Q8, proto::STATE_Q8};
  const fs::path root = fs::temp_directory_path() / ("shardopt_gpu_ckpt_" + std::to_string(::getpid()));
  fs::remove_all(root);
  Params uninterrupted, at_save, resumed, loaded_on_host;
  std::mutex mu;
  auto keep = [&](Params& into, comm::Communicator& comm, Params p) {
    std::lock_guard<std::mutex> lock(mu);
    if (comm.rank() == 0) into = std::move(p);
  };
  auto on_device = [&](const std::function<void(comm::Communicator&)>& fn) {
    comm::run_ranks(2, fn, device_comm_options(), comm::cuda_buffer_mover(0));
  };
  on_device([&](comm::Communicator& comm) {
    Engine e(comm, specs, options_for(c, MemorySpace::kCuda));
    init_params(e);
    train(e, 0, 4);
    keep(uninterrupted, comm, full_params(e));
  });
  on_device([&](comm::Communicator& comm) {
    Engine e(comm, specs, options_for(c, MemorySpace::kCuda));
    init_params(e);
    train(e, 0, 2);
    keep(at_save, comm, full_params(e));
    save_checkpoint(e, root);
  });
  on_device([&](comm::Communicator& comm) {
    Engine e(comm, specs, options_for(c, MemorySpace::kCuda));
    load_checkpoint(e, root / "ckpt-2");
    EXPECT_EQ(e.optimizer_step(), 2);
    train(e, 2, 4);
    keep(resumed, comm, full_params(e));
  });
  comm::run_ranks(1, [&](comm::Communicator& comm) {
    Engine e(comm, specs, options_for({1, 2, proto::SHARD_LAYOUT_OWNED, "muon", proto::STATE_Q8, proto::STATE_Q8},
                                      MemorySpace::kHost));
    load_checkpoint(e, root / "ckpt-2");
    keep(loaded_on_host, comm, full_params(e));
  });
  fs::remove_all(root);
  ASSERT_EQ(resumed.size(), specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    EXPECT_EQ(std::memcmp(resumed[t].data(), uninterrupted[t].data(), 4 * resumed[t].size()), 0) << specs[t].name();
    EXPECT_EQ(std::memcmp(loaded_on_host[t].data(), at_save[t].data(), 4 * at_save[t].size()), 0) << specs[t].name();
  }
  EXPECT_NE(std::memcmp(at_save[0].data(), uninterrupted[0].data(), 4 * at_save[0].size()), 0);  // the run moved on
}

TEST(DeviceEngine, HostOnlyFeaturesAreRefusedByName) {
  SHARDOPT_REQUIRE_GPU();
  comm::run_ranks(1, [&](comm::Communicator& host_comm) {
    comm::HostStagedCommunicator comm(host_comm);
    EngineOptions o = options_for({1, 2, proto::SHARD_LAYOUT_OWNED, "muon"}, MemorySpace::kCuda);
    o.matrix_optimizer.set_ns_schedule(proto::NS_SCHEDULE_POLAR_EXPRESS);
    EXPECT_THROW({ Engine e(comm, mixed_model(), o); }, ConfigError);
    // q8 momentum of a matrix whose row blocks do not start on 256-element blocks (14 x 10, blocks
    // of 6, 4, 4 rows: elements 60 and 100): refused, naming the tensor; bf16 momentum runs.
    std::vector<proto::TensorSpec> blocked = q8_model();
    proto::TensorSpec qkv = spec("layer2.w_qkv", {14, 10});
    for (int64_t rows : {6, 4, 4}) qkv.add_block_rows(rows);
    blocked.insert(blocked.end() - 1, qkv);
    o = options_for({1, 2, proto::SHARD_LAYOUT_OWNED, "muon", proto::STATE_F32, proto::STATE_Q8}, MemorySpace::kCuda);
    try {
      Engine e(comm, blocked, o);
      ADD_FAILURE() << "q8 momentum with unaligned row blocks was accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("layer2.w_qkv"), std::string::npos) << e.what();
    }
    o = options_for({1, 2, proto::SHARD_LAYOUT_OWNED, "muon", proto::STATE_F32, proto::STATE_BF16}, MemorySpace::kCuda);
    EXPECT_NO_THROW({ Engine e(comm, blocked, o); });
    // The host engine's communicator cannot carry a device engine, nor the reverse.
    o = options_for({1, 2, proto::SHARD_LAYOUT_OWNED, "adamw"}, MemorySpace::kCuda);
    EXPECT_THROW({ Engine e(host_comm, mixed_model(), o); }, ConfigError);
  });
}

}  // namespace
}  // namespace shardopt::runtime
