// Newton-Schulz, Muon, NorMuon and QK-clip against plain double-precision references written here
// (triple loops, no BLAS, no code shared with optim/), plus invariants checked with Eigen's SVD.
#include <gtest/gtest.h>

#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <cstdio>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "base/dtype.h"
#include "base/error.h"
#include "optim/config.h"
#include "optim/muon.h"
#include "optim/newton_schulz.h"

namespace shardopt::optim {
namespace {

using Mat = std::vector<double>;  // row-major
using Triple = std::array<double, 3>;

const std::vector<Triple> kDefaultTriples(5, Triple{3.4445, -4.7750, 2.0315});
// Polar Express (arXiv 2505.16932 / modded-nanogpt), typed here independently of optim/.
const std::vector<Triple> kPolarTriples = {
    {8.156554524902461, -22.48329292557795, 15.878769915207462},
    {4.042929935166739, -2.808917465908714, 0.5000178451051316},
    {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
    {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
    {2.3465413258596377, -1.7097828382687081, 0.42323551169305323},
};

struct RefNorm {
  double scale = 1.0, add = 0.0, floor = 1e-7;
};

Mat transpose(const Mat& a, int64_t r, int64_t c) {
  Mat t(a.size());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) t[j * r + i] = a[i * c + j];
  return t;
}

// NS in double exactly as docs/algorithms.md ("Newton–Schulz orthogonalization") writes it.
Mat ref_ns(const Mat& g, int64_t m, int64_t n, const std::vector<Triple>& triples, RefNorm norm = {}) {
  if (m == 0 || n == 0) return g;
  const bool tall = m > n;
  const int64_t p = std::min(m, n), q = std::max(m, n);
  Mat x = tall ? transpose(g, m, n) : g;
  double ss = 0;
  for (double v : x) ss += v * v;
  const double d = std::max(norm.scale * std::sqrt(ss) + norm.add, norm.floor);
  for (double& v : x) v /= d;
  Mat a(p * p), aa(p * p), b(p * p), y(p * q);
  for (const Triple& k : triples) {
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) {
        double s = 0;
        for (int64_t l = 0; l < q; ++l) s += x[i * q + l] * x[j * q + l];
        a[i * p + j] = s;
      }
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) {
        double s = 0;
        for (int64_t l = 0; l < p; ++l) s += a[i * p + l] * a[l * p + j];
        b[i * p + j] = k[1] * a[i * p + j] + k[2] * s;
      }
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < q; ++j) {
        double s = 0;
        for (int64_t l = 0; l < p; ++l) s += b[i * p + l] * x[l * q + j];
        y[i * q + j] = k[0] * x[i * q + j] + s;
      }
    x = y;
  }
  return tall ? transpose(x, p, q) : x;
}

std::vector<float> random_matrix(int64_t r, int64_t c, std::mt19937& rng, float sd = 1.0f) {
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<float> v(static_cast<size_t>(r * c));
  for (auto& x : v) x = normal(rng);
  return v;
}

double max_abs(const Mat& a) {
  double m = 0;
  for (double v : a) m = std::max(m, std::abs(v));
  return m;
}

struct Shape {
  int64_t rows, cols;
};
// 1 x n, n x 1, tall, wide, square, odd both ways, and empty.
const std::vector<Shape> kShapes = {{1, 37}, {37, 1}, {48, 16}, {16, 48}, {32, 32}, {17, 29}, {29, 17}, {0, 5}, {5, 0}};

const NsAlgorithm kAlgorithms[] = {NsAlgorithm::kSymmetric, NsAlgorithm::kBlasSymmetric, NsAlgorithm::kPlainGemm};

TEST(NewtonSchulz, MatchesDoubleReference) {
  std::mt19937 rng(7);
  struct Sched {
    const char* name;
    NsSchedule schedule;
    std::vector<Triple> triples;
    RefNorm norm;
  };
  const std::vector<Sched> schedules = {
      {"default", NsSchedule::default_quintic(), kDefaultTriples, {1.0, 0.0, 1e-7}},
      {"polar", NsSchedule::polar_express(), kPolarTriples, {1.02, 1e-6, 0.0}},
      {"four steps", NsSchedule::default_quintic(4), std::vector<Triple>(4, kDefaultTriples[0]), {1.0, 0.0, 1e-7}},
  };
  for (const Shape s : kShapes) {
    const auto g = random_matrix(s.rows, s.cols, rng);
    const Mat gd(g.begin(), g.end());
    NsWorkspace ws(s.rows, s.cols);
    for (const Sched& sc : schedules) {
      const Mat expect = ref_ns(gd, s.rows, s.cols, sc.triples, sc.norm);
      for (NsAlgorithm alg : kAlgorithms) {
        SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols << " " << sc.name << " algorithm "
                                        << static_cast<int>(alg));
        std::vector<float> out(g.size(), -7.0f);
        newton_schulz(g.data(), s.rows, s.cols, out.data(), sc.schedule, ws, alg);
        // In place (output aliases input) gives the same.
        std::vector<float> inplace = g;
        newton_schulz(inplace.data(), s.rows, s.cols, inplace.data(), sc.schedule, ws, alg);
        const double tol = 2e-3 * std::max(1e-6, max_abs(expect));
        for (size_t i = 0; i < out.size(); ++i) {
          ASSERT_NEAR(out[i], expect[i], tol) << "element " << i;
          ASSERT_NEAR(inplace[i], expect[i], tol) << "element " << i;
        }
      }
    }
  }
}

