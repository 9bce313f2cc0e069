// shardopt: the command-line program. Subcommands: train, compare, plan, simulate, env, bench, ckpt inspect.
// Normal output (progress lines, reports, tables, --help) goes to stdout; diagnostics go through
// base/log.h to stderr.
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <omp.h>
#include <nlohmann/json.hpp>

#include "base/clock.h"
#include "base/env.h"
#include "base/error.h"
#include "base/log.h"
#include "base/thread_pool.h"
#include "checkpoint/inspect.h"
#include "comm/mpi_backend.h"
#include "comm/thread_backend.h"
#include "runtime/step_backend.h"
#include "sharding/layout.h"
#include "optim/config.h"
#include "optim/quant8.h"
#include "sharding/plan_util.h"
#include "sharding/planner.h"
#include "sharding/presets.h"
#include "train/compare.h"
#include "train/outputs.h"
#include "train/trainer.h"

namespace {

// oneDNN's products in Muon's Newton-Schulz run with the calling thread's OpenMP
// thread count, which defaults to every CPU: the ranks sharing this process's cores each get their
// share instead, unless OMP_NUM_THREADS says otherwise.
void set_onednn_threads(int ranks_in_process) {
  if (!shardopt::env::get_string("OMP_NUM_THREADS").empty()) return;
  omp_set_num_threads(std::max(1, shardopt::default_thread_count() / ranks_in_process));
}

using namespace shardopt;

// A launcher sets these in every process it starts: OpenMPI's mpirun OMPI_COMM_WORLD_SIZE, PMI
// launchers PMI_SIZE, a PMIx launcher (srun --mpi=pmix) only PMIX_RANK before MPI_Init.
bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

struct TrainArgs {
  train::TrainConfig config;
  int ranks = 4;
  std::string backend = "auto";
  std::string device = "cpu";
  std::string data;  // empty: default_data_path()
  std::string out = "runs/latest";
  std::string layout = "owned";
  std::string sync = "zero";
  std::string resume;       // --resume [DIR]
  std::string config_file;  // --config FILE (JSON; keys = flag names without "--")
  CLI::Option* resume_option = nullptr;  // counts a bare --resume too
};

void add_train_options(CLI::App& cmd, TrainArgs& a) {
  auto& c = a.config;
  cmd.add_option("--config", a.config_file,
                 "JSON file of options (keys = flag names without --, e.g. {\"steps\": 300}); flags override it")
      ->check(CLI::ExistingFile);
  cmd.add_option("--data", a.data,
                 "text file to train on (byte-level; default: tinyshakespeare.txt from the install's share/shardopt "
                 "or the source tree)");
  cmd.add_option("--out", a.out, "output folder (loss.csv, loss.png, trace.json, sample.txt, summary.json)")
      ->capture_default_str();
  cmd.add_option("--ranks", a.ranks, "ranks on the threads backend (ignored under mpirun)")->capture_default_str();
  cmd.add_option("--backend", a.backend, "auto (mpi when launched by mpirun, else threads) | threads | mpi")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "threads", "mpi"}));
  cmd.add_option("--device", a.device,
                 "cpu | cuda. The reference model trains on the CPU only; cuda explains the GPU path and exits")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd.add_option("--d-model", c.model.d_model, "model width")->capture_default_str();
  cmd.add_option("--layers", c.model.n_layer, "transformer layers")->capture_default_str();
  cmd.add_option("--heads", c.model.n_head, "attention heads")->capture_default_str();
  cmd.add_option("--context", c.model.context, "sequence length")->capture_default_str();
  cmd.add_option("--batch", c.global_batch, "global batch (sequences per step over all ranks)")->capture_default_str();
  cmd.add_option("--steps", c.steps, "optimizer steps")->capture_default_str();
  cmd.add_option("--grad-accum", c.grad_accumulation, "micro-batches per step")->capture_default_str();
  cmd.add_option("--model-threads", c.model_threads,
                 "threads of each rank's model forward/backward (0 = CPUs / local ranks)")
      ->capture_default_str();
  cmd.add_flag("--local-grad-accum", c.local_grad_accumulation,
               "stages 2-3: accumulate micro-batches in full-size gradient buffers (one reduction per step, "
               "more memory) instead of in the ZeRO-2 gradient shard");
  cmd.add_option("--optimizer", c.optimizer, "muon | normuon (hidden matrices; AdamW elsewhere) | adamw | lion")
      ->capture_default_str()
      ->check(CLI::IsMember({"muon", "normuon", "adamw", "lion"}));
  cmd.add_option("--state-dtype", c.state_dtype,
                 "optimizer moment storage f32 | bf16 | q8 (8-bit block-wise); the fp32 master stays fp32")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));
  cmd.add_option("--matrix-state-dtype", c.matrix_state_dtype,
                 "Muon/NorMuon momentum storage f32 | bf16 | q8 (default: --state-dtype)")
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));
  cmd.add_option("--matrix-lr", c.matrix_lr, "Muon/NorMuon learning rate")->capture_default_str();
  cmd.add_option("--lr", c.elementwise_lr, "element-wise (AdamW/Lion) learning rate")->capture_default_str();
  cmd.add_option("--weight-decay", c.weight_decay, "weight decay, both groups")->capture_default_str();
  cmd.add_option("--warmup", c.warmup_steps, "linear warmup steps (then cosine decay)")->capture_default_str();
  cmd.add_option("--min-lr-ratio", c.min_lr_ratio, "final lr / peak lr of the cosine")->capture_default_str();
  cmd.add_option("--clip", c.max_grad_norm, "global gradient-norm clip (0 = off)")->capture_default_str();
  cmd.add_option("--stage", c.zero_stage, "ZeRO stage 1|2|3")->capture_default_str();
  cmd.add_option("--threads", c.threads,
                 "compute threads per rank for the optimizer step (0 = CPUs / ranks on this host, or "
                 "SHARDOPT_NUM_THREADS); matrices then run concurrently with one BLAS thread each")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--layout", a.layout, sharding::layout_names())->capture_default_str();
  cmd.add_option("--bucket-bytes", c.bucket_bytes, "gradient bucket size in bytes")->capture_default_str();
  cmd.add_option("--sync", a.sync, "sync mode: zero | noloco | diloco (the last two with --replicas)")
      ->capture_default_str();
  cmd.add_option("--replicas", c.replicas, "replicas R (noloco/diloco): world = R x shard group")
      ->capture_default_str();
  cmd.add_option("--outer-every", c.outer_every, "inner steps H per outer step")->capture_default_str();
  cmd.add_option("--outer-lr", c.outer_lr, "outer lr: NoLoCo alpha (default 0.7) / DiLoCo lr (default 0.7)");
  cmd.add_option("--outer-momentum", c.outer_momentum,
                 "outer momentum: NoLoCo beta (default 0.5) / DiLoCo Nesterov momentum (default 0.9)");
  cmd.add_option("--outer-gamma", c.outer_gamma, "NoLoCo gamma (pull toward the group's slow weights; default alpha)");
  cmd.add_option("--gossip-group", c.gossip_group, "NoLoCo group size n")->capture_default_str();
  cmd.add_option("--outer-timeout-ms", c.outer_timeout_ms,
                 "longest wait for a gossip partner (NoLoCo skips the round) or for DiLoCo's all-reduce (the run ends)")
      ->capture_default_str();
  cmd.add_option("--save-every", c.save_every, "steps between checkpoints (0 = never; needs --ckpt-dir)")
      ->capture_default_str();
  cmd.add_option("--ckpt-dir", c.ckpt_dir, "root folder of the ckpt-<step> checkpoints");
  cmd.add_option("--keep-last", c.keep_last, "checkpoints kept under --ckpt-dir (0 = all)")->capture_default_str();
  a.resume_option = cmd.add_option("--resume", a.resume,
                 "resume from a checkpoint folder, or the latest under a root (no value: latest under --ckpt-dir)")
      ->expected(0, 1);
  cmd.add_option("--seed", c.seed, "seed of init and data order")->capture_default_str();
  cmd.add_option("--eval-every", c.eval_every, "steps between validation evaluations")->capture_default_str();
  cmd.add_option("--eval-batches", c.eval_batches, "validation batches per evaluation")->capture_default_str();
  cmd.add_option("--log-every", c.log_every, "steps between progress lines (0 = quiet)")->capture_default_str();
  cmd.add_option("--trace-steps", c.trace_steps, "last steps in the Chrome trace")->capture_default_str();
  cmd.add_option("--sample-chars,--sample-tokens", c.sample_chars, "bytes of generated text at the end (0 = none)")
      ->capture_default_str();
  cmd.add_option("--sample-temperature", c.sample_temperature, "sampling temperature (<= 0: greedy)")
      ->capture_default_str();
  cmd.add_option("--sample-top-k", c.sample_top_k, "sample among the k most likely bytes (0 = all)")
      ->capture_default_str();
  cmd.add_option("--qk-clip-tau", c.qk_clip_tau,
                 "MuonClip: clip W_q/W_k heads whose max attention logit exceeds tau (0 = off; muon/normuon)")
      ->capture_default_str();
}

