#include "model/transformer.h"

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "base/error.h"
#include "base/thread_pool.h"
#include "model/fast_math.h"
#include "model/rng.h"

namespace shardopt::model {
namespace {

// Row-major C = alpha·op(A)·op(B) + beta·C. The model's products go through oneDNN's sgemm, which picks
// its kernels for the CPU it runs on; Debian's OpenBLAS falls back to generic SSE3 kernels on some
// AVX-512 machines (on the 2-core development machine: 3 GFLOP/s against oneDNN's 150 on the model's shapes).
void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
           int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  // One oneDNN thread per product: the model's parallelism is its thread pool (--model-threads), and
  // oneDNN's multi-threaded sgemm allocates on every call. OpenMP's thread count is per calling thread.
  const int omp_threads = omp_get_max_threads();
  if (omp_threads != 1) omp_set_num_threads(1);
  const dnnl_status_t status =
      dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (omp_threads != 1) omp_set_num_threads(omp_threads);
  if (status != dnnl_success) {
    throw Error("model: oneDNN sgemm " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k) +
                " failed");
  }
}

// Runs fn(begin, end) over [0, n) in one contiguous chunk per pool thread. Chunk boundaries depend
// only on n and the pool size, never on scheduling, so results are reproducible run to run.
template <class F>
void for_chunks(ThreadPool* pool, int64_t n, F&& fn) {
  const int64_t chunks = pool == nullptr ? 1 : std::min<int64_t>(pool->size(), n);
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  pool->parallel_for(chunks, [&](int64_t c, int) { fn(n * c / chunks, n * (c + 1) / chunks); });
}

// y[N,out] = x[N,in] · Wᵀ  (W is [out,in] row-major); token rows split over the pool.
void linear_forward(ThreadPool* pool, int n, int out, int in, const float* x, const float* w, float* y) {
  for_chunks(pool, n, [&](int64_t r0, int64_t r1) {
    sgemm(false, true, static_cast<int>(r1 - r0), out, in, 1.0f, x + r0 * in, in,
                w, in, 0.0f, y + r0 * out, out);
  });
}
// y[N,out] += x[N,in] · Wᵀ (the residual add).
void linear_forward_add(ThreadPool* pool, int n, int out, int in, const float* x, const float* w, float* y) {
  for_chunks(pool, n, [&](int64_t r0, int64_t r1) {
    sgemm(false, true, static_cast<int>(r1 - r0), out, in, 1.0f, x + r0 * in, in,
                w, in, 1.0f, y + r0 * out, out);
  });
}
// dx[N,in] (=|+=) dy[N,out] · W.
void linear_backward_input(ThreadPool* pool, int n, int out, int in, const float* dy, const float* w, float* dx,
                           float beta) {
  for_chunks(pool, n, [&](int64_t r0, int64_t r1) {
    sgemm(false, false, static_cast<int>(r1 - r0), in, out, 1.0f, dy + r0 * out,
                out, w, in, beta, dx + r0 * in, in);
  });
}
// dW[out,in] (=|+=) dyᵀ · x; rows of dW split over the pool (each sums over all tokens).
void linear_backward_weight(ThreadPool* pool, int n, int out, int in, const float* dy, const float* x, float* dw,
                            GradMode mode) {
  const float beta = mode == GradMode::kAccumulate ? 1.0f : 0.0f;
  for_chunks(pool, out, [&](int64_t o0, int64_t o1) {
    sgemm(true, false, static_cast<int>(o1 - o0), in, n, 1.0f, dy + o0, out, x, in,
                beta, dw + o0 * in, in);
  });
}

