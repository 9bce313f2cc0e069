// Compact optimizer state figures, all from one run:
//   q8_memory     moment bytes per rank (max over ranks) with q8 vs fp32 moments, absmax included,
//                 and the total optimizer bytes (fp32 master + moments) beside them, from the plans
//                 the Engine builds for the llama presets (AdamW everywhere, and Muon + AdamW);
//   q8_codec      q8 encode and decode time alone (float8 in each instruction-set build the CPU runs:
//                 portable, AVX2, AVX-512; the dynamic table code), field "isa";
//   q8_kernel     AdamW / Lion / SGD-momentum step time with q8 / bf16 moments vs the fp32 step of the
//                 same instruction-set build on the same arrays, at 1 and 2 threads (the same pool for
//                 both, repetitions interleaved), field "isa";
//   q8_muon_momentum  Muon compact momentum decode + encode of one 4096 x 4096 matrix at 1 and 2 threads;
//   q8_code_error the error of the float8, dynamic and linear 8-bit codes on AdamW moments of a
//                 synthetic heavy-tailed gradient stream (the measurement behind optim/quant8.h's choice).
// Kernel times are the best of --repeat (the machine is shared). --json: one JSON object per line.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "bench/common/bench_util.h"

#include "base/thread_pool.h"
#include "optim/compact_step.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/kernel_options.h"
#include "optim/quant8.h"
#include "runtime/engine.h"
#include "sharding/planner.h"
#include "sharding/presets.h"

namespace so = shardopt::optim;
namespace sp = shardopt::proto;

