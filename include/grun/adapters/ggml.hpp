#pragma once
// grun/adapters/ggml.hpp — a trained grun module as a custom operator in a ggml inference graph
// (llama.cpp and friends), and ggml tensors as grun views. Glue only: no math here.
//
// ggml keeps a hidden state as ne = [d, n_tokens, …] with ne[0] contiguous: each token is one
// contiguous row of d values, which is grun's [N, d] row view (the outer dimensions collapse into N
// when they are laid out one after the other). F32, F16 and BF16 tensors map bit for bit onto grun's
// float, half and bfloat16; quantized types are refused by name.
//
//   grun::ggml::intervention_op op(module, grun::positions::rows({last_prompt_token}));
//   ggml_tensor* h2 = op(ctx, h);          // graph build: types, shapes and positions checked here
//   … ggml_graph_compute …                 // ggml's threads each take a run of rows
//   op.check();                            // rethrows what a compute raised (none of the above can)
//   std::span<const float> g = op.gates(); // the gates of the last compute, in position order
//
// The op holds a reference to the module and its own positions: both must outlive every compute
// of the graph. Applying a module reads its parameters only, so several ops (or threads) may share one.
#include <ggml.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/params.hpp"
#include "../core/tensor.hpp"
#include "../exec/host.hpp"
#include "../positions.hpp"

namespace grun::ggml {

/// The ggml type of a grun storage type.
template <class T> constexpr ggml_type type_of() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return GGML_TYPE_F32;
  else if constexpr (std::is_same_v<U, grun::half>) return GGML_TYPE_F16;
  else if constexpr (std::is_same_v<U, grun::bfloat16>) return GGML_TYPE_BF16;
  else static_assert(sizeof(U) == 0, "grun::ggml: the storage type must be float, grun::half or grun::bfloat16");
}
static_assert(sizeof(ggml_fp16_t) == sizeof(grun::half) && sizeof(ggml_bf16_t) == sizeof(grun::bfloat16));

namespace detail {
template <class T, class Tensor>
tensor_view<T, 2> tokens(Tensor* t, const char* what, bool need_data = true) {
  require<shape_error>(t != nullptr, what, ": expected a ggml tensor, got a null pointer");
  require<shape_error>(t->type == type_of<T>(), what, ": expected type ", ggml_type_name(type_of<T>()), ", got ",
                       ggml_type_name(t->type));
  const std::size_t es = sizeof(T);
  require<shape_error>(t->nb[0] == es, what, ": expected each token's ", t->ne[0], " values contiguous (nb[0] = ", es,
                       " bytes), got nb[0] = ", t->nb[0]);
  require<shape_error>(t->nb[1] % es == 0, what, ": expected a row stride nb[1] that is a multiple of ", es,
                       " bytes, got ", t->nb[1]);
  // Dimensions 1..3 collapse into one run of rows when each steps over the whole of the one before.
  for (int i = 2; i < GGML_MAX_DIMS; ++i)
    require<shape_error>(t->ne[i] == 1 || t->nb[i] == t->nb[i - 1] * std::size_t(t->ne[i - 1]), what,
                         ": expected dimensions 1..3 laid out one after the other (nb[", i, "] = nb[", i - 1,
                         "]·ne[", i - 1, "] = ", t->nb[i - 1] * std::size_t(t->ne[i - 1]), "), got nb[", i,
                         "] = ", t->nb[i]);
  const index_t rows = index_t(t->ne[1]) * index_t(t->ne[2]) * index_t(t->ne[3]);
  require<shape_error>(!need_data || rows == 0 || t->data != nullptr, what, ": expected allocated data, got a tensor without data "
                       "(not computed or not allocated yet?)");
  using byte_t = std::conditional_t<std::is_const_v<Tensor>, const char, char>;
  return {reinterpret_cast<T*>(static_cast<byte_t*>(t->data)), {rows, index_t(t->ne[0])},
          {index_t(t->nb[1] / es), 1}};
}
}  // namespace detail

/// [N, d] view of a ggml tensor's tokens (ne[0] = d, N = ne[1]·ne[2]·ne[3]).
template <class T>
matrix_view<T> tokens(ggml_tensor* t, const char* what = "tensor") {
  return detail::tokens<T>(t, what);
}
template <class T>
matrix_view<const T> tokens(const ggml_tensor* t, const char* what = "tensor") {
  return detail::tokens<const T>(t, what);
}

