// The run-outputs folder may be any path the user gives: quotes, spaces and shell syntax in it must
// neither break the plot nor run anything.
#include "train/outputs.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

namespace shardopt::train {
namespace {

namespace fs = std::filesystem;

TrainResult small_result() {
  TrainResult r;
  for (int s = 1; s <= 6; ++s) {
    StepRecord rec;
    rec.step = s;
    rec.train_loss = 5.0 - 0.5 * s;
    if (s % 3 == 0) rec.val_loss = 5.2 - 0.5 * s;
    rec.lr_multiplier = 1.0;
    rec.tokens = 128 * s;
    r.history.push_back(rec);
  }
  r.final_val_loss = 2.2;
  r.memory_by_rank.resize(1);
  return r;
}

bool gnuplot_installed() {
  for (const char* dir : {"/usr/bin", "/usr/local/bin", "/bin"})
    if (fs::exists(fs::path(dir) / "gnuplot")) return true;
  return false;
}

TEST(RunOutputs, FolderNameWithQuotesSpacesAndShellSyntaxIsOnlyAName) {
  if (!gnuplot_installed()) GTEST_SKIP() << "gnuplot is not installed (scripts/setup installs gnuplot-nox)";
  const fs::path scratch = fs::temp_directory_path() / ("shardopt-outputs-" + std::to_string(::getpid()));
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  // A shell given this path would close the quote, run `touch X` in its working folder and reopen it.
  const fs::path out = scratch / "run' $(touch X) 'out";
  const fs::path previous_cwd = fs::current_path();
  fs::current_path(scratch);  // where an injected `touch X` would land
  TrainConfig config;
  const auto written = write_run_outputs(out.string(), config, small_result(), "threads");
  fs::current_path(previous_cwd);

  EXPECT_FALSE(fs::exists(scratch / "X")) << "a shell ran the folder name";
  EXPECT_FALSE(fs::exists(previous_cwd / "X")) << "a shell ran the folder name";
  const fs::path png = out / "loss.png";
  EXPECT_NE(std::find(written.begin(), written.end(), png.string()), written.end()) << "loss.png not reported";
  ASSERT_TRUE(fs::exists(png));
  EXPECT_GT(fs::file_size(png), 1000u);
  std::ifstream in(png, std::ios::binary);
  char magic[8] = {};
  in.read(magic, 8);
  EXPECT_EQ(std::string(magic + 1, 3), "PNG");
  EXPECT_TRUE(fs::exists(out / "loss.csv"));
  fs::remove_all(scratch);
}

}  // namespace
}  // namespace shardopt::train
