#pragma once
// grun/io/atomic_file.hpp — all-or-nothing file writes.
//
// A reader (a serving process, a resumed training run) must never see half an adapter. So a write
// goes to a temporary file in the *same directory* as the target (rename(2) is atomic only within
// one filesystem), is flushed with fsync, then renamed over the target, and the directory itself
// is fsynced so the rename survives a power cut. Any failure removes the temporary file and throws
// grun::error naming the path: the target is then either the old file or absent, never partial.
//
// POSIX only (open/fsync/rename); the library targets Linux hosts.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "../core/error.hpp"

namespace grun::io {

namespace detail {
inline std::string errno_text(int e) { return std::string(std::strerror(e)); }
}  // namespace detail

/// A file being written atomically. Bytes go to `<dir>/.<name>.tmp.XXXXXX`; commit() makes them
/// visible under `path` in one step. Destroying an uncommitted atomic_file discards the temp file.
class atomic_file {
 public:
  explicit atomic_file(std::filesystem::path path) : path_(std::move(path)) {
    require<error>(!path_.empty(), "atomic_file: expected a file path, got an empty path");
    require<error>(path_.has_filename(), "atomic_file: expected a file path, got directory-like path '",
                   path_.string(), "'");
    std::filesystem::path dir = path_.parent_path();
    if (dir.empty()) dir = ".";
    // Built with += : g++ 12 warns falsely (-Wrestrict) on `"." + std::string`.
    std::string name = ".";
    name += path_.filename().string();
    name += ".tmp.";
    // Created like any new file (0666 less the umask: not mkstemp's 0600, nor a fixed 0644 that
    // would ignore a private umask); O_EXCL with a random suffix is mkstemp's uniqueness.
    std::string templ;
    int e = EEXIST;
    for (int attempt = 0; attempt < 64 && e == EEXIST; ++attempt) {
      templ = (dir / (name + random_suffix())).string();
      fd_ = ::open(templ.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      e = fd_ < 0 ? errno : 0;
    }
    if (fd_ < 0)
      fail<error>("cannot write '", path_.string(), "': cannot create a temporary file in '", dir.string(),
                  "' (", detail::errno_text(e), ")");
    temp_ = templ;
    // Replacing a file keeps its permissions: a private (0600) adapter stays private.
    struct ::stat st {};
    if (::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode)) (void)::fchmod(fd_, st.st_mode & 07777);
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() { discard(); }

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& temp_path() const { return temp_; }

  /// Appends bytes; throws grun::error (after removing the temp file) when the write fails.
  void write(std::span<const std::byte> bytes) {
    require<error>(fd_ >= 0, "atomic_file: write to '", path_.string(), "' after commit or failure");
    const std::byte* p = bytes.data();
    std::size_t left = bytes.size();
    while (left > 0) {
      const ::ssize_t n = ::write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int e = n < 0 ? errno : EIO;
        discard();
        fail<error>("cannot write '", path_.string(), "': write failed (", detail::errno_text(e), ")");
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
  }
  void write(std::string_view s) { write(std::as_bytes(std::span<const char>(s.data(), s.size()))); }

  /// fsync, close, rename over the target, fsync the directory.
  void commit() {
    require<error>(fd_ >= 0, "atomic_file: commit of '", path_.string(), "' after commit or failure");
    if (::fsync(fd_) != 0) { const int e = errno; discard(); fail<error>("cannot write '", path_.string(), "': fsync failed (", detail::errno_text(e), ")"); }
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) { const int e = errno; discard(); fail<error>("cannot write '", path_.string(), "': close failed (", detail::errno_text(e), ")"); }
    if (::rename(temp_.c_str(), path_.c_str()) != 0) {
      const int e = errno;
      discard();
      fail<error>("cannot write '", path_.string(), "': rename from temporary file failed (", detail::errno_text(e), ")");
    }
    temp_.clear();
    // Persist the directory entry. Failure here leaves a complete file in place; report it anyway.
    std::filesystem::path dir = path_.parent_path();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      const int rc = ::fsync(dfd);
      const int e = errno;
      ::close(dfd);
      // Some filesystems refuse fsync on directories (EINVAL); that is not a failed write.
      require<error>(rc == 0 || e == EINVAL, "wrote '", path_.string(), "' but fsync of its directory failed (",
                     detail::errno_text(e), ")");
    }
  }

 private:
  static std::string random_suffix() {
    static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    thread_local std::mt19937_64 gen(std::random_device{}() ^
                                     std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                                     (std::uint64_t(::getpid()) << 32));
    std::string s(6, 'X');
    for (char& c : s) c = alphabet[gen() % (sizeof(alphabet) - 1)];
    return s;
  }

  void discard() noexcept {
    if (fd_ >= 0) { ::close(fd_); fd_ = -1; }
    if (!temp_.empty()) { ::unlink(temp_.c_str()); temp_.clear(); }
  }
  std::filesystem::path path_;
  std::filesystem::path temp_;
  int fd_ = -1;
};

/// Writes `bytes` to `path` atomically (see atomic_file).
inline void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  atomic_file f(path);
  f.write(bytes);
  f.commit();
}

}  // namespace grun::io
