#pragma once
// grun/core/error.hpp — the three tiers of errors (STYLE.md §8).
//
//  1. compile time: static_assert("grun::<entity>: <reason>") inside policies and concepts;
//  2. device-safe preconditions: GRUN_PRECONDITION, routed through a replaceable handler;
//  3. host checks that throw a grun::error subclass before any launch, naming what was
//     expected and what came.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "config.hpp"

namespace grun {

/// Base of every exception grun throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
/// Shapes, strides, dtypes or memory spaces that do not fit the operation.
class shape_error : public error { public: using error::error; };
/// A file (safetensors, GGUF, JSONL) that breaks its format's rules.
class format_error : public error { public: using error::error; };
/// NaN / Inf where a finite value is required, or a numerically impossible request.
class numeric_error : public error { public: using error::error; };

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream os;
  (os << ... << std::forward<Parts>(parts));
  return os.str();
}
}  // namespace detail

/// Throws E with the parts streamed together: `fail<shape_error>("h: expected ", d, " columns, got ", c)`.
template <class E = error, class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw E(detail::concat("grun: ", std::forward<Parts>(parts)...));
}

/// Host check: throws E with the message when `ok` is false.
template <class E = shape_error, class... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) fail<E>(std::forward<Parts>(parts)...);
}

/// Handler for device-safe preconditions. Replace it (host side) to log or throw.
using precondition_handler = void (*)(const char* condition, const char* file, int line);

namespace detail {
inline void default_precondition_handler(const char* condition, const char* file, int line) {
  std::fprintf(stderr, "grun: precondition failed: %s (%s:%d)\n", condition, file, line);
  std::abort();
}
inline precondition_handler& current_precondition_handler() {
  static precondition_handler handler = &default_precondition_handler;
  return handler;
}
}  // namespace detail

/// Installs `h` and returns the previous handler.
inline precondition_handler set_precondition_handler(precondition_handler h) {
  return std::exchange(detail::current_precondition_handler(), h);
}

}  // namespace grun

#if defined(__CUDA_ARCH__)
#  define GRUN_PRECONDITION(cond) \
     do { if (!(cond)) { printf("grun: precondition failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); __trap(); } } while (0)
#else
#  define GRUN_PRECONDITION(cond) \
     do { if (!(cond)) ::grun::detail::current_precondition_handler()(#cond, __FILE__, __LINE__); } while (0)
#endif
