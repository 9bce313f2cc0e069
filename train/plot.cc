#include "train/plot.h"

#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include <fcntl.h>

extern char** environ;

namespace shardopt::train {

std::string run_gnuplot(const std::string& script_path, const std::vector<std::string>& args) {
  if (args.size() > 9) return "gnuplot -c takes at most 9 arguments, got " + std::to_string(args.size());
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> words = {"gnuplot", "-c", script_path};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return "cannot start gnuplot (" + std::string(std::strerror(rc)) + ")";
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return "waiting for gnuplot failed (" + std::string(std::strerror(errno)) + ")";
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127) return "gnuplot not found on PATH";
  if (WIFEXITED(status)) return "gnuplot exited with status " + std::to_string(WEXITSTATUS(status)) + " on " + script_path;
  return "gnuplot was killed by signal " + std::to_string(WTERMSIG(status));
}

}  // namespace shardopt::train