// Options a configuration file may not set: where the file itself comes from, and one-shot actions.
bool is_config_key(const CLI::Option* o) {
  const auto& names = o->get_lnames();
  if (names.empty()) return false;
  return names[0] != "help" && names[0] != "config" && names[0] != "resume";
}

// The long name of an option ("sample-chars" for "--sample-chars,--sample-tokens").
std::string key_of(const CLI::Option* o) { return o->get_lnames()[0]; }

// A JSON value as the command line would spell it.
std::string as_flag_value(const nlohmann::json& v, const std::string& key, const std::string& file) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number()) return v.dump();
  throw ConfigError("--config " + file + ": key '" + key + "' must be a string, number or boolean, got " + v.dump());
}

// Applies the JSON file's keys to the options not given on the command line (flags override the file).
// Unknown keys are errors naming the key.
void apply_config_file(CLI::App& cmd, const std::string& file) {
  std::ifstream in(file);
  if (!in) throw ConfigError("--config: cannot read '" + file + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("--config " + file + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw ConfigError("--config " + file + ": expected a JSON object of option: value");
  for (const auto& [key, value] : j.items()) {
    CLI::Option* o = cmd.get_option_no_throw("--" + key);
    if (o == nullptr || !is_config_key(o) || key_of(o) != key)
      throw ConfigError("--config " + file + ": unknown key '" + key + "' (keys are the long flag names of " +
                        "`shardopt train --help` without the leading --)");
    if (o->count() > 0) continue;  // the command line wins
    o->add_result(as_flag_value(value, key, file));
    o->run_callback();
  }
}

// The resolved options, keyed like the flags: what --config reads back to repeat the run.
nlohmann::json resolved_config(const CLI::App& cmd) {
  nlohmann::json j = nlohmann::json::object();
  for (const CLI::Option* o : cmd.get_options()) {
    if (!is_config_key(o)) continue;
    std::string text = o->count() > 0 ? o->as<std::string>() : o->get_default_str();
    if (text.empty()) continue;  // unset and without a default (e.g. --ckpt-dir)
    nlohmann::json value = text;
    try {
      auto parsed = nlohmann::json::parse(text);
      if (parsed.is_number() || parsed.is_boolean()) value = parsed;
    } catch (const nlohmann::json::exception&) {
    }
    j[key_of(o)] = value;
  }
  return j;
}

// Where tinyshakespeare.txt is when --data is not given: next to an installed binary
// (<prefix>/bin/shardopt -> <prefix>/share/shardopt/), then the source tree this binary was built from.
std::string default_data_path() {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) candidates.push_back(exe.parent_path().parent_path() / "share" / "shardopt" / "tinyshakespeare.txt");
  candidates.push_back(fs::path(SHARDOPT_SOURCE_DATA_DIR) / "tinyshakespeare.txt");
  for (const auto& p : candidates)
    if (fs::exists(p)) return p.string();
  std::string tried;
  for (const auto& p : candidates) tried += "\n  " + p.string();
  throw ConfigError("train: no --data given and the default corpus was not found; looked in:" + tried);
}

// `train --device cuda`: the reference model's forward/backward is CPU code (model/), so it cannot
// train on a GPU. Says whether this build and machine have the Engine's CUDA memory space (the
// typed error of the first thing missing: the backend, then the device) and where the GPU path is.
[[noreturn]] void require_reference_model_device_cuda() {
  (void)runtime::make_step_backend(runtime::MemorySpace::kCuda);  // ConfigError / DeviceError when missing
  throw ConfigError(
      "train --device cuda: the reference model's forward/backward runs on the CPU only. The GPU path is the "
      "Engine's CUDA memory space (EngineOptions::memory_space = cuda, with an NCCL communicator) under a "
      "trainer whose model runs on the GPU; see README, 'GPU'");
}

// `shardopt simulate`: the SimGrid simulation of the step (docs/simulation.md). The simulation program
// is a separate build (compiler smpicxx) run by smpirun; this subcommand finds scripts/simulate and that
// build and hands over to the script, which assembles the smpirun command line.
struct SimulateArgs {
  std::string platform, preset = "llama-1b", layout = "owned", sync = "zero", bucket_mib = "auto", slow_host,
                        slow_link, sim_build;
  int ranks = 0, layers = 0, stage = 2, replicas = 2, steps = 1;
  int64_t tokens_per_rank = 0, seq_len = 0;
  bool json = false, timing = false;
  std::vector<std::string> cfg;
};

void add_simulate_options(CLI::App& cmd, SimulateArgs& a) {
  cmd.add_option("--platform", a.platform, "SimGrid platform file (sim/platforms/ has examples)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd.add_option("--ranks", a.ranks, "simulated ranks (one per platform host, in file order)")
      ->required()
      ->check(CLI::PositiveNumber);
  cmd.add_option("--preset", a.preset, "model preset (llama-125m, llama-1b, tiny)")->capture_default_str();
  cmd.add_option("--layers", a.layers, "keep only the first K transformer layers (0 = all)")->capture_default_str();
  cmd.add_option("--stage", a.stage, "ZeRO stage 1|2|3")->capture_default_str()->check(CLI::Range(1, 3));
  cmd.add_option("--layout", a.layout, "owned | dim0")->capture_default_str()->check(CLI::IsMember({"owned", "dim0"}));
  cmd.add_option("--sync", a.sync, "zero | diloco | noloco")
      ->capture_default_str()
      ->check(CLI::IsMember({"zero", "diloco", "noloco"}));
  cmd.add_option("--replicas", a.replicas, "replicas for diloco/noloco (must divide --ranks)")->capture_default_str();
  cmd.add_option("--bucket-mib", a.bucket_mib, "bucket size in MiB, or auto: max(40M, 1M x ranks) fp32 elements")
      ->capture_default_str();
  cmd.add_option("--steps", a.steps, "steps to simulate (the last is reported)")->capture_default_str();
  cmd.add_option("--tokens-per-rank", a.tokens_per_rank,
                 "tokens per rank per step: > 0 predicts a training step (forward 2·P·T and backward 4·P·T FLOPs at the "
                 "host's shardopt_flops_per_model_flop, each bucket's reduce-scatter overlapped with the rest of the "
                 "backward); 0 = the optimizer step only")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--seq-len", a.seq_len, "sequence length for the attention FLOPs of a training step (0 = left out)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd.add_option("--slow-host", a.slow_host, "HOST:FACTOR: that platform host computes at FACTOR x its speed");
  cmd.add_option("--slow-link", a.slow_link, "HOST:FACTOR: that host's own links run at FACTOR x their bandwidth");
  cmd.add_flag("--json", a.json,
               "one JSON object (predicted_step_seconds, predicted_<phase>_seconds, bytes; with --tokens-per-rank "
               "predicted_train_step_seconds, _forward_, _backward_, _exposed_reduce_scatter_)");
  cmd.add_flag("--timing", a.timing, "report the simulation's own wall time and peak memory (stderr)");
  cmd.add_option("--sim-build", a.sim_build, "SimGrid build holding bin/step_sim (default: $SHARDOPT_SIM_BUILD_DIR, "
                                             "this build's sim-build, <source>/build-sim)");
  cmd.add_option("--cfg", a.cfg, "extra SimGrid setting NAME:VALUE (repeatable)");
}

int run_simulate(const SimulateArgs& a, const char* argv0) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) exe = fs::weakly_canonical(fs::path(argv0));
  const fs::path bin_dir = exe.parent_path(), prefix = bin_dir.parent_path();
  const fs::path source(SHARDOPT_SOURCE_DIR);
  // The script: installed next to the binary, else the source tree this binary was built from.
  fs::path script;
  for (const fs::path& p : {prefix / "libexec" / "shardopt" / "simulate", source / "scripts" / "simulate"})
    if (fs::exists(p)) {
      script = p;
      break;
    }
  if (script.empty())
    throw ConfigError("simulate: scripts/simulate not found (looked in " + (prefix / "libexec/shardopt").string() +
                      " and " + (source / "scripts").string() + ")");
  // The SimGrid build: --sim-build, $SHARDOPT_SIM_BUILD_DIR, <build>/sim-build (the sub-build the normal
  // build makes when smpicxx is installed), <source>/build-sim (docs/simulation.md's manual build).
  std::vector<fs::path> candidates;
  if (!a.sim_build.empty()) candidates.push_back(a.sim_build);
  else if (const std::string env_dir = env::get_string("SHARDOPT_SIM_BUILD_DIR"); !env_dir.empty())
    candidates.push_back(env_dir);
  else candidates = {prefix / "sim-build", source / "build-sim", source / "build" / "sim-build"};
  fs::path sim_build;
  for (const auto& c : candidates)
    if (fs::exists(c / "bin" / "step_sim")) {
      sim_build = c;
      break;
    }
  if (sim_build.empty()) {
    std::string tried;
    for (const auto& c : candidates) tried += "\n  " + (c / "bin" / "step_sim").string();
    throw ConfigError("simulate: the SimGrid build of the simulation program is absent; looked for:" + tried +
                      "\nInstall SimGrid (apt-get install simgrid libsimgrid-dev, or scripts/setup) and rebuild: the "
                      "normal build then makes <build>/sim-build; or build it by hand as docs/simulation.md says");
  }
  std::vector<std::string> args = {script.string(), "--platform", a.platform, "--ranks", std::to_string(a.ranks),
                                   "--sim-build", sim_build.string(), "--preset", a.preset,
                                   "--layers", std::to_string(a.layers), "--stage", std::to_string(a.stage),
                                   "--layout", a.layout, "--sync", a.sync, "--replicas", std::to_string(a.replicas),
                                   "--bucket-mib", a.bucket_mib, "--steps", std::to_string(a.steps),
                                   "--tokens-per-rank", std::to_string(a.tokens_per_rank),
                                   "--seq-len", std::to_string(a.seq_len)};
  if (!a.slow_host.empty()) args.insert(args.end(), {"--slow-host", a.slow_host});
  if (!a.slow_link.empty()) args.insert(args.end(), {"--slow-link", a.slow_link});
  if (a.json) args.push_back("--json");
  if (a.timing) args.push_back("--timing");
  for (const auto& c : a.cfg) args.push_back("--cfg=" + c);
  std::vector<char*> cargs;
  for (auto& s : args) cargs.push_back(s.data());
  cargs.push_back(nullptr);
  std::cout.flush();
  ::execv(cargs[0], cargs.data());
  throw ConfigError("simulate: could not run " + script.string() + ": " + std::strerror(errno));
}

