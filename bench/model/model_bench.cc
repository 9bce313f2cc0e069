// Forward/backward time and achieved GFLOP/s of the reference transformer on real text.
// Prints the best of --reps timed steps (after warm-up); never passes or fails on time.
#include <fmt/core.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#include "bench/common/bench_util.h"
#include "model/data.h"
#include "base/thread_pool.h"
#include "model/transformer.h"

using namespace shardopt::model;
namespace bench = shardopt::bench;
using shardopt::ThreadPool;

int main(int argc, char** argv) {
  ModelConfig mc;
  int batch = 16, seq_len = 64, reps = 20, threads_wanted = 1;
  bool json = false, relu2 = false;
  std::string data = std::string(SHARDOPT_DATA_DIR) + "/tinyshakespeare.txt";
  CLI::App app{"shardopt model forward/backward benchmark"};
  app.add_option("--d-model", mc.d_model);
  app.add_option("--layers", mc.n_layer);
  app.add_option("--heads", mc.n_head);
  app.add_option("--mlp-ratio", mc.mlp_ratio);
  app.add_option("--seq-len", seq_len);
  app.add_option("--batch", batch);
  bench::add_repeat_option(app, reps, "--reps");
  app.add_option("--data", data);
  app.add_flag("--relu2", relu2, "ReLU² instead of GELU");
  bench::add_json_flag(app, json);
  app.add_option("--threads", threads_wanted,
                 "model ThreadPool size; > 1 also measures the single-threaded model in the same run (ratio)");
  CLI11_PARSE(app, argc, argv);
  mc.context = seq_len;
  if (relu2) mc.activation = Activation::kReluSquared;

  Transformer model(mc);
  std::vector<std::vector<float>> value, grad;
  std::vector<ParamBinding> bindings;
  std::vector<float*> ptrs;
  for (const auto& p : model.params()) {
    value.emplace_back(static_cast<std::size_t>(p.numel()));
    grad.emplace_back(static_cast<std::size_t>(p.numel()));
  }
  for (std::size_t i = 0; i < value.size(); ++i) {
    bindings.push_back({value[i].data(), grad[i].data()});
    ptrs.push_back(value[i].data());
  }
  model.init(1, ptrs);
  ByteCorpus corpus = ByteCorpus::load(data);
  SamplerConfig sc;
  sc.global_batch = batch;
  sc.seq_len = seq_len;
  BatchSampler sampler(corpus, sc);
  TokenBatch tb = sampler.make_batch();
  model.reserve(batch, seq_len);

  struct Best {
    double fwd = 1e30, bwd = 1e30, step = 1e30;
  };
  float loss = 0.0f;
  auto measure = [&](ThreadPool* pool) {
    model.set_thread_pool(pool);
    Best best;
    for (int it = -3; it < reps; ++it) {
      sampler.train_batch(it + 3, tb);
      const auto t0 = bench::Clock::now();
      loss = model.forward(bindings, tb.inputs.data(), tb.targets.data(), batch, seq_len);
      const auto t1 = bench::Clock::now();
      model.backward(bindings, GradMode::kOverwrite);
      const auto t2 = bench::Clock::now();
      if (it < 0) continue;  // warm-up
      const double f = bench::seconds_between(t0, t1), b = bench::seconds_between(t1, t2);
      best.fwd = std::min(best.fwd, f);
      best.bwd = std::min(best.bwd, b);
      best.step = std::min(best.step, f + b);
    }
    return best;
  };
  // Interleaved rounds (serial, threaded, serial, ...) so both see the same machine load.
  std::optional<ThreadPool> pool;
  if (threads_wanted > 1) pool.emplace(threads_wanted);
  Best serial, threaded;
  for (int round = 0; round < 3; ++round) {
    const Best s1 = measure(nullptr);
    serial.fwd = std::min(serial.fwd, s1.fwd);
    serial.bwd = std::min(serial.bwd, s1.bwd);
    serial.step = std::min(serial.step, s1.step);
    if (!pool) continue;
    const Best t1 = measure(&*pool);
    threaded.fwd = std::min(threaded.fwd, t1.fwd);
    threaded.bwd = std::min(threaded.bwd, t1.bwd);
    threaded.step = std::min(threaded.step, t1.step);
  }
  const Best& top = pool ? threaded : serial;
  const double best_fwd = top.fwd, best_bwd = top.bwd, best_step = top.step;
  // Same-moment SGEMM rate (512³) as the yardstick, on the library and thread count of the model's
  // products (oneDNN, one thread each): on a shared machine the ratio is steadier than either figure.
  const int g = 512;
  std::vector<float> ga(g * g, 0.5f), gb(g * g, 0.25f), gc(g * g);
  const int omp_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const double best_gemm = bench::best_seconds(10, [&] {
    dnnl_sgemm('N', 'N', g, g, g, 1.0f, ga.data(), g, gb.data(), g, 0.0f, gc.data(), g);
  });
  omp_set_num_threads(omp_threads);
  const double gemm_gflops = 2.0 * g * g * g / best_gemm / 1e9;

  const double tokens = double(batch) * seq_len;
  const double flops = 3.0 * model.forward_flops(batch, seq_len);  // fwd + 2x fwd for bwd
  const double approx = 6.0 * double(model.num_params()) * tokens;
  const char* threads = std::getenv("OPENBLAS_NUM_THREADS");
  const bench::Emitter emit(json);
  emit({{"bench", "model_fwd_bwd"}, {"d_model", mc.d_model}, {"n_layer", mc.n_layer}, {"n_head", mc.n_head},
        {"seq_len", seq_len}, {"batch", batch}, {"params", model.num_params()},
        {"openblas_threads", threads ? threads : "default"}, {"forward_seconds", best_fwd},
        {"backward_seconds", best_bwd}, {"step_seconds", best_step}, {"tokens_per_s", tokens / best_step},
        {"exact_gflop", flops / 1e9}, {"exact_gflops_per_s", flops / best_step / 1e9},
        {"approx_6nd_gflops_per_s", approx / best_step / 1e9}, {"sgemm512_gflops_per_s", gemm_gflops},
        {"fraction_of_sgemm", flops / best_step / 1e9 / gemm_gflops}, {"loss", loss},
        {"model_threads", pool ? pool->size() : 1}, {"serial_step_seconds", serial.step},
        {"speedup_vs_serial", serial.step / best_step}},
       fmt::format("d={} L={} H={} T={} B={} params={} threads={}\n"
                   "forward {:.3f} ms, backward {:.3f} ms, step {:.3f} ms (best of {})\n"
                   "{:.0f} tokens/s, {:.2f} GFLOP/s exact ({:.3f} GFLOP/step), {:.2f} GFLOP/s by 6·params·tokens\n"
                   "model threads {}: {:.2f}x the single-threaded step in the same run\n"
                   "SGEMM 512^3 at the same time: {:.2f} GFLOP/s; model step at {:.0f}% of it",
                   mc.d_model, mc.n_layer, mc.n_head, seq_len, batch, model.num_params(),
                   threads ? threads : "default", best_fwd * 1e3, best_bwd * 1e3, best_step * 1e3, reps,
                   tokens / best_step, flops / best_step / 1e9, flops / 1e9, approx / best_step / 1e9,
                   pool ? pool->size() : 1, serial.step / best_step, gemm_gflops,
                   100.0 * flops / best_step / 1e9 / gemm_gflops));
  return 0;
}
