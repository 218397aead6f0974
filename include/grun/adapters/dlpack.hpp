#pragma once
// grun/adapters/dlpack.hpp — DLPack tensors ↔ grun::tensor_view: zero-copy exchange with any framework
// that speaks DLPack (PyTorch, JAX, CuPy, TVM, …). Glue only: no math here.
//
//   view<T, Rank, Space>(dl_tensor)  a grun view of a DLTensor: dtype, ndim, device and layout checked,
//                                    byte_offset applied, strides == NULL read as compact row-major;
//                                    lanes ≠ 1, negative strides, a misaligned offset are refused by name
//   managed_tensor                   owns a DLManagedTensor* (a consumer's side of the protocol): its
//                                    deleter is called exactly once, when the owner goes
//   to_dlpack(view, owner)           a DLManagedTensor over grun storage (a producer's side): the
//                                    deleter releases `owner`, which keeps the storage alive
//   positions_from(dl_tensor)        int64 [P] row indices on the CPU
//   forward / backward               a module run on DLTensors (host memory)
//
// This is the unversioned DLManagedTensor of DLPack 0.x (Debian's libdlpack-dev 0.6, and what
// PyTorch's to_dlpack produces); it is ABI-stable across 0.x. Devices: host_space takes kDLCPU and
// kDLCUDAHost (pinned host memory), cuda_space kDLCUDA and kDLCUDAManaged.
#include <dlpack/dlpack.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/params.hpp"
#include "../core/tensor.hpp"
#include "../positions.hpp"

namespace grun::dlpack {

namespace detail {
/// The DLPack dtype of a grun storage (or index) type.
template <class T> constexpr DLDataType dtype_of() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return {kDLFloat, 32, 1};
  else if constexpr (std::is_same_v<U, double>) return {kDLFloat, 64, 1};
  else if constexpr (std::is_same_v<U, grun::half>) return {kDLFloat, 16, 1};
  else if constexpr (std::is_same_v<U, grun::bfloat16>) return {kDLBfloat, 16, 1};
  else if constexpr (std::is_same_v<U, std::int64_t>) return {kDLInt, 64, 1};
  else if constexpr (std::is_same_v<U, std::int32_t>) return {kDLInt, 32, 1};
  else static_assert(sizeof(U) == 0, "grun::dlpack: no DLPack dtype for this element type");
}

inline std::string dtype_text(DLDataType t) {
  std::string s = t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat" : t.code == kDLInt ? "int"
                  : t.code == kDLUInt ? "uint" : "code" + std::to_string(int(t.code)) + "_";
  s += std::to_string(int(t.bits));
  if (t.lanes != 1) s += "x" + std::to_string(int(t.lanes));
  return s;
}

inline std::string device_text(DLDevice d) {
  switch (d.device_type) {
    case kDLCPU: return "CPU";
    case kDLCUDA: return "CUDA:" + std::to_string(d.device_id);
    case kDLCUDAHost: return "CUDA host (pinned)";
    case kDLCUDAManaged: return "CUDA managed";
    default: return "device type " + std::to_string(int(d.device_type)) + ":" + std::to_string(d.device_id);
  }
}

template <class Space> constexpr bool takes_device(DLDeviceType t) {
  if constexpr (std::is_same_v<Space, host_space>) return t == kDLCPU || t == kDLCUDAHost;
  else return t == kDLCUDA || t == kDLCUDAManaged;
}
template <class Space> constexpr const char* space_text() {
  return std::is_same_v<Space, host_space> ? "host memory (kDLCPU or kDLCUDAHost)" : "CUDA memory (kDLCUDA or kDLCUDAManaged)";
}
}  // namespace detail