/// A grun module (gated_intervention<…>::module<T>, T = float, half or bfloat16) applied at fixed
/// positions as a ggml custom operator: h' = h + g(h)·Δ(h) on those rows, the others copied.
template <class Module>
class intervention_op {
 public:
  using value_type = param_value_t<typename Module::params_type>;

  intervention_op(const Module& module, positions pos) : module_(module), pos_(std::move(pos)) {
    gates_.assign(std::size_t(pos_.size()), 0.f);
  }
  intervention_op(const intervention_op&) = delete;  // ggml holds its address
  intervention_op& operator=(const intervention_op&) = delete;

  /// Adds the operator to the graph: returns h' (a new tensor of h's shape and type). Checks now, at
  /// graph-build time, what a compute could otherwise only fail on: h's type and layout, its hidden
  /// size against the module's, and the positions against its rows.
  ggml_tensor* operator()(ggml_context* ctx, ggml_tensor* h) {
    require<shape_error>(ctx != nullptr, "grun::ggml::intervention_op: expected a ggml context, got a null pointer");
    require<shape_error>(h != nullptr, "grun::ggml::intervention_op: h: expected a ggml tensor, got a null pointer");
    check_layout(h, "grun::ggml::intervention_op: h");
    const index_t d = index_t(h->ne[0]), rows = index_t(h->ne[1] * h->ne[2] * h->ne[3]);
    require<shape_error>(d == module_.dim(), "grun::ggml::intervention_op: h: expected hidden size ne[0] = ",
                         module_.dim(), " (the module's), got ", d);
    pos_.validate(rows, "grun::ggml::intervention_op");
    return ggml_map_custom1(ctx, h, &run, GGML_N_TASKS_MAX, this);
  }

  /// The gates of the last compute, one per position in the order given (fp32).
  std::span<const float> gates() const { return gates_; }
  const positions& rows() const { return pos_; }
  /// Rethrows (and clears) the first error raised inside a compute since the last check(): ggml's C
  /// frames cannot carry an exception, so a compute task records it and leaves its rows unwritten.
  void check() {
    std::exception_ptr e;
    {
      std::lock_guard lock(error_mutex_);
      e = std::exchange(error_, nullptr);
    }
    if (e) std::rethrow_exception(e);
  }

 private:
  static void check_layout(const ggml_tensor* t, const char* what) {
    (void)detail::tokens<const value_type>(t, what, /*need_data=*/false);  // type, strides: data comes later
  }

  /// ggml's callback: task ith of nth takes rows [r0, r1) of h, copies them to dst and applies the
  /// module at the positions among them (rebased), with grun's serial host executor.
  static void run(ggml_tensor* dst, const ggml_tensor* a, int ith, int nth, void* userdata) {
    auto* self = static_cast<intervention_op*>(userdata);
    try {
      self->run_rows(dst, a, ith, nth);
    } catch (...) {
      std::lock_guard lock(self->error_mutex_);
      if (!self->error_) self->error_ = std::current_exception();
    }
  }
  void run_rows(ggml_tensor* dst, const ggml_tensor* a, int ith, int nth) {
    using T = value_type;
    const matrix_view<const T> h = tokens<T>(a, "grun::ggml::intervention_op: h");
    const matrix_view<T> out = tokens<T>(dst, "grun::ggml::intervention_op: dst");
    const index_t n = h.extent(0), d = h.extent(1);
    const index_t r0 = n * ith / nth, r1 = n * (ith + 1) / nth;
    if (r0 == r1) return;
    std::vector<index_t> mine, which;  // positions in [r0, r1), rebased, and their index in pos_
    for (index_t q = 0; q < pos_.size(); ++q)
      if (pos_[q] >= r0 && pos_[q] < r1) { mine.push_back(pos_[q] - r0); which.push_back(q); }
    const matrix_view<const T> hs(h.row(r0), {r1 - r0, d}, {h.stride(0), 1});
    const matrix_view<T> os(out.row(r0), {r1 - r0, d}, {out.stride(0), 1});
    std::vector<T> g(std::max<std::size_t>(mine.size(), 1));
    module_.forward(exec::host, hs, positions::rows(std::move(mine)), os,
                    vector_view<T>(g.data(), {index_t(which.size())}));
    for (std::size_t i = 0; i < which.size(); ++i) gates_[std::size_t(which[i])] = load<float>(g[i]);
  }

  const Module& module_;
  positions pos_;
  std::vector<float> gates_;  // each compute task writes the gates of its own positions only
  mutable std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace grun::ggml
