// Small POSIX file helpers for the checkpoint layer: every failure becomes a CheckpointError that
// names the file and the system error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

namespace shardopt::ckpt {

// An owned file descriptor, closed on destruction.
class File {
 public:
  File() = default;
  File(int fd, std::filesystem::path path) : fd_(fd), path_(std::move(path)) {}
  File(File&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) { other.fd_ = -1; }
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  static File open_read(const std::filesystem::path& path);
  // Creates or truncates.
  static File create(const std::filesystem::path& path);

  int fd() const { return fd_; }
  const std::filesystem::path& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }

  void write_all(const void* data, size_t size);
  // Reads exactly `size` bytes at `offset`; a short read (truncated file) throws naming the range.
  void pread_all(void* data, size_t size, uint64_t offset) const;
  uint64_t size() const;
  void fsync();
  // Drops the file's clean pages from the page cache (benchmarks measure the disk, not RAM).
  void drop_cache();
  void close();

 private:
  int fd_ = -1;
  std::filesystem::path path_;
};

// fsync on a directory makes the entries created or renamed in it durable.
void fsync_directory(const std::filesystem::path& dir);
// Whole-file helpers for small files (manifests).
std::string read_small_file(const std::filesystem::path& path);
void write_file_durably(const std::filesystem::path& path, const void* data, size_t size);

[[noreturn]] void throw_errno(const std::string& what, const std::filesystem::path& path, int err);

}  // namespace shardopt::ckpt
