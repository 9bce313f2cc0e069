// Plain double-precision forward of the same transformer, written independently of
// model/transformer.cc (plain loops, no BLAS, no shared code): the tests' reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace shardopt::model::testing {

struct RefConfig {
  int vocab, d, layers, heads, context, hidden;
  bool relu_squared;
  double eps;
};

struct RefResult {
  double loss = 0.0;                // mean cross-entropy
  std::vector<double> logits;       // [B*T][V]
  std::vector<double> max_logit;    // [layers*heads], max |q·k|/sqrt(dh) over causal pairs
};

// Tensors in the model's registration order: tok, pos, per layer {attn_norm, q, k, v, o,
// mlp_norm, up, down}, final_norm, lm_head.
inline RefResult reference_forward(const RefConfig& c, const std::vector<std::vector<double>>& w,
                                   const std::vector<uint8_t>& in, const std::vector<uint8_t>& tgt, int B, int T) {
  const int d = c.d, H = c.heads, dh = d / H, F = c.hidden, V = c.vocab;
  auto W = [&](int idx, int r, int col, int cols) { return w[idx][static_cast<size_t>(r) * cols + col]; };
  using Mat = std::vector<std::vector<double>>;  // [token][feature]
  const int N = B * T;
  Mat x(N, std::vector<double>(d));
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < d; ++i) x[b * T + t][i] = W(0, in[b * T + t], i, d) + W(1, t, i, d);

  auto rmsnorm = [&](const Mat& m, int gidx) {
    Mat out(N, std::vector<double>(d));
    for (int n = 0; n < N; ++n) {
      double ss = 0;
      for (double e : m[n]) ss += e * e;
      const double r = 1.0 / std::sqrt(ss / d + c.eps);
      for (int i = 0; i < d; ++i) out[n][i] = m[n][i] * r * w[gidx][i];
    }
    return out;
  };
  auto matvec = [&](const Mat& m, int widx, int rows, int cols) {  // out[n][r] = Σ_c W[r][c]·m[n][c]
    Mat out(N, std::vector<double>(rows));
    for (int n = 0; n < N; ++n)
      for (int r = 0; r < rows; ++r) {
        double s = 0;
        for (int col = 0; col < cols; ++col) s += W(widx, r, col, cols) * m[n][col];
        out[n][r] = s;
      }
    return out;
  };

  RefResult res;
  res.max_logit.assign(static_cast<size_t>(c.layers * H), 0.0);
  for (int l = 0; l < c.layers; ++l) {
    const int base = 2 + 8 * l;
    Mat h = rmsnorm(x, base);
    Mat q = matvec(h, base + 1, d, d), k = matvec(h, base + 2, d, d), v = matvec(h, base + 3, d, d);
    Mat o(N, std::vector<double>(d, 0.0));
    for (int b = 0; b < B; ++b)
      for (int hd = 0; hd < H; ++hd)
        for (int i = 0; i < T; ++i) {
          std::vector<double> s(i + 1);
          for (int j = 0; j <= i; ++j) {
            double dot = 0;
            for (int e = 0; e < dh; ++e) dot += q[b * T + i][hd * dh + e] * k[b * T + j][hd * dh + e];
            s[j] = dot / std::sqrt(static_cast<double>(dh));
            double& ml = res.max_logit[l * H + hd];
            ml = std::max(ml, std::fabs(s[j]));
          }
          const double m = *std::max_element(s.begin(), s.end());
          double z = 0;
          for (double& e : s) z += (e = std::exp(e - m));
          for (int j = 0; j <= i; ++j)
            for (int e = 0; e < dh; ++e) o[b * T + i][hd * dh + e] += s[j] / z * v[b * T + j][hd * dh + e];
        }
    Mat proj = matvec(o, base + 4, d, d);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < d; ++i) x[n][i] += proj[n][i];
    Mat h2 = rmsnorm(x, base + 5);
    Mat u = matvec(h2, base + 6, F, d);
    for (auto& row : u)
      for (double& e : row) {
        if (c.relu_squared) {
          e = e > 0 ? e * e : 0.0;
        } else {
          e = 0.5 * e * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (e + 0.044715 * e * e * e)));
        }
      }
    Mat down = matvec(u, base + 7, d, F);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < d; ++i) x[n][i] += down[n][i];
  }
  const int fin = 2 + 8 * c.layers;
  Mat hf = rmsnorm(x, fin);
  Mat logits = matvec(hf, fin + 1, V, d);
  res.logits.reserve(static_cast<size_t>(N) * V);
  double total = 0;
  for (int n = 0; n < N; ++n) {
    const double m = *std::max_element(logits[n].begin(), logits[n].end());
    double z = 0;
    for (double e : logits[n]) z += std::exp(e - m);
    if (!tgt.empty()) total += m + std::log(z) - logits[n][tgt[n]];
    res.logits.insert(res.logits.end(), logits[n].begin(), logits[n].end());
  }
  res.loss = total / N;
  return res;
}

}  // namespace shardopt::model::testing