namespace {

shardopt::bench::Emitter emit(false);  // set from --json in main

using shardopt::bench::best_seconds;

// Per rank: moment bytes and master bytes under `plan` (the ShardState layout: per element-wise
// piece 2 AdamW moments; per owned matrix 1 Muon momentum; q8 = codes + one fp32 absmax per block).
struct RankBytes {
  double moments = 0, master = 0;
};
std::vector<RankBytes> rank_bytes(const sp::ShardPlan& plan, sp::StateDType dtype) {
  const int world = plan.request().world_size();
  std::vector<RankBytes> out(static_cast<size_t>(world));
  auto moment = [&](int64_t n) { return static_cast<double>(so::compact_bytes(dtype, n)); };
  for (const auto& t : plan.tensors()) {
    if (t.muon()) out[static_cast<size_t>(t.owner())].moments += moment(t.numel());
    for (const auto& p : t.pieces()) {
      auto& r = out[static_cast<size_t>(p.rank())];
      if (!t.muon()) r.moments += 2 * moment(p.length());
    }
  }
  for (const auto& b : plan.buckets())
    for (const auto& s : b.segments()) out[static_cast<size_t>(s.rank())].master += 4.0 * static_cast<double>(s.count());
  return out;
}

void bench_memory(const std::string& preset, int world, bool muon) {
  const auto specs = shardopt::sharding::preset_specs(preset, sp::F32);
  double max_moments[2] = {0, 0}, max_total[2] = {0, 0};
  int i = 0;
  for (auto dtype : {sp::STATE_F32, sp::STATE_Q8}) {
    shardopt::runtime::EngineOptions o;
    o.zero_stage = 2;
    o.elementwise_optimizer.set_kind(sp::OPTIMIZER_ADAMW);
    o.elementwise_optimizer.set_state_dtype(dtype);
    if (muon) {
      o.matrix_optimizer.set_kind(sp::OPTIMIZER_MUON);
      o.matrix_optimizer.set_state_dtype(dtype);
    }
    const auto plan = shardopt::sharding::make_plan(shardopt::runtime::make_engine_plan_request(specs, world, o));
    for (const auto& r : rank_bytes(plan, dtype)) {
      max_moments[i] = std::max(max_moments[i], r.moments);
      max_total[i] = std::max(max_total[i], r.moments + r.master);
    }
    ++i;
  }
  const double ratio = max_moments[1] / max_moments[0];
  const std::string opt = muon ? "muon+adamw" : "adamw";
  emit({{"bench", "q8_memory"}, {"preset", preset}, {"world", world}, {"optimizer", opt},
        {"f32_moment_bytes_per_rank", max_moments[0]}, {"q8_moment_bytes_per_rank", max_moments[1]},
        {"q8_over_f32_moments", ratio}, {"f32_optimizer_bytes_per_rank", max_total[0]},
        {"q8_optimizer_bytes_per_rank", max_total[1]}, {"q8_over_f32_optimizer", max_total[1] / max_total[0]}},
       fmt::format("memory {:<10} N={} {:<10}  moments f32 {:8.1f} MiB  q8 {:8.1f} MiB  ({:.3f}x)   optimizer total "
                   "f32 {:8.1f} MiB  q8 {:8.1f} MiB  ({:.3f}x)",
                   preset, world, opt, max_moments[0] / 1048576, max_moments[1] / 1048576, ratio,
                   max_total[0] / 1048576, max_total[1] / 1048576, max_total[1] / max_total[0]));
}

// The instruction-set builds this CPU runs (optim/kernel_options.h), narrowest first.
std::vector<so::Isa> supported_isas() {
  std::vector<so::Isa> out;
  for (so::Isa isa : {so::Isa::kPortable, so::Isa::kAvx2, so::Isa::kAvx512})
    if (so::cpu_supports(isa)) out.push_back(isa);
  return out;
}

// Step time with compact moments against the fp32 step on the same arrays with the same pool, for
// AdamW (m and v), Lion (m) and SGD momentum, at 1 and 2 threads, in every instruction-set build the
// CPU runs: q8 in build X against the fp32 step in build X (and bf16 in the widest build). All
// repetitions are interleaved, so a change of load on the shared machine hits both sides of a ratio.
void bench_kernel(int64_t n, int reps) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(n)), g(w.size()), m(w.size(), 0.0f), v(w.size(), 0.0f);
  for (size_t i = 0; i < w.size(); ++i) w[i] = normal(rng), g[i] = normal(rng) * 1e-2f;
  struct Variant {
    sp::StateDType dtype;
    so::Isa isa;
    std::vector<unsigned char> values[2];
    std::vector<float> absmax[2];
    so::CompactSlots slots;
    double best = 1e300;
  };
  const std::vector<so::Isa> isas = supported_isas();
  for (const char* kernel : {"adamw", "lion", "sgd_momentum"}) {
    sp::OptimizerConfig cfg;
    cfg.set_kind(kernel == std::string("adamw") ? sp::OPTIMIZER_ADAMW
                 : kernel == std::string("lion") ? sp::OPTIMIZER_LION
                                                 : sp::OPTIMIZER_SGD);
    if (cfg.kind() == sp::OPTIMIZER_SGD) cfg.set_momentum(0.9);
    const so::OptimizerParams p = so::resolve_optimizer_config(cfg);
    const int slots = so::state_values_per_element(p);
    so::ElementwiseSlice s;
    s.master = w.data();
    s.grad = g.data();
    s.count = static_cast<size_t>(n);
    s.state[0] = m.data();
    s.state[1] = v.data();
    for (int threads : {1, 2}) {
      shardopt::ThreadPool pool(threads);
      std::vector<Variant> variants;
      const auto variant = [](sp::StateDType dtype, so::Isa isa) {
        Variant v;
        v.dtype = dtype;
        v.isa = isa;
        return v;
      };
      for (so::Isa isa : isas) variants.push_back(variant(sp::STATE_Q8, isa));
      variants.push_back(variant(sp::STATE_BF16, isas.back()));
      for (Variant& var : variants)
        for (int k = 0; k < slots; ++k) {
          var.values[k].assign(static_cast<size_t>(n * (var.dtype == sp::STATE_BF16 ? 2 : 1)), 0);
          var.absmax[k].assign(static_cast<size_t>(so::q8_num_blocks(n)), 0.0f);
          var.slots.slot[k] = {var.dtype, var.values[k].data(),
                               var.dtype == sp::STATE_Q8 ? var.absmax[k].data() : nullptr,
                               so::q8_slot_is_nonnegative(p.kind, k)};
        }
      so::ElementwiseSlice c = s;
      c.state[0] = c.state[1] = nullptr;
      int64_t step = 1;
      std::vector<double> f32(isas.size(), 1e300);  // per build, in the order of isas
      for (int r = 0; r < reps; ++r) {
        for (size_t i = 0; i < isas.size(); ++i)
          f32[i] = std::min(f32[i], best_seconds(1, [&] {
            so::elementwise_step(p, std::span(&s, 1), 1e-3f, step++, so::FiniteCheck::kNone, {&pool, isas[i]});
          }));
        for (Variant& var : variants)
          var.best = std::min(var.best, best_seconds(1, [&] {
            so::elementwise_step_compact(p, std::span(&c, 1), std::span(&var.slots, 1), 1e-3f, step,
                                         so::FiniteCheck::kNone, {&pool, var.isa});
          }));
      }
      for (const Variant& var : variants) {
        const std::string name = so::state_dtype_name(var.dtype);
        const double f32_best = f32[static_cast<size_t>(std::find(isas.begin(), isas.end(), var.isa) - isas.begin())];
        const double f32_ns = 1e9 * f32_best / static_cast<double>(n);
        const double ns = 1e9 * var.best / static_cast<double>(n);
        emit({{"bench", "q8_kernel"}, {"kernel", kernel}, {"state", name}, {"isa", so::isa_name(var.isa)},
              {"elements", n}, {"threads", threads}, {"reps", reps}, {"f32_ns_per_elem", f32_ns},
              {"ns_per_elem", ns}, {"time_over_f32", var.best / f32_best}},
             fmt::format("kernel {:<12} {:<5} {:<8} n={} threads={}  f32 {:.3f} ns/elem  {} {:.3f} ns/elem  ({:.2f}x "
                         "the f32 time of the same build)",
                         kernel, name, so::isa_name(var.isa), n, threads, f32_ns, name, ns, var.best / f32_best));
      }
    }
  }
}