// p > 384: the symmetric products are several upper-triangle block GEMMs (oneDNN), mirrored; wide
// and tall. The default quintic in double with Eigen's products (independent of optim/); same bound
// as above (fp32 products; measured ~1e-6 of the largest element).
TEST(NewtonSchulz, LargeMatricesMatchDoubleReference) {
  using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::mt19937 rng(9);
  for (const Shape s : {Shape{400, 500}, Shape{520, 400}}) {
    const auto g = random_matrix(s.rows, s.cols, rng);
    MatD x(s.rows, s.cols);
    for (size_t i = 0; i < g.size(); ++i) x.data()[i] = g[i];
    if (s.rows > s.cols) x.transposeInPlace();  // wide orientation
    x /= std::max(x.norm(), 1e-7);
    for (const Triple& k : kDefaultTriples) {
      const MatD a = x * x.transpose();
      const MatD b = k[1] * a + k[2] * a * a;
      x = k[0] * x + b * x;
    }
    if (s.rows > s.cols) x.transposeInPlace();
    const double tol = 2e-3 * x.cwiseAbs().maxCoeff();
    NsWorkspace ws(s.rows, s.cols);
    for (NsAlgorithm alg : kAlgorithms) {
      SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols << " algorithm " << static_cast<int>(alg));
      std::vector<float> out(g.size(), -7.0f);
      newton_schulz(g.data(), s.rows, s.cols, out.data(), NsSchedule::default_quintic(), ws, alg);
      double worst = 0;
      for (size_t i = 0; i < out.size(); ++i) {
        const double err = std::abs(out[i] - x.data()[i]);
        if (!(err <= worst)) worst = err;  // NaN propagates (std::max would drop it)
      }
      EXPECT_LT(worst, tol);
      std::printf("[ns f32] %lldx%lld algorithm %d max error %.3e of max element %.3e\n",
                  static_cast<long long>(s.rows), static_cast<long long>(s.cols), static_cast<int>(alg), worst,
                  x.cwiseAbs().maxCoeff());
    }
  }
}

// Singular values of NS(G): NS keeps the singular vectors and maps each normalized singular value
// sigma through the composed scalar polynomials. Check both that map and the band it implies.
void check_singular_values(const std::vector<Triple>& triples, const NsSchedule& schedule, RefNorm norm,
                           double band_lo_expected, double band_hi_expected) {
  std::mt19937 rng(11);
  for (const Shape s : {Shape{64, 64}, Shape{48, 96}, Shape{96, 40}}) {
    const int64_t p = std::min(s.rows, s.cols);
    // G = U diag(sigma) V^T with sigma in [0.2, 1]: condition number <= 5.
    Eigen::MatrixXd u = Eigen::MatrixXd::Random(s.rows, p).householderQr().householderQ() *
                        Eigen::MatrixXd::Identity(s.rows, p);
    Eigen::MatrixXd v = Eigen::MatrixXd::Random(s.cols, p).householderQr().householderQ() *
                        Eigen::MatrixXd::Identity(s.cols, p);
    std::uniform_real_distribution<double> uni(0.2, 1.0);
    Eigen::VectorXd sigma(p);
    for (int64_t i = 0; i < p; ++i) sigma[i] = uni(rng);
    const Eigen::MatrixXd gm = u * sigma.asDiagonal() * v.transpose();
    std::vector<float> g(static_cast<size_t>(s.rows * s.cols));
    for (int64_t i = 0; i < s.rows; ++i)
      for (int64_t j = 0; j < s.cols; ++j) g[i * s.cols + j] = static_cast<float>(gm(i, j));

    NsWorkspace ws(s.rows, s.cols);
    std::vector<float> out(g.size());
    newton_schulz(g.data(), s.rows, s.cols, out.data(), schedule, ws);
    Eigen::MatrixXd om(s.rows, s.cols);
    for (int64_t i = 0; i < s.rows; ++i)
      for (int64_t j = 0; j < s.cols; ++j) om(i, j) = out[i * s.cols + j];
    Eigen::VectorXd got = om.jacobiSvd().singularValues();

    // Expected: the scalar map applied to the normalized input singular values.
    const double d = norm.scale * gm.norm() + norm.add;
    std::vector<double> expect(p);
    double lo_in = 1e9, hi_in = 0;
    for (int64_t i = 0; i < p; ++i) {
      double x = sigma[i] / std::max(d, norm.floor);
      lo_in = std::min(lo_in, x);
      hi_in = std::max(hi_in, x);
      for (const Triple& k : triples) x = k[0] * x + k[1] * x * x * x + k[2] * x * x * x * x * x;
      expect[i] = x;
    }
    std::sort(expect.begin(), expect.end(), std::greater<>());
    for (int64_t i = 0; i < p; ++i) ASSERT_NEAR(got[i], expect[i], 2e-3) << s.rows << "x" << s.cols << " sv " << i;

    // The band the schedule produces on [lo_in, hi_in], derived by a fine scan of the scalar map.
    double band_lo = 1e9, band_hi = 0;
    for (int i = 0; i <= 20000; ++i) {
      double x = lo_in + (hi_in - lo_in) * i / 20000.0;
      for (const Triple& k : triples) x = k[0] * x + k[1] * x * x * x + k[2] * x * x * x * x * x;
      band_lo = std::min(band_lo, x);
      band_hi = std::max(band_hi, x);
    }
    EXPECT_GE(band_lo, band_lo_expected);
    EXPECT_LE(band_hi, band_hi_expected);
    EXPECT_GE(got.minCoeff(), band_lo - 2e-3) << s.rows << "x" << s.cols;
    EXPECT_LE(got.maxCoeff(), band_hi + 2e-3) << s.rows << "x" << s.cols;
  }
}

