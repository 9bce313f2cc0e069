#include "optim/config.h"

#include <cmath>

#include <fmt/format.h>

#include "base/error.h"

namespace shardopt::optim {
namespace {

// modded-nanogpt / Polar Express (arXiv 2505.16932) 5-iteration schedule with the 2% safety factor.
constexpr double kPolarExpress[5][3] = {
    {8.156554524902461, -22.48329292557795, 15.878769915207462},
    {4.042929935166739, -2.808917465908714, 0.5000178451051316},
    {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
    {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
    {2.3465413258596377, -1.7097828382687081, 0.42323551169305323},
};

[[noreturn]] void fail(const proto::OptimizerConfig& config, const std::string& what) {
  throw ConfigError(fmt::format("optimizer config ({}): {}", optimizer_kind_name(config.kind()), what));
}

void check_range(const proto::OptimizerConfig& config, const char* field, double value, double lo,
                 bool lo_open, double hi, bool hi_open) {
  const bool ok = std::isfinite(value) && (lo_open ? value > lo : value >= lo) &&
                  (hi_open ? value < hi : value <= hi);
  if (!ok) {
    fail(config, fmt::format("{} must be in {}{}, {}{}, found {}", field, lo_open ? "(" : "[", lo, hi,
                             hi_open ? ")" : "]", value));
  }
}

bool is_muon(OptimizerKind kind) { return kind == proto::OPTIMIZER_MUON || kind == proto::OPTIMIZER_NORMUON; }

}  // namespace

NsSchedule NsSchedule::default_quintic(int steps, float eps) {
  NsSchedule schedule;
  schedule.coefficients.assign(static_cast<size_t>(std::max(steps, 0)), {3.4445f, -4.7750f, 2.0315f});
  schedule.norm_scale = 1.0f;
  schedule.norm_add = 0.0f;
  schedule.norm_floor = eps;
  return schedule;
}

NsSchedule NsSchedule::polar_express(int steps) {
  if (steps < 1 || steps > 5) {
    throw ConfigError(fmt::format("Polar Express schedule: ns_steps must be in [1, 5] (published "
                                  "triples), found {}",
                                  steps));
  }
  NsSchedule schedule;
  for (int i = 0; i < steps; ++i) {
    schedule.coefficients.push_back({static_cast<float>(kPolarExpress[i][0]), static_cast<float>(kPolarExpress[i][1]),
                                     static_cast<float>(kPolarExpress[i][2])});
  }
  schedule.norm_scale = 1.02f;
  schedule.norm_add = 1e-6f;
  schedule.norm_floor = 0.0f;
  return schedule;
}

std::string optimizer_kind_name(OptimizerKind kind) {
  switch (kind) {
    case proto::OPTIMIZER_ADAMW: return "adamw";
    case proto::OPTIMIZER_LION: return "lion";
    case proto::OPTIMIZER_SGD: return "sgd";
    case proto::OPTIMIZER_MUON: return "muon";
    case proto::OPTIMIZER_NORMUON: return "normuon";
    case proto::OPTIMIZER_KIND_UNSPECIFIED: return "unspecified";
    default: return fmt::format("unknown({})", static_cast<int>(kind));
  }
}

OptimizerKind parse_optimizer_kind(const std::string& name) {
  for (OptimizerKind kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD,
                             proto::OPTIMIZER_MUON, proto::OPTIMIZER_NORMUON}) {
    if (optimizer_kind_name(kind) == name) return kind;
  }
  throw ConfigError(fmt::format("optimizer kind: expected adamw|lion|sgd|muon|normuon, found '{}'", name));
}

std::string state_dtype_name(StateDType dtype) {
  switch (dtype) {
    case proto::STATE_DTYPE_UNSPECIFIED:
    case proto::STATE_F32: return "f32";
    case proto::STATE_BF16: return "bf16";
    case proto::STATE_Q8: return "q8";
    default: return fmt::format("unknown({})", static_cast<int>(dtype));
  }
}

StateDType parse_state_dtype(const std::string& name) {
  for (StateDType dtype : {proto::STATE_F32, proto::STATE_BF16, proto::STATE_Q8})
    if (state_dtype_name(dtype) == name) return dtype;
  throw ConfigError(fmt::format("optimizer state dtype: expected f32|bf16|q8, found '{}'", name));
}

double state_bytes_per_value(const OptimizerParams& params) {
  switch (params.state_dtype) {
    case proto::STATE_BF16: return 2.0;
    case proto::STATE_Q8: return 1.0 + 4.0 / 256.0;
    default: return 4.0;
  }
}

proto::OptimizerConfig default_optimizer_config(OptimizerKind kind) {
  proto::OptimizerConfig c;
  c.set_kind(kind);
  switch (kind) {
    case proto::OPTIMIZER_ADAMW:
      c.set_lr(1e-3);
      c.set_weight_decay(0.01);
      c.set_beta1(0.9);
      c.set_beta2(0.999);
      c.set_eps(1e-8);
      break;
    case proto::OPTIMIZER_LION:
      c.set_lr(1e-4);
      c.set_weight_decay(0.0);
      c.set_beta1(0.9);
      c.set_beta2(0.99);
      break;
    case proto::OPTIMIZER_SGD:
      c.set_lr(1e-3);
      c.set_weight_decay(0.0);
      c.set_momentum(0.0);
      c.set_dampening(0.0);
      c.set_nesterov(false);
      break;
    case proto::OPTIMIZER_MUON:
    case proto::OPTIMIZER_NORMUON:
      c.set_lr(1e-3);
      c.set_weight_decay(0.1);
      c.set_momentum(0.95);
      c.set_nesterov(true);
      c.set_muon_momentum(proto::MUON_MOMENTUM_AVERAGED);
      c.set_shape_scale(proto::MUON_SHAPE_SCALE_ORIGINAL);
      c.set_ns_steps(5);
      c.set_ns_schedule(proto::NS_SCHEDULE_DEFAULT);
      c.set_ns_eps(1e-7);
      c.set_ns_dtype(proto::NS_DTYPE_F32);
      if (kind == proto::OPTIMIZER_NORMUON) {
        c.set_normuon_beta2(0.95);
        c.set_normuon_eps(1e-10);
      }
      c.mutable_qk_clip()->set_enabled(false);
      c.mutable_qk_clip()->set_tau(100.0);
      c.mutable_qk_clip()->set_alpha(0.5);
      break;
    default:
      throw ConfigError(fmt::format("optimizer config: kind must be adamw|lion|sgd|muon|normuon, found {}",
                                    optimizer_kind_name(kind)));
  }
  c.set_state_dtype(proto::STATE_F32);
  return c;
}

proto::OptimizerConfig with_defaults(const proto::OptimizerConfig& config) {
  const proto::OptimizerConfig d = default_optimizer_config(config.kind());
  proto::OptimizerConfig c = config;
  if (!c.has_lr()) c.set_lr(d.lr());
  if (!c.has_weight_decay()) c.set_weight_decay(d.weight_decay());
  if (!c.has_beta1() && d.has_beta1()) c.set_beta1(d.beta1());
  if (!c.has_beta2() && d.has_beta2()) c.set_beta2(d.beta2());
  if (!c.has_eps() && d.has_eps()) c.set_eps(d.eps());
  if (!c.has_momentum() && d.has_momentum()) c.set_momentum(d.momentum());
  if (!c.has_dampening() && d.has_dampening()) c.set_dampening(d.dampening());
  if (!c.has_nesterov() && d.has_nesterov()) c.set_nesterov(d.nesterov());
  if (c.state_dtype() == proto::STATE_DTYPE_UNSPECIFIED) c.set_state_dtype(d.state_dtype());
  if (is_muon(c.kind())) {
    if (c.muon_momentum() == proto::MUON_MOMENTUM_UNSPECIFIED) c.set_muon_momentum(d.muon_momentum());
    if (c.shape_scale() == proto::MUON_SHAPE_SCALE_UNSPECIFIED) c.set_shape_scale(d.shape_scale());
    if (!c.has_ns_steps()) c.set_ns_steps(d.ns_steps());
    if (c.ns_schedule() == proto::NS_SCHEDULE_UNSPECIFIED) c.set_ns_schedule(d.ns_schedule());
    if (!c.has_ns_eps()) c.set_ns_eps(d.ns_eps());
    if (c.ns_dtype() == proto::NS_DTYPE_UNSPECIFIED) c.set_ns_dtype(d.ns_dtype());
    if (!c.has_normuon_beta2() && d.has_normuon_beta2()) c.set_normuon_beta2(d.normuon_beta2());
    if (!c.has_normuon_eps() && d.has_normuon_eps()) c.set_normuon_eps(d.normuon_eps());
    if (!c.qk_clip().has_tau()) c.mutable_qk_clip()->set_tau(d.qk_clip().tau());
    if (!c.qk_clip().has_alpha()) c.mutable_qk_clip()->set_alpha(d.qk_clip().alpha());
  }
  return c;
}

void validate_optimizer_config(const proto::OptimizerConfig& raw) {
  const proto::OptimizerConfig c = with_defaults(raw);  // throws for a bad kind
  constexpr double kInf = INFINITY;
  check_range(c, "lr", c.lr(), 0.0, false, kInf, true);
  check_range(c, "weight_decay", c.weight_decay(), 0.0, false, kInf, true);
  if (c.state_dtype() < proto::STATE_F32 || c.state_dtype() > proto::STATE_Q8)
    fail(c, fmt::format("state_dtype must be f32|bf16|q8, found {}", static_cast<int>(c.state_dtype())));
  switch (c.kind()) {
    case proto::OPTIMIZER_ADAMW:
      check_range(c, "beta1", c.beta1(), 0.0, false, 1.0, true);
      check_range(c, "beta2", c.beta2(), 0.0, false, 1.0, true);
      check_range(c, "eps", c.eps(), 0.0, true, kInf, true);
      break;
    case proto::OPTIMIZER_LION:
      check_range(c, "beta1", c.beta1(), 0.0, false, 1.0, false);
      check_range(c, "beta2", c.beta2(), 0.0, false, 1.0, false);
      break;
    case proto::OPTIMIZER_SGD:
      check_range(c, "momentum", c.momentum(), 0.0, false, 1.0, false);
      check_range(c, "dampening", c.dampening(), 0.0, false, 1.0, false);
      // torch.optim.SGD's rule: Nesterov needs momentum and no dampening.
      if (c.nesterov() && (c.momentum() <= 0.0 || c.dampening() != 0.0)) {
        fail(c, fmt::format("nesterov requires momentum > 0 and dampening == 0, found momentum {} dampening {}",
                            c.momentum(), c.dampening()));
      }
      break;
    case proto::OPTIMIZER_MUON:
    case proto::OPTIMIZER_NORMUON: {
      check_range(c, "momentum", c.momentum(), 0.0, false, 1.0, true);
      if (c.muon_momentum() != proto::MUON_MOMENTUM_AVERAGED && c.muon_momentum() != proto::MUON_MOMENTUM_SUMMED) {
        fail(c, fmt::format("muon_momentum must be averaged|summed, found {}", static_cast<int>(c.muon_momentum())));
      }
      if (c.shape_scale() < proto::MUON_SHAPE_SCALE_ORIGINAL || c.shape_scale() > proto::MUON_SHAPE_SCALE_SPECTRAL) {
        fail(c, fmt::format("shape_scale must be original|match_rms_adamw|spectral, found {}",
                            static_cast<int>(c.shape_scale())));
      }
      if (c.ns_steps() < 1 || c.ns_steps() > 100) {
        fail(c, fmt::format("ns_steps must be in [1, 100], found {}", c.ns_steps()));
      }
      check_range(c, "ns_eps", c.ns_eps(), 0.0, true, kInf, true);
      if (c.ns_dtype() != proto::NS_DTYPE_F32 && c.ns_dtype() != proto::NS_DTYPE_BF16) {
        fail(c, fmt::format("ns_dtype must be f32|bf16, found {}", static_cast<int>(c.ns_dtype())));
      }
      switch (c.ns_schedule()) {
        case proto::NS_SCHEDULE_DEFAULT: break;
        case proto::NS_SCHEDULE_POLAR_EXPRESS:
          if (c.ns_steps() > 5) {
            fail(c, fmt::format("ns_schedule polar_express has 5 published iterations, ns_steps must be "
                                "in [1, 5], found {}",
                                c.ns_steps()));
          }
          break;
        case proto::NS_SCHEDULE_CUSTOM: {
          const int n = c.ns_custom_coefficients_size();
          if (n != 1 && n != c.ns_steps()) {
            fail(c, fmt::format("ns_schedule custom needs 1 or ns_steps ({}) coefficient triples, found {}",
                                c.ns_steps(), n));
          }
          for (int i = 0; i < n; ++i) {
            const auto& t = c.ns_custom_coefficients(i);
            if (!std::isfinite(t.a()) || !std::isfinite(t.b()) || !std::isfinite(t.c())) {
              fail(c, fmt::format("ns_custom_coefficients[{}] must be finite, found ({}, {}, {})", i, t.a(),
                                  t.b(), t.c()));
            }
          }
          break;
        }
        default:
          fail(c, fmt::format("ns_schedule must be default|polar_express|custom, found {}",
                              static_cast<int>(c.ns_schedule())));
      }
      if (c.kind() == proto::OPTIMIZER_NORMUON) {
        check_range(c, "normuon_beta2", c.normuon_beta2(), 0.0, false, 1.0, true);
        check_range(c, "normuon_eps", c.normuon_eps(), 0.0, true, kInf, true);
      }
      check_range(c, "qk_clip.tau", c.qk_clip().tau(), 0.0, true, kInf, true);
      check_range(c, "qk_clip.alpha", c.qk_clip().alpha(), 0.0, false, 1.0, false);
      break;
    }
    default: fail(c, "unknown kind");
  }
}

OptimizerParams resolve_optimizer_config(const proto::OptimizerConfig& raw) {
  validate_optimizer_config(raw);
  const proto::OptimizerConfig c = with_defaults(raw);
  OptimizerParams p;
  p.kind = c.kind();
  p.lr = c.lr();
  p.weight_decay = c.weight_decay();
  p.beta1 = c.beta1();
  p.beta2 = c.beta2();
  p.eps = c.eps();
  p.momentum = c.momentum();
  p.dampening = c.dampening();
  p.nesterov = c.nesterov();
  p.state_dtype = c.state_dtype();
  if (is_muon(c.kind())) {
    p.muon_momentum = c.muon_momentum();
    p.shape_scale = c.shape_scale();
    switch (c.ns_schedule()) {
      case proto::NS_SCHEDULE_POLAR_EXPRESS: p.ns = NsSchedule::polar_express(c.ns_steps()); break;
      case proto::NS_SCHEDULE_CUSTOM:
        p.ns = NsSchedule::default_quintic(c.ns_steps(), static_cast<float>(c.ns_eps()));
        for (int i = 0; i < c.ns_steps(); ++i) {
          const auto& t = c.ns_custom_coefficients(c.ns_custom_coefficients_size() == 1 ? 0 : i);
          p.ns.coefficients[static_cast<size_t>(i)] = {static_cast<float>(t.a()), static_cast<float>(t.b()),
                                                       static_cast<float>(t.c())};
        }
        break;
      default: p.ns = NsSchedule::default_quintic(c.ns_steps(), static_cast<float>(c.ns_eps())); break;
    }
    p.ns.precision = c.ns_dtype() == proto::NS_DTYPE_BF16 ? NsPrecision::kBF16 : NsPrecision::kF32;
    p.normuon_beta2 = c.normuon_beta2();
    p.normuon_eps = c.normuon_eps();
    p.qk_clip = c.qk_clip().enabled();
    p.qk_clip_tau = c.qk_clip().tau();
    p.qk_clip_alpha = c.qk_clip().alpha();
  }
  return p;
}

int state_values_per_element(const OptimizerParams& params) {
  switch (params.kind) {
    case proto::OPTIMIZER_ADAMW: return 2;
    case proto::OPTIMIZER_LION: return 1;
    case proto::OPTIMIZER_SGD: return params.momentum != 0.0 ? 1 : 0;
    case proto::OPTIMIZER_MUON:
    case proto::OPTIMIZER_NORMUON: return 1;
    default:
      throw ConfigError(fmt::format("state_values_per_element: unknown optimizer kind {}",
                                    optimizer_kind_name(params.kind)));
  }
}

int state_values_per_row(const OptimizerParams& params) {
  return params.kind == proto::OPTIMIZER_NORMUON ? 1 : 0;
}

}  // namespace shardopt::optim