// h = x / rms(x) * g per token; rstd keeps 1/rms for backward.
void rmsnorm_forward(int n, int d, float eps, const float* x, const float* g, float* h, float* rstd) {
  for (int t = 0; t < n; ++t) {
    const float* xr = x + static_cast<int64_t>(t) * d;
    float* hr = h + static_cast<int64_t>(t) * d;
    float ss = 0.0f;
    for (int i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    rstd[t] = r;
    for (int i = 0; i < d; ++i) hr[i] = xr[i] * r * g[i];
  }
}

// dx += ∂loss/∂x through the norm; dg (=|+=) Σ_tokens dh·x̂.
void rmsnorm_backward(int n, int d, const float* x, const float* rstd, const float* g, const float* dh,
                      float* dx, float* dg, GradMode mode) {
  if (mode == GradMode::kOverwrite) std::fill(dg, dg + d, 0.0f);
  for (int t = 0; t < n; ++t) {
    const float* xr = x + static_cast<int64_t>(t) * d;
    const float* dhr = dh + static_cast<int64_t>(t) * d;
    float* dxr = dx + static_cast<int64_t>(t) * d;
    const float r = rstd[t];
    float dot = 0.0f;  // Σ (dh·g)·x̂
    for (int i = 0; i < d; ++i) {
      const float xhat = xr[i] * r;
      dg[i] += dhr[i] * xhat;
      dot += dhr[i] * g[i] * xhat;
    }
    const float mean_dot = dot / static_cast<float>(d);
    for (int i = 0; i < d; ++i) dxr[i] += r * (dhr[i] * g[i] - xr[i] * r * mean_dot);
  }
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2/pi)

// a = act(u); u is overwritten with act'(u), the only thing backward needs from it.
void activation_forward_serial(Activation act, int64_t n, float* u, float* a) {
  if (act == Activation::kReluSquared) {
    for (int64_t i = 0; i < n; ++i) {
      const float r = u[i] > 0.0f ? u[i] : 0.0f;
      a[i] = r * r;
      u[i] = 2.0f * r;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {  // GELU, tanh approximation
    const float x = u[i];
    const float t = fast_tanh(kGeluC * (x + 0.044715f * x * x * x));
    a[i] = 0.5f * x * (1.0f + t);
    u[i] = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * 0.044715f * x * x);
  }
}

// fn(task, thread) for every task in [0, n): on the pool, or inline as thread 0.
template <class F>
void pool_parallel_for(ThreadPool* pool, int64_t n, F&& fn) {
  if (pool == nullptr || pool->size() == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  pool->parallel_for(n, fn);
}

void activation_forward(ThreadPool* pool, Activation act, int64_t n, float* u, float* a) {
  for_chunks(pool, n, [&](int64_t i0, int64_t i1) { activation_forward_serial(act, i1 - i0, u + i0, a + i0); });
}

void rmsnorm_forward(ThreadPool* pool, int n, int d, float eps, const float* x, const float* g, float* h, float* rstd) {
  for_chunks(pool, n, [&](int64_t t0, int64_t t1) {
    rmsnorm_forward(static_cast<int>(t1 - t0), d, eps, x + t0 * d, g, h + t0 * d, rstd + t0);
  });
}

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
}

}  // namespace

void ModelConfig::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw ConfigError("ModelConfig: " + what);
  };
  need(vocab >= 2 && vocab <= 256, "vocab must be in [2, 256] (byte tokens), got " + std::to_string(vocab));
  need(d_model > 0, "d_model must be > 0, got " + std::to_string(d_model));
  need(n_layer > 0, "n_layer must be > 0, got " + std::to_string(n_layer));
  need(n_head > 0 && d_model % n_head == 0,
       "n_head must be > 0 and divide d_model=" + std::to_string(d_model) + ", got " + std::to_string(n_head));
  need(context > 0, "context must be > 0, got " + std::to_string(context));
  need(mlp_ratio > 0, "mlp_ratio must be > 0, got " + std::to_string(mlp_ratio));
  need(init_std > 0.0f, "init_std must be > 0, got " + std::to_string(init_std));
  need(norm_eps > 0.0f, "norm_eps must be > 0, got " + std::to_string(norm_eps));
}

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

int Transformer::threads() const { return pool_ == nullptr ? 1 : pool_->size(); }

void Transformer::set_thread_pool(ThreadPool* pool) {
  pool_ = pool;
  // Per-thread attention scratch follows the pool size.
  if (cap_tokens_ > 0)
    grow(dscores_, static_cast<int64_t>(threads()) * config_.context * config_.context);
}