// Where q8 time goes: encode and decode alone (one thread, signed and unsigned code), float8 in
// every instruction-set build the CPU runs and the dynamic table code (portable), on moments of a
// realistic spread.
void bench_codec(int64_t n, int reps) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n)), out(x.size());
  for (float& e : x) e = normal(rng) * std::exp(2.0f * normal(rng)) * 1e-3f;
  std::vector<uint8_t> codes(x.size());
  std::vector<float> absmax(static_cast<size_t>(so::q8_num_blocks(n)));
  struct Build {
    so::Q8CodeKind kind;
    so::Isa isa;
  };
  std::vector<Build> builds;
  for (so::Isa isa : supported_isas()) builds.push_back({so::Q8CodeKind::kFloat8, isa});
  builds.push_back({so::Q8CodeKind::kDynamic, so::Isa::kPortable});
  for (bool nonnegative : {false, true}) {
    if (nonnegative)
      for (float& e : x) e = e * e;
    for (const Build b : builds) {
      const double enc = best_seconds(reps, [&] {
        so::q8_quantize(x.data(), n, nonnegative, codes.data(), absmax.data(), b.kind, b.isa);
      });
      const double dec = best_seconds(reps, [&] {
        so::q8_dequantize(codes.data(), absmax.data(), n, nonnegative, out.data(), b.kind, b.isa);
      });
      const double en = 1e9 * enc / static_cast<double>(n), de = 1e9 * dec / static_cast<double>(n);
      const std::string code = so::q8_code_name(b.kind);
      emit({{"bench", "q8_codec"}, {"code", code}, {"sign", nonnegative ? "unsigned" : "signed"},
            {"isa", so::isa_name(b.isa)}, {"elements", n}, {"threads", 1}, {"encode_ns_per_elem", en},
            {"decode_ns_per_elem", de}},
           fmt::format("codec {:<8} {:<8} {:<8} n={}  encode {:.3f} ns/elem  decode {:.3f} ns/elem", code,
                       nonnegative ? "unsigned" : "signed", so::isa_name(b.isa), n, en, de));
    }
  }
}

