#pragma once
// grun/cuda/check.cuh — the CUDA seam every kernel header stands on: checked runtime calls,
// device discovery, owning device buffers (Thrust), storage-type bridges and the host checks
// that run before any launch.
//
// Only compiled by nvcc (or a CUDA-aware clang). Nothing here launches work by itself.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <thrust/copy.h>
#include <thrust/device_vector.h>
#include <thrust/fill.h>

#include <cstddef>
#include <mutex>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include <grun/core/error.hpp>
#include <grun/core/numeric.hpp>
#include <grun/core/params.hpp>
#include <grun/core/tensor.hpp>
#include <grun/exec/host.hpp>  // exec/cuda.hpp names exec::host_t without including it
#include <grun/exec/cuda.hpp>

namespace grun::cuda {

namespace detail {
/// Turns a failed CUDA runtime call into grun::error naming the call, the place and the
/// runtime's own words. Clears the sticky "last error" so a later check does not report it twice.
inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail<error>("CUDA call failed: ", call, " at ", file, ":", line, ": ", cudaGetErrorName(status), " (",
              cudaGetErrorString(status), ")");
}
}  // namespace detail

}  // namespace grun::cuda

/// Every CUDA runtime call goes through this: a failure throws grun::error with file and line.
#define GRUN_CUDA_CHECK(call) ::grun::cuda::detail::check((call), #call, __FILE__, __LINE__)
/// After a kernel launch: configuration errors surface at once, not at the next sync.
#define GRUN_CUDA_CHECK_LAUNCH() GRUN_CUDA_CHECK(cudaGetLastError())

namespace grun::cuda {

// ---- device discovery -----------------------------------------------------------------
/// Number of usable CUDA devices; 0 when there is no driver, no device, or the runtime
/// refuses (never throws: tests and benchmarks use it to decide whether to skip).
inline int device_count() noexcept {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { (void)cudaGetLastError(); n = 0; }
    return n;
  }();
  return count;
}
inline bool device_available() noexcept { return device_count() > 0; }

/// The value `make(device)` gives for the device current at the call: made at the first call on each
/// device and kept for the process, never destroyed (a pool or handle torn down at static
/// destruction could outlive the CUDA context). One table per call site (each `make` lambda is its
/// own type), guarded by its own mutex; make runs under it. For what belongs to a device — its
/// memory pool, a library handle, its attributes, a kernel's opt-in — where a process-wide `static`
/// would decide for every device from the first one that asked.
template <class Value, class Make>
Value per_device(Make make) {
  int device = 0;
  GRUN_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex guard;
  static std::vector<std::optional<Value>> table;
  const std::lock_guard lock(guard);
  if (table.size() <= std::size_t(device)) table.resize(std::size_t(device) + 1);
  std::optional<Value>& slot = table[std::size_t(device)];
  if (!slot) slot = make(device);
  return *slot;
}

/// Launches need a device; without one the call fails by name instead of a CUDA error code.
inline void require_device(const char* what) {
  require<error>(device_available(), what, ": exec::cuda needs a CUDA device, none is available");
}

/// The stream an executor names (nullptr = the legacy default stream).
inline cudaStream_t stream_of(const exec::cuda_t& ex) noexcept { return static_cast<cudaStream_t>(ex.stream); }

// ---- storage types ----------------------------------------------------------------------
/// grun's 2-byte storage types and CUDA's share bit layouts, so pointers are reinterpreted,
/// never converted element by element.
template <class T> struct device_type { using type = T; };
template <> struct device_type<half> { using type = __half; };
template <> struct device_type<bfloat16> { using type = __nv_bfloat16; };
template <class T> struct device_type<const T> { using type = const typename device_type<T>::type; };
template <class T> using device_type_t = typename device_type<T>::type;

static_assert(sizeof(half) == sizeof(__half) && alignof(half) <= alignof(__half));
static_assert(sizeof(bfloat16) == sizeof(__nv_bfloat16) && alignof(bfloat16) <= alignof(__nv_bfloat16));

template <class T> GRUN_HD inline device_type_t<T>* as_device_type(T* p) {
  return reinterpret_cast<device_type_t<T>*>(p);
}

