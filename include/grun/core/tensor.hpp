#pragma once
// grun/core/tensor.hpp — the one tensor concept every algorithm is written against.
//
// A tensor_view is a non-owning strided view (pointer, extents, strides in elements) with a
// storage value type and a memory-space tag, after std::mdspan with layout_stride. Framework
// tensors (at::Tensor, ggml_tensor, DLTensor, Eigen::Map) become views in their adapters;
// nothing below core/ ever names a framework type.
#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "config.hpp"
#include "error.hpp"
#include "numeric.hpp"

namespace grun {

// ---- memory spaces ---------------------------------------------------------------------
struct host_space { static constexpr const char* name = "host"; };
struct cuda_space { static constexpr const char* name = "cuda"; };

template <class S>
concept memory_space = std::same_as<S, host_space> || std::same_as<S, cuda_space>;

// ---- the view --------------------------------------------------------------------------
template <class T, int Rank, memory_space Space = host_space>
class tensor_view {
  static_assert(Rank >= 1 && Rank <= 4, "grun::tensor_view: rank must be 1..4");
  static_assert(is_storage_type_v<std::remove_const_t<T>> || std::is_integral_v<std::remove_const_t<T>>,
                "grun::tensor_view: value type must be float, double, grun::half, grun::bfloat16 or an "
                "integer (labels, positions)");

 public:
  using value_type = T;
  using element_type = std::remove_const_t<T>;
  using memory_space = Space;
  using extents_type = std::array<index_t, Rank>;
  static constexpr int rank = Rank;

  constexpr tensor_view() = default;
  /// Contiguous row-major view.
  GRUN_HD tensor_view(T* data, extents_type extents) : data_(data), extents_(extents) {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) { strides_[i] = s; s *= extents_[i]; }
  }
  /// Arbitrary strides (in elements, may be zero for broadcast, never negative).
  GRUN_HD tensor_view(T* data, extents_type extents, extents_type strides)
      : data_(data), extents_(extents), strides_(strides) {}

  /// A view of const elements converts implicitly from a mutable one.
  template <class U>
    requires(std::is_same_v<T, const U>)
  GRUN_HD tensor_view(const tensor_view<U, Rank, Space>& other)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  GRUN_HD T* data() const { return data_; }
  GRUN_HD index_t extent(int i) const { return extents_[i]; }
  GRUN_HD index_t stride(int i) const { return strides_[i]; }
  GRUN_HD const extents_type& extents() const { return extents_; }
  GRUN_HD const extents_type& strides() const { return strides_; }
  GRUN_HD index_t size() const {
    index_t n = 1;
    for (int i = 0; i < Rank; ++i) n *= extents_[i];
    return n;
  }
  GRUN_HD bool empty() const { return size() == 0; }

  /// Row-major contiguous (the fast path every kernel prefers).
  GRUN_HD bool is_contiguous() const {
    index_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      if (extents_[i] != 1 && strides_[i] != s) return false;
      s *= extents_[i];
    }
    return true;
  }
  /// Each row (last dimension) contiguous: the layout the row-wise policies need.
  GRUN_HD bool rows_contiguous() const { return extents_[Rank - 1] <= 1 || strides_[Rank - 1] == 1; }

  template <class... I>
    requires(sizeof...(I) == Rank && (std::is_integral_v<I> && ...))
  GRUN_HD T& operator()(I... idx) const {
    const index_t ix[] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (int i = 0; i < Rank; ++i) off += ix[i] * strides_[i];
    return data_[off];
  }

  /// Pointer to row `i` of a rank-2 view (rows_contiguous() required for element access by +j).
  GRUN_HD T* row(index_t i) const requires(Rank == 2) { return data_ + i * strides_[0]; }

 private:
  T* data_ = nullptr;
  extents_type extents_{};
  extents_type strides_{};
};

template <class T, memory_space S = host_space> using vector_view = tensor_view<T, 1, S>;
template <class T, memory_space S = host_space> using matrix_view = tensor_view<T, 2, S>;

// ---- the concept -----------------------------------------------------------------------
/// grun::tensor: what every algorithm requires of a tensor argument.
///   value_type    the storage element type (float, double, half, bfloat16, possibly const)
///   memory_space  host_space or cuda_space: where data() may be dereferenced
///   rank          number of dimensions
///   data(), extent(i), stride(i) in elements
template <class V>
concept tensor = requires(const V& v, int i) {
  typename V::value_type;
  typename V::memory_space;
  requires memory_space<typename V::memory_space>;
  { V::rank } -> std::convertible_to<int>;
  { v.data() } -> std::convertible_to<const typename V::value_type*>;
  { v.extent(i) } -> std::convertible_to<index_t>;
  { v.stride(i) } -> std::convertible_to<index_t>;
};
template <class V, class Space>
concept tensor_in = tensor<V> && std::same_as<typename V::memory_space, Space>;

