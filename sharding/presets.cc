#include "sharding/presets.h"

#include <algorithm>

#include "base/error.h"

namespace shardopt::sharding {
namespace {

proto::TensorSpec spec(std::string name, std::vector<int64_t> shape, proto::DType dtype) {
  proto::TensorSpec s;
  s.set_name(std::move(name));
  for (int64_t d : shape) s.add_shape(d);
  s.set_dtype(dtype);
  return s;
}

}  // namespace

std::vector<proto::TensorSpec> llama_specs(const LlamaShape& m, proto::DType dtype) {
  if (m.d_model < 1 || m.n_layers < 0 || m.ffn < 1 || m.vocab < 1 || m.n_heads < 1 || m.n_kv_heads < 1 ||
      m.d_model % m.n_heads != 0 || m.n_heads % m.n_kv_heads != 0)
    throw ConfigError("llama_specs: expected d_model divisible by n_heads and n_heads divisible by n_kv_heads, got d " +
                      std::to_string(m.d_model) + ", heads " + std::to_string(m.n_heads) + ", kv heads " +
                      std::to_string(m.n_kv_heads));
  const int64_t kv = m.d_model / m.n_heads * m.n_kv_heads;
  std::vector<proto::TensorSpec> out;
  out.push_back(spec("model.embed_tokens.weight", {m.vocab, m.d_model}, dtype));
  for (int64_t i = 0; i < m.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.push_back(spec(p + "input_layernorm.weight", {m.d_model}, dtype));
    out.push_back(spec(p + "self_attn.q_proj.weight", {m.d_model, m.d_model}, dtype));
    out.push_back(spec(p + "self_attn.k_proj.weight", {kv, m.d_model}, dtype));
    out.push_back(spec(p + "self_attn.v_proj.weight", {kv, m.d_model}, dtype));
    out.push_back(spec(p + "self_attn.o_proj.weight", {m.d_model, m.d_model}, dtype));
    out.push_back(spec(p + "post_attention_layernorm.weight", {m.d_model}, dtype));
    out.push_back(spec(p + "mlp.gate_proj.weight", {m.ffn, m.d_model}, dtype));
    out.push_back(spec(p + "mlp.up_proj.weight", {m.ffn, m.d_model}, dtype));
    out.push_back(spec(p + "mlp.down_proj.weight", {m.d_model, m.ffn}, dtype));
  }
  out.push_back(spec("model.norm.weight", {m.d_model}, dtype));
  if (!m.tied_embeddings) out.push_back(spec("lm_head.weight", {m.vocab, m.d_model}, dtype));
  return out;
}

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> names = {"tiny", "llama-125m", "llama-1b"};
  return names;
}

LlamaShape preset_shape(std::string_view name) {
  if (name == "tiny") return {64, 2, 176, 1000, 4, 2, false};
  if (name == "llama-125m") return {768, 12, 2048, 32000, 12, 12, false};
  if (name == "llama-1b") return {2048, 22, 5632, 32000, 32, 4, false};
  std::string known;
  for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
  throw ConfigError("unknown model preset '" + std::string(name) + "': expected one of " + known);
}

std::vector<proto::TensorSpec> preset_specs(std::string_view name, proto::DType dtype, int layers) {
  LlamaShape shape = preset_shape(name);
  if (layers > 0) shape.n_layers = std::min<int64_t>(shape.n_layers, layers);
  return llama_specs(shape, dtype);
}

}  // namespace shardopt::sharding