Transformer::Transformer(const ModelConfig& config) : config_(config) {
  config_.validate();
  const int64_t d = config_.d_model, v = config_.vocab, f = config_.mlp_hidden();
  params_.push_back({"tok_emb", {v, d}, ParamKind::kEmbedding});
  params_.push_back({"pos_emb", {config_.context, d}, ParamKind::kEmbedding});
  for (int l = 0; l < config_.n_layer; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    params_.push_back({p + "attn_norm", {d}, ParamKind::kNormGain});
    params_.push_back({p + "w_q", {d, d}, ParamKind::kHiddenMatrix});
    params_.push_back({p + "w_k", {d, d}, ParamKind::kHiddenMatrix});
    params_.push_back({p + "w_v", {d, d}, ParamKind::kHiddenMatrix});
    params_.push_back({p + "w_o", {d, d}, ParamKind::kHiddenMatrix});
    params_.push_back({p + "mlp_norm", {d}, ParamKind::kNormGain});
    params_.push_back({p + "w_up", {f, d}, ParamKind::kHiddenMatrix});
    params_.push_back({p + "w_down", {d, f}, ParamKind::kHiddenMatrix});
  }
  params_.push_back({"final_norm", {d}, ParamKind::kNormGain});
  params_.push_back({"lm_head", {v, d}, ParamKind::kOutputHead});
  max_logit_.assign(static_cast<std::size_t>(config_.n_layer * config_.n_head), 0.0f);
}

int64_t Transformer::num_params() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.numel();
  return n;
}

std::vector<proto::TensorSpec> Transformer::tensor_specs(bool route_groups) const {
  std::vector<proto::TensorSpec> specs;
  specs.reserve(params_.size());
  for (const auto& p : params_) {
    proto::TensorSpec s;
    s.set_name(p.name);
    for (int64_t dim : p.shape) s.add_shape(dim);
    s.set_dtype(proto::F32);
    if (route_groups) s.set_group(p.kind == ParamKind::kHiddenMatrix ? "muon" : "adamw");
    specs.push_back(std::move(s));
  }
  return specs;
}

LayerParamIndex Transformer::layer_index(int layer) const {
  if (layer < 0 || layer >= config_.n_layer)
    throw ConfigError("Transformer::layer_index: layer must be in [0, " + std::to_string(config_.n_layer) +
                      "), got " + std::to_string(layer));
  const std::size_t b = 2 + 8 * static_cast<std::size_t>(layer);
  return {b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7};
}

void Transformer::init_tensor(uint64_t seed, std::size_t index, float* values) const {
  if (index >= params_.size())
    throw ConfigError("Transformer::init_tensor: tensor index must be < " + std::to_string(params_.size()) +
                      ", got " + std::to_string(index));
  const ParamSpec& p = params_[index];
  const int64_t n = p.numel();
  if (p.kind == ParamKind::kNormGain) {
    std::fill(values, values + n, 1.0f);
    return;
  }
  float std_dev = config_.init_std;
  // Residual-branch output projections: keep the residual stream's variance independent of depth.
  const bool residual_out = p.name.ends_with(".w_o") || p.name.ends_with(".w_down");
  if (residual_out) std_dev /= std::sqrt(2.0f * static_cast<float>(config_.n_layer));
  NormalRng rng(seed, index);
  for (int64_t i = 0; i < n; ++i) values[i] = std_dev * rng.next();
}

void Transformer::init(uint64_t seed, std::span<float* const> values) const {
  if (values.size() != params_.size())
    throw ConfigError("Transformer::init: expected " + std::to_string(params_.size()) + " tensors, got " +
                      std::to_string(values.size()));
  for (std::size_t i = 0; i < params_.size(); ++i) init_tensor(seed, i, values[i]);
}

double Transformer::forward_flops(int batch, int seq_len) const {
  const double n = static_cast<double>(batch) * seq_len, d = config_.d_model, f = config_.mlp_hidden();
  const double per_layer = 2.0 * n * (4.0 * d * d + 2.0 * d * f) + 4.0 * batch * double(seq_len) * seq_len * d;
  return config_.n_layer * per_layer + 2.0 * n * d * config_.vocab;
}

