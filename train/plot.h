// Plots through gnuplot without a shell: the script is a file, gnuplot is started by posix_spawnp
// with an argument vector (no quoting of paths, no `sh -c`).
#pragma once

#include <string>

namespace shardopt::train {

// Runs `gnuplot <script_path>` and waits for it. Returns "" on success, else why it failed (gnuplot
// not on PATH, a non-zero exit status, a signal) for a warning; the caller decides whether to go on.
// gnuplot's own stdout/stderr are discarded.
std::string run_gnuplot(const std::string& script_path);

}  // namespace shardopt::train
