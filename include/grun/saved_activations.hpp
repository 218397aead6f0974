#pragma once
// grun/saved_activations.hpp — what a training forward keeps for its backward (see the class), apart
// from intervention.hpp so that adapters which take it (dlpack.hpp) need not include the policies.
#include <cstddef>
#include <vector>

#include "core/error.hpp"
#include "core/config.hpp"

namespace grun {

namespace detail { struct saved_access; }

/// What a training forward keeps so that its backward need not recompute the gate (cuDNN's reserve
/// space; a framework's saved tensors). On exec::host, gate::mlp saves its hidden activations a1, a2
/// and g — (H1 + H2 + 1) scalars of acc_t<T> per position and module, 1.3 KB with the default
/// <256, 64> — and the backward skips the gate's forward, whose first-layer GEMM is a quarter of
/// the gate's fwd+bwd arithmetic. Other gates (a linear gate's recompute is one dot over a row the
/// backward reads anyway) and exec::cuda save nothing and recompute. Gradients are bit for bit the
/// same either way. Reuse one across steps: its storage is kept.
///
///   grun::saved_activations<float> saved;
///   m.forward(ex, h, pos, out, gates, saved);   m.backward(ex, h, pos, dout, dgates, dh, saved);
///
/// The backward checks that the forward filled it for as many modules and positions and the same d,
/// not the values: as with saved tensors, h, the positions and the parameters must be the ones the
/// forward saw (no optimizer step in between). A forward that refuses its inputs leaves it as it was;
/// one that fails while running leaves it unfilled, never half-filled and marked filled.
template <class T>
class saved_activations {
 public:
  using value_type = acc_t<T>;
  bool filled() const noexcept { return filled_; }
  index_t modules() const noexcept { return modules_; }
  index_t positions() const noexcept { return positions_; }
  index_t dim() const noexcept { return dim_; }
  /// Scalars saved per position and module (0: the backward recomputes).
  index_t width() const noexcept { return width_; }
  std::size_t bytes() const noexcept { return std::size_t(modules_ * positions_ * width_) * sizeof(value_type); }
  /// Forget what was saved (the storage is kept for the next forward).
  void clear() noexcept { filled_ = false; }

 private:
  friend struct detail::saved_access;
  std::vector<value_type> data_;
  index_t modules_ = 0, positions_ = 0, dim_ = 0, width_ = 0;
  bool filled_ = false;
};

namespace detail {
/// The executors' side of saved_activations: a forward fills it (begin, run, finish), a backward
/// reads it after checking it belongs to the call.
struct saved_access {
  template <class T>
  static acc_t<T>* begin(saved_activations<T>& s, index_t K, index_t P, index_t d, index_t width) {
    s.filled_ = false;
    s.modules_ = K, s.positions_ = P, s.dim_ = d, s.width_ = width;
    const auto n = std::size_t(K * P * width);
    if (s.data_.size() < n) s.data_.resize(n);
    return width > 0 ? s.data_.data() : nullptr;
  }
  template <class T>
  static void finish(saved_activations<T>& s) noexcept { s.filled_ = true; }
  template <class T>
  static const acc_t<T>* use(const saved_activations<T>& s, index_t K, index_t P, index_t d, const char* what) {
    require<shape_error>(s.filled_, what, ": saved activations: expected what a forward saved, got none (pass the "
                         "same saved_activations to the forward first)");
    require<shape_error>(s.modules_ == K && s.positions_ == P && s.dim_ == d, what,
                         ": saved activations: expected a forward's over ", K, " module(s), ", P, " positions, d = ", d,
                         "; got one over ", s.modules_, " module(s), ", s.positions_, " positions, d = ", s.dim_);
    return s.width_ > 0 ? s.data_.data() : nullptr;
  }
};

}  // namespace detail

}  // namespace grun
