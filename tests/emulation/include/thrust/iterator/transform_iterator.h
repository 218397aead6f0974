#pragma once
// Emulation shim for thrust::transform_iterator (tests/emulation): *it is f(*base), random access.
// Only what grun's reductions use; base() lets a shim check that the underlying array is device
// memory, as a kernel reading through it would need.
#include <cuda_emulation.hpp>

#include <cstddef>
#include <utility>

namespace thrust {

template <class F, class It>
class transform_iterator {
 public:
  using value_type = decltype(std::declval<const F&>()(*std::declval<It>()));
  using difference_type = std::ptrdiff_t;

  transform_iterator(It base, F f) : base_(base), f_(f) {}
  value_type operator*() const { return f_(*base_); }
  value_type operator[](difference_type i) const { return f_(base_[i]); }
  transform_iterator operator+(difference_type i) const { return {base_ + i, f_}; }
  It base() const { return base_; }

 private:
  It base_;
  F f_;
};

template <class It, class F>
transform_iterator<F, It> make_transform_iterator(It base, F f) {
  return {base, f};
}

}  // namespace thrust