void Transformer::reserve(int batch, int seq_len) {
  if (batch <= 0) throw ConfigError("Transformer: batch must be > 0, got " + std::to_string(batch));
  if (seq_len <= 0 || seq_len > config_.context)
    throw ConfigError("Transformer: seq_len must be in [1, context=" + std::to_string(config_.context) + "], got " +
                      std::to_string(seq_len));
  const int64_t n = static_cast<int64_t>(batch) * seq_len;
  const int64_t att = n * seq_len * config_.n_head;
  if (n <= cap_tokens_ && att <= cap_att_) return;
  cap_tokens_ = std::max(cap_tokens_, n);
  cap_att_ = std::max(cap_att_, att);
  const int64_t L = config_.n_layer, d = config_.d_model, f = config_.mlp_hidden(), N = cap_tokens_;
  grow(inputs_, N);
  grow(targets_, N);
  grow(x_, (L + 1) * N * d);
  grow(xmid_, L * N * d);
  grow(rstd1_, L * N);
  grow(rstd2_, L * N);
  grow(rstdf_, N);
  grow(h1_, L * N * d);
  grow(h2_, L * N * d);
  grow(hf_, N * d);
  grow(q_, L * N * d);
  grow(k_, L * N * d);
  grow(v_, L * N * d);
  grow(att_, L * N * d);
  grow(probs_, L * cap_att_);
  grow(u_, L * N * f);
  grow(a_, L * N * f);
  grow(logits_, N * config_.vocab);
  grow(dlogits_, N * config_.vocab);
  grow(dx_, N * d);
  grow(dh_, N * d);
  grow(dbig_, N * f);
  grow(dq_, N * d);
  grow(dk_, N * d);
  grow(dv_, N * d);
  grow(datt_, N * d);
  // Per-(batch, head) attention backward scratch: dP then dS, one T×T tile at a time.
  grow(dscores_, static_cast<int64_t>(threads()) * config_.context * config_.context);
  grow(head_max_, N * config_.n_head);  // B*H <= N*H
}

void Transformer::check_bindings(std::span<const ParamBinding> params, bool need_grad, const char* where) const {
  if (params.size() != params_.size())
    throw ConfigError(std::string("Transformer::") + where + ": expected " + std::to_string(params_.size()) +
                      " parameter bindings, got " + std::to_string(params.size()));
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (params[i].value == nullptr)
      throw ConfigError(std::string("Transformer::") + where + ": binding " + std::to_string(i) + " (" +
                        params_[i].name + ") has a null value pointer");
    if (need_grad && params[i].grad == nullptr)
      throw ConfigError(std::string("Transformer::") + where + ": binding " + std::to_string(i) + " (" +
                        params_[i].name + ") has a null grad pointer");
  }
}

