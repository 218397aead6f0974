#pragma once
// Shared helpers for the file-format tests (safetensors, adapter files): a scratch folder that is
// removed with everything in it, and a check that an expression throws a given error whose message
// names what it should.
#include <catch2/catch.hpp>

#include <filesystem>
#include <iterator>
#include <random>
#include <string>
#include <system_error>

namespace grun_test {

/// A fresh folder under the system's temporary directory, removed (with its contents) on scope exit;
/// entries() counts what is in it — a failed write must leave nothing behind.
struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(const std::string& prefix = "grun_test_") {
    path = std::filesystem::temp_directory_path() / (prefix + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::size_t entries() const {
    return static_cast<std::size_t>(
        std::distance(std::filesystem::directory_iterator(path), std::filesystem::directory_iterator{}));
  }
};

}  // namespace grun_test

/// Requires `expr` to throw E whose message contains `fragment` (Catch2 v2 has no
/// REQUIRE_THROWS_WITH_AS).
#define REQUIRE_THROWS_CONTAINING(expr, E, fragment)                           \
  do {                                                                         \
    bool grun_thrown_ = false;                                                 \
    try { (void)(expr); } catch (const E& e_) {                                \
      grun_thrown_ = true;                                                     \
      INFO("message: " << e_.what());                                          \
      CHECK_THAT(std::string(e_.what()), Catch::Matchers::Contains(fragment)); \
    }                                                                          \
    REQUIRE(grun_thrown_);                                                     \
  } while (0)
