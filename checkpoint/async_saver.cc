#include "checkpoint/async_saver.h"

#include <cstring>

#include "base/error.h"

namespace shardopt::ckpt {

AsyncShardSaver::AsyncShardSaver() : worker_([this] { worker_loop(); }) {}

AsyncShardSaver::~AsyncShardSaver() {
  {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !has_job_; });
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

void AsyncShardSaver::start(const std::filesystem::path& dir_tmp, int rank, std::span<const SavePiece> pieces,
                            const ReadBytes& read) {
  std::unique_lock lock(mu_);
  if (pending_) throw ConfigError("AsyncShardSaver::start: the previous save was not collected with wait()");
  pieces_ = snapshot_pieces(pieces, snapshot_, read);
  dir_ = dir_tmp;
  rank_ = rank;
  result_.reset();
  error_ = nullptr;
  has_job_ = true;
  pending_ = true;
  lock.unlock();
  cv_.notify_all();
}

proto::CheckpointShardRecord AsyncShardSaver::wait() {
  std::unique_lock lock(mu_);
  if (!pending_) throw ConfigError("AsyncShardSaver::wait: no save in progress");
  cv_.wait(lock, [&] { return !has_job_; });
  pending_ = false;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return std::move(*result_);
}

bool AsyncShardSaver::busy() const {
  std::lock_guard lock(mu_);
  return has_job_;
}

bool AsyncShardSaver::pending() const {
  std::lock_guard lock(mu_);
  return pending_;
}

void AsyncShardSaver::worker_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || has_job_; });
    if (has_job_) {
      // The job's inputs are not touched by start() while has_job_ is set, so write unlocked.
      lock.unlock();
      std::optional<proto::CheckpointShardRecord> result;
      std::exception_ptr error;
      try {
        result = save_shard(dir_, rank_, pieces_);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      result_ = std::move(result);
      error_ = error;
      has_job_ = false;
      cv_.notify_all();
      continue;
    }
    if (stop_) return;
  }
}

}  // namespace shardopt::ckpt