static_assert(tensor<tensor_view<float, 2>>);
static_assert(tensor<tensor_view<const bfloat16, 3, cuda_space>>);

// ---- shape checks shared by every entry point -----------------------------------------
namespace detail {
template <tensor V>
std::string shape_string(const V& v) {
  std::string s = "[";
  for (int i = 0; i < V::rank; ++i) s += (i ? ", " : "") + std::to_string(v.extent(i));
  return s + "]";
}
}  // namespace detail

/// Throws shape_error unless `v` has extent `expected` in dimension `dim`.
template <tensor V>
void require_extent(const V& v, int dim, index_t expected, const char* what) {
  require<shape_error>(v.extent(dim) == expected, what, ": expected extent ", expected, " in dimension ", dim,
                       ", got shape ", detail::shape_string(v));
}
/// Throws shape_error unless `v` lives in memory space `Space`.
template <class Space, tensor V>
void require_space(const V&, const char* what) {
  if constexpr (!std::same_as<typename V::memory_space, Space>)
    fail<shape_error>(what, ": expected a tensor in ", Space::name, " memory, got one in ",
                      V::memory_space::name, " memory");
}
template <tensor V>
void require_rows_contiguous(const V& v, const char* what) {
  require<shape_error>(v.extent(V::rank - 1) <= 1 || v.stride(V::rank - 1) == 1, what,
                       ": expected unit stride in the last dimension, got stride ", v.stride(V::rank - 1));
}

// ---- owning buffer for hosts without a framework ---------------------------------------
/// A 64-byte aligned, zero-initialised host array. Move-only; view() hands out tensor_views.
template <class T>
class buffer {
  static_assert(is_storage_type_v<T> || std::is_integral_v<T>,
                "grun::buffer: element type must be a grun storage type or an integer");
  struct free_deleter { void operator()(T* p) const { ::operator delete[](p, std::align_val_t{64}); } };

 public:
  using value_type = T;
  buffer() = default;
  explicit buffer(index_t n) : size_(n) {
    require<shape_error>(n >= 0, "buffer: expected a non-negative size, got ", n);
    if (n > 0) {
      data_.reset(static_cast<T*>(::operator new[](sizeof(T) * static_cast<std::size_t>(n), std::align_val_t{64})));
      std::memset(static_cast<void*>(data_.get()), 0, sizeof(T) * static_cast<std::size_t>(n));
    }
  }
  buffer(const buffer& o) : buffer(o.size_) { if (size_) std::memcpy(data_.get(), o.data_.get(), sizeof(T) * size_); }
  buffer& operator=(const buffer& o) { if (this != &o) *this = buffer(o); return *this; }
  buffer(buffer&&) noexcept = default;
  buffer& operator=(buffer&&) noexcept = default;

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  index_t size() const { return size_; }
  T& operator[](index_t i) { return data_.get()[i]; }
  const T& operator[](index_t i) const { return data_.get()[i]; }
  std::span<T> span() { return {data(), static_cast<std::size_t>(size_)}; }
  std::span<const T> span() const { return {data(), static_cast<std::size_t>(size_)}; }
  void zero() { if (size_) std::memset(static_cast<void*>(data_.get()), 0, sizeof(T) * static_cast<std::size_t>(size_)); }

  template <int Rank = 1>
  tensor_view<T, Rank> view(std::array<index_t, Rank> extents) {
    index_t n = 1;
    for (auto e : extents) n *= e;
    require<shape_error>(n <= size_, "buffer::view: shape needs ", n, " elements, buffer holds ", size_);
    return {data(), extents};
  }
  vector_view<T> view() { return {data(), {size_}}; }

 private:
  std::unique_ptr<T[], free_deleter> data_;
  index_t size_ = 0;
};

/// A host matrix that owns its storage: the quickstart's and the tests' tensor.
template <class T>
struct host_matrix {
  buffer<T> storage;
  index_t rows = 0, cols = 0;
  host_matrix() = default;
  host_matrix(index_t r, index_t c) : storage(r * c), rows(r), cols(c) {}
  matrix_view<T> view() { return {storage.data(), {rows, cols}}; }
  matrix_view<const T> view() const { return {storage.data(), {rows, cols}}; }
  T& operator()(index_t i, index_t j) { return storage[i * cols + j]; }
  const T& operator()(index_t i, index_t j) const { return storage[i * cols + j]; }
};

}  // namespace grun
