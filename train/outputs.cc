#include "train/outputs.h"

#include <algorithm>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "base/log.h"
#include "sharding/layout.h"
#include "train/plot.h"

namespace shardopt::train {
namespace {

std::string mib(double bytes) { return fmt::format("{:.2f} MiB", bytes / (1024.0 * 1024.0)); }

std::ofstream open_for_write(const std::string& path) {
  std::ofstream out(path);
  if (!out) throw ConfigError("train outputs: cannot write '" + path + "'");
  return out;
}

double mean_bytes_per_step(const TrainResult& r) {
  if (r.history.empty()) return 0;
  double sum = 0;
  for (const auto& s : r.history) sum += static_cast<double>(s.bytes_per_rank);
  return sum / r.history.size();
}

}  // namespace

std::string final_report(const TrainResult& r, const TrainConfig& c, const std::string& backend) {
  std::string out;
  const auto& last = r.history.back();
  out += fmt::format("final: train loss {:.4f}  val loss {:.4f}  ({} steps, {} ranks on {}, {:.1f} s, {:.1f}k tok/s)\n",
                     last.train_loss, r.final_val_loss, c.steps, r.world_size, backend, r.total_seconds,
                     r.tokens_per_second / 1e3);
  out += fmt::format("model: {} parameters, d_model {}, {} layers, {} heads, context {}; optimizer {}; stage {} {}\n",
                     r.num_params, c.model.d_model, c.model.n_layer, c.model.n_head, c.model.context, c.optimizer,
                     c.zero_stage, sharding::layout_name(c.layout));
  const auto& p = r.phase_seconds;
  out += fmt::format(
      "time per phase (rank {}, summed over steps): forward+backward {:.3f} s | step {:.3f} s = reduce wait {:.3f} + "
      "check {:.3f} + element-wise {:.3f} + matrix {:.3f} + dim0 exchange {:.3f} + param gather {:.3f}\n",
      r.rank, r.compute_seconds, p.total, p.reduce_wait, p.check, p.elementwise, p.matrix, p.dim0_exchange, p.gather);
  out += fmt::format("traffic: {:.3f} MB sent per rank per step (mean)\n", mean_bytes_per_step(r) / 1e6);
  out += "optimizer memory per rank (master + state) vs the ZeRO formula:\n";
  for (size_t k = 0; k < r.memory_by_rank.size(); ++k) {
    const auto& m = r.memory_by_rank[k];
    out += fmt::format("  rank {}: {} (master {} + state {}), formula {}; params {}, grad buffer {}, grad shard {}\n", k,
                       mib(static_cast<double>(m.optimizer_bytes())), mib(static_cast<double>(m.master_bytes)),
                       mib(static_cast<double>(m.state_bytes)), mib(m.formula_optimizer_bytes),
                       mib(static_cast<double>(m.param_bytes)), mib(static_cast<double>(m.grad_buffer_bytes)),
                       mib(static_cast<double>(m.grad_shard_bytes)));
  }
  return out;
}

std::vector<std::string> write_run_outputs(const std::string& dir, const TrainConfig& c, const TrainResult& r,
                                           const std::string& backend, const std::string& resolved_config_json) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw ConfigError("train outputs: cannot create folder '" + dir + "': " + ec.message());
  std::vector<std::string> written;

  const std::string csv_path = dir + "/loss.csv";
  {
    auto csv = open_for_write(csv_path);
    csv << "step,train_loss,val_loss,lr_multiplier,tokens,bytes_per_rank,seconds,consensus_distance,"
           "max_attention_logit,qk_clipped_heads\n";
    for (const auto& s : r.history) {
      csv << s.step << ',' << fmt::format("{:.6f}", s.train_loss) << ','
          << (std::isnan(s.val_loss) ? std::string() : fmt::format("{:.6f}", s.val_loss)) << ','
          << fmt::format("{:.6f}", s.lr_multiplier) << ',' << s.tokens << ',' << s.bytes_per_rank << ','
          << fmt::format("{:.6f}", s.seconds) << ','
          << (std::isnan(s.consensus_distance) ? std::string() : fmt::format("{:.6e}", s.consensus_distance)) << ','
          << fmt::format("{:.4f}", s.max_attention_logit) << ',' << s.qk_clipped_heads << '\n';
    }
  }
  written.push_back(csv_path);

  if (!r.sample.empty()) {
    const std::string path = dir + "/sample.txt";
    open_for_write(path) << r.sample << '\n';
    written.push_back(path);
  }