TEST(NewtonSchulz, SingularValuesInDefaultBand) {
  // Default quintic, 5 steps: for normalized sigma >= 0.01 the output lies in ~[0.6818, 1.1344].
  check_singular_values(kDefaultTriples, NsSchedule::default_quintic(), {1.0, 0.0, 1e-7}, 0.68, 1.135);
}

TEST(NewtonSchulz, SingularValuesInPolarExpressBand) {
  // Polar Express, 5 steps: ~[0.8589, 1.1411] for normalized sigma >= 1e-3.
  check_singular_values(kPolarTriples, NsSchedule::polar_express(), {1.02, 1e-6, 0.0}, 0.85, 1.15);
}

// bf16 products (oneDNN) against the default quintic in double (Eigen products, independent of
// optim/). Bound, derived: each iteration rounds three operands to bf16 (X, A, a I + B; relative
// u = 2^-9 each), moving an output singular value by about 3u = 6e-3 relative; the scalar map's
// slope along the NS trajectory (|f'| <= ~1.3 for sigma in the band) carries an error into the
// later steps, so five steps give <= 6e-3 (1 + 1.3 + 1.3^2 + 1.3^3 + 1.3^4) = 5.4e-2. Measured:
// 1.5e-2 to 1.7e-2 for matrices, up to 3.7e-2 for a vector (all error in its one singular value);
// a wrong product is off by O(1). Shapes include p > 384 (several upper-triangle blocks), wide
// and tall.
TEST(NewtonSchulz, Bf16MatchesDoubleReferenceAndLandsInTheSingularValueBand) {
  using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  struct S {
    int64_t rows, cols;
  };
  std::mt19937 gen(5);
  std::normal_distribution<double> normal;
  NsSchedule schedule = NsSchedule::default_quintic();
  schedule.precision = NsPrecision::kBF16;
  for (const S s : {S{1, 37}, S{37, 1}, S{48, 16}, S{17, 29}, S{29, 17}, S{400, 500}, S{520, 400}}) {
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    const int64_t p = std::min(s.rows, s.cols);
    // G = U diag(sigma) V^T with sigma spread over [0.1, 1]: the NS band applies to all of them.
    auto orthonormal = [&](int64_t n) {
      MatD r(n, p);
      for (int64_t i = 0; i < r.size(); ++i) r.data()[i] = normal(gen);
      return MatD(Eigen::HouseholderQR<MatD>(r).householderQ() * MatD::Identity(n, p));
    };
    Eigen::VectorXd sigma(p);
    for (int64_t i = 0; i < p; ++i) sigma[i] = 0.1 + 0.9 * double(i) / double(std::max<int64_t>(p - 1, 1));
    const MatD g = orthonormal(s.rows) * sigma.asDiagonal() * orthonormal(s.cols).transpose();
    std::vector<float> gf(static_cast<size_t>(g.size()));
    for (size_t i = 0; i < gf.size(); ++i) gf[i] = static_cast<float>(g.data()[i]);

    MatD x = s.rows > s.cols ? MatD(g.transpose()) : g;  // wide orientation
    x /= std::max(x.norm(), 1e-7);
    for (int it = 0; it < 5; ++it) {
      const MatD a = x * x.transpose();
      const MatD b = -4.7750 * a + 2.0315 * a * a;
      x = 3.4445 * x + b * x;
    }
    const MatD expect = s.rows > s.cols ? MatD(x.transpose()) : x;

    for (const Bf16GemmKernel kernel : {Bf16GemmKernel::kNative, Bf16GemmKernel::kF32Units}) {
      SCOPED_TRACE(to_string(kernel));
      NsWorkspace ws;
      ws.set_bf16_gemm_kernel(kernel);
      ws.reserve(s.rows, s.cols, NsPrecision::kBF16);
      std::vector<float> out(gf.size(), -7.0f);
      newton_schulz(gf.data(), s.rows, s.cols, out.data(), schedule, ws);
      MatD got(s.rows, s.cols);
      for (size_t i = 0; i < out.size(); ++i) got.data()[i] = out[i];
      ASSERT_TRUE(got.allFinite());
      const double rel = (got - expect).norm() / expect.norm();
      EXPECT_LT(rel, 5.4e-2);
      std::printf("[ns bf16 %s] %lldx%lld relative Frobenius error vs double %.3e\n", to_string(kernel),
                  static_cast<long long>(s.rows), static_cast<long long>(s.cols), rel);
      // Default quintic, 5 steps, normalized sigma in [0.1/||G||, 1/||G||]: output in ~[0.68, 1.135],
      // widened by the same relative error.
      const Eigen::VectorXd sv = Eigen::BDCSVD<MatD>(got).singularValues();
      EXPECT_GT(sv.minCoeff(), 0.68 * (1 - 5.4e-2));
      EXPECT_LT(sv.maxCoeff(), 1.135 * (1 + 5.4e-2));
    }
  }
  // Not reserved for bf16: a clear error instead of a missing primitive.
  NsWorkspace f32_only(4, 4);
  std::vector<float> z(16, 1.0f);
  EXPECT_THROW(newton_schulz(z.data(), 4, 4, z.data(), schedule, f32_only), ConfigError);
}