int run_train(TrainArgs& a, CLI::App& cmd, int* argc, char*** argv) {
  auto& c = a.config;
  if (!a.config_file.empty()) apply_config_file(cmd, a.config_file);
  if (a.device == "cuda") require_reference_model_device_cuda();
  if (a.data.empty()) a.data = default_data_path();
  nlohmann::json resolved = resolved_config(cmd);
  resolved["data"] = a.data;  // the corpus actually used, also when found by default
  c.layout = sharding::parse_layout(a.layout);
  c.sync = train::parse_sync_mode(a.sync);
  if (a.resume_option->count() > 0) c.resume_from = train::resolve_resume_dir(a.resume, c.ckpt_dir);
  const bool mpi = a.backend == "mpi" || (a.backend == "auto" && launched_by_mpirun());
  const auto corpus = model::ByteCorpus::load(a.data);
  std::cout << "data: " << a.data << " (" << corpus.size() << " bytes)" << std::endl;
  // The run folder holds its own configuration: `--config <out>/config.json` repeats the run.
  auto write_config = [&] {
    std::filesystem::create_directories(a.out);
    std::ofstream(a.out + "/config.json") << resolved.dump(2) << "\n";
    std::cout << "wrote " << a.out << "/config.json\n";
  };

  const auto start = clock::now();
  double last_time = 0;
  int64_t last_tokens = 0;
  train::TrainHooks hooks;
  hooks.on_step = [&](const train::StepRecord& r, const train::TrainConfig& cfg) {
    if (cfg.log_every == 0 || (r.step % cfg.log_every != 0 && r.step != cfg.steps && r.step != 1)) return;
    const double now = clock::seconds_since(start);
    const double rate = (r.tokens - last_tokens) / std::max(1e-9, now - last_time);
    last_time = now;
    last_tokens = r.tokens;
    std::cout << train::progress_line(r, cfg, rate) << std::endl;
  };

  hooks.flight_record_dir = a.out;  // flight_recorder_rank<r>.txt when a communication error ends the run
  if (mpi) {
    comm::MpiRuntime runtime(argc, argv);
    auto world = runtime.world();
    log::set_process_rank(world->rank());
    c.validate(world->size());
    set_onednn_threads(1);
    train::TrainResult r = train::train_rank(*world, corpus, c, hooks);
    std::filesystem::create_directories(a.out);
    // One trace file per rank: MPI ranks have separate clocks and memories.
    train::write_trace(a.out + "/trace_rank" + std::to_string(r.rank) + ".json", {&r});
    if (r.rank == 0) {
      std::cout << train::final_report(r, c, "mpi");
      for (const auto& p : train::write_run_outputs(a.out, c, r, "mpi", resolved.dump())) std::cout << "wrote " << p << "\n";
      write_config();
      std::cout << "wrote " << a.out << "/trace_rank<r>.json (one per rank; open in https://ui.perfetto.dev)\n";
      std::cout << "sample:\n" << r.sample << "\n";
    }
    return 0;
  }

  c.validate(a.ranks);  // fail before starting threads, with the clear message
  std::vector<train::TrainResult> results(a.ranks);
  std::mutex mu;
  comm::run_ranks(a.ranks, [&](comm::Communicator& comm) {
    log::ScopedRank log_rank(comm.rank());
    set_onednn_threads(a.ranks);
    auto r = train::train_rank(comm, corpus, c, hooks);
    std::lock_guard<std::mutex> lock(mu);
    results[comm.rank()] = std::move(r);
  });
  const auto& r0 = results[0];
  std::cout << train::final_report(r0, c, "threads");
  for (const auto& p : train::write_run_outputs(a.out, c, r0, "threads", resolved.dump()))
    std::cout << "wrote " << p << "\n";
  write_config();
  std::vector<const train::TrainResult*> all;
  for (const auto& r : results) all.push_back(&r);
  train::write_trace(a.out + "/trace.json", all);
  std::cout << "wrote " << a.out << "/trace.json (all ranks; open in https://ui.perfetto.dev)\n";
  std::cout << "sample:\n" << r0.sample << "\n";
  return 0;
}

