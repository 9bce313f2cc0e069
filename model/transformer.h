// Reference byte-level decoder-only transformer LM for shardopt's training job.
//
// The model owns no parameter memory: it describes its tensors (ParamSpec, registration order
// embedding first ... lm_head last) and runs forward/backward on pointers the runtime provides
// (ParamBinding per tensor). Activations live in a workspace that grows only when a larger
// (batch, seq_len) is seen, so steady-state steps allocate nothing.
//
// Architecture: tok_emb[V,d] + pos_emb[ctx,d] -> n_layer x { x += Wo·attn(RMSNorm(x)) ;
// x += Wdown·act(Wup·RMSNorm(x)) } -> RMSNorm -> lm_head[V,d] -> mean cross-entropy.
// RMSNorm has a learnable gain and no bias; no linear layer has a bias.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "proto/types.pb.h"

namespace shardopt {
class ThreadPool;
}

namespace shardopt::model {

enum class Activation { kGeluTanh, kReluSquared };

struct ModelConfig {
  int vocab = 256;  // byte-level
  int d_model = 128;
  int n_layer = 4;
  int n_head = 4;
  int context = 64;  // maximum sequence length (rows of pos_emb)
  int mlp_ratio = 4;  // W_up is (mlp_ratio*d_model) x d_model
  Activation activation = Activation::kGeluTanh;
  float init_std = 0.02f;
  float norm_eps = 1e-5f;

  int d_head() const { return d_model / n_head; }
  int mlp_hidden() const { return mlp_ratio * d_model; }
  // Throws ConfigError naming the offending field.
  void validate() const;
};

// What a tensor is for; lets the runtime route it (hidden matrices -> Muon, the rest -> AdamW).
enum class ParamKind { kEmbedding, kNormGain, kHiddenMatrix, kOutputHead };

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;  // row-major; 2-D weights are [fan_out, fan_in]
  ParamKind kind;
  int64_t numel() const;
};

// The runtime's buffers for one tensor. grad may be null for forward-only use.
struct ParamBinding {
  const float* value = nullptr;
  float* grad = nullptr;
};

enum class GradMode { kOverwrite, kAccumulate };

// Called with a tensor index as soon as that tensor's gradient is final for this backward.
using GradReadyFn = std::function<void(std::size_t tensor_index)>;
// Where tensor_index's gradient goes, asked right before backward writes it (once per tensor per
// backward, in the order gradients are produced): lets a runtime hand out per-bucket buffers that
// exist only while their bucket is being filled instead of whole-model gradient memory.
using GradBufferFn = std::function<float*(std::size_t tensor_index)>;

// Index of every tensor in the registration order (for tests, QK-clip, routing).
struct LayerParamIndex {
  std::size_t attn_norm, w_q, w_k, w_v, w_o, mlp_norm, w_up, w_down;
};

// Not thread-safe: one instance (one workspace) per thread/rank (it may use a ThreadPool inside).
class Transformer {
 public:
  explicit Transformer(const ModelConfig& config);

  const ModelConfig& config() const { return config_; }
  const std::vector<ParamSpec>& params() const { return params_; }
  std::size_t num_tensors() const { return params_.size(); }
  int64_t num_params() const;
  // proto TensorSpecs (F32) in registration order. group: "muon" for hidden matrices, "adamw"
  // for embeddings, norm gains and lm_head (2-D but not hidden); empty with route_groups=false.
  std::vector<proto::TensorSpec> tensor_specs(bool route_groups = true) const;

  std::size_t tok_emb_index() const { return 0; }
  std::size_t pos_emb_index() const { return 1; }
  LayerParamIndex layer_index(int layer) const;
  std::size_t final_norm_index() const { return params_.size() - 2; }
  std::size_t lm_head_index() const { return params_.size() - 1; }

  // Deterministic init into caller memory (values[i] has params()[i].numel() floats).
  // Each tensor's values depend only on (seed, tensor index), so a rank may init a subset.
  void init(uint64_t seed, std::span<float* const> values) const;
  void init_tensor(uint64_t seed, std::size_t tensor_index, float* values) const;

