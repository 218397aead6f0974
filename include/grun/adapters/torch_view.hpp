#pragma once
// grun/adapters/torch_view.hpp — at::Tensor ↔ grun::tensor_view. Glue only: no math here.
//
// A CPU tensor becomes a host_space view, a CUDA tensor a cuda_space view; at::Half and
// at::BFloat16 share their bit layout with grun::half / grun::bfloat16, so the data pointer is
// reinterpreted, never copied. Strides are carried as they are; each algorithm states what it
// needs (rows contiguous, say) and rejects other layouts by name.
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

#include "../core/tensor.hpp"

namespace grun::torch_adapter {

/// The at::ScalarType a grun storage type maps to.
template <class T> constexpr at::ScalarType scalar_type_of() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return at::kFloat;
  else if constexpr (std::is_same_v<U, double>) return at::kDouble;
  else if constexpr (std::is_same_v<U, grun::half>) return at::kHalf;
  else if constexpr (std::is_same_v<U, grun::bfloat16>) return at::kBFloat16;
  else if constexpr (std::is_same_v<U, std::int64_t>) return at::kLong;
  else if constexpr (std::is_same_v<U, std::int32_t>) return at::kInt;
  else static_assert(sizeof(U) == 0, "grun::torch_adapter: no at::ScalarType for this element type");
}

/// Throws shape_error unless `t` is defined, has `Rank` dimensions and element type T.
template <class T, int Rank>
void check(const at::Tensor& t, const char* what) {
  require<shape_error>(t.defined(), what, ": expected a defined tensor, got an undefined one");
  require<shape_error>(t.dim() == Rank, what, ": expected ", Rank, " dimensions, got ", t.dim(), " (shape ",
                       std::string(c10::str(t.sizes())), ")");
  require<shape_error>(t.scalar_type() == scalar_type_of<T>(), what, ": expected dtype ",
                       c10::toString(scalar_type_of<T>()), ", got ", c10::toString(t.scalar_type()));
  require<shape_error>(t.is_cpu() || t.is_cuda(), what, ": expected a CPU or CUDA tensor, got device ",
                       t.device().str());
}

/// A grun view of `t` in memory space Space. Throws shape_error on any mismatch.
template <class T, int Rank, class Space = host_space>
tensor_view<T, Rank, Space> view(const at::Tensor& t, const char* what = "tensor") {
  check<T, Rank>(t, what);
  if constexpr (std::is_same_v<Space, host_space>)
    require<shape_error>(t.is_cpu(), what, ": expected a CPU tensor, got one on ", t.device().str());
  else
    require<shape_error>(t.is_cuda(), what, ": expected a CUDA tensor, got one on ", t.device().str());
  typename tensor_view<T, Rank, Space>::extents_type extents{}, strides{};
  for (int i = 0; i < Rank; ++i) {
    extents[i] = t.size(i);
    strides[i] = t.stride(i);
    require<shape_error>(strides[i] >= 0, what, ": expected non-negative strides, got ", strides[i],
                         " in dimension ", i);
  }
  using raw = std::conditional_t<std::is_const_v<T>, const void*, void*>;
  raw p = t.data_ptr();
  return {static_cast<T*>(p), extents, strides};
}

/// Views an [.., d] tensor as the [N, d] matrix of rows every intervention works on. The leading
/// dimensions must collapse (contiguous), otherwise shape_error names the layout.
template <class T, class Space = host_space>
matrix_view<T, Space> rows_view(const at::Tensor& t, const char* what = "hidden") {
  require<shape_error>(t.defined() && t.dim() >= 1, what, ": expected a tensor of at least one dimension");
  require<shape_error>(t.is_contiguous(), what, ": expected a contiguous tensor (call .contiguous()), got strides ",
                       std::string(c10::str(t.strides())));
  return view<T, 2, Space>(t.reshape({-1, t.size(-1)}), what);
}

}  // namespace grun::torch_adapter
