// Model presets as shape lists (name + shape), Llama-style: token embedding; per layer q, k, v, o,
// gate, up, down and two RMSNorm weights; final norm; untied lm_head. Registration order is forward
// order, so the planner's reverse packing puts lm_head in bucket 0.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "proto/types.pb.h"

namespace shardopt::sharding {

struct LlamaShape {
  int64_t d_model = 768;
  int64_t n_layers = 12;
  int64_t ffn = 2048;
  int64_t vocab = 32000;
  int64_t n_heads = 12;
  int64_t n_kv_heads = 12;  // grouped-query attention when < n_heads: k, v are [n_kv_heads*head_dim, d]
  bool tied_embeddings = false;
};

// Names follow the common checkpoint convention: model.embed_tokens.weight,
// model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
// model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight.
std::vector<proto::TensorSpec> llama_specs(const LlamaShape& shape, proto::DType dtype = proto::BF16);

// Named presets: "llama-125m" (d 768, 12 layers, ffn 2048, vocab 32000: 134M parameters),
// "llama-1b" (d 2048, 22 layers, ffn 5632, 32 heads / 4 KV heads, vocab 32000: 1.10B),
// "tiny" (d 64, 2 layers, ffn 176, vocab 1000, 4 heads / 2 KV heads: a small model for tests and demos).
const std::vector<std::string>& preset_names();
LlamaShape preset_shape(std::string_view name);  // ConfigError for unknown names
// `layers` > 0 keeps only the first `layers` transformer layers (benchmarks and simulations of a slice
// of a model); 0 = all of them.
std::vector<proto::TensorSpec> preset_specs(std::string_view name, proto::DType dtype = proto::BF16, int layers = 0);

}  // namespace shardopt::sharding
