// Optimizer configuration: documented defaults per kind, validation, and the resolved plain struct
// the kernels read (no proto access on hot paths). Formulas and defaults: docs/algorithms.md.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "proto/optim.pb.h"

namespace shardopt::optim {

using OptimizerKind = proto::OptimizerKind;
using MuonMomentum = proto::MuonMomentum;
using MuonShapeScale = proto::MuonShapeScale;
using NsScheduleKind = proto::NsSchedule;
using StateDType = proto::StateDType;

// Precision of the Newton-Schulz matrix products (oneDNN matmul): fp32 throughout, or bf16 operands
// with fp32 accumulation and fp32 iterates, as torch.optim.Muon's bf16 NS does.
enum class NsPrecision { kF32, kBF16 };

// A resolved Newton-Schulz schedule: one (a, b, c) per iteration and the input normalization
// X0 = G / max(norm_scale*||G||_F + norm_add, norm_floor).
struct NsSchedule {
  std::vector<std::array<float, 3>> coefficients;  // size = number of iterations
  float norm_scale = 1.0f;
  float norm_add = 0.0f;
  float norm_floor = 1e-7f;
  NsPrecision precision = NsPrecision::kF32;

  int steps() const { return static_cast<int>(coefficients.size()); }

  // (3.4445, -4.7750, 2.0315) x steps, X0 = G / max(||G||_F, eps) (torch.optim.Muon).
  static NsSchedule default_quintic(int steps = 5, float eps = 1e-7f);
  // The published 5-iteration Polar Express triples (first steps of them), X0 = G/(1.02||G||_F+1e-6).
  // Throws ConfigError for steps outside [1, 5].
  static NsSchedule polar_express(int steps = 5);
};

// Every hyperparameter of one optimizer group, defaults filled in and validated. Kept in double so
// that derived constants (1 - beta2, bias corrections) are formed before rounding to fp32.
struct OptimizerParams {
  OptimizerKind kind = proto::OPTIMIZER_KIND_UNSPECIFIED;
  double lr = 0;
  double weight_decay = 0;
  double beta1 = 0;
  double beta2 = 0;
  double eps = 0;
  double momentum = 0;
  double dampening = 0;
  bool nesterov = false;
  MuonMomentum muon_momentum = proto::MUON_MOMENTUM_AVERAGED;
  MuonShapeScale shape_scale = proto::MUON_SHAPE_SCALE_ORIGINAL;
  NsSchedule ns;
  double normuon_beta2 = 0;
  double normuon_eps = 0;
  bool qk_clip = false;
  double qk_clip_tau = 100.0;
  double qk_clip_alpha = 0.5;
  StateDType state_dtype = proto::STATE_F32;  // never UNSPECIFIED once resolved

  bool is_matrix_optimizer() const {
    return kind == proto::OPTIMIZER_MUON || kind == proto::OPTIMIZER_NORMUON;
  }
};

// A config of `kind` with every field set to its documented default:
//   AdamW  lr 1e-3, wd 0.01, betas (0.9, 0.999), eps 1e-8
//   Lion   lr 1e-4, wd 0,    betas (0.9, 0.99)
//   SGD    lr 1e-3, wd 0, momentum 0, dampening 0, nesterov off
//   Muon   lr 1e-3, wd 0.1, momentum 0.95, nesterov on, averaged, shape scale original,
//          5 steps of the default quintic, ns_eps 1e-7
//   NorMuon = Muon + normuon_beta2 0.95, normuon_eps 1e-10
//   QK-clip (Muon kinds): off, tau 100, alpha 0.5
// Throws ConfigError for OPTIMIZER_KIND_UNSPECIFIED or an unknown kind.
proto::OptimizerConfig default_optimizer_config(OptimizerKind kind);

// Fills every unset field of `config` with its kind's default and returns the result.
proto::OptimizerConfig with_defaults(const proto::OptimizerConfig& config);

// Throws ConfigError naming the field, the allowed range and the value found, for the first
// invalid field of `config` (unset fields are checked at their defaults).
void validate_optimizer_config(const proto::OptimizerConfig& config);

// Defaults + validation + conversion to the struct the kernels use.
OptimizerParams resolve_optimizer_config(const proto::OptimizerConfig& config);

// fp32 state values per parameter element the runtime must allocate (and shard with the params):
// AdamW 2 (m, v), Lion 1 (m), SGD 1 if momentum != 0 else 0, Muon/NorMuon 1 (momentum).
int state_values_per_element(const OptimizerParams& params);
// Extra fp32 state per matrix row: NorMuon 1 (row second moment), others 0.
int state_values_per_row(const OptimizerParams& params);

// Bytes one state value occupies under params.state_dtype: 4 (f32), 2 (bf16), 1 + 4/256 (q8: the
// code plus its share of the block's fp32 absmax; a tensor's last partial block costs a little more).
double state_bytes_per_value(const OptimizerParams& params);

std::string optimizer_kind_name(OptimizerKind kind);
// "f32", "bf16", "q8"; parse throws ConfigError naming the accepted names otherwise.
std::string state_dtype_name(StateDType dtype);
StateDType parse_state_dtype(const std::string& name);
// Parses "adamw", "lion", "sgd", "muon", "normuon"; throws ConfigError otherwise.
OptimizerKind parse_optimizer_kind(const std::string& name);

}  // namespace shardopt::optim
