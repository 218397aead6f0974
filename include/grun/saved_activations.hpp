#pragma once
// grun/saved_activations.hpp — what a training forward keeps for its backward (see the class), apart
// from intervention.hpp so that adapters which take it (dlpack.hpp) need not include the policies.
#include <cstddef>
#include <utility>
#include <vector>

#include "core/error.hpp"
#include "core/config.hpp"

namespace grun {

namespace detail {
struct saved_access;

/// Memory of another space (exec::cuda: device memory) owned by a saved_activations: allocated by
/// the executor that fills it, told of each call that touches it (note(where), `where` the
/// executor's stream: a stream-ordered release must wait for all of them), released through the
/// function it gave. Type-erased — two functions and an opaque context — so that this header
/// includes no backend's.
class foreign_storage {
 public:
  using release_fn = void (*)(void* data, void* context) noexcept;
  using note_fn = void (*)(void* context, void* where);
  foreign_storage() = default;
  foreign_storage(void* data, std::size_t bytes, release_fn release, void* context = nullptr,
                  note_fn note = nullptr) noexcept
      : data_(data), bytes_(bytes), release_(release), note_(note), context_(context) {}
  foreign_storage(foreign_storage&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), release_(o.release_),
        note_(o.note_), context_(std::exchange(o.context_, nullptr)) {}
  foreign_storage& operator=(foreign_storage&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
      release_ = o.release_;
      note_ = o.note_;
      context_ = std::exchange(o.context_, nullptr);
    }
    return *this;
  }
  foreign_storage(const foreign_storage&) = delete;
  foreign_storage& operator=(const foreign_storage&) = delete;
  ~foreign_storage() { reset(); }
  void* data() const noexcept { return data_; }
  std::size_t bytes() const noexcept { return bytes_; }
  /// A call has touched the memory from `where` (it changes what the release waits for, not the memory).
  void note(void* where) const {
    if (data_ && note_) note_(context_, where);
  }
  void reset() noexcept {
    if (data_ && release_) release_(data_, context_);
    data_ = nullptr;
    bytes_ = 0;
    context_ = nullptr;
  }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  release_fn release_ = nullptr;
  note_fn note_ = nullptr;
  void* context_ = nullptr;
};
}  // namespace detail

/// What a training forward keeps so that its backward need not recompute it (cuDNN's reserve
/// space; a framework's saved tensors).
/// - exec::host, gate::mlp: its hidden activations a1, a2 and g — (H1 + H2 + 1) scalars of acc_t<T>
///   per position and module, 1.3 KB with the default <256, 64> — so the backward skips the gate's
///   forward, whose first-layer GEMM is a quarter of the gate's fwd+bwd arithmetic. Gradients are
///   bit for bit the same either way. Other gates on the host save nothing (a linear gate's
///   recompute is one dot over a row the backward reads anyway).
/// - exec::cuda, 16-bit storage, the fused kernels (gate::linear / gate::always / gate::mlp × a
///   rank-r ReFT): e = D h + b − [lo] U h and the gate's logit z, r + 1 fp32 values per position and
///   module, in device memory — so the backward's first kernel reads dout only, not h and dout: half
///   its bytes; gate::mlp keeps its a1, a2 and logit too (H1 + H2 + 1 more), so the backward skips
///   the gate's forward as on the host. The gradients use the forward's values instead of recomputed
///   ones (another summation order: held to the host like every path, and bitwise repeatable).
///   Other calls on exec::cuda (fp32, whose backward forms e from fp64 dots; the generic path) save
///   nothing and recompute (width() == 0).
/// Reuse one across steps: its storage is kept (for exec::cuda it grows when it must, stream-ordered
/// from grun's device pool; nothing synchronizes the device, neither then nor when it goes — see
/// cuda::detail::allocate_saved). With exec::cuda, its device block is released once every forward
/// and backward that used it has run, whatever streams they ran on (no caller's stream waits for
/// that); a forward that refills it on another stream than a backward that reads it is the caller's
/// to order, as for any buffer.
///
///   grun::saved_activations<float> saved;
///   m.forward(ex, h, pos, out, gates, saved);   m.backward(ex, h, pos, dout, dgates, dh, saved);
///
/// The backward checks that the forward filled it for as many modules and positions and the same d,
/// and on the same kind of executor, not the values: as with saved tensors, h, the positions and the
/// parameters must be the ones the forward saw (no optimizer step in between). A forward that
/// refuses its inputs leaves it as it was; one that fails while running leaves it unfilled, never
/// half-filled and marked filled. Movable, not copyable (it may own device memory).
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
  /// Whether the values lie in an executor's device memory (exec::cuda), for that executor's backward.
  bool on_device() const noexcept { return on_device_; }
  /// Forget what was saved (the storage is kept for the next forward).
  void clear() noexcept { filled_ = false; }

 private:
  friend struct detail::saved_access;
  std::vector<value_type> data_;
  detail::foreign_storage device_;
  index_t modules_ = 0, positions_ = 0, dim_ = 0, width_ = 0;
  bool filled_ = false, on_device_ = false;
};

