// Optimizer kernel figures: SGEMM rate, fp32 Newton-Schulz (the default oneDNN symmetric products vs
// OpenBLAS SSYRK/SSYMM and the plain-SGEMM baseline), and the element-wise optimizers' bandwidth
// against memcpy, all measured in one run with the same threads (OPENBLAS_NUM_THREADS; oneDNN's
// OpenMP is set to the same count).
// Every figure is the best of --reps repetitions (the machine is shared; the best is the least
// disturbed). Prints a table, or with --json one JSON object per result line.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "base/dtype.h"
#include "bench/common/bench_util.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/newton_schulz.h"

namespace so = shardopt::optim;

namespace {

using shardopt::bench::best_seconds;

shardopt::bench::Emitter emit(false);  // set from --json in main

std::vector<float> random_floats(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

int threads() {
  const char* env = std::getenv("OPENBLAS_NUM_THREADS");
  return env ? std::atoi(env) : openblas_get_num_threads();
}

// SGEMM C(m x n) = A(m x k) B(k x n), best-of-reps GFLOP/s.
double sgemm_gflops(int64_t m, int64_t n, int64_t k, int reps) {
  auto a = random_floats(static_cast<size_t>(m * k), 1);
  auto b = random_floats(static_cast<size_t>(k * n), 2);
  std::vector<float> c(static_cast<size_t>(m * n));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
  const double s = best_seconds(reps, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(),
                n);
  });
  return 2.0 * m * n * k / s / 1e9;
}

void bench_ns(int64_t m, int64_t n, int reps, double machine_sgemm) {
  const auto schedule = so::NsSchedule::default_quintic();
  auto g = random_floats(static_cast<size_t>(m * n), 3);
  std::vector<float> out(g.size());
  so::NsWorkspace ws(m, n);
  auto time_ns = [&](so::NsAlgorithm alg) {
    so::newton_schulz(g.data(), m, n, out.data(), schedule, ws, alg);  // warm-up: page faults, BLAS init
    return best_seconds(reps, [&] { so::newton_schulz(g.data(), m, n, out.data(), schedule, ws, alg); });
  };
  const double t_sym = time_ns(so::NsAlgorithm::kSymmetric);
  const double t_blas = time_ns(so::NsAlgorithm::kBlasSymmetric);
  const double t_plain = time_ns(so::NsAlgorithm::kPlainGemm);
  const double flops = so::newton_schulz_flops(m, n, schedule.steps());
  const int64_t p = std::min(m, n), q = std::max(m, n);
  // The SGEMM shape that dominates NS: (p x p) times (p x q).
  const double sgemm_same_shape = sgemm_gflops(p, q, p, std::max(1, reps));
  shardopt::bench::Row row = {{"kernel", "ns5"},
                              {"m", m},
                              {"n", n},
                              {"dtype", "f32"},
                              {"threads", threads()},
                              {"openblas_core", openblas_get_corename()},
                              {"seconds", t_sym},
                              {"gflops_gemm_count", flops / t_sym / 1e9},
                              {"sgemm_gflops", machine_sgemm},
                              {"sgemm_same_shape_gflops", sgemm_same_shape},
                              {"ratio_vs_sgemm", flops / t_sym / 1e9 / machine_sgemm},
                              {"blas_symmetric_seconds", t_blas},
                              {"speedup_vs_blas_symmetric_ns", t_blas / t_sym},
                              {"plain_gemm_seconds", t_plain},
                              {"plain_gemm_gflops_gemm_count", flops / t_plain / 1e9},
                              {"speedup_vs_plain_gemm_ns", t_plain / t_sym}};
  emit(row, fmt::format("ns5 {:>5}x{:<5} oneDNN {:8.4f} s  {:7.1f} GFLOP/s (gemm count) = {:5.2f} x SGEMM   OpenBLAS "
                        "SSYRK/SSYMM {:8.4f} s ({:4.2f}x)   plain-SGEMM {:8.4f} s ({:4.2f}x)",
                        m, n, t_sym, flops / t_sym / 1e9, flops / t_sym / 1e9 / machine_sgemm, t_blas,
                        t_blas / t_sym, t_plain, t_plain / t_sym));
}