// Both bf16 kernels round exactly the operands torch.optim.Muon rounds, and nothing else. One
// iteration with (a, b, c) = (0, 1, 0) and no normalization (floor 1) on a small-integer G gives
// X1 = bf16(A) X with A = G G^T: every product and sum is an integer below 2^24, exact in fp32 and in
// double, so the result is exact and the reference (written here) needs only the rounding of A, whose
// entries reach ~300 and are odd integers above 256 in places (not bf16-representable). A kernel that
// skipped the rounding of A (plain fp32 operands) or rounded anything else differently fails the
// equality.
TEST(NewtonSchulz, Bf16KernelsRoundTheOperandsExactly) {
  NsSchedule schedule;
  schedule.coefficients = {{0.0f, 1.0f, 0.0f}};
  schedule.norm_scale = 0.0f;
  schedule.norm_add = 0.0f;
  schedule.norm_floor = 1.0f;
  schedule.precision = NsPrecision::kBF16;
  std::mt19937 gen(11);
  std::uniform_int_distribution<int> small(-3, 3);
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{40, 72}, {72, 40}, {400, 420}}) {
    SCOPED_TRACE(testing::Message() << rows << "x" << cols);
    const int64_t p = std::min(rows, cols), q = std::max(rows, cols);
    std::vector<float> g(static_cast<size_t>(rows * cols));
    for (float& v : g) v = static_cast<float>(small(gen));
    // Wide orientation X (p x q) as doubles; A = X X^T; B = bf16(A); X1 = B X.
    Mat x(static_cast<size_t>(p * q));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        x[static_cast<size_t>(rows <= cols ? r * q + c : c * q + r)] = g[static_cast<size_t>(r * cols + c)];
    Mat b(static_cast<size_t>(p * p));
    int odd_above_256 = 0;
    for (int64_t i = 0; i < p; ++i)
      for (int64_t j = 0; j < p; ++j) {
        double sum = 0;
        for (int64_t k = 0; k < q; ++k) sum += x[static_cast<size_t>(i * q + k)] * x[static_cast<size_t>(j * q + k)];
        odd_above_256 += std::fabs(sum) > 256 && std::fmod(sum, 2.0) != 0;
        b[static_cast<size_t>(i * p + j)] = bf16_to_float(float_to_bf16(static_cast<float>(sum)));
      }
    ASSERT_GT(odd_above_256, 0) << "the test needs entries of A that bf16 cannot hold";
    std::vector<float> expect(g.size());
    for (int64_t i = 0; i < p; ++i)
      for (int64_t k = 0; k < q; ++k) {
        double sum = 0;
        for (int64_t j = 0; j < p; ++j) sum += b[static_cast<size_t>(i * p + j)] * x[static_cast<size_t>(j * q + k)];
        expect[static_cast<size_t>(rows <= cols ? i * q + k : k * p + i)] = static_cast<float>(sum);
      }
    for (const Bf16GemmKernel kernel : {Bf16GemmKernel::kNative, Bf16GemmKernel::kF32Units}) {
      SCOPED_TRACE(to_string(kernel));
      NsWorkspace ws;
      ws.set_bf16_gemm_kernel(kernel);
      ws.reserve(rows, cols, NsPrecision::kBF16);
      std::vector<float> out(g.size(), -7.0f);
      newton_schulz(g.data(), rows, cols, out.data(), schedule, ws);
      int64_t wrong = 0;
      for (size_t i = 0; i < out.size(); ++i) wrong += out[i] != expect[i];
      EXPECT_EQ(wrong, 0) << "of " << out.size();
    }
  }
  // A workspace reserved for one kernel does not silently serve the other.
  NsWorkspace ws;
  ws.set_bf16_gemm_kernel(Bf16GemmKernel::kF32Units);
  ws.reserve(8, 8, NsPrecision::kBF16);
  ws.set_bf16_gemm_kernel(Bf16GemmKernel::kNative);
  std::vector<float> z(64, 1.0f);
  EXPECT_THROW(newton_schulz(z.data(), 8, 8, z.data(), schedule, ws), ConfigError);
}