/// Loads one stored element into float with the hardware conversion on the device (exact for
/// every storage type, so it equals grun::load<float> bit for bit).
template <class T> __device__ __forceinline__ float dload(const T* p) {
  if constexpr (std::is_same_v<T, half>) return __half2float(*reinterpret_cast<const __half*>(p));
  else if constexpr (std::is_same_v<T, bfloat16>) return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
  else return static_cast<float>(*p);
}
/// Stores float with round-to-nearest-even (the same rounding as grun::store on the host).
template <class T> __device__ __forceinline__ void dstore(T* p, float x) {
  if constexpr (std::is_same_v<T, half>) *reinterpret_cast<__half*>(p) = __float2half_rn(x);
  else if constexpr (std::is_same_v<T, bfloat16>) *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(x);
  else *p = static_cast<T>(x);
}

/// N elements moved as one aligned vector load/store (16 bytes for float × 4, half × 8).
template <class T, int N>
struct alignas(sizeof(T) * N) vec {
  T v[N];
};
/// Elements per 16-byte transaction.
template <class T> inline constexpr int vec_width = 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1;

// ---- owning device memory ---------------------------------------------------------------
/// A zero-initialised device array (thrust::device_vector underneath) that hands out
/// tensor_views in cuda_space. Copies to and from the host are explicit.
template <class T>
class device_buffer {
  static_assert(is_storage_type_v<T> || std::is_integral_v<T>,
                "grun::cuda::device_buffer: element type must be a grun storage type or an integer");

 public:
  using value_type = T;
  device_buffer() = default;
  device_buffer(const device_buffer&) = default;
  device_buffer& operator=(const device_buffer&) = default;
  // noexcept: containers of buffers move them on growth rather than deep-copying device memory
  // (thrust::device_vector's move steals the allocation and does not throw, but is not marked so).
  device_buffer(device_buffer&&) noexcept = default;
  device_buffer& operator=(device_buffer&&) noexcept = default;
  explicit device_buffer(index_t n) {
    require<shape_error>(n >= 0, "device_buffer: expected a non-negative size, got ", n);
    if (n == 0) return;
    require_device("device_buffer");
    v_.resize(static_cast<std::size_t>(n));  // value-initialized (zeros) by Thrust, which synchronizes
  }
  explicit device_buffer(std::span<const T> host) : device_buffer(static_cast<index_t>(host.size())) {
    copy_from_host(host);
  }

  T* data() { return thrust::raw_pointer_cast(v_.data()); }
  const T* data() const { return thrust::raw_pointer_cast(v_.data()); }
  index_t size() const { return static_cast<index_t>(v_.size()); }

  void copy_from_host(std::span<const T> host) {
    require<shape_error>(static_cast<index_t>(host.size()) == size(), "device_buffer::copy_from_host: expected ",
                         size(), " elements, got ", host.size());
    if (size()) GRUN_CUDA_CHECK(cudaMemcpy(data(), host.data(), sizeof(T) * host.size(), cudaMemcpyHostToDevice));
  }
  void copy_to_host(std::span<T> host) const {
    require<shape_error>(static_cast<index_t>(host.size()) == size(), "device_buffer::copy_to_host: expected ",
                         size(), " elements, got ", host.size());
    if (size()) GRUN_CUDA_CHECK(cudaMemcpy(host.data(), data(), sizeof(T) * host.size(), cudaMemcpyDeviceToHost));
  }
  std::vector<T> to_host() const {
    std::vector<T> out(static_cast<std::size_t>(size()));
    copy_to_host(out);
    return out;
  }
  /// Zeroes the buffer and waits for it: the memset runs on the legacy default stream, which a
  /// non-blocking executor stream does not order against.
  void zero() {
    if (!size()) return;
    GRUN_CUDA_CHECK(cudaMemset(data(), 0, sizeof(T) * static_cast<std::size_t>(size())));
    GRUN_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  }

  template <int Rank = 1>
  tensor_view<T, Rank, cuda_space> view(std::array<index_t, Rank> extents) {
    index_t n = 1;
    for (auto e : extents) n *= e;
    require<shape_error>(n <= size(), "device_buffer::view: shape needs ", n, " elements, buffer holds ", size());
    return {data(), extents};
  }
  vector_view<T, cuda_space> view() { return {data(), {size()}}; }

 private:
  thrust::device_vector<T> v_;
};