float Transformer::forward(std::span<const ParamBinding> params, const uint8_t* inputs, const uint8_t* targets,
                           int batch, int seq_len) {
  check_bindings(params, false, "forward");
  reserve(batch, seq_len);
  have_activations_ = false;  // until this forward completes with a loss
  const int B = batch, T = seq_len, d = config_.d_model, H = config_.n_head, dh = config_.d_head();
  const int f = config_.mlp_hidden(), V = config_.vocab;
  const int N = B * T;
  const int64_t Nd = static_cast<int64_t>(N) * d, Nf = static_cast<int64_t>(N) * f;
  const int64_t att_layer = static_cast<int64_t>(B) * H * T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));

  for (int i = 0; i < N; ++i) {
    if (inputs[i] >= V)
      throw ConfigError("Transformer::forward: token " + std::to_string(inputs[i]) + " at position " +
                        std::to_string(i) + " is outside the vocabulary of " + std::to_string(V));
    if (targets != nullptr && targets[i] >= V)
      throw ConfigError("Transformer::forward: target " + std::to_string(targets[i]) + " at position " +
                        std::to_string(i) + " is outside the vocabulary of " + std::to_string(V));
  }
  std::copy(inputs, inputs + N, inputs_.begin());

  // Embeddings.
  const float* tok = params[tok_emb_index()].value;
  const float* pos = params[pos_emb_index()].value;
  float* x0 = x_.data();
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      float* xr = x0 + (static_cast<int64_t>(b) * T + t) * d;
      const float* te = tok + static_cast<int64_t>(inputs[b * T + t]) * d;
      const float* pe = pos + static_cast<int64_t>(t) * d;
      for (int i = 0; i < d; ++i) xr[i] = te[i] + pe[i];
    }

  for (int l = 0; l < config_.n_layer; ++l) {
    const LayerParamIndex li = layer_index(l);
    const float* xin = x_.data() + l * Nd;
    float* xmid = xmid_.data() + l * Nd;
    float* xout = x_.data() + (l + 1) * Nd;
    float* h1 = h1_.data() + l * Nd;
    float* q = q_.data() + l * Nd;
    float* k = k_.data() + l * Nd;
    float* v = v_.data() + l * Nd;
    float* att = att_.data() + l * Nd;
    float* probs = probs_.data() + l * att_layer;

    rmsnorm_forward(pool_, N, d, config_.norm_eps, xin, params[li.attn_norm].value, h1, rstd1_.data() + l * N);
    linear_forward(pool_, N, d, d, h1, params[li.w_q].value, q);
    linear_forward(pool_, N, d, d, h1, params[li.w_k].value, k);
    linear_forward(pool_, N, d, d, h1, params[li.w_v].value, v);

    // One task per (sequence, head); each keeps its own max |logit|, combined per head afterwards.
    for_chunks(pool_, int64_t{B} * H, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        const int b = static_cast<int>(task / H), hd = static_cast<int>(task % H);
        const int64_t off = static_cast<int64_t>(b) * T * d + static_cast<int64_t>(hd) * dh;
        float* p = probs + task * T * T;
        // S = Q Kᵀ·scale over the full tile; the masked upper triangle is ignored below.
        sgemm(false, true, T, T, dh, scale, q + off, d, k + off, d, 0.0f, p, T);
        float& max_logit = head_max_[static_cast<std::size_t>(task)];
        max_logit = 0.0f;
        for (int i = 0; i < T; ++i) {
          float* row = p + static_cast<int64_t>(i) * T;
          float m = -std::numeric_limits<float>::infinity();
          for (int j = 0; j <= i; ++j) {
            m = std::max(m, row[j]);
            max_logit = std::max(max_logit, std::fabs(row[j]));
          }
          for (int j = 0; j <= i; ++j) row[j] = fast_exp(row[j] - m);
          float sum = 0.0f;
          for (int j = 0; j <= i; ++j) sum += row[j];
          const float inv = 1.0f / sum;
          for (int j = 0; j <= i; ++j) row[j] *= inv;
          for (int j = i + 1; j < T; ++j) row[j] = 0.0f;
        }
        // O = P V (masked entries are zero).
        sgemm(false, false, T, dh, T, 1.0f, p, T, v + off, d, 0.0f, att + off, d);
      }
    });
    for (int hd = 0; hd < H; ++hd) {
      float m = 0.0f;
      for (int b = 0; b < B; ++b) m = std::max(m, head_max_[static_cast<std::size_t>(b * H + hd)]);
      max_logit_[static_cast<std::size_t>(l * H + hd)] = m;
    }

    // xmid = xin + att·W_oᵀ
    std::copy(xin, xin + Nd, xmid);
    linear_forward_add(pool_, N, d, d, att, params[li.w_o].value, xmid);

    float* h2 = h2_.data() + l * Nd;
    float* u = u_.data() + l * Nf;
    float* a = a_.data() + l * Nf;
    rmsnorm_forward(pool_, N, d, config_.norm_eps, xmid, params[li.mlp_norm].value, h2, rstd2_.data() + l * N);
    linear_forward(pool_, N, f, d, h2, params[li.w_up].value, u);
    activation_forward(pool_, config_.activation, Nf, u, a);
    // xout = xmid + a·W_downᵀ
    std::copy(xmid, xmid + Nd, xout);
    linear_forward_add(pool_, N, d, f, a, params[li.w_down].value, xout);
  }

  const float* xf = x_.data() + config_.n_layer * Nd;
  rmsnorm_forward(pool_, N, d, config_.norm_eps, xf, params[final_norm_index()].value, hf_.data(), rstdf_.data());
  linear_forward(pool_, N, V, d, hf_.data(), params[lm_head_index()].value, logits_.data());

  if (targets == nullptr) return 0.0f;
  std::copy(targets, targets + N, targets_.begin());
  // Softmax probabilities go to dlogits_, which backward turns into the logit gradient.
  double loss = 0.0;
  for (int n = 0; n < N; ++n) {
    const float* row = logits_.data() + static_cast<int64_t>(n) * V;
    float* prob = dlogits_.data() + static_cast<int64_t>(n) * V;
    float m = row[0];
    for (int c = 1; c < V; ++c) m = std::max(m, row[c]);
    for (int c = 0; c < V; ++c) prob[c] = fast_exp(row[c] - m);
    float sum = 0.0f;
    for (int c = 0; c < V; ++c) sum += prob[c];
    const float inv = 1.0f / sum;
    for (int c = 0; c < V; ++c) prob[c] *= inv;
    loss += static_cast<double>(m) + std::log(static_cast<double>(sum)) - row[targets[n]];
  }
  if (!std::isfinite(loss))
    throw NumericError("Transformer::forward: expected a finite loss, got " + std::to_string(loss / N) +
                       " over a " + std::to_string(B) + "x" + std::to_string(T) +
                       " batch (non-finite or exploding parameters)");
  batch_ = B;
  seq_len_ = T;
  have_activations_ = true;
  return static_cast<float>(loss / N);
}