/// A grun view of `t`. Throws shape_error naming `what`, what was expected and what came.
template <class T, int Rank, class Space = host_space>
tensor_view<T, Rank, Space> view(const DLTensor& t, const char* what = "tensor") {
  constexpr DLDataType want = detail::dtype_of<T>();
  require<shape_error>(t.ndim == Rank, what, ": expected ", Rank, " dimensions, got ", t.ndim);
  require<shape_error>(t.dtype.code == want.code && t.dtype.bits == want.bits && t.dtype.lanes == 1, what,
                       ": expected dtype ", detail::dtype_text(want), ", got ", detail::dtype_text(t.dtype));
  require<shape_error>(detail::takes_device<Space>(t.device.device_type), what, ": expected ",
                       detail::space_text<Space>(), ", got a tensor on ", detail::device_text(t.device));
  require<shape_error>(t.byte_offset % sizeof(T) == 0, what, ": expected a byte_offset that is a multiple of ",
                       sizeof(T), " (the element size), got ", t.byte_offset);
  require<shape_error>(Rank == 0 || t.shape != nullptr, what, ": expected a shape, got a null shape pointer");
  typename tensor_view<T, Rank, Space>::extents_type extents{}, strides{};
  index_t numel = 1;
  for (int i = 0; i < Rank; ++i) {
    extents[i] = t.shape[i];
    require<shape_error>(extents[i] >= 0, what, ": expected non-negative sizes, got ", extents[i], " in dimension ", i);
    numel *= extents[i];
  }
  // strides == NULL: compact row-major (DLPack's convention).
  index_t compact = 1;
  for (int i = Rank - 1; i >= 0; --i) {
    strides[i] = t.strides ? t.strides[i] : compact;
    require<shape_error>(strides[i] >= 0, what, ": expected non-negative strides (grun views never step backwards), "
                         "got stride ", strides[i], " in dimension ", i);
    compact *= extents[i];
  }
  require<shape_error>(numel == 0 || t.data != nullptr, what, ": expected data, got a null data pointer for ", numel,
                       " elements");
  using byte_t = std::conditional_t<std::is_const_v<T>, const char, char>;
  auto* base = static_cast<byte_t*>(t.data);
  return {reinterpret_cast<T*>(base + t.byte_offset), extents, strides};
}

/// Row indices int64 [P] in host memory.
inline positions positions_from(const DLTensor& rows, const char* what = "rows") {
  const auto v = view<const std::int64_t, 1>(rows, what);
  std::vector<index_t> r(static_cast<std::size_t>(v.extent(0)));
  for (index_t i = 0; i < v.extent(0); ++i) r[static_cast<std::size_t>(i)] = v(i);
  return positions::rows(std::move(r));
}

