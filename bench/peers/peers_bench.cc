// shardopt against its torch peers on the Llama-style 134M shapes (d 768, 12 layers, ffn 2048,
// vocab 32000: 84 hidden matrices, 134M parameters), one run, one JSON object per line:
//   torch rows (bench/peers/torch_peers.py in the venv, run first in its own process):
//     torch.optim.Muon (bf16 NS), the same step with torch's NS5 in fp32, AdamW(fused=True)
//   shardopt rows: the Muon phase (ParallelMuon over the 84 matrices, 1 process x --threads pool
//     threads, NS in f32 and bf16), AdamW over all parameters at each --adamw-threads, and the
//     read-modify-write stream ceiling (m += g; v += g; w += g: AdamW's bytes, trivial math; the
//     fastest of several ways to write that stream, each reported as an rmw_variant row) at the same
//     threads. AdamW, the RMW variants and torch's fused AdamW run in --adamw-rounds rounds, the
//     shardopt ones interleaved run by run (the machine's bandwidth drifts: ratios of figures taken
//     minutes apart are not worth reading).
//   with --mpi-ranks N: bench/step's step_bench under mpirun (N ranks x 1 thread, ZeRO-2, owner-rank
//     Muon, NS in each of --mpi-ns-dtypes) on the same model (preset llama-125m): its matrix phase
//     (muon_phase, against torch.optim.Muon in 1 process and torch's N-rank Muon phase) and its whole
//     Engine::step (optimizer_step, against torch's N-rank peer of the same NS precision: round-robin
//     Muon owners + ZeroRedundancyOptimizer(AdamW), gloo, 1 thread each).
// Ratios are torch_seconds / shardopt_seconds (> 1: shardopt faster) and rmw_seconds /
// adamw_seconds (fraction of the stream ceiling reached). Every figure is the best of --reps (torch's
// AdamW and each RMW variant: of --reps + 2 in each round, over all rounds; shardopt's AdamW: as many
// runs as all the RMW variants together).
#include <cblas.h>
#include <immintrin.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench/common/bench_util.h"

#include "base/thread_pool.h"
#include "optim/config.h"
#include "optim/elementwise.h"
#include "optim/muon.h"
#include "optim/newton_schulz.h"

namespace so = shardopt::optim;
using shardopt::ThreadPool;

namespace {

shardopt::bench::Emitter emit(false);  // set from --json in main

double best_seconds(int reps, const std::function<void()>& fn) {
  fn();  // warm-up: page faults, primitive and BLAS initialization
  return shardopt::bench::best_seconds(reps, fn);
}

std::vector<float> random_floats(size_t n, unsigned seed, float sd) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

struct Model {
  std::vector<std::pair<int64_t, int64_t>> hidden;  // Muon matrices
  std::vector<int64_t> tensors;                     // every parameter's element count
  int64_t elements = 0;
};

Model llama(int64_t d, int64_t ffn, int layers, int64_t vocab) {
  Model m;
  m.tensors.push_back(vocab * d);  // embedding
  for (int l = 0; l < layers; ++l) {
    for (int k = 0; k < 4; ++k) m.hidden.emplace_back(d, d);
    m.hidden.emplace_back(ffn, d);
    m.hidden.emplace_back(ffn, d);
    m.hidden.emplace_back(d, ffn);
    m.tensors.push_back(d);  // two norms
    m.tensors.push_back(d);
  }
  for (const auto& [r, c] : m.hidden) m.tensors.push_back(r * c);
  m.tensors.push_back(d);          // final norm
  m.tensors.push_back(vocab * d);  // head
  for (int64_t n : m.tensors) m.elements += n;
  return m;
}

// Runs a command printing JSON lines; returns the rows (those with "error" reported and dropped).
std::vector<nlohmann::json> json_rows_of(const std::string& cmd, const std::string& what) {
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    fmt::print(stderr, "peers_bench: cannot run {}: {} rows skipped\n", cmd, what);
    return {};
  }
  std::vector<nlohmann::json> rows;
  char line[4096];
  while (std::fgets(line, sizeof line, pipe)) {
    if (line[0] != '{') continue;
    nlohmann::json row = nlohmann::json::parse(line, nullptr, false);
    if (row.is_discarded()) continue;
    if (row.contains("error")) {
      fmt::print(stderr, "peers_bench: {}: {} rows skipped\n", row["error"].get<std::string>(), what);
      continue;
    }
    rows.push_back(row);
  }
  if (pclose(pipe) != 0) fmt::print(stderr, "peers_bench: {} failed\n", cmd);
  return rows;
}