void Transformer::backward(std::span<const ParamBinding> params, GradMode mode, const GradReadyFn& on_grad_ready,
                           const GradBufferFn& grad_buffer) {
  check_bindings(params, !grad_buffer, "backward");
  if (!have_activations_)
    throw ConfigError("Transformer::backward: needs a preceding forward with targets and runs once per "
                      "forward (none since the last backward, forward without targets, or construction)");
  have_activations_ = false;  // backward consumes the softmax kept in dlogits_
  auto ready = [&](std::size_t idx) {
    if (on_grad_ready) on_grad_ready(idx);
  };
  auto grad_of = [&](std::size_t idx) -> float* {
    if (!grad_buffer) return params[idx].grad;
    float* g = grad_buffer(idx);
    if (g == nullptr)
      throw ConfigError("Transformer::backward: grad_buffer returned null for " + params_[idx].name);
    return g;
  };
  const int B = batch_, T = seq_len_, d = config_.d_model, H = config_.n_head, dh = config_.d_head();
  const int f = config_.mlp_hidden(), V = config_.vocab;
  const int N = B * T;
  const int64_t Nd = static_cast<int64_t>(N) * d, Nf = static_cast<int64_t>(N) * f;
  const int64_t att_layer = static_cast<int64_t>(B) * H * T * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));

  // dlogits = (softmax − onehot) / N : the loss is a mean over tokens.
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int n = 0; n < N; ++n) {
    float* drow = dlogits_.data() + static_cast<int64_t>(n) * V;  // softmax from forward
    for (int c = 0; c < V; ++c) drow[c] *= inv_n;
    drow[targets_[n]] -= inv_n;
  }
  linear_backward_weight(pool_, N, V, d, dlogits_.data(), hf_.data(), grad_of(lm_head_index()), mode);
  ready(lm_head_index());
  linear_backward_input(pool_, N, V, d, dlogits_.data(), params[lm_head_index()].value, dh_.data(), 0.0f);

  float* dx = dx_.data();  // gradient w.r.t. the residual stream at the current point
  std::fill(dx, dx + Nd, 0.0f);
  rmsnorm_backward(N, d, x_.data() + config_.n_layer * Nd, rstdf_.data(), params[final_norm_index()].value,
                   dh_.data(), dx, grad_of(final_norm_index()), mode);
  ready(final_norm_index());

  for (int l = config_.n_layer - 1; l >= 0; --l) {
    const LayerParamIndex li = layer_index(l);
    const float* xin = x_.data() + l * Nd;
    const float* xmid = xmid_.data() + l * Nd;
    const float* h1 = h1_.data() + l * Nd;
    const float* h2 = h2_.data() + l * Nd;
    const float* q = q_.data() + l * Nd;
    const float* k = k_.data() + l * Nd;
    const float* v = v_.data() + l * Nd;
    const float* att = att_.data() + l * Nd;
    const float* probs = probs_.data() + l * att_layer;
    const float* act_grad = u_.data() + l * Nf;
    const float* a = a_.data() + l * Nf;

    // MLP branch: dx is ∂/∂xout, which is also ∂/∂(branch output).
    float* da = dbig_.data();
    linear_backward_weight(pool_, N, d, f, dx, a, grad_of(li.w_down), mode);
    ready(li.w_down);
    linear_backward_input(pool_, N, d, f, dx, params[li.w_down].value, da, 0.0f);
    for (int64_t i = 0; i < Nf; ++i) da[i] *= act_grad[i];  // now du
    linear_backward_weight(pool_, N, f, d, da, h2, grad_of(li.w_up), mode);
    ready(li.w_up);
    linear_backward_input(pool_, N, f, d, da, params[li.w_up].value, dh_.data(), 0.0f);
    rmsnorm_backward(N, d, xmid, rstd2_.data() + l * N, params[li.mlp_norm].value, dh_.data(), dx,
                     grad_of(li.mlp_norm), mode);
    ready(li.mlp_norm);

    // Attention branch: dx is now ∂/∂xmid.
    linear_backward_weight(pool_, N, d, d, dx, att, grad_of(li.w_o), mode);
    ready(li.w_o);
    linear_backward_input(pool_, N, d, d, dx, params[li.w_o].value, datt_.data(), 0.0f);
    // One task per (sequence, head), each with its thread's T×T scratch.
    pool_parallel_for(pool_, int64_t{B} * H, [&](int64_t task, int thread) {
      const int b = static_cast<int>(task / H), hd = static_cast<int>(task % H);
      float* ds = dscores_.data() + static_cast<int64_t>(thread) * config_.context * config_.context;
      const int64_t off = static_cast<int64_t>(b) * T * d + static_cast<int64_t>(hd) * dh;
      const float* p = probs + (static_cast<int64_t>(b) * H + hd) * T * T;
      const float* dO = datt_.data() + off;
      // dP = dO Vᵀ ; dV = Pᵀ dO
      sgemm(false, true, T, T, dh, 1.0f, dO, d, v + off, d, 0.0f, ds, T);
      sgemm(true, false, T, dh, T, 1.0f, p, T, dO, d, 0.0f, dv_.data() + off, d);
      // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale ; masked entries have P = 0.
      for (int i = 0; i < T; ++i) {
        float* dsr = ds + static_cast<int64_t>(i) * T;
        const float* pr = p + static_cast<int64_t>(i) * T;
        float dot = 0.0f;
        for (int j = 0; j <= i; ++j) dot += pr[j] * dsr[j];
        for (int j = 0; j <= i; ++j) dsr[j] = pr[j] * (dsr[j] - dot) * scale;
        for (int j = i + 1; j < T; ++j) dsr[j] = 0.0f;
      }
      // dQ = dS K ; dK = dSᵀ Q
      sgemm(false, false, T, dh, T, 1.0f, ds, T, k + off, d, 0.0f,
                  dq_.data() + off, d);
      sgemm(true, false, T, dh, T, 1.0f, ds, T, q + off, d, 0.0f,
                  dk_.data() + off, d);
    });
    // Reverse registration order within the layer: v, k, q.
    linear_backward_weight(pool_, N, d, d, dv_.data(), h1, grad_of(li.w_v), mode);
    ready(li.w_v);
    linear_backward_weight(pool_, N, d, d, dk_.data(), h1, grad_of(li.w_k), mode);
    ready(li.w_k);
    linear_backward_weight(pool_, N, d, d, dq_.data(), h1, grad_of(li.w_q), mode);
    ready(li.w_q);
    linear_backward_input(pool_, N, d, d, dq_.data(), params[li.w_q].value, dh_.data(), 0.0f);
    linear_backward_input(pool_, N, d, d, dk_.data(), params[li.w_k].value, dh_.data(), 1.0f);
    linear_backward_input(pool_, N, d, d, dv_.data(), params[li.w_v].value, dh_.data(), 1.0f);
    rmsnorm_backward(N, d, xin, rstd1_.data() + l * N, params[li.attn_norm].value, dh_.data(), dx,
                     grad_of(li.attn_norm), mode);
    ready(li.attn_norm);
  }

  // Embeddings: scatter-add dx (∂/∂x0) into the rows used.
  float* dpos = grad_of(pos_emb_index());
  if (mode == GradMode::kOverwrite) std::fill(dpos, dpos + params_[pos_emb_index()].numel(), 0.0f);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      const float* dxr = dx + (static_cast<int64_t>(b) * T + t) * d;
      float* dp = dpos + static_cast<int64_t>(t) * d;
      for (int i = 0; i < d; ++i) dp[i] += dxr[i];
    }
  ready(pos_emb_index());
  float* dtok = grad_of(tok_emb_index());
  if (mode == GradMode::kOverwrite) std::fill(dtok, dtok + params_[tok_emb_index()].numel(), 0.0f);
  for (int n = 0; n < N; ++n) {
    const float* dxr = dx + static_cast<int64_t>(n) * d;
    float* dt = dtok + static_cast<int64_t>(inputs_[n]) * d;
    for (int i = 0; i < d; ++i) dt[i] += dxr[i];
  }
  ready(tok_emb_index());
}

}  // namespace shardopt::model