/// Owner of a DLManagedTensor received from a producer: calls its deleter exactly once (when the
/// owner is destroyed or reset), unless release() hands it on. Move-only.
class managed_tensor {
 public:
  managed_tensor() = default;
  explicit managed_tensor(DLManagedTensor* m) : m_(m) {
    require<shape_error>(m != nullptr, "dlpack::managed_tensor: expected a DLManagedTensor, got a null pointer");
  }
  managed_tensor(managed_tensor&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
  managed_tensor& operator=(managed_tensor&& o) noexcept {
    if (this != &o) { reset(); m_ = std::exchange(o.m_, nullptr); }
    return *this;
  }
  managed_tensor(const managed_tensor&) = delete;
  managed_tensor& operator=(const managed_tensor&) = delete;
  ~managed_tensor() { reset(); }

  explicit operator bool() const { return m_ != nullptr; }
  const DLTensor& tensor() const {
    require<shape_error>(m_ != nullptr, "dlpack::managed_tensor: empty (moved from or released)");
    return m_->dl_tensor;
  }
  /// A grun view of the tensor; valid while this owner holds it.
  template <class T, int Rank, class Space = host_space>
  tensor_view<T, Rank, Space> view(const char* what = "tensor") const {
    return dlpack::view<T, Rank, Space>(tensor(), what);
  }
  /// Gives up ownership (the caller now calls the deleter).
  DLManagedTensor* release() { return std::exchange(m_, nullptr); }
  void reset() noexcept {
    if (DLManagedTensor* m = std::exchange(m_, nullptr); m && m->deleter) m->deleter(m);
  }

 private:
  DLManagedTensor* m_ = nullptr;
};

namespace detail {
/// A DLManagedTensor with its own shape and stride arrays and the owner of the storage.
template <int Rank>
struct exported {
  DLManagedTensor managed{};
  std::int64_t shape[Rank > 0 ? Rank : 1]{};
  std::int64_t strides[Rank > 0 ? Rank : 1]{};
  std::shared_ptr<const void> owner;
  static void deleter(DLManagedTensor* self) { delete static_cast<exported*>(self->manager_ctx); }
};
}  // namespace detail

/// A DLManagedTensor over the storage of `v` for a consumer (a framework's from_dlpack). `owner`
/// keeps that storage alive until the consumer calls the deleter, which releases it. CUDA views
/// name `device_id` (the device the storage is on).
template <class T, int Rank, class Space>
DLManagedTensor* to_dlpack(tensor_view<T, Rank, Space> v, std::shared_ptr<const void> owner, int device_id = 0) {
  auto e = std::make_unique<detail::exported<Rank>>();
  for (int i = 0; i < Rank; ++i) {
    e->shape[i] = v.extent(i);
    e->strides[i] = v.stride(i);
  }
  e->owner = std::move(owner);
  DLTensor& t = e->managed.dl_tensor;
  t.data = const_cast<std::remove_const_t<T>*>(v.data());
  t.device = std::is_same_v<Space, host_space> ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, device_id};
  t.ndim = Rank;
  t.dtype = detail::dtype_of<T>();
  t.shape = e->shape;
  t.strides = e->strides;
  t.byte_offset = 0;
  e->managed.manager_ctx = e.get();
  e->managed.deleter = &detail::exported<Rank>::deleter;
  return &e.release()->managed;
}

/// module.forward on DLTensors in host memory: h, out [N, d], gates [P] (out may be h itself).
template <class Module, class Exec>
void forward(const Module& module, const Exec& ex, const DLTensor& h, const positions& pos, const DLTensor& out,
             const DLTensor& gates) {
  using T = param_value_t<typename Module::params_type>;
  module.forward(ex, view<const T, 2>(h, "h"), pos, view<T, 2>(out, "out"), view<T, 1>(gates, "gates"));
}

/// module.backward on DLTensors in host memory: gradients land in module.gradients() (overwritten),
/// dh [N, d] is written (it may be dout itself); dgates may be a null pointer (no gradient at the gates).
/// dgates' dtype is the module's, or for float16/bfloat16 modules float32 (what a gate loss computes
/// in: no rounding to 16 bits on the way, see grun::gate_gradient_for).
template <class Module, class Exec>
void backward(Module& module, const Exec& ex, const DLTensor& h, const positions& pos, const DLTensor& dout,
              const DLTensor* dgates, const DLTensor& dh) {
  using T = param_value_t<typename Module::params_type>;
  using A = acc_t<T>;
  const auto hv = view<const T, 2>(h, "h");
  const auto dv = view<const T, 2>(dout, "dout");
  const auto dhv = view<T, 2>(dh, "dh");
  if (!dgates) return module.backward(ex, hv, pos, dv, vector_view<const T>(), dhv);
  if constexpr (!std::is_same_v<T, A>) {
    constexpr DLDataType t = detail::dtype_of<T>(), a = detail::dtype_of<A>();
    const DLDataType g = dgates->dtype;
    const auto is = [&](DLDataType w) { return g.code == w.code && g.bits == w.bits && g.lanes == 1; };
    require<shape_error>(is(t) || is(a), "dgates: expected dtype ", detail::dtype_text(t), " or ", detail::dtype_text(a),
                         ", got ", detail::dtype_text(g));
    if (is(a)) return module.backward(ex, hv, pos, dv, view<const A, 1>(*dgates, "dgates"), dhv);
  }
  module.backward(ex, hv, pos, dv, view<const T, 1>(*dgates, "dgates"), dhv);
}

}  // namespace grun::dlpack