// Runs the torch peers; returns their rows (empty with a message when torch is not there).
std::vector<nlohmann::json> torch_rows(const std::string& python, const std::string& script, const Model& m,
                                       int64_t d, int64_t ffn, int layers, int muon_threads,
                                       const std::string& adamw_threads, int reps, int dist_ranks,
                                       const std::string& dist_dtypes, bool skip_muon) {
  if (!std::filesystem::exists(python)) {
    fmt::print(stderr, "peers_bench: {} not found: torch rows skipped (set SHARDOPT_VENV or --python)\n", python);
    return {};
  }
  const std::string cmd = fmt::format("'{}' '{}' --d-model {} --ffn {} --layers {} --elements {} --muon-threads {} "
                                      "--adamw-threads {} --reps {} --dist-ranks {} --dist-dtypes {}{}",
                                      python, script, d, ffn, layers, m.elements, muon_threads, adamw_threads, reps,
                                      dist_ranks, dist_dtypes, skip_muon ? " --skip-muon" : "");
  return json_rows_of(cmd, "torch");
}

// The read-modify-write stream ceiling: m += g; v += g; w += g over the elements, AdamW's bytes (read
// 4 arrays, write 3) with no math. Several ways to write that stream are measured on the same arrays
// in the same run and the fastest is the ceiling, so that it is the best in-place stream found on
// this CPU rather than one particular loop:
//   loop             the compiler-vectorized loop, 32768-element chunks on the pool
//   prefetch_<d>     AVX-512 loads/stores, one 64-byte line of each array per iteration, each array
//                    prefetched d elements ahead (the hardware prefetchers stop at 4 KiB pages), on
//                    the pool's 32768-element chunks
//   prefetch_<d>_split  the same on one contiguous range per thread (how ATen's parallel_for splits)
// Non-temporal stores were tried and left out: in place, each line is read first anyway, and the
// streaming store only evicted it (about 0.75x the plain AVX-512 loop here).
struct RmwVariant {
  std::string name;
  size_t prefetch_elements = 0;  // 0: the plain compiler-vectorized loop
  bool split = false;            // one contiguous range per thread instead of chunks
};

template <int kDummy>
inline __attribute__((always_inline)) void rmw_loop(const float* __restrict g, float* __restrict m,
                                                    float* __restrict v, float* __restrict w, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    m[i] += g[i];
    v[i] += g[i];
    w[i] += g[i];
  }
}
__attribute__((flatten, target("avx512f,avx512bw,avx512vl,avx512dq,fma,prefer-vector-width=512"))) void rmw_avx512(
    const float* g, float* m, float* v, float* w, size_t n) {
  rmw_loop<0>(g, m, v, w, n);
}
__attribute__((flatten)) void rmw_portable(const float* g, float* m, float* v, float* w, size_t n) {
  rmw_loop<0>(g, m, v, w, n);
}

inline const void* elements_ahead(const float* p, size_t i) {  // may lie past the array: integer arithmetic
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + i * sizeof(float));
}
__attribute__((target("avx512f"))) void rmw_avx512_prefetch(const float* g, float* m, float* v, float* w, size_t n,
                                                            size_t ahead) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(elements_ahead(g, i + ahead), _MM_HINT_T0);
    _mm_prefetch(elements_ahead(m, i + ahead), _MM_HINT_T0);
    _mm_prefetch(elements_ahead(v, i + ahead), _MM_HINT_T0);
    _mm_prefetch(elements_ahead(w, i + ahead), _MM_HINT_T0);
    const __m512 gi = _mm512_loadu_ps(g + i);
    _mm512_storeu_ps(m + i, _mm512_add_ps(_mm512_loadu_ps(m + i), gi));
    _mm512_storeu_ps(v + i, _mm512_add_ps(_mm512_loadu_ps(v + i), gi));
    _mm512_storeu_ps(w + i, _mm512_add_ps(_mm512_loadu_ps(w + i), gi));
  }
  rmw_portable(g + i, m + i, v + i, w + i, n - i);
}

bool cpu_has_avx512() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("fma");
  return avx512;
}

