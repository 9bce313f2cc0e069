// Checks a checkpoint against the model and optimizer that will load it, before any data is read.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "proto/checkpoint.pb.h"

namespace shardopt::ckpt {

// A model tensor and the optimizer states the loader will read for it.
struct ExpectedTensor {
  proto::TensorSpec spec;
  std::vector<std::string> states;  // e.g. {"param", "adam_m", "adam_v"}
};

struct CompatOptions {
  // Tensors in the checkpoint the model does not have are ignored when true, an error otherwise.
  bool allow_extra_tensors = false;
};

// Throws ConfigError naming the tensor when: a model tensor has a different shape in the checkpoint
// (both shapes in the message), or a state the optimizer expects is absent (listing the states the
// checkpoint has, e.g. after switching AdamW -> Muon); CheckpointError when a model tensor is missing
// from the checkpoint entirely; ConfigError for a checkpoint tensor the model does not have, unless
// options.allow_extra_tensors. `where` names the checkpoint in messages.
void check_compatible(const proto::CheckpointManifest& manifest, std::span<const ExpectedTensor> expected,
                      const std::string& where, const CompatOptions& options = {});

}  // namespace shardopt::ckpt
