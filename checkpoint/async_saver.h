// Background shard writing: the training loop hands its pieces over, they are copied into a
// persistent host buffer (the only time training waits), and a worker thread writes the shard file
// while training goes on. The runtime gathers the record returned by wait() and finalizes as usual.
#pragma once

#include <condition_variable>
#include <exception>
#include <filesystem>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "checkpoint/writer.h"

namespace shardopt::ckpt {

class AsyncShardSaver {
 public:
  AsyncShardSaver();
  ~AsyncShardSaver();  // waits for a pending write (its error, if any, is dropped)
  AsyncShardSaver(const AsyncShardSaver&) = delete;
  AsyncShardSaver& operator=(const AsyncShardSaver&) = delete;

  // Snapshots `pieces` (copies their bytes with `read`, memcpy when empty; the caller may modify its
  // buffers as soon as this returns) and starts writing them with save_shard(dir_tmp, rank, ...) in
  // the background. Throws ConfigError if a previous save has not been collected with wait().
  void start(const std::filesystem::path& dir_tmp, int rank, std::span<const SavePiece> pieces,
             const ReadBytes& read = {});
  // Blocks until the write finishes; returns its record or rethrows the writer's exception.
  proto::CheckpointShardRecord wait();
  // True between start() and the end of the background write.
  bool busy() const;
  // True between start() and wait().
  bool pending() const;

 private:
  void worker_loop();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool has_job_ = false;   // job submitted, not yet finished
  bool pending_ = false;   // started and not yet collected by wait()
  std::filesystem::path dir_;
  int rank_ = 0;
  std::vector<SavePiece> pieces_;       // point into snapshot_
  std::vector<unsigned char> snapshot_;  // grows to the largest save, then reused: no per-save allocation
  std::optional<proto::CheckpointShardRecord> result_;
  std::exception_ptr error_;
  // Declared last: members are initialized in declaration order, and the worker reads stop_/has_job_
  // as soon as it starts, so every other member must exist before the thread does.
  std::thread worker_;
};

}  // namespace shardopt::ckpt