// "name:RxC,name:N,..." or one "name RxC" per line in a file.
std::vector<proto::TensorSpec> parse_shapes(const std::string& text) {
  std::vector<proto::TensorSpec> specs;
  std::string item;
  std::string normalized = text;
  for (char& ch : normalized)
    if (ch == '\n' || ch == ';') ch = ',';
  std::stringstream ss(normalized);
  while (std::getline(ss, item, ',')) {
    while (!item.empty() && std::isspace(static_cast<unsigned char>(item.back()))) item.pop_back();
    while (!item.empty() && std::isspace(static_cast<unsigned char>(item.front()))) item.erase(item.begin());
    if (item.empty() || item[0] == '#') continue;
    auto sep = item.find_first_of(": ");
    if (sep == std::string::npos)
      throw ConfigError("--shapes: expected name:RxC (e.g. w1:128x64), got '" + item + "'");
    proto::TensorSpec s;
    s.set_name(item.substr(0, sep));
    s.set_dtype(proto::F32);
    std::stringstream dims(item.substr(sep + 1));
    std::string d;
    while (std::getline(dims, d, 'x')) {
      try {
        s.add_shape(std::stoll(d));
      } catch (const std::exception&) {
        throw ConfigError("--shapes: dimension '" + d + "' of '" + item + "' is not an integer");
      }
    }
    specs.push_back(s);
  }
  if (specs.empty()) throw ConfigError("--shapes: no tensors given");
  return specs;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"shardopt: distributed training with a sharded optimizer (ZeRO + owner-rank Muon)"};
  app.require_subcommand(1);

  TrainArgs targs;
  auto* train_cmd = app.add_subcommand("train", "train the reference byte-level transformer (threads or mpirun)");
  add_train_options(*train_cmd, targs);

  std::string preset = "llama-125m", shapes, shapes_file, plan_layout = "owned";
  int plan_world = 8, plan_stage = 2, max_buckets = 16;
  int64_t plan_bucket = sharding::kDefaultBucketBytes;
  auto* plan_cmd = app.add_subcommand("plan", "print the ShardPlan and balance statistics for a model");
  plan_cmd->add_option("--preset", preset, "model preset (llama-125m, llama-1b, tiny)")->capture_default_str();
  plan_cmd->add_option("--shapes", shapes, "tensors as name:RxC,... (overrides --preset)");
  plan_cmd->add_option("--shapes-file", shapes_file, "file with one name:RxC per line (overrides --preset)")
      ->check(CLI::ExistingFile);
  plan_cmd->add_option("--world", plan_world, "world size")->capture_default_str();
  plan_cmd->add_option("--stage", plan_stage, "ZeRO stage 1|2|3")->capture_default_str();
  plan_cmd->add_option("--layout", plan_layout, sharding::layout_names())->capture_default_str();
  plan_cmd->add_option("--bucket-bytes", plan_bucket, "bucket size in bytes")->capture_default_str();
  plan_cmd->add_option("--max-buckets", max_buckets, "buckets listed (0 = all)")->capture_default_str();
  std::string plan_state_dtype = "f32", plan_matrix_state_dtype;
  plan_cmd->add_option("--state-dtype", plan_state_dtype, "AdamW moment storage f32 | bf16 | q8 (opt state column)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));
  plan_cmd->add_option("--matrix-state-dtype", plan_matrix_state_dtype,
                       "Muon momentum storage f32 | bf16 | q8 (default: --state-dtype)")
      ->check(CLI::IsMember({"f32", "bf16", "q8"}));

  std::vector<std::string> compare_dirs;
  std::string compare_out;
  auto* compare_cmd = app.add_subcommand("compare", "table and plot of finished runs (train --out folders)");
  compare_cmd->add_option("RUN_DIRS", compare_dirs, "run folders holding loss.csv and summary.json")
      ->required()
      ->check(CLI::ExistingDirectory);
  compare_cmd->add_option("--out", compare_out,
                          "PNG to write: train/validation loss vs step and vs wall time, every run (gnuplot)");

  SimulateArgs sargs;
  auto* simulate_cmd = app.add_subcommand(
      "simulate", "predicted optimizer-step (or, with --tokens-per-rank, training-step) time on a simulated cluster "
                  "(SimGrid SMPI platform file; docs/simulation.md)");
  add_simulate_options(*simulate_cmd, sargs);

  auto* env_cmd = app.add_subcommand("env", "list the environment variables shardopt reads");
  auto* bench_cmd = app.add_subcommand("bench", "list the benchmark binaries and how to run them");
  auto* ckpt_cmd = app.add_subcommand("ckpt", "checkpoint tools");
  ckpt_cmd->require_subcommand(1);
  std::string ckpt_dir;
  auto* inspect_cmd = ckpt_cmd->add_subcommand("inspect", "describe a checkpoint folder");
  inspect_cmd->add_option("DIR", ckpt_dir, "checkpoint folder, or a root of ckpt-<step> folders (latest)")
      ->required();
  bool no_verify = false;
  inspect_cmd->add_flag("--no-verify", no_verify, "skip reading every piece and checking its CRC32C");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    log::init_from_env();
  } catch (const ConfigError& e) {
    log::set_level(log::Level::kError);
    log::error("{}", e.what());
    return 2;
  }
  try {
    if (*train_cmd) return run_train(targs, *train_cmd, &argc, &argv);
    if (*compare_cmd) {
      std::vector<train::RunCurves> runs;
      for (const auto& d : compare_dirs) runs.push_back(train::read_run(d));
      std::cout << train::comparison_table(runs);
      if (!compare_out.empty()) {
        const std::string why = train::write_comparison_plot(runs, compare_out);
        if (why.empty()) std::cout << "wrote " << compare_out << "\n";
        else log::warn("no plot: {} (script: {}.gp)", why, compare_out);
      }
      return 0;
    }
    if (*plan_cmd) {
      std::vector<proto::TensorSpec> specs;
      if (!shapes_file.empty()) {
        std::ifstream in(shapes_file);
        std::stringstream buf;
        buf << in.rdbuf();
        specs = parse_shapes(buf.str());
      } else if (!shapes.empty()) {
        specs = parse_shapes(shapes);
      } else {
        specs = sharding::preset_specs(preset);
      }
      auto request = sharding::make_plan_request(specs, plan_world, plan_stage, sharding::parse_layout(plan_layout), plan_bucket);
      // Opt state = fp32 master + AdamW's 2 moments (element-wise) / Muon's momentum, in their storage.
      optim::OptimizerParams ew, mx;
      ew.state_dtype = optim::parse_state_dtype(plan_state_dtype);
      mx.state_dtype = optim::parse_state_dtype(plan_matrix_state_dtype.empty() ? plan_state_dtype
                                                                                 : plan_matrix_state_dtype);
      request.set_elementwise_state_bytes_per_param(4.0 + 2.0 * optim::state_bytes_per_value(ew));
      request.set_muon_state_bytes_per_param(4.0 + optim::state_bytes_per_value(mx));
      if (ew.state_dtype == proto::STATE_Q8) request.set_state_block_elems(optim::kQ8BlockElems);
      const auto plan = sharding::make_plan(request);
      std::cout << "optimizer state: element-wise (AdamW) " << optim::state_dtype_name(ew.state_dtype) << " "
                << request.elementwise_state_bytes_per_param() << " B/param, matrix (Muon) "
                << optim::state_dtype_name(mx.state_dtype) << " " << request.muon_state_bytes_per_param()
                << " B/param (fp32 master included; q8: codes + one fp32 absmax per 256)\n";
      std::cout << sharding::plan_summary(plan, max_buckets);
      return 0;
    }
    if (*simulate_cmd) return run_simulate(sargs, argv[0]);
    if (*env_cmd) {
      for (const auto& v : env::registry())
        std::cout << v.name << " (default '" << v.default_value << "'): " << v.meaning << "\n";
      return 0;
    }
    if (*bench_cmd) {
      const auto self = std::filesystem::weakly_canonical(std::filesystem::path(argv[0])).parent_path();
      const auto bench_root = self.parent_path() / "bench";
      std::cout << "benchmark binaries (each takes --help and --json):\n";
      for (const char* name : {"comm/comm_bench", "optim/optim_bench", "model/model_bench", "step/step_bench",
                               "ckpt/ckpt_bench", "gossip/gossip_bench", "gpu/gpu_bench"}) {
        const auto p = bench_root / name;
        std::cout << "  " << p.string() << (std::filesystem::exists(p) ? "" : "  (not built)") << "\n";
      }
      std::cout << "multi-rank MPI runs: mpirun --oversubscribe --mca btl self,vader --bind-to none -np 4 "
                << (bench_root / "comm/comm_bench").string() << " --backends mpi\n";
      return 0;
    }
    if (*inspect_cmd) {
      ckpt::InspectOptions io;
      io.verify = !no_verify;
      ckpt::inspect_checkpoint(ckpt_dir, std::cout, io);
      return 0;
    }
  } catch (const shardopt::Error& e) {
    log::error("{}", e.what());
    return 2;
  }
  return 0;
}