TEST(NewtonSchulz, ZeroMatrixStaysZeroAndFlopCount) {
  std::vector<float> z(12, 0.0f), out(12, 5.0f);
  NsWorkspace ws(3, 4);
  newton_schulz(z.data(), 3, 4, out.data(), NsSchedule::default_quintic(), ws);
  for (float v : out) EXPECT_EQ(v, 0.0f);
  // 4 p^2 q + 2 p^3 per iteration, p = min, q = max.
  EXPECT_DOUBLE_EQ(newton_schulz_flops(100, 300, 5), 5 * (4.0 * 100 * 100 * 300 + 2.0 * 100 * 100 * 100));
  EXPECT_DOUBLE_EQ(newton_schulz_flops(300, 100, 1), 4.0 * 100 * 100 * 300 + 2.0 * 100 * 100 * 100);
  EXPECT_THROW(newton_schulz(z.data(), 4, 4, out.data(), NsSchedule::default_quintic(), ws), ConfigError);
}

// ---- Muon / NorMuon reference ----

struct RefMuon {
  bool summed = false, nesterov = true, normuon = false;
  double mu = 0.95, wd = 0.1, b2 = 0.95, eps = 1e-10;
  int scale = 1;  // 1 original, 2 match_rms_adamw, 3 spectral
  std::vector<Triple> triples = kDefaultTriples;
  RefNorm norm;
};

double ref_scale(int kind, double m, double n) {
  if (kind == 1) return std::sqrt(std::max(1.0, m / n));
  if (kind == 2) return 0.2 * std::sqrt(std::max(m, n));
  return std::sqrt(m / n);
}

void ref_muon_step(const RefMuon& c, Mat& w, Mat& mom, Mat& v, const Mat& g, int64_t m, int64_t n,
                   const std::vector<int64_t>& blocks, double lr) {
  Mat u(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    if (c.summed) {
      mom[i] = c.mu * mom[i] + g[i];
      u[i] = c.nesterov ? g[i] + c.mu * mom[i] : mom[i];
    } else {
      mom[i] = c.mu * mom[i] + (1 - c.mu) * g[i];
      u[i] = c.nesterov ? (1 - c.mu) * g[i] + c.mu * mom[i] : mom[i];
    }
  }
  int64_t r0 = 0;
  for (int64_t b : blocks) {
    Mat ub(u.begin() + r0 * n, u.begin() + (r0 + b) * n);
    Mat o = ref_ns(ub, b, n, c.triples, c.norm);
    if (c.normuon) {
      double before = 0, after = 0;
      for (int64_t i = 0; i < b; ++i) {
        double ms = 0;
        for (int64_t j = 0; j < n; ++j) ms += o[i * n + j] * o[i * n + j];
        before += ms;
        ms /= n;
        v[r0 + i] = c.b2 * v[r0 + i] + (1 - c.b2) * ms;
        for (int64_t j = 0; j < n; ++j) o[i * n + j] /= std::sqrt(v[r0 + i]) + c.eps;
        for (int64_t j = 0; j < n; ++j) after += o[i * n + j] * o[i * n + j];
      }
      const double f = std::sqrt(before / after);
      for (double& x : o) x *= f;
    }
    const double s = ref_scale(c.scale, double(b), double(n));
    for (int64_t i = 0; i < b * n; ++i) {
      double& wi = w[(r0 * n) + i];
      wi = wi * (1 - lr * c.wd) - lr * s * o[i];
    }
    r0 += b;
  }
}

struct MuonCase {
  RefMuon ref;
  proto::OptimizerConfig config;
  bool bf16_grads = false;
  bool mirror = false;
};

void run_muon(const MuonCase& mc, int64_t m, int64_t n, std::vector<int64_t> blocks = {}) {
  const OptimizerParams params = resolve_optimizer_config(mc.config);
  std::mt19937 rng(static_cast<unsigned>(m * 131 + n));
  auto w = random_matrix(m, n, rng, 0.5f);
  std::vector<float> mom(w.size(), 0.0f), v(static_cast<size_t>(m), 0.0f);
  std::vector<bf16> mirror(w.size(), bf16{0});
  Mat wr(w.begin(), w.end()), momr(w.size(), 0.0), vr(static_cast<size_t>(m), 0.0);
  MuonWorkspace ws(m, n);
  const std::vector<int64_t> ref_blocks = blocks.empty() ? std::vector<int64_t>{m} : blocks;
  const double lr = 0.02;
  for (int step = 1; step <= 3; ++step) {
    auto gf = random_matrix(m, n, rng);
    std::vector<bf16> gb(gf.size());
    Mat g(gf.size());
    for (size_t i = 0; i < gf.size(); ++i) {
      gb[i] = float_to_bf16(gf[i]);
      g[i] = mc.bf16_grads ? bf16_to_float(gb[i]) : gf[i];
    }
    ref_muon_step(mc.ref, wr, momr, vr, g, m, n, ref_blocks, lr);
    MuonMatrix mat;
    mat.master = w.data();
    mat.mirror = mc.mirror ? mirror.data() : nullptr;
    mat.grad = mc.bf16_grads ? static_cast<const void*>(gb.data()) : gf.data();
    mat.grad_dtype = mc.bf16_grads ? DType::kBF16 : DType::kF32;
    mat.momentum = mom.data();
    mat.row_second_moment = v.data();
    mat.rows = m;
    mat.cols = n;
    mat.block_rows = blocks;
    ASSERT_TRUE(muon_step(params, mat, float(lr), ws).applied);
  }
  // NS amplifies fp32 rounding (|p'(0)| = a per iteration): allow 2e-3 of the update size.
  double max_scale = 0;
  for (int64_t b : ref_blocks) max_scale = std::max(max_scale, b > 0 ? ref_scale(mc.ref.scale, double(b), double(n)) : 0.0);
  const double tol = 3 * lr * max_scale * 2e-3 * (mc.ref.normuon ? 5 : 1) + 1e-6;
  for (size_t i = 0; i < w.size(); ++i) {
    ASSERT_NEAR(w[i], wr[i], tol) << m << "x" << n << " element " << i;
    ASSERT_NEAR(mom[i], momr[i], 1e-5 * std::max(1.0, std::abs(momr[i])));
    if (mc.mirror) {
      ASSERT_EQ(mirror[i].bits, float_to_bf16(w[i]).bits);
      ASSERT_NEAR(bf16_to_float(mirror[i]), wr[i], std::abs(wr[i]) / 256.0 + tol);
    }
  }
  if (mc.ref.normuon) {
    for (int64_t i = 0; i < m; ++i) ASSERT_NEAR(v[i], vr[i], 1e-3 * vr[i] + 1e-9) << "row " << i;
  }
}