  nlohmann::json j;
  j["backend"] = backend;
  j["ranks"] = r.world_size;
  j["config"] = {{"d_model", c.model.d_model},      {"n_layer", c.model.n_layer},
                 {"n_head", c.model.n_head},        {"context", c.model.context},
                 {"global_batch", c.global_batch},  {"steps", c.steps},
                 {"grad_accumulation", c.grad_accumulation},
                 {"local_grad_accumulation", c.local_grad_accumulation},
                 {"model_threads", c.model_threads},
                 {"optimizer", c.optimizer},        {"matrix_lr", c.matrix_lr},
                 {"elementwise_lr", c.elementwise_lr}, {"weight_decay", c.weight_decay},
                 {"warmup_steps", c.warmup_steps},  {"min_lr_ratio", c.min_lr_ratio},
                 {"max_grad_norm", c.max_grad_norm}, {"zero_stage", c.zero_stage},
                 {"layout", sharding::layout_name(c.layout)},
                 {"bucket_bytes", c.bucket_bytes},  {"sync", sync_mode_name(c.sync)},
                 {"seed", c.seed},                  {"replicas", c.replicas},
                 {"outer_every", c.outer_every},    {"gossip_group", c.gossip_group},
                 {"qk_clip_tau", c.qk_clip_tau},    {"sample_chars", c.sample_chars},
                 {"sample_temperature", c.sample_temperature}, {"sample_top_k", c.sample_top_k}};
  if (!resolved_config_json.empty()) j["resolved_config"] = nlohmann::json::parse(resolved_config_json);
  double max_logit = 0;
  int64_t clipped = 0;
  for (const auto& s : r.history) {
    max_logit = std::max(max_logit, s.max_attention_logit);
    clipped += s.qk_clipped_heads;
  }
  j["max_attention_logit"] = max_logit;
  j["qk_clipped_heads_total"] = clipped;
  j["first_step"] = r.first_step;
  j["resumed_from"] = r.resumed_from;
  j["saved_checkpoints"] = r.saved_checkpoints;
  j["skipped_outer_rounds"] = r.skipped_rounds;
  // null when no outer step ran (sync zero)
  j["final_consensus_distance"] =
      std::isnan(r.final_consensus_distance) ? nlohmann::json() : nlohmann::json(r.final_consensus_distance);
  j["num_params"] = r.num_params;
  j["final_train_loss"] = r.history.back().train_loss;
  j["final_val_loss"] = r.final_val_loss;
  j["total_seconds"] = r.total_seconds;
  j["tokens_per_second"] = r.tokens_per_second;
  j["mean_bytes_sent_per_rank_per_step"] = mean_bytes_per_step(r);
  const auto& p = r.phase_seconds;
  j["phase_seconds"] = {{"forward_backward", r.compute_seconds}, {"step_total", p.total},
                        {"reduce_wait", p.reduce_wait},          {"check", p.check},
                        {"elementwise", p.elementwise},          {"matrix", p.matrix},
                        {"dim0_exchange", p.dim0_exchange},      {"param_gather", p.gather}};
  for (const auto& m : r.memory_by_rank)
    j["memory_bytes_by_rank"].push_back({{"optimizer", m.optimizer_bytes()},
                                         {"formula_optimizer", m.formula_optimizer_bytes},
                                         {"master", m.master_bytes},
                                         {"state", m.state_bytes},
                                         {"params", m.param_bytes},
                                         {"grad_buffer", m.grad_buffer_bytes},
                                         {"grad_shard", m.grad_shard_bytes}});
  for (size_t rank = 0; rank < r.step_compute_seconds_by_rank.size(); ++rank) {
    const StepTimeStats& t = r.step_compute_seconds_by_rank[rank];
    j["step_compute_seconds_by_rank"].push_back({{"rank", rank}, {"p50", t.p50}, {"p90", t.p90}, {"max", t.max}});
  }
  j["sample"] = r.sample;  // raw bytes: dump() below writes invalid UTF-8 as U+FFFD
  const std::string summary_path = dir + "/summary.json";
  // Samples may hold any byte: invalid UTF-8 is replaced, not an exception.
  open_for_write(summary_path) << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << '\n';
  written.push_back(summary_path);

  // The plot: gnuplot is optional (a Debian package); without it the CSV is still there.
  const std::string script_path = dir + "/loss.gp";
  const std::string png_path = dir + "/loss.png";
  {
    // Paths and title reach gnuplot as ARG1..ARG3 (gnuplot -c), never inside its quoted strings:
    // a folder name with quotes or backticks cannot change the script.
    auto gp = open_for_write(script_path);
    gp << "# gnuplot -c loss.gp <loss.csv> <loss.png> <title>\n"
       << "set terminal pngcairo size 900,540\n"
       << "set output ARG2\n"
       << "set datafile separator ','\n"
       << "set key autotitle columnhead\n"
       << "set xlabel 'step'\nset ylabel 'loss (nats/byte)'\nset grid\n"
       << "set title ARG3 noenhanced\n"
       << "plot ARG1 using 1:2 with lines title 'train', "
       << "'' using 1:($3) with linespoints title 'validation'\n";
  }
  const std::string title = fmt::format("{}, {} ranks, stage {}", c.optimizer, r.world_size, c.zero_stage);
  const std::string why = run_gnuplot(script_path, {csv_path, png_path, title});
  if (why.empty()) {
    written.push_back(png_path);
  } else {
    log::warn("{}; no loss.png (the curve is in {}, the script in {})", why, csv_path, script_path);
  }
  return written;
}

void write_trace(const std::string& path, const std::vector<const TrainResult*>& ranks) {
  std::vector<const runtime::TraceRecorder*> recorders;
  std::vector<int> ids;
  for (const auto* r : ranks) {
    recorders.push_back(&r->trace);
    ids.push_back(r->rank);
  }
  runtime::write_chrome_trace(path, recorders, ids);
}

}  // namespace shardopt::train