// The variants this CPU can run (the prefetching ones need AVX-512).
std::vector<RmwVariant> rmw_variants() {
  std::vector<RmwVariant> variants = {{"loop", 0, false}};
  if (!cpu_has_avx512()) return variants;
  for (size_t d : {256, 512, 1024, 2048}) variants.push_back({fmt::format("prefetch_{}", d), d, false});
  variants.push_back({"prefetch_512_split", 512, true});
  return variants;
}

void rmw_stream(const RmwVariant& variant, ThreadPool* pool, const float* g, float* m, float* v, float* w,
                size_t n) {
  auto run = [&](size_t b, size_t e) {
    if (variant.prefetch_elements > 0) rmw_avx512_prefetch(g + b, m + b, v + b, w + b, e - b, variant.prefetch_elements);
    else if (cpu_has_avx512()) rmw_avx512(g + b, m + b, v + b, w + b, e - b);
    else rmw_portable(g + b, m + b, v + b, w + b, e - b);
  };
  if (pool == nullptr || pool->size() == 1) {
    run(0, n);
    return;
  }
  if (variant.split) {
    const auto threads = static_cast<size_t>(pool->size());
    const size_t per_thread = (n + threads - 1) / threads / 16 * 16 + 16;  // whole lines
    pool->parallel_for(pool->size(), [&](int64_t t, int) {
      const size_t b = std::min(n, static_cast<size_t>(t) * per_thread);
      run(b, std::min(n, b + per_thread));
    });
    return;
  }
  constexpr size_t kChunk = size_t{1} << 15;  // as the element-wise kernels
  pool->parallel_for(static_cast<int64_t>((n + kChunk - 1) / kChunk), [&](int64_t c, int) {
    const size_t b = static_cast<size_t>(c) * kChunk;
    run(b, std::min(n, b + kChunk));
  });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt vs torch optimizer peers on Llama-style shapes"};
  int64_t d = 768, ffn = 2048, vocab = 32000;
  int layers = 12, threads = 2, reps = 2, mpi_ranks = 0, adamw_rounds = 2;
  std::string adamw_threads_list = "1,2", mpi_ns_dtypes = "bf16,f32";
  const char* venv = std::getenv("SHARDOPT_VENV");
  const char* home = std::getenv("HOME");
  std::string python = venv ? std::string(venv) + "/bin/python"
                            : std::string(home ? home : "") + "/.cache/shardopt/venv/bin/python";
  std::string script = SHARDOPT_TORCH_PEERS_SCRIPT;
  bool no_peers = false, no_muon = false;
  bool json = false;
  shardopt::bench::add_json_flag(app, json);
  app.add_option("--d-model", d)->capture_default_str();
  app.add_option("--ffn", ffn)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  app.add_option("--layers", layers, "transformer layers (7 hidden matrices each)")->capture_default_str();
  app.add_option("--threads", threads, "pool threads of the Muon phase (and torch's threads for its Muon)")
      ->capture_default_str();
  app.add_option("--adamw-threads", adamw_threads_list, "thread counts for AdamW and the RMW ceiling")
      ->capture_default_str();
  app.add_option("--reps", reps, "timed repetitions per figure (best reported)")->capture_default_str();
  app.add_option("--adamw-rounds", adamw_rounds,
                 "rounds of torch AdamW, then shardopt AdamW and the RMW variants (best of all rounds)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--python", python, "python with torch (default: $SHARDOPT_VENV/bin/python)")->capture_default_str();
  app.add_flag("--no-peers", no_peers, "shardopt rows only");
  app.add_flag("--no-muon", no_muon, "AdamW and RMW rows only");
  app.add_option("--mpi-ranks", mpi_ranks,
                 "also N ranks x 1 thread under mpirun (step_bench) and torch's N-rank gloo peer (0: none)")
      ->capture_default_str();
  app.add_option("--mpi-ns-dtypes", mpi_ns_dtypes, "NS precisions of the N-rank rows, each against torch's of the same")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  emit = shardopt::bench::Emitter(json);

  std::vector<int> adamw_threads;
  for (size_t pos = 0; pos < adamw_threads_list.size();) {
    const size_t comma = adamw_threads_list.find(',', pos);
    adamw_threads.push_back(std::stoi(adamw_threads_list.substr(pos, comma - pos)));
    pos = comma == std::string::npos ? adamw_threads_list.size() : comma + 1;
  }

  const Model model = llama(d, ffn, layers, vocab);
  // "torch_muon", "torch_muon_f32", "torch_adamw_fused/<threads>", "torch_{muon,step}_dist/<dtype>"
  std::map<std::string, double> peer;
  std::map<int, nlohmann::json> torch_adamw_rows;  // threads -> torch_adamw_fused row (best seconds so far)
  if (!no_peers) {
    for (nlohmann::json row : torch_rows(python, script, model, d, ffn, layers, threads, adamw_threads_list, reps,
                                         no_muon ? 0 : mpi_ranks, mpi_ns_dtypes, no_muon)) {
      const std::string name = row["peer"];
      const double s = row["seconds"];
      std::string key = name;
      if (name == "torch_adamw_fused") key += "/" + std::to_string(row["threads"].get<int>());
      if (row["ranks"].get<int>() > 1) key += "/" + row["dtype"].get<std::string>();
      row["impl"] = "torch";
      if (name == "torch_adamw_fused") {  // emitted after the AdamW rounds, with the best of them
        torch_adamw_rows[row["threads"].get<int>()] = row;
      } else {
        peer[key] = s;
        emit(row);
      }
    }
  }

  if (!no_muon) {
    const size_t n = model.hidden.size();
    std::vector<std::vector<float>> w(n), g(n), mom(n);
    std::vector<so::MuonMatrix> mats(n);
    std::vector<const so::MuonMatrix*> ptrs(n);
    for (size_t i = 0; i < n; ++i) {
      const auto [r, c] = model.hidden[i];
      const size_t count = static_cast<size_t>(r * c);
      w[i] = random_floats(count, static_cast<unsigned>(3 * i + 1), 0.02f);
      g[i] = random_floats(count, static_cast<unsigned>(3 * i + 2), 1.0f);
      mom[i].assign(count, 0.0f);
      mats[i].master = w[i].data();
      mats[i].grad = g[i].data();
      mats[i].momentum = mom[i].data();
      mats[i].rows = r;
      mats[i].cols = c;
      ptrs[i] = &mats[i];
    }
    ThreadPool pool(threads);
    // bf16 runs with both GEMM kernels (optim/newton_schulz.h: the same numerics); the default is
    // what SHARDOPT_NS_BF16_GEMM=auto picks on this CPU, and the row the targets read.
    const so::Bf16GemmKernel default_kernel = so::default_bf16_gemm_kernel();
    const so::Bf16GemmKernel other_kernel =
        default_kernel == so::Bf16GemmKernel::kNative ? so::Bf16GemmKernel::kF32Units : so::Bf16GemmKernel::kNative;
    const char* saved_choice = std::getenv("SHARDOPT_NS_BF16_GEMM");
    const std::string saved = saved_choice ? saved_choice : "";
    struct Variant {
      shardopt::proto::NsDtype dtype;
      so::Bf16GemmKernel kernel;
    };
    for (const Variant v : {Variant{shardopt::proto::NS_DTYPE_F32, default_kernel},
                            Variant{shardopt::proto::NS_DTYPE_BF16, default_kernel},
                            Variant{shardopt::proto::NS_DTYPE_BF16, other_kernel}}) {
      shardopt::proto::OptimizerConfig config;
      config.set_kind(shardopt::proto::OPTIMIZER_MUON);
      config.set_ns_dtype(v.dtype);
      const so::OptimizerParams params = so::resolve_optimizer_config(config);
      const bool bf16 = v.dtype == shardopt::proto::NS_DTYPE_BF16;
      // ParallelMuon's workspaces take the kernel from the environment when they are built.
      setenv("SHARDOPT_NS_BF16_GEMM", v.kernel == so::Bf16GemmKernel::kNative ? "native" : "f32", 1);
      so::ParallelMuon parallel(&pool, model.hidden, {}, params.ns.precision);
      if (saved_choice) setenv("SHARDOPT_NS_BF16_GEMM", saved.c_str(), 1);
      else unsetenv("SHARDOPT_NS_BF16_GEMM");
      const double s = best_seconds(reps, [&] { parallel.step(params, ptrs, 1e-3f); });
      nlohmann::json row = {{"impl", "shardopt"},       {"kernel", "muon_phase"}, {"ranks", 1},
                            {"threads", threads},       {"dtype", bf16 ? "bf16" : "f32"},
                            {"grad_dtype", "f32"},      {"matrices", n},          {"seconds", s}};
      if (bf16) {
        row["bf16_gemm"] = so::to_string(v.kernel);
        row["bf16_gemm_is_default"] = v.kernel == default_kernel;
      }
      if (peer.count("torch_muon")) row["ratio_vs_torch_muon"] = peer["torch_muon"] / s;
      if (peer.count("torch_muon_f32")) row["ratio_vs_torch_muon_f32"] = peer["torch_muon_f32"] / s;
      emit(row);
    }
  }

  if (!no_muon && mpi_ranks > 0) {
    // One thread per rank: OpenBLAS and oneDNN's OpenMP both default to every core otherwise.
    // step_bench builds the llama-125m preset's tensors: the same model only at these sizes.
    if (d != 768 || ffn != 2048 || vocab != 32000) {
      fmt::print(stderr, "peers_bench: --mpi-ranks needs --d-model 768 --ffn 2048 --vocab 32000 (llama-125m)\n");
      return 2;
    }
    for (size_t pos = 0; pos < mpi_ns_dtypes.size();) {
      const size_t comma = std::min(mpi_ns_dtypes.find(',', pos), mpi_ns_dtypes.size());
      const std::string dtype = mpi_ns_dtypes.substr(pos, comma - pos);
      pos = comma + 1;
      const std::string cmd = fmt::format(
          "mpirun --oversubscribe --mca btl self,vader --bind-to none -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS=1 -np {} '{}' --json "
          "--shapes llama-125m --layers {} --stages 2 --layouts owned --ns-dtype {} --no-baselines --steps {}",
          mpi_ranks, SHARDOPT_STEP_BENCH, layers, dtype, reps + 1);
      for (const nlohmann::json& step : json_rows_of(cmd, "mpirun")) {
        if (step.value("mode", "") != "step") continue;
        const double matrix = step["matrix_seconds"], whole = step["step_seconds"];
        nlohmann::json common = {{"impl", "shardopt"}, {"ranks", mpi_ranks}, {"threads", 1}, {"dtype", dtype},
                                 {"grad_dtype", "f32"}, {"matrices", step["muon_matrices"]}};
        if (step.contains("bf16_gemm")) common["bf16_gemm"] = step["bf16_gemm"];
        const std::string dist = "/" + dtype;  // torch's N-rank peers of the same NS precision
        nlohmann::json muon = common;
        muon["kernel"] = "muon_phase";
        muon["seconds"] = matrix;
        if (peer.count("torch_muon")) muon["ratio_vs_torch_muon"] = peer["torch_muon"] / matrix;
        if (dtype == "f32" && peer.count("torch_muon_f32")) muon["ratio_vs_torch_muon_f32"] = peer["torch_muon_f32"] / matrix;
        if (peer.count("torch_muon_dist" + dist)) muon["ratio_vs_torch_muon_dist"] = peer["torch_muon_dist" + dist] / matrix;
        emit(muon);
        nlohmann::json row = common;
        row["kernel"] = "optimizer_step";
        row["elements"] = step["total_params"];
        row["seconds"] = whole;
        row["reduce_wait_seconds"] = step["reduce_wait_seconds"];
        row["elementwise_seconds"] = step["elementwise_seconds"];
        row["gather_seconds"] = step["gather_seconds"];
        if (peer.count("torch_step_dist" + dist)) row["ratio_vs_torch_step_dist"] = peer["torch_step_dist" + dist] / whole;
        emit(row);
      }
    }
  }

  // AdamW over every parameter (one slice per tensor) and the RMW ceiling, at each thread count.
  const size_t total = static_cast<size_t>(model.elements);
  std::vector<float> master = random_floats(total, 11, 0.02f), grad = random_floats(total, 12, 1e-3f);
  std::vector<float> m(total, 0.0f), v(total, 0.0f);
  std::vector<so::ElementwiseSlice> slices;
  size_t offset = 0;
  for (int64_t count : model.tensors) {
    so::ElementwiseSlice s;
    s.master = master.data() + offset;
    s.grad = grad.data() + offset;
    s.state[0] = m.data() + offset;
    s.state[1] = v.data() + offset;
    s.count = static_cast<size_t>(count);
    slices.push_back(s);
    offset += s.count;
  }
  shardopt::proto::OptimizerConfig adamw;
  adamw.set_kind(shardopt::proto::OPTIMIZER_ADAMW);
  const so::OptimizerParams adamw_params = so::resolve_optimizer_config(adamw);
  const double bytes = 28.0 * static_cast<double>(total);  // read g, m, v, w; write m, v, w
  // --adamw-rounds rounds, each: torch's fused AdamW (round 1: its rows from the torch run above; later
  // rounds: the script again, AdamW only), then at each thread count shardopt's AdamW and every RMW
  // variant, interleaved repetition by repetition so that all of them see the same machine. Each figure
  // is the best over all rounds and repetitions; the ratios compare those bests.
  const std::vector<RmwVariant> variants = rmw_variants();
  std::map<int, double> adamw_best;               // threads -> seconds
  std::map<int, std::vector<double>> rmw_best;    // threads -> seconds per variant
  for (int round = 0; round < adamw_rounds; ++round) {
    if (round > 0 && !no_peers) {
      for (const nlohmann::json& row : torch_rows(python, script, model, d, ffn, layers, threads, adamw_threads_list,
                                                  reps, 0, mpi_ns_dtypes, true)) {
        if (row["peer"] != "torch_adamw_fused") continue;
        nlohmann::json& kept = torch_adamw_rows[row["threads"].get<int>()];
        if (kept.is_null() || row["seconds"].get<double>() < kept["seconds"].get<double>()) kept = row;
      }
    }
    for (int t : adamw_threads) {
      std::unique_ptr<ThreadPool> pool = t > 1 ? std::make_unique<ThreadPool>(t) : nullptr;
      int64_t step = 1;
      auto adamw_step = [&] {
        so::elementwise_step(adamw_params, slices, 1e-4f, step++, so::FiniteCheck::kNone, so::KernelOptions{pool.get()});
      };
      auto rmw = [&](const RmwVariant& variant) {
        rmw_stream(variant, pool.get(), grad.data(), m.data(), v.data(), master.data(), total);
      };
      if (round == 0) {  // warm-up: page faults, the pool's threads
        adamw_step();
        for (const RmwVariant& variant : variants) rmw(variant);
      }
      double& adamw_s = adamw_best.try_emplace(t, 1e30).first->second;
      std::vector<double>& rmw_s = rmw_best.try_emplace(t, variants.size(), 1e30).first->second;
      // AdamW runs before every variant: the ceiling is the best of all the variants' runs together,
      // and AdamW gets as many runs (and chances at a quiet moment) as they have.
      for (int rep = 0; rep < reps + 2; ++rep) {
        for (size_t k = 0; k < variants.size(); ++k) {
          adamw_s = std::min(adamw_s, shardopt::bench::best_seconds(1, adamw_step));
          rmw_s[k] = std::min(rmw_s[k], shardopt::bench::best_seconds(1, [&] { rmw(variants[k]); }));
        }
      }
    }
  }

  for (auto& [t, row] : torch_adamw_rows) {
    row["rounds"] = adamw_rounds;
    peer["torch_adamw_fused/" + std::to_string(t)] = row["seconds"];
    emit(row);
  }
  for (int t : adamw_threads) {
    // The ceiling: the fastest RMW variant.
    const std::vector<double>& rmw_s = rmw_best[t];
    const size_t fastest = static_cast<size_t>(std::min_element(rmw_s.begin(), rmw_s.end()) - rmw_s.begin());
    for (size_t k = 0; k < variants.size(); ++k) {
      emit({{"impl", "shardopt"}, {"kernel", "rmw_variant"}, {"variant", variants[k].name}, {"ranks", 1},
            {"threads", t}, {"grad_dtype", "f32"}, {"elements", total}, {"seconds", rmw_s[k]},
            {"gbytes_per_s", bytes / rmw_s[k] / 1e9}});
    }
    const double rmw = rmw_s[fastest], s = adamw_best[t];
    emit({{"impl", "shardopt"}, {"kernel", "rmw_ceiling"}, {"variant", variants[fastest].name}, {"ranks", 1},
          {"threads", t}, {"grad_dtype", "f32"}, {"elements", total}, {"seconds", rmw},
          {"rmw_gbytes_per_s", bytes / rmw / 1e9}});
    nlohmann::json row = {{"impl", "shardopt"},     {"kernel", "adamw"},     {"ranks", 1},
                          {"threads", t},           {"grad_dtype", "f32"},   {"elements", total},
                          {"seconds", s},           {"gbytes_per_s", bytes / s / 1e9},
                          {"rmw_gbytes_per_s", bytes / rmw / 1e9}, {"ratio_vs_rmw", rmw / s},
                          {"rounds", adamw_rounds}};
    const std::string key = "torch_adamw_fused/" + std::to_string(t);
    if (peer.count(key)) row["ratio_vs_torch_fused_adamw"] = peer[key] / s;
    emit(row);
  }
  return 0;
}
