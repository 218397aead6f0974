#pragma once
// Emulation shim for thrust::device_vector (tests/emulation): a value-initialised array in the
// emulated device memory (cudaMalloc of runtime.cpp, so the runtime knows it as device memory and
// AddressSanitizer knows its bounds). Only what grun's device_buffer uses.
#include <cuda_emulation.hpp>

#include <cstddef>
#include <cstring>
#include <new>
#include <utility>

namespace thrust {

template <class T>
class device_vector {
 public:
  device_vector() = default;
  explicit device_vector(std::size_t n) { resize(n); }
  device_vector(const device_vector& other) {
    resize(other.size_);
    if (size_) std::memcpy(data_, other.data_, sizeof(T) * size_);
  }
  device_vector(device_vector&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  device_vector& operator=(device_vector other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  ~device_vector() {
    if (data_) (void)cudaFree(data_);
  }

  void resize(std::size_t n) {
    T* fresh = nullptr;
    if (n > 0) {
      if (cudaMalloc(reinterpret_cast<void**>(&fresh), sizeof(T) * n) != cudaSuccess) throw std::bad_alloc();
      for (std::size_t i = 0; i < n; ++i) new (fresh + i) T();
      if (size_) std::memcpy(fresh, data_, sizeof(T) * (n < size_ ? n : size_));
    }
    if (data_) (void)cudaFree(data_);
    data_ = fresh;
    size_ = n;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

template <class T>
T* raw_pointer_cast(T* p) {
  return p;
}

}  // namespace thrust
