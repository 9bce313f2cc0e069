// GPU optimizer kernels against independent double-precision references written here.
#include <Eigen/Dense>

#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "base/error.h"
#include "optim/cuda/elementwise.h"
#include "optim/cuda/muon.h"
#include "optim/cuda/newton_schulz.h"
#include "tests/gpu/gpu_test_util.h"

namespace shardopt::cuda {
namespace {

using testing::DeviceBuffer;
using testing::from_bf16;
using testing::random_floats;
using testing::to_bf16;

// ---------- element-wise optimizers ----------

struct SliceData {
  std::vector<double> p, m, v;  // reference state (double)
  std::unique_ptr<DeviceBuffer<float>> dp, dm, dv;
  std::unique_ptr<DeviceBuffer<float>> dg32;
  std::unique_ptr<DeviceBuffer<bf16>> dg16, dmirror;
  std::vector<bool> ambiguous;  // Lion: |c| so small that fp32 and double may disagree on its sign
};

struct EwCase {
  ElementwiseAlgorithm algorithm;
  DType grad_dtype;
  bool nesterov;  // SGD only
};

const char* algorithm_label(ElementwiseAlgorithm a) {
  return a == ElementwiseAlgorithm::kAdamW ? "AdamW" : (a == ElementwiseAlgorithm::kLion ? "Lion" : "Sgd");
}

std::string scale_label(ShapeScale s) {
  return s == ShapeScale::kOriginal ? "original" : (s == ShapeScale::kSpectral ? "spectral" : "match_rms_adamw");
}

class ElementwiseTest : public ::testing::TestWithParam<EwCase> {};

TEST_P(ElementwiseTest, MatchesDoubleReferenceOverManySlicesAndSteps) {
  SHARDOPT_REQUIRE_GPU();
  const EwCase tc = GetParam();
  const std::vector<size_t> sizes = {1, 777, ElementwiseOptimizerCuda::kChunkElements + 5, 50000};
  const bool bf16_grad = tc.grad_dtype == DType::kBF16;
  AdamWHyper adamw{.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.05f};
  LionHyper lion{.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.99f, .weight_decay = 0.1f};
  SgdHyper sgd{.lr = 0.05f, .momentum = 0.9f, .dampening = tc.nesterov ? 0.0f : 0.1f, .weight_decay = 0.01f,
               .nesterov = tc.nesterov};

  std::vector<SliceData> data(sizes.size());
  std::vector<DeviceSlice> slices;
  for (size_t s = 0; s < sizes.size(); ++s) {
    const size_t n = sizes[s];
    SliceData& d = data[s];
    const auto p0 = random_floats(n, 100 + s);
    const auto m0 = random_floats(n, 200 + s, 0.1f);
    auto v0 = random_floats(n, 300 + s, 0.01f);
    for (auto& x : v0) x = x * x;
    d.p.assign(p0.begin(), p0.end());
    d.m.assign(m0.begin(), m0.end());
    d.v.assign(v0.begin(), v0.end());
    d.ambiguous.assign(n, false);
    d.dp = std::make_unique<DeviceBuffer<float>>(p0);
    d.dm = std::make_unique<DeviceBuffer<float>>(m0);
    d.dv = std::make_unique<DeviceBuffer<float>>(v0);
    d.dg32 = std::make_unique<DeviceBuffer<float>>(n);
    d.dg16 = std::make_unique<DeviceBuffer<bf16>>(n);
    if (s % 2 == 1) d.dmirror = std::make_unique<DeviceBuffer<bf16>>(n);
    DeviceSlice slice;
    slice.param = d.dp->get();
    slice.grad = bf16_grad ? static_cast<const void*>(d.dg16->get()) : d.dg32->get();
    slice.exp_avg = d.dm->get();
    slice.exp_avg_sq = tc.algorithm == ElementwiseAlgorithm::kAdamW ? d.dv->get() : nullptr;
    slice.param_bf16 = d.dmirror ? d.dmirror->get() : nullptr;
    slice.count = n;
    slices.push_back(slice);
  }
  ElementwiseOptimizerCuda opt(tc.algorithm, tc.grad_dtype);
  opt.set_slices(slices);
  size_t total = 0;
  for (size_t n : sizes) total += n;
  EXPECT_EQ(opt.element_count(), total);

  for (int t = 1; t <= 3; ++t) {
    for (size_t s = 0; s < sizes.size(); ++s) {
      SliceData& d = data[s];
      auto g = random_floats(sizes[s], 1000 * t + s);
      if (bf16_grad) {
        const auto gb = to_bf16(g);
        d.dg16->upload(gb);
        g = from_bf16(gb);
      } else {
        d.dg32->upload(g);
      }
      for (size_t i = 0; i < sizes[s]; ++i) {
        const double gi = g[i];
        double& p = d.p[i];
        double& m = d.m[i];
        double& v = d.v[i];
        if (tc.algorithm == ElementwiseAlgorithm::kAdamW) {
          m = adamw.beta1 * double(m) + (1.0 - adamw.beta1) * gi;
          v = adamw.beta2 * double(v) + (1.0 - adamw.beta2) * gi * gi;
          const double m_hat = m / (1.0 - std::pow(double(adamw.beta1), t));
          const double v_hat = v / (1.0 - std::pow(double(adamw.beta2), t));
          p = p * (1.0 - double(adamw.lr) * adamw.weight_decay) - adamw.lr * m_hat / (std::sqrt(v_hat) + adamw.eps);
        } else if (tc.algorithm == ElementwiseAlgorithm::kLion) {
          const double c = lion.beta1 * m + (1.0 - lion.beta1) * gi;
          if (std::abs(c) < 1e-5) d.ambiguous[i] = true;
          const double sign = c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0);
          p = p * (1.0 - double(lion.lr) * lion.weight_decay) - lion.lr * sign;
          m = lion.beta2 * m + (1.0 - lion.beta2) * gi;
        } else {
          double step = gi + double(sgd.weight_decay) * p;
          m = t == 1 ? step : sgd.momentum * m + (1.0 - sgd.dampening) * step;
          step = sgd.nesterov ? step + sgd.momentum * m : m;
          p -= sgd.lr * step;
        }
      }
    }
    if (tc.algorithm == ElementwiseAlgorithm::kAdamW) opt.step(adamw, t, nullptr);
    if (tc.algorithm == ElementwiseAlgorithm::kLion) opt.step(lion, t, nullptr);
    if (tc.algorithm == ElementwiseAlgorithm::kSgd) opt.step(sgd, t, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
  }

  for (size_t s = 0; s < sizes.size(); ++s) {
    SliceData& d = data[s];
    const auto p = d.dp->download();
    const auto m = d.dm->download();
    const auto v = d.dv->download();
    size_t bad = 0;
    for (size_t i = 0; i < sizes[s]; ++i) {
      const double ptol = d.ambiguous[i] ? 6.0 * lion.lr : 1e-5 * std::abs(d.p[i]) + 2e-6;
      if (std::abs(p[i] - d.p[i]) > ptol || std::abs(m[i] - d.m[i]) > 1e-5 * std::abs(d.m[i]) + 1e-6 ||
          (tc.algorithm == ElementwiseAlgorithm::kAdamW && std::abs(v[i] - d.v[i]) > 1e-5 * std::abs(d.v[i]) + 1e-9)) {
        if (bad++ < 5)
          ADD_FAILURE() << "slice " << s << " element " << i << ": param " << p[i] << " vs " << d.p[i] << ", m "
                        << m[i] << " vs " << d.m[i] << ", v " << v[i] << " vs " << d.v[i];
      }
    }
    EXPECT_EQ(bad, 0u) << "slice " << s;
    if (d.dmirror) {
      const auto mirror = d.dmirror->download();
      for (size_t i = 0; i < sizes[s]; ++i)
        ASSERT_EQ(mirror[i].bits, float_to_bf16(p[i]).bits) << "bf16 mirror of slice " << s << " element " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Algorithms, ElementwiseTest,
                         ::testing::Values(EwCase{ElementwiseAlgorithm::kAdamW, DType::kF32, false},
                                           EwCase{ElementwiseAlgorithm::kAdamW, DType::kBF16, false},
                                           EwCase{ElementwiseAlgorithm::kLion, DType::kF32, false},
                                           EwCase{ElementwiseAlgorithm::kLion, DType::kBF16, false},
                                           EwCase{ElementwiseAlgorithm::kSgd, DType::kF32, false},
                                           EwCase{ElementwiseAlgorithm::kSgd, DType::kF32, true},
                                           EwCase{ElementwiseAlgorithm::kSgd, DType::kBF16, true}),
                         [](const ::testing::TestParamInfo<EwCase>& info) {
                           return std::string(algorithm_label(info.param.algorithm)) +
                                  (info.param.grad_dtype == DType::kBF16 ? "_bf16grad" : "_f32grad") +
                                  (info.param.nesterov ? "_nesterov" : "");
                         });

TEST(NonFinite, CountsNanAndInfInBothDtypesAndOverSlices) {
  SHARDOPT_REQUIRE_GPU();
  auto g = random_floats(100000, 7);
  const std::vector<size_t> bad_at = {0, 12345, 50000, 99999};
  g[bad_at[0]] = std::nanf("");
  g[bad_at[1]] = INFINITY;
  g[bad_at[2]] = -INFINITY;
  g[bad_at[3]] = std::nanf("");
  DeviceBuffer<float> dg(g);
  DeviceBuffer<bf16> dg16(to_bf16(g));
  DeviceBuffer<unsigned long long> count(1);
  CUDA_OK(cudaMemset(count.get(), 0, sizeof(unsigned long long)));
  count_nonfinite(dg.get(), g.size(), DType::kF32, count.get(), nullptr);
  EXPECT_EQ(count.download()[0], 4u);
  count_nonfinite(dg16.get(), g.size(), DType::kBF16, count.get(), nullptr);  // accumulates
  EXPECT_EQ(count.download()[0], 8u);

  // Over an optimizer's slices: two slices covering [0, 60000) and [60000, 100000).
  DeviceBuffer<float> p(100000), m(100000), v(100000);
  std::vector<DeviceSlice> slices(2);
  for (int s = 0; s < 2; ++s) {
    const size_t off = s == 0 ? 0 : 60000;
    slices[s] = DeviceSlice{p.get() + off, dg.get() + off, m.get() + off, v.get() + off, nullptr,
                            size_t(s == 0 ? 60000 : 40000)};
  }
  ElementwiseOptimizerCuda opt(ElementwiseAlgorithm::kAdamW, DType::kF32);
  opt.set_slices(slices);
  CUDA_OK(cudaMemset(count.get(), 0, sizeof(unsigned long long)));
  opt.count_nonfinite_grads(count.get(), nullptr);
  EXPECT_EQ(count.download()[0], 4u);
}

// Bad input needs no device: these run everywhere.
TEST(ElementwiseErrors, RejectsBadDtypesNullPointersAndMismatchedHyperparameters) {
  EXPECT_THROW(ElementwiseOptimizerCuda(ElementwiseAlgorithm::kAdamW, DType::kI32), ConfigError);
  EXPECT_THROW(count_nonfinite(nullptr, 0, DType::kF16, nullptr, nullptr), ConfigError);
  ElementwiseOptimizerCuda adamw(ElementwiseAlgorithm::kAdamW, DType::kF32);
  float dummy = 0;
  DeviceSlice missing_v{&dummy, &dummy, &dummy, nullptr, nullptr, 10};
  try {
    adamw.set_slices(std::vector<DeviceSlice>{missing_v});
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("exp_avg_sq"), std::string::npos) << e.what();
  }
  EXPECT_THROW(adamw.step(LionHyper{}, 1, nullptr), ConfigError);
  EXPECT_THROW(adamw.step(AdamWHyper{}, 0, nullptr), ConfigError);
  ElementwiseOptimizerCuda sgd(ElementwiseAlgorithm::kSgd, DType::kF32);
  EXPECT_THROW(sgd.step(SgdHyper{.lr = 0.1f, .momentum = 0.0f, .nesterov = true}, 1, nullptr), ConfigError);
}

// ---------- Newton–Schulz ----------

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Plain double NS on the wide orientation (the documented reference semantics).
MatD ns_reference(const MatD& g, const std::vector<NsCoefficients>& coeffs, double eps) {
  const bool tall = g.rows() > g.cols();
  MatD x = tall ? MatD(g.transpose()) : g;
  x /= std::max(x.norm(), eps);
  for (const auto& k : coeffs) {
    const MatD a = x * x.transpose();
    const MatD b = double(k.b) * a + double(k.c) * a * a;
    x = double(k.a) * x + b * x;
  }
  return tall ? MatD(x.transpose()) : x;
}

// A rows×cols matrix with singular values spread evenly over [0.1, 1]·scale (known spectrum).
MatD matrix_with_spectrum(int64_t rows, int64_t cols, uint32_t seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  auto random_orthonormal = [&](int64_t n, int64_t k) {
    MatD r(n, k);
    for (int64_t i = 0; i < r.size(); ++i) r.data()[i] = dist(gen);
    Eigen::HouseholderQR<MatD> qr(r);
    return MatD(qr.householderQ() * MatD::Identity(n, k));
  };
  const int64_t p = std::min(rows, cols);
  const MatD u = random_orthonormal(rows, p), v = random_orthonormal(cols, p);
  Eigen::VectorXd s(p);
  for (int64_t i = 0; i < p; ++i) s[i] = scale * (0.1 + 0.9 * double(i) / double(std::max<int64_t>(p - 1, 1)));
  return u * s.asDiagonal() * v.transpose();
}

struct NsShape {
  int64_t rows, cols, batch;
  int symmetric_blocks = 1;  // NsOptions::symmetric_blocks
  NsCombine combine = NsCombine::kKernel;
};

class NewtonSchulzTest : public ::testing::TestWithParam<NsShape> {};

// bf16 operands with fp32 accumulation: ‖out − ref‖_F / ‖ref‖_F against the double reference was
// 1.1e-2 to 1.9e-2 on an H100 (bf16 keeps 8 significant bits, ~4e-3 per rounding, amplified over 5
// iterations); the bound 3e-2 leaves room for other GEMM algorithms, a wrong kernel is far off (~1).
TEST_P(NewtonSchulzTest, Bf16MatchesDoubleReferenceAndLandsInTheSingularValueBand) {
  SHARDOPT_REQUIRE_GPU();
  const NsShape sh = GetParam();
  const size_t per = size_t(sh.rows * sh.cols);
  NsOptions options;
  options.symmetric_blocks = sh.symmetric_blocks;
  options.combine = sh.combine;
  NewtonSchulzCuda ns(sh.rows, sh.cols, sh.batch, options);
  EXPECT_EQ(ns.symmetric_blocks(), sh.symmetric_blocks);
  std::vector<float> input(per * sh.batch);
  std::vector<MatD> mats;
  for (int64_t b = 0; b < sh.batch; ++b) {
    mats.push_back(matrix_with_spectrum(sh.rows, sh.cols, 11 + b, 0.5 + b));
    for (size_t i = 0; i < per; ++i) input[b * per + i] = float(mats.back().data()[i]);
  }
  DeviceBuffer<float> din(input);
  DeviceBuffer<bf16> dout(per * sh.batch);
  CUDA_OK(cudaMemset(dout.get(), 0xff, per * sh.batch * 2));  // poison: NaN bits everywhere
  ns.orthogonalize(din.get(), DType::kF32, dout.get(), sh.batch, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto out = from_bf16(dout.download());
  for (int64_t b = 0; b < sh.batch; ++b) {
    MatD in_rounded(sh.rows, sh.cols);  // the kernel rounds the input to bf16 first
    for (size_t i = 0; i < per; ++i) in_rounded.data()[i] = bf16_to_float(float_to_bf16(input[b * per + i]));
    const MatD ref = ns_reference(in_rounded, options.coefficients, options.eps);
    MatD got(sh.rows, sh.cols);
    for (size_t i = 0; i < per; ++i) got.data()[i] = out[b * per + i];
    ASSERT_TRUE(got.allFinite()) << "matrix " << b << " has unwritten or non-finite elements";
    const double rel = (got - ref).norm() / ref.norm();
    EXPECT_LT(rel, 3e-2) << "matrix " << b << " of " << sh.rows << "x" << sh.cols;
    std::printf("[ns] %lldx%lld matrix %lld: relative Frobenius error vs double %.3e\n", (long long)sh.rows,
                (long long)sh.cols, (long long)b, rel);
    Eigen::JacobiSVD<MatD> svd(got);
    const auto sv = svd.singularValues();
    // NS5 with (3.4445, −4.7750, 2.0315) maps σ/‖G‖ ∈ [~0.02, 1] into about [0.68, 1.13].
    EXPECT_GT(sv.minCoeff(), 0.6) << "matrix " << b;
    EXPECT_LT(sv.maxCoeff(), 1.25) << "matrix " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, NewtonSchulzTest,
                         // Full GEMMs, then the blocked symmetric products (k blocks) on wide and tall shapes,
                         // single and batched, and larger shapes (blocks of 256 and 192 rows), then the
                         // GEMM-epilogue combine on square, wide and tall shapes, single and batched.
                         ::testing::Values(NsShape{64, 64, 1}, NsShape{96, 256, 1}, NsShape{300, 128, 1},
                                           NsShape{128, 192, 3}, NsShape{160, 80, 2}, NsShape{64, 64, 1, 4},
                                           NsShape{96, 256, 1, 3}, NsShape{300, 128, 1, 4}, NsShape{128, 192, 3, 2},
                                           NsShape{160, 80, 2, 4}, NsShape{512, 768, 1, 2}, NsShape{768, 512, 2, 4},
                                           NsShape{64, 64, 1, 1, NsCombine::kGemmEpilogue},
                                           NsShape{96, 256, 1, 1, NsCombine::kGemmEpilogue},
                                           NsShape{300, 128, 1, 1, NsCombine::kGemmEpilogue},
                                           NsShape{128, 192, 3, 1, NsCombine::kGemmEpilogue},
                                           NsShape{160, 80, 2, 1, NsCombine::kGemmEpilogue}),
                         [](const ::testing::TestParamInfo<NsShape>& info) {
                           return std::to_string(info.param.rows) + "x" + std::to_string(info.param.cols) + "_batch" +
                                  std::to_string(info.param.batch) + "_blocks" +
                                  std::to_string(info.param.symmetric_blocks) +
                                  (info.param.combine == NsCombine::kGemmEpilogue ? "_epilogue" : "");
                         });

TEST(NewtonSchulz, CustomCoefficientsAndBf16InputInPlace) {
  SHARDOPT_REQUIRE_GPU();
  NsOptions options;
  options.coefficients = {{4.0848f, -6.8946f, 2.9270f}, {3.9505f, -6.3029f, 2.6377f}, {3.7418f, -5.5913f, 2.3037f},
                          {2.8769f, -3.1427f, 1.2046f}, {2.8366f, -3.0525f, 1.2012f}};
  const int64_t rows = 200, cols = 72;
  const MatD g = matrix_with_spectrum(rows, cols, 5, 3.0);
  std::vector<float> gf(g.data(), g.data() + g.size());
  const auto gb = to_bf16(gf);
  DeviceBuffer<bf16> buf(gb);
  NewtonSchulzCuda ns(rows, cols, 1, options);
  ns.orthogonalize(buf.get(), DType::kBF16, buf.get(), 1, nullptr);  // in place
  CUDA_OK(cudaDeviceSynchronize());
  const auto out = from_bf16(buf.download());
  MatD in_rounded(rows, cols), got(rows, cols);
  for (int64_t i = 0; i < g.size(); ++i) {
    in_rounded.data()[i] = bf16_to_float(gb[i]);
    got.data()[i] = out[i];
  }
  const MatD ref = ns_reference(in_rounded, options.coefficients, options.eps);
  EXPECT_LT((got - ref).norm() / ref.norm(), 3e-2);
  EXPECT_DOUBLE_EQ(ns.plain_gemm_flops(), 5.0 * (4.0 * 72 * 72 * 200 + 2.0 * 72 * 72 * 72));
}

// ---------- Muon ----------

struct MuonCase {
  MomentumConvention convention;
  bool nesterov;
  ShapeScale scale;
  DType grad_dtype;
  int64_t rows, cols;
};

class MuonTest : public ::testing::TestWithParam<MuonCase> {};

TEST_P(MuonTest, TwoStepsMatchDoubleReference) {
  SHARDOPT_REQUIRE_GPU();
  const MuonCase tc = GetParam();
  const int64_t batch = 2;
  const size_t per = size_t(tc.rows * tc.cols), n = per * batch;
  MuonHyper h{.lr = 0.02f, .weight_decay = 0.1f, .momentum = 0.9f, .nesterov = tc.nesterov,
              .convention = tc.convention, .shape_scale = tc.scale};
  const auto w0 = random_floats(n, 1);
  const auto m0 = random_floats(n, 2, 0.05f);
  DeviceBuffer<float> w(w0), m(m0), g32(n);
  DeviceBuffer<bf16> g16(n), mirror(n);
  std::vector<double> wr(w0.begin(), w0.end()), mr(m0.begin(), m0.end());
  MuonCuda muon(tc.rows, tc.cols, batch);
  const double mu = h.momentum;
  double s_ref = 1.0;
  switch (tc.scale) {
    case ShapeScale::kOriginal: s_ref = std::sqrt(std::max(1.0, double(tc.rows) / tc.cols)); break;
    case ShapeScale::kMatchRmsAdamW: s_ref = 0.2 * std::sqrt(double(std::max(tc.rows, tc.cols))); break;
    case ShapeScale::kSpectral: s_ref = std::sqrt(double(tc.rows) / tc.cols); break;
  }
  EXPECT_NEAR(muon_shape_scale(tc.scale, tc.rows, tc.cols), s_ref, 1e-12);
  std::vector<double> w_before;
  for (int t = 1; t <= 2; ++t) {
    auto g = random_floats(n, 10 + t);
    if (tc.grad_dtype == DType::kBF16) {
      const auto gb = to_bf16(g);
      g16.upload(gb);
      g = from_bf16(gb);
    } else {
      g32.upload(g);
    }
    w_before = wr;
    for (int64_t b = 0; b < batch; ++b) {
      MatD u(tc.rows, tc.cols);
      for (size_t i = 0; i < per; ++i) {
        const size_t j = b * per + i;
        double u_i;
        if (tc.convention == MomentumConvention::kAveraged) {
          mr[j] = mu * mr[j] + (1 - mu) * g[j];
          u_i = tc.nesterov ? (1 - mu) * g[j] + mu * mr[j] : mr[j];
        } else {
          mr[j] = mu * mr[j] + g[j];
          u_i = tc.nesterov ? g[j] + mu * mr[j] : mr[j];
        }
        u.data()[i] = u_i;
      }
      const MatD o = ns_reference(u, NsOptions{}.coefficients, 1e-7);
      for (size_t i = 0; i < per; ++i) {
        const size_t j = b * per + i;
        wr[j] = wr[j] * (1.0 - double(h.lr) * h.weight_decay) - double(h.lr) * s_ref * o.data()[i];
      }
    }
    muon.step(w.get(), tc.grad_dtype == DType::kBF16 ? static_cast<const void*>(g16.get()) : g32.get(),
              tc.grad_dtype, m.get(), mirror.get(), batch, h, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
  }
  const auto wg = w.download(), mg = m.download();
  const auto mir = mirror.download();
  // Momentum is plain fp32 arithmetic; the last update went through bf16 NS: compare the last
  // step's update direction with the bf16 tolerance, the weights with the update's size.
  double diff2 = 0, upd2 = 0;
  for (size_t j = 0; j < n; ++j) {
    ASSERT_NEAR(mg[j], mr[j], 1e-5 * std::abs(mr[j]) + 1e-6) << "momentum element " << j;
    ASSERT_EQ(mir[j].bits, float_to_bf16(wg[j]).bits) << "bf16 mirror element " << j;
    const double upd_ref = wr[j] - w_before[j];
    diff2 += (wg[j] - wr[j]) * (wg[j] - wr[j]);
    upd2 += upd_ref * upd_ref;
  }
  const double rel = std::sqrt(diff2 / upd2);
  std::printf("[muon] %lldx%lld: weight error in units of the last update %.3e\n", (long long)tc.rows,
              (long long)tc.cols, rel);
  EXPECT_LT(rel, 4e-2) << "relative error of the weights, in units of the last update";
}

INSTANTIATE_TEST_SUITE_P(
    Conventions, MuonTest,
    ::testing::Values(MuonCase{MomentumConvention::kAveraged, true, ShapeScale::kOriginal, DType::kF32, 192, 96},
                      MuonCase{MomentumConvention::kAveraged, false, ShapeScale::kMatchRmsAdamW, DType::kBF16, 64, 160},
                      MuonCase{MomentumConvention::kSummed, true, ShapeScale::kSpectral, DType::kF32, 128, 128},
                      MuonCase{MomentumConvention::kSummed, false, ShapeScale::kOriginal, DType::kBF16, 100, 40}),
    [](const ::testing::TestParamInfo<MuonCase>& info) {
      const MuonCase& c = info.param;
      return std::string(c.convention == MomentumConvention::kAveraged ? "averaged" : "summed") +
             (c.nesterov ? "_nesterov_" : "_plain_") + scale_label(c.scale) +
             (c.grad_dtype == DType::kBF16 ? "_bf16grad_" : "_f32grad_") + std::to_string(c.rows) + "x" +
             std::to_string(c.cols);
    });

TEST(MuonErrors, ShapeScaleFormulasNeedNoDevice) {
  EXPECT_DOUBLE_EQ(muon_shape_scale(ShapeScale::kOriginal, 400, 100), 2.0);
  EXPECT_DOUBLE_EQ(muon_shape_scale(ShapeScale::kOriginal, 100, 400), 1.0);
  EXPECT_DOUBLE_EQ(muon_shape_scale(ShapeScale::kMatchRmsAdamW, 100, 400), 4.0);
  EXPECT_DOUBLE_EQ(muon_shape_scale(ShapeScale::kSpectral, 100, 400), 0.5);
}

TEST(NewtonSchulzErrors, RejectsEmptyShapesBeforeTouchingTheDevice) {
  EXPECT_THROW(NewtonSchulzCuda(0, 10, 1), ConfigError);
  EXPECT_THROW(NewtonSchulzCuda(10, 10, 0), ConfigError);
  NsOptions blocks;
  blocks.symmetric_blocks = 3;  // does not divide min(rows, cols) = 10
  EXPECT_THROW(NewtonSchulzCuda(10, 20, 1, blocks), ConfigError);
  blocks.symmetric_blocks = -1;
  EXPECT_THROW(NewtonSchulzCuda(10, 20, 1, blocks), ConfigError);
  blocks.symmetric_blocks = 2;  // the epilogue combine runs on full GEMMs only
  blocks.combine = NsCombine::kGemmEpilogue;
  EXPECT_THROW(NewtonSchulzCuda(10, 20, 1, blocks), ConfigError);
  EXPECT_EQ(parse_ns_combine("epilogue", "SHARDOPT_CUDA_NS_COMBINE"), NsCombine::kGemmEpilogue);
  EXPECT_EQ(parse_ns_combine("kernel", "SHARDOPT_CUDA_NS_COMBINE"), NsCombine::kKernel);
  try {
    parse_ns_combine("fused", "SHARDOPT_CUDA_NS_COMBINE");
    ADD_FAILURE() << "an unknown combine was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("SHARDOPT_CUDA_NS_COMBINE='fused'"), std::string::npos) << e.what();
  }
}


}  // namespace
}  // namespace shardopt::cuda