// Muon / NorMuon compact momentum: the decode before muon_step and the encode after it
// (load_compact + store_compact of one rows x cols matrix, as muon_step_compact runs them), q8 and
// bf16, at 1 and 2 pool threads in the widest build, repetitions interleaved; the ratio is the
// 2-thread time over the 1-thread time measured in the same run.
void bench_muon_momentum(int64_t rows, int64_t cols, int reps) {
  const int64_t n = rows * cols;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> momentum(static_cast<size_t>(n));
  for (float& e : momentum) e = normal(rng) * std::exp(normal(rng)) * 1e-3f;
  const so::Isa isa = supported_isas().back();
  for (sp::StateDType dtype : {sp::STATE_Q8, sp::STATE_BF16}) {
    std::vector<unsigned char> values(static_cast<size_t>(n * (dtype == sp::STATE_BF16 ? 2 : 1)));
    std::vector<float> absmax(static_cast<size_t>(so::q8_num_blocks(n)));
    const so::CompactState state{dtype, values.data(), dtype == sp::STATE_Q8 ? absmax.data() : nullptr, false};
    so::store_compact(state, n, momentum.data());
    shardopt::ThreadPool pools[] = {shardopt::ThreadPool(1), shardopt::ThreadPool(2)};
    double best[2] = {1e300, 1e300};
    for (int r = 0; r < reps; ++r)
      for (int t = 0; t < 2; ++t) {
        const so::KernelOptions exec{&pools[t], isa};
        best[t] = std::min(best[t], best_seconds(1, [&] {
          so::load_compact(state, n, momentum.data(), exec);
          so::store_compact(state, n, momentum.data(), exec);
        }));
      }
    const std::string name = so::state_dtype_name(dtype);
    for (int t = 0; t < 2; ++t)
      emit({{"bench", "q8_muon_momentum"}, {"state", name}, {"isa", so::isa_name(isa)}, {"rows", rows},
            {"cols", cols}, {"threads", t + 1}, {"reps", reps}, {"decode_encode_ms", 1e3 * best[t]},
            {"ns_per_elem", 1e9 * best[t] / static_cast<double>(n)}, {"time_over_1_thread", best[t] / best[0]}},
           fmt::format("muon momentum {:<5} {}x{} {} threads={}  decode+encode {:.2f} ms  {:.3f} ns/elem  ({:.2f}x "
                       "the 1-thread time)",
                       name, rows, cols, so::isa_name(isa), t + 1, 1e3 * best[t],
                       1e9 * best[t] / static_cast<double>(n), best[t] / best[0]));
  }
}

