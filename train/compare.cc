#include "train/compare.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "train/plot.h"

namespace shardopt::train {
namespace {

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> cells;
  std::stringstream ss(line);
  std::string cell;
  while (std::getline(ss, cell, ',')) cells.push_back(cell);
  if (!line.empty() && line.back() == ',') cells.emplace_back();
  return cells;
}

double to_double(const std::string& text, const std::string& where) {
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  throw ConfigError("compare: " + where + ": '" + text + "' is not a number");
}

}  // namespace

RunCurves read_run(const std::string& dir) {
  RunCurves r;
  r.dir = dir;
  std::string trimmed = dir;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  r.name = trimmed.substr(trimmed.find_last_of('/') + 1);

  const std::string csv_path = dir + "/loss.csv";
  std::ifstream csv(csv_path);
  if (!csv) throw ConfigError("compare: cannot read '" + csv_path + "' (is '" + dir + "' a train --out folder?)");
  std::string line;
  std::getline(csv, line);
  const auto header = split_csv_line(line);
  auto column = [&](const std::string& name) -> size_t {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return i;
    throw ConfigError("compare: '" + csv_path + "' has no column '" + name + "'");
  };
  const size_t c_step = column("step"), c_train = column("train_loss"), c_val = column("val_loss"),
               c_sec = column("seconds");
  double elapsed = 0;
  for (int row = 2; std::getline(csv, line); ++row) {
    if (line.empty()) continue;
    const auto cells = split_csv_line(line);
    const std::string where = csv_path + " line " + std::to_string(row);
    if (cells.size() < header.size()) throw ConfigError("compare: " + where + " has too few cells");
    const long step = std::lround(to_double(cells[c_step], where));
    elapsed += to_double(cells[c_sec], where);
    r.steps.push_back(step);
    r.train_loss.push_back(to_double(cells[c_train], where));
    r.elapsed_seconds.push_back(elapsed);
    if (!cells[c_val].empty()) {
      r.val_steps.push_back(step);
      r.val_loss.push_back(to_double(cells[c_val], where));
      r.val_elapsed_seconds.push_back(elapsed);
    }
  }
  if (r.steps.empty()) throw ConfigError("compare: '" + csv_path + "' has no steps");
  if (r.val_loss.empty()) throw ConfigError("compare: '" + csv_path + "' has no validation loss");
  r.final_train_loss = r.train_loss.back();
  r.final_val_loss = r.val_loss.back();

  const std::string summary_path = dir + "/summary.json";
  std::ifstream in(summary_path);
  if (!in) throw ConfigError("compare: cannot read '" + summary_path + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
    r.total_seconds = j.at("total_seconds").get<double>();
    r.mb_sent_per_rank_per_step = j.at("mean_bytes_sent_per_rank_per_step").get<double>() / 1e6;
    const auto& mem = j.at("memory_bytes_by_rank");
    double sum = 0, most = 0;
    for (const auto& m : mem) {
      const double mib = m.at("optimizer").get<double>() / (1024.0 * 1024.0);
      sum += mib;
      most = std::max(most, mib);
    }
    r.optimizer_mib_per_rank = mem.empty() ? 0 : sum / static_cast<double>(mem.size());
    r.max_optimizer_mib_per_rank = most;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("compare: '" + summary_path + "': " + e.what());
  }
  return r;
}

std::string comparison_table(const std::vector<RunCurves>& runs) {
  std::string out = fmt::format("{:<12} {:>6} {:>11} {:>9} {:>9} {:>13} {:>22}\n", "run", "steps", "final train",
                                "val loss", "seconds", "MB/rank/step", "optimizer MiB/rank");
  for (const auto& r : runs)
    out += fmt::format("{:<12} {:>6} {:>11.4f} {:>9.4f} {:>9.1f} {:>13.3f} {:>10.3f} (max {:.3f})\n", r.name,
                       r.steps.back(), r.final_train_loss, r.final_val_loss, r.total_seconds,
                       r.mb_sent_per_rank_per_step, r.optimizer_mib_per_rank, r.max_optimizer_mib_per_rank);
  return out;
}

std::string write_comparison_plot(const std::vector<RunCurves>& runs, const std::string& png_path) {
  if (runs.empty()) throw ConfigError("compare: no runs to plot");
  // The PNG path and the run names reach gnuplot as ARG1..ARG9 (train/plot.h): at most 8 runs.
  if (runs.size() > 8) throw ConfigError("compare: at most 8 runs per plot, got " + std::to_string(runs.size()));
  const std::string script_path = png_path + ".gp";
  {
    std::ofstream gp(script_path);
    if (!gp) throw ConfigError("compare: cannot write '" + script_path + "'");
    // The data travel inside the script (datablocks), so the plot does not depend on the run folders.
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& r = runs[i];
      gp << "$train" << i << " << EOD\n";
      for (size_t k = 0; k < r.steps.size(); ++k)
        gp << r.steps[k] << ' ' << fmt::format("{:.4f} {:.6f}", r.elapsed_seconds[k], r.train_loss[k]) << '\n';
      gp << "EOD\n$val" << i << " << EOD\n";
      for (size_t k = 0; k < r.val_steps.size(); ++k)
        gp << r.val_steps[k] << ' ' << fmt::format("{:.4f} {:.6f}", r.val_elapsed_seconds[k], r.val_loss[k]) << '\n';
      gp << "EOD\n";
    }
    gp << "set terminal pngcairo size 1400,560\n"
       << "set output ARG1\n"
       << "set multiplot layout 1,2 title 'train and validation loss (nats/byte)'\n"
       << "set grid\nset ylabel 'loss (nats/byte)'\nset key top right\n";
    auto plot = [&](const char* xlabel, int xcol) {
      gp << "set xlabel '" << xlabel << "'\nplot ";
      for (size_t i = 0; i < runs.size(); ++i) {
        const int color = static_cast<int>(i) + 1;
        gp << (i ? ", " : "") << "$train" << i << " using " << xcol << ":3 with lines lc " << color
           << " lw 1 dt 3 title ARG" << i + 2 << ".' train' noenhanced, "
           << "$val" << i << " using " << xcol << ":3 with linespoints lc " << color << " lw 2 pt 7 title ARG" << i + 2
           << ".' validation' noenhanced";
      }
      gp << "\n";
    };
    plot("step", 1);
    plot("wall time (s)", 2);
    gp << "unset multiplot\n";
  }
  std::vector<std::string> args = {png_path};
  for (const auto& r : runs) args.push_back(r.name);
  return run_gnuplot(script_path, args);
}

}  // namespace shardopt::train
