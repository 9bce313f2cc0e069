#include "checkpoint/io_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace shardopt::ckpt {

void throw_errno(const std::string& what, const std::filesystem::path& path, int err) {
  throw CheckpointError("checkpoint: " + what + " '" + path.string() + "' failed: " + std::strerror(err));
}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    path_ = std::move(other.path_);
    other.fd_ = -1;
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

File File::open_read(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno("open", path, errno);
  return File(fd, path);
}

File File::create(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw_errno("create", path, errno);
  return File(fd, path);
}

void File::write_all(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("write", path_, errno);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void File::pread_all(void* data, size_t size, uint64_t offset) const {
  char* p = static_cast<char*>(data);
  uint64_t at = offset;
  while (size > 0) {
    ssize_t n = ::pread(fd_, p, size, static_cast<off_t>(at));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("read", path_, errno);
    }
    if (n == 0)
      throw CheckpointError("checkpoint: file '" + path_.string() + "' is truncated: expected " +
                            std::to_string(size) + " more bytes at offset " + std::to_string(at) +
                            ", found end of file");
    p += n;
    at += static_cast<uint64_t>(n);
    size -= static_cast<size_t>(n);
  }
}

uint64_t File::size() const {
  struct stat st{};
  if (::fstat(fd_, &st) != 0) throw_errno("stat", path_, errno);
  return static_cast<uint64_t>(st.st_size);
}

void File::fsync() {
  if (::fsync(fd_) != 0) throw_errno("fsync", path_, errno);
}

void File::drop_cache() { (void)::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }

void File::close() {
  if (fd_ >= 0) {
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) throw_errno("close", path_, errno);
  }
}

void fsync_directory(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno("open directory", dir, errno);
  File f(fd, dir);
  f.fsync();
}

std::string read_small_file(const std::filesystem::path& path) {
  File f = File::open_read(path);
  std::string bytes(f.size(), '\0');
  f.pread_all(bytes.data(), bytes.size(), 0);
  return bytes;
}

void write_file_durably(const std::filesystem::path& path, const void* data, size_t size) {
  File f = File::create(path);
  f.write_all(data, size);
  f.fsync();
  f.close();
}

}  // namespace shardopt::ckpt
