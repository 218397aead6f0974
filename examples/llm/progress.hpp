#pragma once
// examples/llm/progress.hpp — a one-line progress bar with ETA and live values, for long work.
#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <unistd.h>

namespace llm {

class progress_bar {
 public:
  progress_bar(std::string label, long total) : label_(std::move(label)), total_(total),
      start_(std::chrono::steady_clock::now()), tty_(isatty(fileno(stderr))) {}

  /// Draws step `done` of total with `extra` (live loss terms, say). On a non-terminal it prints a
  /// line every ~10% so logs stay readable.
  void update(long done, const std::string& extra = {}) {
    const double elapsed = seconds();
    const double eta = done > 0 ? elapsed / done * (total_ - done) : 0.0;
    const int width = 24;
    const int filled = total_ > 0 ? static_cast<int>(width * done / total_) : width;
    std::string bar(filled, '#');
    bar.resize(width, '.');
    const std::string line = fmt::format("{} [{}] {}/{} {:.0f}s eta {:.0f}s {}", label_, bar, done, total_, elapsed, eta, extra);
    if (tty_) {
      fmt::print(stderr, "\r{}\x1b[K", line);
      if (done >= total_) fmt::print(stderr, "\n");
    } else {
      const long every = total_ >= 10 ? total_ / 10 : 1;
      if (done == total_ || done % every == 0) fmt::print(stderr, "{}\n", line);
    }
    std::fflush(stderr);
  }
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::string label_;
  long total_;
  std::chrono::steady_clock::time_point start_;
  bool tty_;
};

}  // namespace llm