proto::OptimizerConfig muon_config(bool summed, bool nesterov, proto::MuonShapeScale scale, bool normuon = false) {
  proto::OptimizerConfig c;
  c.set_kind(normuon ? proto::OPTIMIZER_NORMUON : proto::OPTIMIZER_MUON);
  c.set_muon_momentum(summed ? proto::MUON_MOMENTUM_SUMMED : proto::MUON_MOMENTUM_AVERAGED);
  c.set_nesterov(nesterov);
  c.set_shape_scale(scale);
  return c;
}

TEST(Muon, ConventionsNesterovAndShapesMatchReference) {
  for (const Shape s : kShapes) {
    for (bool summed : {false, true}) {
      for (bool nesterov : {false, true}) {
        MuonCase mc;
        mc.ref.summed = summed;
        mc.ref.nesterov = nesterov;
        mc.config = muon_config(summed, nesterov, proto::MUON_SHAPE_SCALE_ORIGINAL);
        SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols << " summed " << summed << " nesterov " << nesterov);
        run_muon(mc, s.rows, s.cols);
      }
    }
  }
}

TEST(Muon, EveryShapeScale) {
  const std::pair<proto::MuonShapeScale, int> scales[] = {{proto::MUON_SHAPE_SCALE_ORIGINAL, 1},
                                                          {proto::MUON_SHAPE_SCALE_MATCH_RMS_ADAMW, 2},
                                                          {proto::MUON_SHAPE_SCALE_SPECTRAL, 3}};
  for (const auto& [scale, ref_kind] : scales) {
    for (const Shape s : {Shape{48, 16}, Shape{16, 48}, Shape{29, 17}}) {
      MuonCase mc;
      mc.ref.scale = ref_kind;
      mc.config = muon_config(false, true, scale);
      SCOPED_TRACE(testing::Message() << "scale " << ref_kind << " " << s.rows << "x" << s.cols);
      run_muon(mc, s.rows, s.cols);
    }
  }
  EXPECT_FLOAT_EQ(muon_shape_scale(proto::MUON_SHAPE_SCALE_ORIGINAL, 64, 16), 2.0f);
  EXPECT_FLOAT_EQ(muon_shape_scale(proto::MUON_SHAPE_SCALE_ORIGINAL, 16, 64), 1.0f);
  EXPECT_FLOAT_EQ(muon_shape_scale(proto::MUON_SHAPE_SCALE_SPECTRAL, 16, 64), 0.5f);
  EXPECT_FLOAT_EQ(muon_shape_scale(proto::MUON_SHAPE_SCALE_MATCH_RMS_ADAMW, 16, 100), 2.0f);
}

TEST(Muon, Bf16GradientsAndMirror) {
  MuonCase mc;
  mc.config = muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL);
  mc.bf16_grads = true;
  mc.mirror = true;
  run_muon(mc, 24, 40);
  run_muon(mc, 40, 24);
}

TEST(Muon, PolarExpressSchedule) {
  MuonCase mc;
  mc.config = muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL);
  mc.config.set_ns_schedule(proto::NS_SCHEDULE_POLAR_EXPRESS);
  mc.ref.triples = kPolarTriples;
  mc.ref.norm = {1.02, 1e-6, 0.0};
  run_muon(mc, 32, 20);
  run_muon(mc, 20, 32);
}

TEST(Muon, BlockwiseOrthogonalization) {
  MuonCase mc;
  mc.config = muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL);
  run_muon(mc, 40, 24, {8, 0, 24, 8});  // QKV-like, one empty block, one tall block
  // Block-wise differs from whole-matrix NS: the blocks of O are each orthogonal.
  std::mt19937 rng(3);
  auto g = random_matrix(32, 24, rng);
  const Mat gd(g.begin(), g.end());
  const Mat whole = ref_ns(gd, 32, 24, kDefaultTriples);
  const Mat top = ref_ns(Mat(gd.begin(), gd.begin() + 16 * 24), 16, 24, kDefaultTriples);
  double diff = 0;
  for (int64_t i = 0; i < 16 * 24; ++i) diff = std::max(diff, std::abs(whole[i] - top[i]));
  EXPECT_GT(diff, 1e-2);
}

