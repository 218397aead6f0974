#pragma once
// grun/core/params.hpp — parameters as plain aggregates of views, reflected with Boost.PFR.
//
// A policy declares its parameters once, as an aggregate of `param<T>` fields (or of nested
// aggregates), plus a `shape(params&, dims)` that sets each field's extents. Everything else —
// allocation, zero-grad, AdamW, parameter counting, (de)serialization — walks those fields
// generically with for_each_param, so no policy writes per-parameter boilerplate.
#include <boost/pfr.hpp>

#include <array>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tensor.hpp"

namespace grun {

/// One contiguous parameter tensor: a matrix [rows, cols] or, when `is_vector`, a vector [cols]
/// (rows == 1). Non-owning; trivially copyable so it crosses to the device by value.
template <class T, class Space = host_space>
struct param {
  using value_type = T;
  using memory_space = Space;
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  bool is_vector = false;

  GRUN_HD index_t size() const { return rows * cols; }
  GRUN_HD T& operator()(index_t i, index_t j) const { return data[i * cols + j]; }
  GRUN_HD T& operator[](index_t i) const { return data[i]; }
  GRUN_HD T* row(index_t i) const { return data + i * cols; }
  /// Shape as written to files: [cols] for a vector, [rows, cols] for a matrix.
  std::vector<index_t> shape() const {
    return is_vector ? std::vector<index_t>{cols} : std::vector<index_t>{rows, cols};
  }
  matrix_view<T, Space> view() const { return {data, {rows, cols}}; }
};

/// Shape-only constructors used by policies' shape() functions. Every leaf's element count fits in
/// index_t (a hidden size of 2^57 made the mlp gate's 256·d overflow: undefined, then a garbage count).
template <class T, class S> void set_matrix(param<T, S>& p, index_t rows, index_t cols) {
  index_t n = 0;
  require<shape_error>(rows >= 0 && cols >= 0 && !__builtin_mul_overflow(rows, cols, &n),
                       "parameter shape: expected a [rows, cols] whose element count fits in 64 bits, got [", rows,
                       ", ", cols, "]");
  p.rows = rows; p.cols = cols; p.is_vector = false;
}
template <class T, class S> void set_vector(param<T, S>& p, index_t n) {
  require<shape_error>(n >= 0, "parameter shape: expected a non-negative length, got ", n);
  p.rows = 1; p.cols = n; p.is_vector = true;
}

namespace detail {
template <class X> struct is_param : std::false_type {};
template <class T, class S> struct is_param<param<T, S>> : std::true_type {};
}  // namespace detail

/// Calls f(param&) for every leaf param of an aggregate, depth first, in declaration order.
template <class Params, class F>
void for_each_param(Params& p, F&& f) {
  if constexpr (detail::is_param<std::remove_const_t<Params>>::value) {
    f(p);
  } else {
    static_assert(std::is_aggregate_v<std::remove_const_t<Params>>,
                  "grun::for_each_param: a parameter struct must be an aggregate of grun::param fields");
    boost::pfr::for_each_field(p, [&](auto& field) { for_each_param(field, f); });
  }
}

/// Calls f(a_leaf, b_leaf) pairwise over two aggregates of the same type (params and grads, say).
template <class Params, class Other, class F>
void for_each_param_pair(Params& a, Other& b, F&& f) {
  if constexpr (detail::is_param<std::remove_const_t<Params>>::value) {
    f(a, b);
  } else {
    constexpr std::size_t n = boost::pfr::tuple_size_v<std::remove_const_t<Params>>;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (for_each_param_pair(boost::pfr::get<I>(a), boost::pfr::get<I>(b), f), ...);
    }(std::make_index_sequence<n>{});
  }
}

/// Number of scalar parameters.
template <class Params>
index_t parameter_count(const Params& p) {
  index_t n = 0;
  for_each_param(p, [&](const auto& leaf) {
    require<shape_error>(!__builtin_add_overflow(n, leaf.size(), &n),
                         "parameter_count: expected a total that fits in 64 bits, got an overflowing sum");
  });
  return n;
}

namespace detail {
template <class P> auto& first_leaf(P& p) {
  if constexpr (is_param<P>::value) return p;
  else return first_leaf(boost::pfr::get<0>(p));
}
}  // namespace detail

namespace detail {
template <class P> struct param_value {
  using type = typename std::remove_cvref_t<decltype(first_leaf(std::declval<P&>()))>::value_type;
};
/// An aggregate may name its storage type (needed when its first field is an empty aggregate,
/// e.g. a gate without parameters).
template <class P> requires requires { typename P::value_type; }
struct param_value<P> { using type = typename P::value_type; };
}  // namespace detail