double memcpy_gbytes_per_s(size_t bytes, int reps) {
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  std::memcpy(dst.data(), src.data(), bytes);
  const double s = best_seconds(reps, [&] { std::memcpy(dst.data(), src.data(), bytes); });
  return 2.0 * static_cast<double>(bytes) / s / 1e9;  // read + write
}

void bench_elementwise(so::OptimizerKind kind, bool bf16_grads, bool mirror, size_t elements, size_t slice_elements,
                       int reps, double memcpy_gbs) {
  shardopt::proto::OptimizerConfig config;
  config.set_kind(kind);
  if (kind == shardopt::proto::OPTIMIZER_SGD) config.set_momentum(0.9);
  const so::OptimizerParams params = so::resolve_optimizer_config(config);
  const int slots = so::state_values_per_element(params);
  auto master = random_floats(elements, 4);
  auto gf = random_floats(elements, 5);
  std::vector<shardopt::bf16> gb(elements), mirror_buf(mirror ? elements : 0);
  for (size_t i = 0; i < elements; ++i) gb[i] = shardopt::float_to_bf16(gf[i]);
  std::vector<float> s0(elements, 0.0f), s1(slots > 1 ? elements : 0, 0.0f);
  std::vector<so::ElementwiseSlice> slices;
  for (size_t start = 0; start < elements; start += slice_elements) {
    so::ElementwiseSlice s;
    s.count = std::min(slice_elements, elements - start);
    s.master = master.data() + start;
    s.mirror = mirror ? mirror_buf.data() + start : nullptr;
    s.grad = bf16_grads ? static_cast<const void*>(gb.data() + start) : gf.data() + start;
    s.grad_dtype = bf16_grads ? shardopt::DType::kBF16 : shardopt::DType::kF32;
    s.state[0] = s0.data() + start;
    s.state[1] = slots > 1 ? s1.data() + start : nullptr;
    slices.push_back(s);
  }
  int64_t step = 1;
  so::elementwise_step(params, slices, 1e-4f, step++);
  const double s = best_seconds(reps, [&] { so::elementwise_step(params, slices, 1e-4f, step++); });
  // Bytes that must move: read grad + master + state, write master + state (+ mirror).
  const double bytes_per_element =
      (bf16_grads ? 2.0 : 4.0) + 4.0 * 2 + 4.0 * 2 * slots + (mirror ? 2.0 : 0.0);
  const double gbs = bytes_per_element * static_cast<double>(elements) / s / 1e9;
  const std::string name = so::optimizer_kind_name(kind) + (kind == shardopt::proto::OPTIMIZER_SGD ? "_momentum" : "");
  shardopt::bench::Row row = {{"kernel", name},
                              {"grad_dtype", bf16_grads ? "bf16" : "f32"},
                              {"bf16_mirror", mirror},
                              {"elements", elements},
                              {"slices", slices.size()},
                              {"threads", 1},
                              {"seconds", s},
                              {"bytes_per_element", bytes_per_element},
                              {"gbytes_per_s", gbs},
                              {"memcpy_gbytes_per_s", memcpy_gbs},
                              {"ratio_vs_memcpy", gbs / memcpy_gbs}};
  emit(row, fmt::format("{:<13} grad {:<4} mirror {:<3} {:>9} elements in {:>6} slices  {:8.5f} s  {:6.2f} GB/s = "
                        "{:4.2f} x memcpy",
                        name, bf16_grads ? "bf16" : "f32", mirror ? "yes" : "no", elements, slices.size(), s, gbs,
                        gbs / memcpy_gbs));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt optimizer kernel benchmark"};
  bool large = false, quick = false, ns_only = false;
  std::string ns_shapes;
  int reps = 3;
  bool json = false;
  shardopt::bench::add_json_flag(app, json);
  app.add_flag("--large", large, "add the 4096x4096 NS (minutes on 2 cores)");
  app.add_flag("--quick", quick, "small shapes only (smoke run)");
  app.add_option("--ns-shapes", ns_shapes, "NS shapes instead of the defaults, e.g. 768x768,768x2048,2048x768");
  app.add_flag("--ns-only", ns_only, "SGEMM and NS rows only");
  shardopt::bench::add_repeat_option(app, reps, "--reps")->check(CLI::Range(1, 100));
  CLI11_PARSE(app, argc, argv);
  emit = shardopt::bench::Emitter(json);
  omp_set_num_threads(threads());  // oneDNN's products with the same threads as OpenBLAS's

  const double machine_sgemm = sgemm_gflops(quick ? 512 : 2048, quick ? 512 : 2048, quick ? 512 : 2048, reps);
  emit({{"kernel", "sgemm"}, {"m", quick ? 512 : 2048}, {"n", quick ? 512 : 2048}, {"k", quick ? 512 : 2048},
        {"dtype", "f32"}, {"threads", threads()}, {"gflops", machine_sgemm}},
       fmt::format("sgemm {0}x{0}x{0}: {1:.1f} GFLOP/s ({2} threads)", quick ? 512 : 2048, machine_sgemm, threads()));

  std::vector<std::pair<int64_t, int64_t>> shapes = {{512, 512}, {1024, 1024}, {512, 2048}, {2048, 512}};
  if (!quick) {
    shapes.insert(shapes.end(), {{2048, 2048}, {1024, 4096}, {4096, 1024}});
  }
  if (large) shapes.push_back({4096, 4096});
  if (!ns_shapes.empty()) {
    shapes.clear();
    for (size_t pos = 0; pos < ns_shapes.size();) {
      const size_t comma = std::min(ns_shapes.find(',', pos), ns_shapes.size());
      const std::string item = ns_shapes.substr(pos, comma - pos);
      const size_t x = item.find('x');
      if (x == std::string::npos) {
        fmt::print(stderr, "optim_bench: --ns-shapes expects ROWSxCOLS items, found '{}'\n", item);
        return 2;
      }
      shapes.emplace_back(std::stoll(item.substr(0, x)), std::stoll(item.substr(x + 1)));
      pos = comma + 1;
    }
  }
  for (const auto& [m, n] : shapes) bench_ns(m, n, m * n >= (int64_t{2048} * 2048) ? std::min(reps, 2) : reps, machine_sgemm);

  if (ns_only) return 0;
  const size_t elements = quick ? (size_t{1} << 20) : (size_t{1} << 24);
  const double memcpy_gbs = memcpy_gbytes_per_s(elements * 4 * 4, reps + 2);
  emit({{"kernel", "memcpy"}, {"bytes", elements * 16}, {"threads", 1}, {"gbytes_per_s", memcpy_gbs}},
       fmt::format("memcpy {} MiB: {:.2f} GB/s (read + write)", elements * 16 >> 20, memcpy_gbs));
  for (auto kind : {shardopt::proto::OPTIMIZER_ADAMW, shardopt::proto::OPTIMIZER_LION, shardopt::proto::OPTIMIZER_SGD}) {
    bench_elementwise(kind, false, false, elements, elements, reps + 2, memcpy_gbs);
    bench_elementwise(kind, true, true, elements, elements, reps + 2, memcpy_gbs);
  }
  // Multi-tensor: the same elements split into 4096-element slices (per-slice overhead).
  bench_elementwise(shardopt::proto::OPTIMIZER_ADAMW, false, false, elements, 4096, reps + 2, memcpy_gbs);
  bench_elementwise(shardopt::proto::OPTIMIZER_ADAMW, false, false, elements, 512, reps + 2, memcpy_gbs);
  return 0;
}