TEST(Muon, NorMuonMatchesReference) {
  for (const Shape s : {Shape{48, 16}, Shape{16, 48}, Shape{17, 29}, Shape{1, 37}, Shape{37, 1}}) {
    MuonCase mc;
    mc.ref.normuon = true;
    mc.config = muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL, true);
    SCOPED_TRACE(testing::Message() << s.rows << "x" << s.cols);
    run_muon(mc, s.rows, s.cols);
  }
  MuonCase blocked;
  blocked.ref.normuon = true;
  blocked.ref.summed = true;
  blocked.config = muon_config(true, true, proto::MUON_SHAPE_SCALE_ORIGINAL, true);
  run_muon(blocked, 30, 20, {10, 20});
}

TEST(Muon, BadInputThrowsAndFiniteCheck) {
  const OptimizerParams params = resolve_optimizer_config(muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL));
  std::vector<float> w(12, 1.0f), g(12, 0.5f), mom(12, 0.0f);
  MuonMatrix mat{w.data(), nullptr, g.data(), DType::kF32, mom.data(), nullptr, 3, 4, {}};
  MuonWorkspace small(2, 2);
  EXPECT_THROW(muon_step(params, mat, 0.1f, small), ConfigError);
  MuonWorkspace ws(3, 4);
  const int64_t bad_blocks[] = {1, 1};
  MuonMatrix blocked = mat;
  blocked.block_rows = bad_blocks;
  EXPECT_THROW(muon_step(params, blocked, 0.1f, ws), ConfigError);
  const OptimizerParams normuon =
      resolve_optimizer_config(muon_config(false, true, proto::MUON_SHAPE_SCALE_ORIGINAL, true));
  EXPECT_THROW(muon_step(normuon, mat, 0.1f, ws), ConfigError);  // no row state
  const OptimizerParams adamw = resolve_optimizer_config(default_optimizer_config(proto::OPTIMIZER_ADAMW));
  EXPECT_THROW(muon_step(adamw, mat, 0.1f, ws), ConfigError);

  g[5] = INFINITY;
  const StepResult r = muon_step(params, mat, 0.1f, ws, FiniteCheck::kGradients);
  EXPECT_FALSE(r.applied);
  EXPECT_EQ(r.nonfinite_gradients, 1);
  for (float x : w) EXPECT_EQ(x, 1.0f);
  for (float x : mom) EXPECT_EQ(x, 0.0f);
}

// ---- QK-clip ----

TEST(QkClip, ScalesOnlyHeadsAboveTauAndLogitsByTauOverS) {
  const int64_t heads = 3, dq = 4, dk = 2, cols = 6;
  std::mt19937 rng(5);
  auto wq = random_matrix(heads * dq, cols, rng);
  auto wk = random_matrix(heads * dk, cols, rng);
  const auto wq0 = wq, wk0 = wk;
  std::vector<bf16> kmirror(wk.size(), bf16{0});
  const std::vector<float> logits = {50.0f, 400.0f, 100.0f};  // only head 1 exceeds tau = 100
  const float tau = 100.0f, alpha = 0.5f;
  QkClipWeights wts{wq.data(), nullptr, dq, wk.data(), kmirror.data(), dk, cols};
  EXPECT_EQ(qk_clip(wts, logits, tau, alpha), 1);
  // Heads 0 and 2 untouched, bit for bit.
  for (int64_t h : {0, 2}) {
    for (int64_t i = h * dq * cols; i < (h + 1) * dq * cols; ++i) EXPECT_EQ(wq[i], wq0[i]);
    for (int64_t i = h * dk * cols; i < (h + 1) * dk * cols; ++i) EXPECT_EQ(wk[i], wk0[i]);
  }
  // Head 1: W_q scaled by eta^alpha, W_k by eta^(1-alpha), eta = tau/S = 0.25.
  const double eta = 0.25;
  for (int64_t i = dq * cols; i < 2 * dq * cols; ++i) EXPECT_NEAR(wq[i], wq0[i] * std::pow(eta, alpha), 1e-6);
  for (int64_t i = dk * cols; i < 2 * dk * cols; ++i) {
    EXPECT_NEAR(wk[i], wk0[i] * std::pow(eta, 1 - alpha), 1e-6);
    EXPECT_EQ(kmirror[i].bits, float_to_bf16(wk[i]).bits);
  }
  // Invariant: every q.k logit of head 1 (any query/key input) shrinks by exactly eta.
  std::vector<double> x(cols), y(cols);
  for (auto& e : x) e = std::normal_distribution<double>()(rng);
  for (auto& e : y) e = std::normal_distribution<double>()(rng);
  auto logit = [&](const std::vector<float>& q, const std::vector<float>& k, int64_t qi, int64_t ki) {
    double a = 0, b = 0;
    for (int64_t j = 0; j < cols; ++j) {
      a += q[(dq + qi) * cols + j] * x[j];
      b += k[(dk + ki) * cols + j] * y[j];
    }
    return a * b;
  };
  EXPECT_NEAR(logit(wq, wk, 1, 1), eta * logit(wq0, wk0, 1, 1), 1e-5 * std::abs(logit(wq0, wk0, 1, 1)) + 1e-7);

  const std::vector<float> bad = {NAN};
  EXPECT_THROW(qk_clip(wts, bad, tau, alpha), ConfigError);
  EXPECT_THROW(qk_clip(wts, logits, 0.0f, alpha), ConfigError);
  EXPECT_THROW(qk_clip(wts, logits, tau, 1.5f), ConfigError);
}

}  // namespace
}  // namespace shardopt::optim