/// Storage type of a parameter aggregate (its value_type if it declares one, else the value_type of its first leaf).
template <class Params>
using param_value_t = typename detail::param_value<std::remove_const_t<Params>>::type;

/// Host storage for one parameter aggregate: one aligned buffer carved into the fields, so
/// an optimizer or a copy touches one contiguous block.
template <class Params>
class owned_params {
 public:
  using value_type = param_value_t<Params>;

  owned_params() = default;
  /// `shaped` carries extents only (data pointers null), as set by a policy's shape().
  explicit owned_params(const Params& shaped) : view_(shaped) {
    storage_ = buffer<value_type>(parameter_count(view_));
    index_t offset = 0;
    for_each_param(view_, [&](auto& leaf) { leaf.data = storage_.data() + offset; offset += leaf.size(); });
  }
  owned_params(const owned_params& o) : owned_params(o.view_) { copy_from(o); }
  owned_params& operator=(const owned_params& o) {
    if (this != &o) { *this = owned_params(o.view_); copy_from(o); }
    return *this;
  }
  owned_params(owned_params&&) noexcept = default;
  owned_params& operator=(owned_params&&) noexcept = default;

  Params& operator*() { return view_; }
  const Params& operator*() const { return view_; }
  Params* operator->() { return &view_; }
  const Params* operator->() const { return &view_; }
  value_type* data() { return storage_.data(); }
  const value_type* data() const { return storage_.data(); }
  index_t size() const { return storage_.size(); }
  void zero() { if (size()) std::memset(static_cast<void*>(data()), 0, sizeof(value_type) * size()); }

 private:
  void copy_from(const owned_params& o) {
    if (size()) std::memcpy(static_cast<void*>(data()), o.data(), sizeof(value_type) * size());
  }
  Params view_{};
  buffer<value_type> storage_;
};

/// Per-element state of type U shaped like a parameter aggregate, leaf for leaf — an optimizer's
/// moments. One `Storage` buffer (buffer<U> on the host, cuda::device_buffer<U> on the device)
/// carved in for_each_param order: leaf i of the state and leaf i of the parameters have the same
/// extents, and the state of element k of a parameter leaf is element k of state leaf i.
///
/// Unlike owned_params<Params>, the element type is free: AdamW keeps the moments of half and
/// bfloat16 parameters in fp32 (acc_t), where (1 − β2)·g² and the slow decay of v survive.
template <class U, class Space, class Storage>
class basic_param_state {
 public:
  using value_type = U;
  using memory_space = Space;
  using leaf_type = param<U, Space>;

  basic_param_state() = default;
  /// `shaped` carries extents only (its data pointers are not read); the state starts at zero
  /// (both storages zero-initialize).
  template <class Params>
  explicit basic_param_state(const Params& shaped) {
    for_each_param(shaped, [&](const auto& leaf) {
      leaves_.push_back(leaf_type{nullptr, leaf.rows, leaf.cols, leaf.is_vector});
    });
    storage_ = Storage(parameter_count(shaped));
    seat_leaves();
  }
  // The leaves point into storage_: a copy re-seats them into its own storage; a move keeps them
  // (the moved buffer keeps its address) and leaves the source empty.
  basic_param_state(const basic_param_state& o) : leaves_(o.leaves_), storage_(o.storage_) { seat_leaves(); }
  basic_param_state& operator=(const basic_param_state& o) {
    if (this != &o) *this = basic_param_state(o);
    return *this;
  }
  basic_param_state(basic_param_state&& o) noexcept : leaves_(std::move(o.leaves_)), storage_(std::move(o.storage_)) {
    seat_leaves();
    o.leaves_.clear();
  }
  basic_param_state& operator=(basic_param_state&& o) noexcept {
    if (this != &o) {
      leaves_ = std::move(o.leaves_);
      storage_ = std::move(o.storage_);
      seat_leaves();
      o.leaves_.clear();
    }
    return *this;
  }

  /// Leaf i (for_each_param order of the aggregate it was shaped from).
  const leaf_type& leaf(index_t i) const { return leaves_.at(static_cast<std::size_t>(i)); }
  std::span<const leaf_type> leaves() const { return leaves_; }
  index_t leaf_count() const { return static_cast<index_t>(leaves_.size()); }
  U* data() { return storage_.data(); }
  const U* data() const { return storage_.data(); }
  index_t size() const { return storage_.size(); }
  void zero() { storage_.zero(); }

 private:
  void seat_leaves() {
    index_t offset = 0;
    for (auto& l : leaves_) { l.data = storage_.data() + offset; offset += l.size(); }
  }
  std::vector<leaf_type> leaves_;
  Storage storage_;
};

/// Host per-element state shaped like a parameter aggregate (see basic_param_state).
template <class U>
using param_state = basic_param_state<U, host_space, buffer<U>>;

}  // namespace grun
