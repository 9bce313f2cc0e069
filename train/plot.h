// Plots through gnuplot without a shell: the script is a file, gnuplot is started by posix_spawnp
// with an argument vector (no quoting of paths, no `sh -c`).
#pragma once

#include <string>
#include <vector>

namespace shardopt::train {

// Runs `gnuplot -c <script_path> <args...>` and waits for it. Values that come from users (paths,
// titles, run names) travel as args and reach the script as ARG1..ARG9, never inside its quoted
// strings, so a folder name with quotes or backticks cannot change what gnuplot does.
// Returns "" on success, else why it failed (gnuplot not on PATH, a non-zero exit status, a signal)
// for a warning; the caller decides whether to go on. gnuplot's own stdout/stderr are discarded.
std::string run_gnuplot(const std::string& script_path, const std::vector<std::string>& args = {});

}  // namespace shardopt::train