namespace shardopt::optim {
namespace {

// ParallelMuon on 2 and 3 threads == muon_step one matrix after another (the reference: muon_step
// is checked against double above), for Muon and NorMuon, f32 and bf16 NS, with a blocked matrix;
// and a bad matrix's ConfigError reaches the caller.
TEST(ParallelMuon, AnyThreadCountEqualsSequentialMuonSteps) {
  struct Shape {
    int64_t rows, cols;
  };
  const std::vector<Shape> shapes = {{64, 48}, {32, 96}, {96, 32}, {16, 16}, {48, 40}, {8, 200}};
  const std::vector<int64_t> blocks = {16, 32};  // rows of the 48x40 matrix
  for (auto kind : {proto::OPTIMIZER_MUON, proto::OPTIMIZER_NORMUON}) {
    for (auto dtype : {proto::NS_DTYPE_F32, proto::NS_DTYPE_BF16}) {
      proto::OptimizerConfig c;
      c.set_kind(kind);
      c.set_ns_dtype(dtype);
      const OptimizerParams params = resolve_optimizer_config(c);
      for (int threads : {2, 3}) {
        SCOPED_TRACE(testing::Message() << optimizer_kind_name(kind) << " ns dtype " << dtype << " threads " << threads);
        std::mt19937 rng(21);
        struct Data {
          std::vector<float> w, g, m, v;
        };
        std::vector<Data> seq(shapes.size()), par(shapes.size());
        std::vector<MuonMatrix> seq_m(shapes.size()), par_m(shapes.size());
        std::vector<std::pair<int64_t, int64_t>> dims;
        std::vector<std::span<const int64_t>> block_lists;
        for (size_t i = 0; i < shapes.size(); ++i) {
          const auto [r, cc] = shapes[i];
          seq[i].w = random_matrix(r, cc, rng);
          seq[i].g = random_matrix(r, cc, rng);
          seq[i].m.assign(static_cast<size_t>(r * cc), 0.0f);
          seq[i].v.assign(static_cast<size_t>(r), 0.0f);
          par[i] = seq[i];
          for (auto* pair : {&seq, &par}) {
            Data& d = (*pair)[i];
            MuonMatrix& mm = pair == &seq ? seq_m[i] : par_m[i];
            mm.master = d.w.data();
            mm.grad = d.g.data();
            mm.momentum = d.m.data();
            mm.row_second_moment = d.v.data();
            mm.rows = r;
            mm.cols = cc;
            if (r == 48) mm.block_rows = blocks;
          }
          dims.emplace_back(r, cc);
          block_lists.push_back(r == 48 ? std::span<const int64_t>(blocks) : std::span<const int64_t>());
        }
        MuonWorkspace ws(dims, params.ns.precision);
        for (const int64_t b : blocks) ws.reserve(b, 40, params.ns.precision);
        ThreadPool pool(threads);
        ParallelMuon parallel(&pool, dims, block_lists, params.ns.precision);
        std::vector<const MuonMatrix*> ptrs;
        for (const MuonMatrix& mm : par_m) ptrs.push_back(&mm);
        for (int step = 0; step < 2; ++step) {
          for (const MuonMatrix& mm : seq_m) muon_step(params, mm, 0.02f, ws);
          parallel.step(params, ptrs, 0.02f);
        }
        for (size_t i = 0; i < shapes.size(); ++i) {
          for (size_t j = 0; j < seq[i].w.size(); ++j) {
            // Same code per matrix; bf16 products may split work differently with OpenMP threads.
            const double tol = dtype == proto::NS_DTYPE_F32 ? 0.0 : 1e-6;
            ASSERT_NEAR(par[i].w[j], seq[i].w[j], tol) << "matrix " << i << " element " << j;
            ASSERT_EQ(par[i].m[j], seq[i].m[j]) << "matrix " << i << " element " << j;
          }
        }
        // A matrix whose shape differs from the constructor's: ConfigError from the step.
        MuonMatrix wrong = par_m[0];
        wrong.rows = 63;
        std::vector<const MuonMatrix*> bad = ptrs;
        bad[0] = &wrong;
        EXPECT_THROW(parallel.step(params, bad, 0.02f), ConfigError);
        // A task that throws inside the pool (null momentum) propagates too.
        MuonMatrix broken = par_m[1];
        broken.momentum = nullptr;
        bad = ptrs;
        bad[1] = &broken;
        EXPECT_THROW(parallel.step(params, bad, 0.02f), ConfigError);
      }
    }
  }
}

}  // namespace
}  // namespace shardopt::optim
