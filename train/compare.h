// Side-by-side comparison of finished runs (their output folders): a table of final losses, wall
// time, traffic and optimizer memory, and one plot with every run's train and validation curves
// against step (left panel) and against wall time (right panel).
#pragma once

#include <string>
#include <vector>

namespace shardopt::train {

struct RunCurves {
  std::string name;  // the folder's last component
  std::string dir;
  std::vector<long> steps;
  std::vector<double> train_loss;
  std::vector<double> elapsed_seconds;  // wall time at the end of each step (running sum of loss.csv seconds)
  std::vector<long> val_steps;
  std::vector<double> val_loss, val_elapsed_seconds;
  double final_train_loss = 0, final_val_loss = 0;
  double total_seconds = 0;                      // summary.json
  double mb_sent_per_rank_per_step = 0;          // summary.json mean bytes / 1e6
  double optimizer_mib_per_rank = 0;             // mean over ranks of master + state bytes, MiB
  double max_optimizer_mib_per_rank = 0;         // largest rank
};

// Reads dir/loss.csv and dir/summary.json. ConfigError naming the file and what is missing.
RunCurves read_run(const std::string& dir);

// Fixed-width table, one row per run.
std::string comparison_table(const std::vector<RunCurves>& runs);

// Writes <png>.gp (a gnuplot script holding the data) and the PNG through run_gnuplot. Returns "" on
// success, else why no PNG was written.
std::string write_comparison_plot(const std::vector<RunCurves>& runs, const std::string& png_path);

}  // namespace shardopt::train