// AdamW moments after `steps` steps of a heavy-tailed stream: per-element scale log-normal
// (sigma 1.5), per-step noise Student-t-like (normal / sqrt(chi2_3 / 3)), a slowly drifting mean.
void bench_code_error(int64_t n, int steps) {
  std::mt19937 rng(11);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::chi_squared_distribution<double> chi2(3.0);
  std::vector<double> scale(static_cast<size_t>(n)), mean(scale.size()), m(scale.size(), 0.0), v(scale.size(), 0.0);
  for (size_t i = 0; i < scale.size(); ++i) scale[i] = 1e-3 * std::exp(1.5 * normal(rng)), mean[i] = 0.3 * normal(rng);
  for (int s = 0; s < steps; ++s)
    for (size_t i = 0; i < scale.size(); ++i) {
      const double g = scale[i] * (mean[i] + normal(rng) / std::sqrt(chi2(rng) / 3.0));
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.999 * v[i] + 0.001 * g * g;
    }
  const double bias2 = 1 - std::pow(0.999, steps), bias1 = 1 - std::pow(0.9, steps), eps = 1e-8;
  for (auto kind : {so::Q8CodeKind::kFloat8, so::Q8CodeKind::kDynamic, so::Q8CodeKind::kLinear}) {
    std::vector<float> mf(m.begin(), m.end()), vf(v.begin(), v.end()), md(mf.size()), vd(vf.size());
    std::vector<uint8_t> codes(mf.size());
    std::vector<float> absmax(static_cast<size_t>(so::q8_num_blocks(n)));
    so::q8_quantize(mf.data(), n, false, codes.data(), absmax.data(), kind);
    so::q8_dequantize(codes.data(), absmax.data(), n, false, md.data(), kind);
    so::q8_quantize(vf.data(), n, true, codes.data(), absmax.data(), kind);
    so::q8_dequantize(codes.data(), absmax.data(), n, true, vd.data(), kind);
    double em = 0, nm = 0, ev = 0, nv = 0, eu = 0, nu = 0;
    int64_t v_zero = 0;
    for (size_t i = 0; i < mf.size(); ++i) {
      em += (md[i] - m[i]) * (md[i] - m[i]), nm += m[i] * m[i];
      ev += (vd[i] - v[i]) * (vd[i] - v[i]), nv += v[i] * v[i];
      v_zero += vd[i] == 0.0f;
      const double u = (m[i] / bias1) / (std::sqrt(v[i] / bias2) + eps);
      const double ud = (md[i] / bias1) / (std::sqrt(vd[i] / bias2) + eps);
      eu += (ud - u) * (ud - u), nu += u * u;
    }
    const std::string name = so::q8_code_name(kind);
    const double rm = std::sqrt(em / nm), rv = std::sqrt(ev / nv), ru = std::sqrt(eu / nu);
    const double zero_frac = static_cast<double>(v_zero) / static_cast<double>(n);
    emit({{"bench", "q8_code_error"}, {"code", name}, {"elements", n}, {"steps", steps}, {"m_rel_rms_error", rm},
          {"v_rel_rms_error", rv}, {"update_rel_rms_error", ru}, {"v_flushed_to_zero_frac", zero_frac}},
         fmt::format("code {:<8} AdamW moments after {} steps: m rel RMS err {:.4f}  v {:.4f}  update m/sqrt(v) "
                     "{:.4f}  v decoded to 0: {:.1f}%",
                     name, steps, rm, rv, ru, 100 * zero_frac));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"q8_bench: 8-bit block-wise optimizer state: memory, kernel time, code error"};
  int reps = 5, world = 8;
  int64_t elements = int64_t{1} << 24;  // about the element-wise state per rank of llama-125m (134M) at 8 ranks
  bool json = false;
  shardopt::bench::add_json_flag(app, json);
  shardopt::bench::add_repeat_option(app, reps, "--reps")->check(CLI::Range(1, 100));
  app.add_option("--world", world, "ranks of the memory plans")->check(CLI::Range(1, 4096));
  app.add_option("--elements", elements, "elements of the kernel arrays")->check(CLI::Range(int64_t{256}, int64_t{1} << 28));
  std::vector<std::string> sections = {"memory", "codec", "kernel", "muon_momentum", "code_error"};
  app.add_option("--section", sections, "the parts to run (default: all)")
      ->check(CLI::IsMember({"memory", "codec", "kernel", "muon_momentum", "code_error"}));
  CLI11_PARSE(app, argc, argv);
  emit = shardopt::bench::Emitter(json);
  const auto run = [&](const char* section) { return std::find(sections.begin(), sections.end(), section) != sections.end(); };
  if (run("memory"))
    for (const char* preset : {"llama-125m", "llama-1b"})
      for (bool muon : {false, true}) bench_memory(preset, world, muon);
  if (run("codec")) bench_codec(elements, reps);
  if (run("kernel")) bench_kernel(elements, reps);
  if (run("muon_momentum")) bench_muon_momentum(4096, 4096, reps);
  if (run("code_error")) bench_code_error(1 << 16, 300);
  return 0;
}