  // Forward/backward split their matmuls (token rows, or weight rows for weight gradients), norms,
  // activations and attention (one task per sequence and head) over `pool`'s threads; nullptr (the
  // default) runs on the caller. The pool is not owned and must outlive its use here. Results do
  // not depend on scheduling (fixed chunks); they may differ in the last bits between pool sizes.
  void set_thread_pool(ThreadPool* pool);
  int threads() const;

  // Grows the workspace to hold (batch, seq_len); smaller shapes reuse it afterwards.
  void reserve(int batch, int seq_len);

  // Forward over inputs[batch][seq_len] (bytes). With targets (same layout) returns the mean
  // cross-entropy over all batch*seq_len tokens and keeps activations for backward; with
  // targets == nullptr computes logits only and returns 0. A non-finite loss throws NumericError.
  float forward(std::span<const ParamBinding> params, const uint8_t* inputs, const uint8_t* targets,
                int batch, int seq_len);

  // Gradient of the last forward's loss, once per forward (throws ConfigError otherwise).
  // Bindings' values must be the ones passed to that forward. Gradients go to bindings' grad
  // pointers, or, with grad_buffer, to where grad_buffer(t) says (asked right before tensor t is
  // written; bindings' grad may then be null). on_grad_ready (optional) fires once per tensor, in
  // reverse registration order, right after that tensor's gradient is written.
  void backward(std::span<const ParamBinding> params, GradMode mode, const GradReadyFn& on_grad_ready = {},
                const GradBufferFn& grad_buffer = {});

  // Logits of the last forward: [batch*seq_len][vocab].
  const float* logits() const { return logits_.data(); }
  // max over the last forward's batch, query i and key j <= i of |q_i·k_j|/sqrt(d_head),
  // per layer and head: [n_layer*n_head], layer-major. Input to QK-clip: head h owns rows
  // [h·d_head, (h+1)·d_head) of that layer's W_q and W_k.
  std::span<const float> max_attn_logits() const { return max_logit_; }

  // Matmul FLOPs of one forward at (batch, seq_len) (attention counted over full T×T tiles,
  // as computed); a backward costs twice that.
  double forward_flops(int batch, int seq_len) const;

 private:
  void check_bindings(std::span<const ParamBinding> params, bool need_grad, const char* where) const;

  ModelConfig config_;
  std::vector<ParamSpec> params_;
  ThreadPool* pool_ = nullptr;

  // Workspace (capacity in tokens / attention cells), sized by reserve().
  int64_t cap_tokens_ = 0, cap_att_ = 0;
  int batch_ = 0, seq_len_ = 0;  // shape of the last forward with targets
  bool have_activations_ = false;
  std::vector<uint8_t> inputs_, targets_;
  std::vector<float> x_;      // residual stream entering each layer + final: (L+1) * N*d
  std::vector<float> xmid_;   // residual after attention, per layer: L * N*d
  std::vector<float> rstd1_, rstd2_, rstdf_;  // inverse RMS per token: L*N, L*N, N
  std::vector<float> h1_, h2_, hf_;           // normed inputs: L*N*d, L*N*d, N*d
  std::vector<float> q_, k_, v_, att_;        // L*N*d each (att = concatenated head outputs)
  std::vector<float> probs_;                  // L * B*H*T*T
  std::vector<float> u_, a_;                  // MLP act'(pre-activation), activation: L*N*F each
  std::vector<float> logits_;                 // N*V raw logits
  std::vector<float> max_logit_;              // L*H
  std::vector<float> head_max_;               // B*H: max |logit| per (sequence, head) of one layer
  // Backward scratch; dlogits_ holds the softmax of the last loss forward.
  std::vector<float> dlogits_, dx_, dh_, dbig_, dq_, dk_, dv_, datt_, dscores_;
};

}  // namespace shardopt::model