/// A host matrix copied to the device, shape kept.
template <class T>
struct device_matrix {
  device_buffer<T> storage;
  index_t rows = 0, cols = 0;
  device_matrix() = default;
  device_matrix(index_t r, index_t c) : storage(r * c), rows(r), cols(c) {}
  explicit device_matrix(const host_matrix<T>& h) : storage(h.storage.span()), rows(h.rows), cols(h.cols) {}
  matrix_view<T, cuda_space> view() { return {storage.data(), {rows, cols}}; }
  matrix_view<const T, cuda_space> view() const { return {storage.data(), {rows, cols}}; }
  host_matrix<T> to_host() const {
    host_matrix<T> h(rows, cols);
    storage.copy_to_host(h.storage.span());
    return h;
  }
};

// ---- parameters on the device -----------------------------------------------------------
/// Device storage for one parameter aggregate, the twin of grun::owned_params: one contiguous
/// device buffer carved into the fields in declaration order, so the fused AdamW treats a whole
/// module (or a stack of them) as one flat array. The aggregate's leaves point into device memory.
template <class Params>
class device_params {
 public:
  using value_type = param_value_t<Params>;
  device_params() = default;
  explicit device_params(const Params& shaped) : view_(shaped), storage_(parameter_count(shaped)) { seat_leaves(); }
  // The leaves point into storage_, so a copy re-seats them into its own (deep-copied) storage, and
  // a move is noexcept: std::vector<device_params> then moves on growth instead of copying — with
  // the implicit members it copied the views (still pointing at the old storage) and freed the old
  // storage, leaving every module of a stack reading freed device memory.
  device_params(const device_params& other) : view_(other.view_), storage_(other.storage_) { seat_leaves(); }
  device_params(device_params&& other) noexcept : view_(other.view_), storage_(std::move(other.storage_)) {
    seat_leaves();
    other.view_ = Params{};
  }
  device_params& operator=(const device_params& other) {
    if (this != &other) *this = device_params(other);
    return *this;
  }
  device_params& operator=(device_params&& other) noexcept {
    if (this != &other) {
      view_ = other.view_;
      storage_ = std::move(other.storage_);
      seat_leaves();
      other.view_ = Params{};
    }
    return *this;
  }
  /// Copies the values of a host owned_params with the same shapes.
  explicit device_params(const owned_params<Params>& host) : device_params(*host) {
    storage_.copy_from_host(std::span<const value_type>(host.data(), static_cast<std::size_t>(host.size())));
  }
  void copy_to(owned_params<Params>& host) const {
    storage_.copy_to_host(std::span<value_type>(host.data(), static_cast<std::size_t>(host.size())));
  }
  Params& operator*() { return view_; }
  const Params& operator*() const { return view_; }
  Params* operator->() { return &view_; }
  value_type* data() { return storage_.data(); }
  const value_type* data() const { return storage_.data(); }
  index_t size() const { return storage_.size(); }
  void zero() { storage_.zero(); }

 private:
  /// Points every leaf of view_ at its slice of storage_ (declaration order, contiguous).
  void seat_leaves() {
    index_t offset = 0;
    for_each_param(view_, [&](auto& leaf) { leaf.data = storage_.data() + offset; offset += leaf.size(); });
  }

  Params view_{};
  device_buffer<value_type> storage_;
};

/// Per-element device state of type U shaped like a parameter aggregate, leaf for leaf (AdamW's
/// moments; see grun::basic_param_state). Zero-initialized.
template <class U>
using device_param_state = basic_param_state<U, cuda_space, device_buffer<U>>;

// ---- host checks before any launch --------------------------------------------------------
/// A view handed to exec::cuda must be tagged cuda_space (compile-time knowledge, reported as a
/// shape_error at run time so the bad call is catchable and testable without a GPU).
template <tensor V>
void require_device_view(const V& v, const char* what) {
  require_space<cuda_space>(v, what);
}
/// A raw pointer claimed to be device memory really is (device or managed). Catches a host
/// pointer wrapped in a cuda_space view before the kernel faults on it. Needs a device.
inline void require_device_pointer(const void* p, const char* what) {
  if (p == nullptr) return;
  cudaPointerAttributes attr{};
  const cudaError_t status = cudaPointerGetAttributes(&attr, p);
  if (status != cudaSuccess) { (void)cudaGetLastError(); }
  require<shape_error>(status == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged),
                       what, ": expected a pointer to CUDA device memory, got a host pointer");
}

/// ceil(a / b) for launch sizes.
GRUN_HD constexpr index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

}  // namespace grun::cuda