namespace detail {
/// The executors' side of saved_activations: a forward fills it (begin, run, finish), a backward
/// reads it after checking it belongs to the call.
struct saved_access {
  /// A host forward's storage: width scalars per position and module, in data_.
  template <class T>
  static acc_t<T>* begin(saved_activations<T>& s, index_t K, index_t P, index_t d, index_t width) {
    start(s, K, P, d, width, false);
    const auto n = std::size_t(K * P * width);
    if (s.data_.size() < n) s.data_.resize(n);
    return width > 0 ? s.data_.data() : nullptr;
  }
  /// A device executor's forward: the same in its memory, grown by allocate(bytes) → foreign_storage
  /// when too small (the old block released first).
  template <class T, class Allocate>
  static acc_t<T>* begin_on_device(saved_activations<T>& s, index_t K, index_t P, index_t d, index_t width,
                                   Allocate&& allocate) {
    start(s, K, P, d, width, true);
    const std::size_t bytes = s.bytes();
    if (s.device_.bytes() < bytes) {
      s.device_.reset();
      s.device_ = allocate(bytes);
    }
    return width > 0 ? static_cast<acc_t<T>*>(s.device_.data()) : nullptr;
  }
  template <class T>
  static void finish(saved_activations<T>& s) noexcept { s.filled_ = true; }
  /// Runs call() — a forward that may fill s in device memory, or a backward reading it, on executor
  /// ex — then, when s holds values in device memory (the forward kept some; the backward reads
  /// them), tells the device block that ex's stream touched it, also when call() throws (kernels it
  /// launched before may still run: the block's release must wait for them). A call that kept
  /// nothing leaves what the release waits for as it was. Executors without a stream: just call().
  template <class T, class Exec, class Call>
  static void touching(const saved_activations<T>& s, const Exec& ex, Call&& call) {
    if constexpr (requires { ex.stream; }) {
      const auto note = [&] {
        if (s.on_device_ && s.width_ > 0) s.device_.note(ex.stream);
      };
      try {
        call();
      } catch (...) {
        note();
        throw;
      }
      note();
    } else {
      call();
    }
  }
  /// What the backward reads: null when nothing was saved (width 0), else the values, which must lie
  /// where this backward's executor reads (on_device: a device executor's).
  template <class T>
  static const acc_t<T>* use(const saved_activations<T>& s, index_t K, index_t P, index_t d, bool on_device,
                             const char* what) {
    require<shape_error>(s.filled_, what, ": saved activations: expected what a forward saved, got none (pass the "
                         "same saved_activations to the forward first)");
    require<shape_error>(s.modules_ == K && s.positions_ == P && s.dim_ == d, what,
                         ": saved activations: expected a forward's over ", K, " module(s), ", P, " positions, d = ", d,
                         "; got one over ", s.modules_, " module(s), ", s.positions_, " positions, d = ", s.dim_);
    if (s.width_ == 0) return nullptr;
    require<shape_error>(s.on_device_ == on_device, what, ": saved activations: expected ones saved by a forward on ",
                         on_device ? "a device executor (exec::cuda)" : "exec::host", ", got ones in ",
                         s.on_device_ ? "device memory (a forward on exec::cuda)" : "host memory (a forward on exec::host)");
    return on_device ? static_cast<const acc_t<T>*>(s.device_.data()) : s.data_.data();
  }

 private:
  template <class T>
  static void start(saved_activations<T>& s, index_t K, index_t P, index_t d, index_t width, bool on_device) {
    s.filled_ = false;
    s.modules_ = K, s.positions_ = P, s.dim_ = d, s.width_ = width;
    s.on_device_ = on_device;
  }
};

}  // namespace detail

}  // namespace grun
