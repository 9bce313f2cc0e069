#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "base/error.h"
#include "optim/config.h"

namespace shardopt::optim {
namespace {

proto::OptimizerConfig make(proto::OptimizerKind kind) {
  proto::OptimizerConfig c;
  c.set_kind(kind);
  return c;
}

// Expects ConfigError whose message contains `needle`.
void expect_config_error(const proto::OptimizerConfig& c, const std::string& needle) {
  try {
    validate_optimizer_config(c);
    ADD_FAILURE() << "no ConfigError for " << c.ShortDebugString();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

TEST(OptimizerConfig, DocumentedDefaults) {
  const auto adamw = default_optimizer_config(proto::OPTIMIZER_ADAMW);
  EXPECT_DOUBLE_EQ(adamw.lr(), 1e-3);
  EXPECT_DOUBLE_EQ(adamw.weight_decay(), 0.01);
  EXPECT_DOUBLE_EQ(adamw.beta1(), 0.9);
  EXPECT_DOUBLE_EQ(adamw.beta2(), 0.999);
  EXPECT_DOUBLE_EQ(adamw.eps(), 1e-8);

  const auto lion = default_optimizer_config(proto::OPTIMIZER_LION);
  EXPECT_DOUBLE_EQ(lion.beta1(), 0.9);
  EXPECT_DOUBLE_EQ(lion.beta2(), 0.99);

  const auto sgd = default_optimizer_config(proto::OPTIMIZER_SGD);
  EXPECT_DOUBLE_EQ(sgd.momentum(), 0.0);
  EXPECT_FALSE(sgd.nesterov());

  const auto muon = default_optimizer_config(proto::OPTIMIZER_MUON);
  EXPECT_DOUBLE_EQ(muon.lr(), 1e-3);
  EXPECT_DOUBLE_EQ(muon.weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(muon.momentum(), 0.95);
  EXPECT_TRUE(muon.nesterov());
  EXPECT_DOUBLE_EQ(muon.ns_eps(), 1e-7);
  EXPECT_EQ(muon.ns_steps(), 5);
  EXPECT_EQ(muon.muon_momentum(), proto::MUON_MOMENTUM_AVERAGED);
  EXPECT_EQ(muon.shape_scale(), proto::MUON_SHAPE_SCALE_ORIGINAL);
  EXPECT_EQ(muon.ns_schedule(), proto::NS_SCHEDULE_DEFAULT);
  EXPECT_DOUBLE_EQ(muon.qk_clip().tau(), 100.0);
  EXPECT_DOUBLE_EQ(muon.qk_clip().alpha(), 0.5);

  const auto normuon = default_optimizer_config(proto::OPTIMIZER_NORMUON);
  EXPECT_DOUBLE_EQ(normuon.normuon_beta2(), 0.95);
  EXPECT_DOUBLE_EQ(normuon.normuon_eps(), 1e-10);
}

TEST(OptimizerConfig, ResolveFillsOnlyUnsetFields) {
  proto::OptimizerConfig c = make(proto::OPTIMIZER_MUON);
  c.set_weight_decay(0.0);  // an explicit zero must survive (proto3 `optional`)
  c.set_nesterov(false);
  c.set_muon_momentum(proto::MUON_MOMENTUM_SUMMED);
  const OptimizerParams p = resolve_optimizer_config(c);
  EXPECT_EQ(p.weight_decay, 0.0f);
  EXPECT_FALSE(p.nesterov);
  EXPECT_EQ(p.muon_momentum, proto::MUON_MOMENTUM_SUMMED);
  EXPECT_FLOAT_EQ(p.momentum, 0.95f);
  ASSERT_EQ(p.ns.steps(), 5);
  for (const auto& k : p.ns.coefficients) {
    EXPECT_FLOAT_EQ(k[0], 3.4445f);
    EXPECT_FLOAT_EQ(k[1], -4.7750f);
    EXPECT_FLOAT_EQ(k[2], 2.0315f);
  }
  EXPECT_FLOAT_EQ(p.ns.norm_floor, 1e-7f);
  EXPECT_FLOAT_EQ(p.ns.norm_scale, 1.0f);
}

TEST(OptimizerConfig, PolarExpressAndCustomSchedules) {
  proto::OptimizerConfig pe = make(proto::OPTIMIZER_MUON);
  pe.set_ns_schedule(proto::NS_SCHEDULE_POLAR_EXPRESS);
  const OptimizerParams p = resolve_optimizer_config(pe);
  ASSERT_EQ(p.ns.steps(), 5);
  EXPECT_NEAR(p.ns.coefficients[0][0], 8.1566, 1e-4);
  EXPECT_NEAR(p.ns.coefficients[0][1], -22.4833, 1e-4);
  EXPECT_NEAR(p.ns.coefficients[0][2], 15.8788, 1e-4);
  EXPECT_FLOAT_EQ(p.ns.norm_scale, 1.02f);
  EXPECT_FLOAT_EQ(p.ns.norm_add, 1e-6f);

  proto::OptimizerConfig custom = make(proto::OPTIMIZER_MUON);
  custom.set_ns_schedule(proto::NS_SCHEDULE_CUSTOM);
  custom.set_ns_steps(3);
  auto* t = custom.add_ns_custom_coefficients();
  t->set_a(2.0);
  t->set_b(-1.5);
  t->set_c(0.5);
  const OptimizerParams q = resolve_optimizer_config(custom);
  ASSERT_EQ(q.ns.steps(), 3);
  EXPECT_FLOAT_EQ(q.ns.coefficients[2][0], 2.0f);
  EXPECT_FLOAT_EQ(q.ns.coefficients[2][1], -1.5f);
}

TEST(OptimizerConfig, ValidationNamesTheField) {
  expect_config_error(proto::OptimizerConfig{}, "kind");
  auto c = make(proto::OPTIMIZER_ADAMW);
  c.set_lr(-1.0);
  expect_config_error(c, "lr");
  c = make(proto::OPTIMIZER_ADAMW);
  c.set_beta1(1.0);
  expect_config_error(c, "beta1");
  c = make(proto::OPTIMIZER_ADAMW);
  c.set_beta2(NAN);
  expect_config_error(c, "beta2");
  c = make(proto::OPTIMIZER_ADAMW);
  c.set_eps(0.0);
  expect_config_error(c, "eps");
  c = make(proto::OPTIMIZER_SGD);
  c.set_nesterov(true);
  expect_config_error(c, "nesterov");
  c = make(proto::OPTIMIZER_MUON);
  c.set_ns_steps(0);
  expect_config_error(c, "ns_steps");
  c = make(proto::OPTIMIZER_MUON);
  c.set_ns_schedule(proto::NS_SCHEDULE_POLAR_EXPRESS);
  c.set_ns_steps(6);
  expect_config_error(c, "polar_express");
  c = make(proto::OPTIMIZER_MUON);
  c.set_ns_schedule(proto::NS_SCHEDULE_CUSTOM);
  expect_config_error(c, "coefficient triples");
  c = make(proto::OPTIMIZER_MUON);
  c.set_momentum(1.0);
  expect_config_error(c, "momentum");
  c = make(proto::OPTIMIZER_NORMUON);
  c.set_normuon_beta2(-0.1);
  expect_config_error(c, "normuon_beta2");
  c = make(proto::OPTIMIZER_MUON);
  c.mutable_qk_clip()->set_alpha(1.5);
  expect_config_error(c, "qk_clip.alpha");
  c = make(proto::OPTIMIZER_MUON);
  c.set_shape_scale(static_cast<proto::MuonShapeScale>(9));
  expect_config_error(c, "shape_scale");
  // The message says what was found.
  c = make(proto::OPTIMIZER_ADAMW);
  c.set_weight_decay(-0.5);
  expect_config_error(c, "found -0.5");
}

TEST(OptimizerConfig, KindNames) {
  for (auto kind : {proto::OPTIMIZER_ADAMW, proto::OPTIMIZER_LION, proto::OPTIMIZER_SGD, proto::OPTIMIZER_MUON,
                    proto::OPTIMIZER_NORMUON}) {
    EXPECT_EQ(parse_optimizer_kind(optimizer_kind_name(kind)), kind);
  }
  EXPECT_THROW(parse_optimizer_kind("adam"), ConfigError);
}

}  // namespace
}  // namespace shardopt::optim

namespace shardopt::optim {
namespace {

TEST(OptimizerConfig, NsDtypeDefaultsToF32AndResolvesBf16) {
  proto::OptimizerConfig c;
  c.set_kind(proto::OPTIMIZER_MUON);
  EXPECT_EQ(with_defaults(c).ns_dtype(), proto::NS_DTYPE_F32);
  EXPECT_EQ(resolve_optimizer_config(c).ns.precision, NsPrecision::kF32);
  c.set_ns_dtype(proto::NS_DTYPE_BF16);
  EXPECT_EQ(resolve_optimizer_config(c).ns.precision, NsPrecision::kBF16);
  c.set_kind(proto::OPTIMIZER_NORMUON);
  EXPECT_EQ(resolve_optimizer_config(c).ns.precision, NsPrecision::kBF16);
  c.set_ns_dtype(static_cast<proto::NsDtype>(7));
  try {
    resolve_optimizer_config(c);
    FAIL() << "ns_dtype 7 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("ns_dtype"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardopt::optim
