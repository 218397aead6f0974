#pragma once
// grun/adapters/dlpack.hpp — DLPack tensors ↔ grun::tensor_view: zero-copy exchange with any framework
// that speaks DLPack (PyTorch, JAX, CuPy, TVM, …). Glue only: no math here.
//
//   view<T, Rank, Space>(dl_tensor)  a grun view of a DLTensor: dtype, ndim, device and layout checked,
//                                    byte_offset applied, strides == NULL read as compact row-major;
//                                    lanes ≠ 1, negative strides, a misaligned offset are refused by name
//   managed_tensor                   owns a DLManagedTensor* or a DLManagedTensorVersioned* (a consumer's
//                                    side of the protocol): its deleter is called exactly once, when the
//                                    owner goes; a versioned tensor of another major version is released
//                                    and refused, a read-only one gives only const views
//   to_dlpack(view, owner)           a DLManagedTensor over grun storage (a producer's side): the
//                                    deleter releases `owner`, which keeps the storage alive
//   to_dlpack_versioned(view, owner) the same as a DLManagedTensorVersioned (DLPack 1.0), read-only
//                                    when the view's elements are const
//   positions_from(dl_tensor)        int64 [P] row indices on the CPU
//   forward / backward               a module run on DLTensors (host memory)
//
// Both exchange structures: the unversioned DLManagedTensor of DLPack 0.x (Debian's libdlpack-dev
// 0.6, and what PyTorch's to_dlpack produces) and DLPack 1.x's DLManagedTensorVersioned (what
// `__dlpack__(max_version=(1, 0))` hands out). A header older than 0.8 does not declare the
// versioned one; grun then declares it itself, by the layout the DLPack specification fixes for
// major version 1 (checked below), so a 0.6 header still exchanges 1.x tensors. Devices: host_space
// takes kDLCPU and kDLCUDAHost (pinned host memory), cuda_space kDLCUDA and kDLCUDAManaged.
#include <dlpack/dlpack.h>

#include <cstddef>
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
#include "../saved_activations.hpp"

namespace grun::dlpack {

// ---- DLPack 1.x's versioned exchange structure ---------------------------------------------
#if defined(DLPACK_FLAG_BITMASK_READ_ONLY)  // the header declares it (DLPack >= 0.8)
using ::DLManagedTensorVersioned;
using ::DLPackVersion;
inline constexpr std::uint64_t flag_read_only = DLPACK_FLAG_BITMASK_READ_ONLY;
inline constexpr std::uint64_t flag_is_copied = DLPACK_FLAG_BITMASK_IS_COPIED;
#else
/// DLPack's version pair: a new major version changes the layout of DLManagedTensorVersioned
/// (nothing past `deleter` may then be read); a new minor one only adds enumerators.
struct DLPackVersion {
  std::uint32_t major;
  std::uint32_t minor;
};
/// DLPack 1.x's managed tensor, field for field as the specification lays it out.
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);
  std::uint64_t flags;
  DLTensor dl_tensor;
};
inline constexpr std::uint64_t flag_read_only = 1u << 0;  // the consumer must not write through it
inline constexpr std::uint64_t flag_is_copied = 1u << 1;  // the producer made a copy for the consumer
#endif
// The layout every DLPack 1.x producer writes (LP64 and 32-bit alike): version, the context and the
// deleter a consumer of any major version can still reach, then flags and the tensor.
static_assert(offsetof(DLManagedTensorVersioned, version) == 0 && sizeof(DLPackVersion) == 8 &&
              offsetof(DLManagedTensorVersioned, manager_ctx) == 8 &&
              offsetof(DLManagedTensorVersioned, deleter) == 8 + sizeof(void*) &&
              offsetof(DLManagedTensorVersioned, flags) == 8 + 2 * sizeof(void*) &&
              offsetof(DLManagedTensorVersioned, dl_tensor) == 16 + 2 * sizeof(void*),
              "grun::dlpack: DLManagedTensorVersioned does not have DLPack 1.x's layout");
/// The major version whose layout grun reads and writes.
inline constexpr std::uint32_t abi_major_version = 1;

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
  const char* base = t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat" : t.code == kDLInt ? "int"
                     : t.code == kDLUInt ? "uint" : nullptr;
  std::string s = base ? std::string(base) : std::string("code").append(std::to_string(int(t.code))).append("_");
  s.append(std::to_string(int(t.bits)));
  if (t.lanes != 1) s.append("x").append(std::to_string(int(t.lanes)));
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

/// Owner of a managed tensor received from a producer — DLPack 0.x's DLManagedTensor or 1.x's
/// DLManagedTensorVersioned: calls its deleter exactly once (when the owner is destroyed or reset),
/// unless release() hands it on. Move-only.
class managed_tensor {
 public:
  managed_tensor() = default;
  explicit managed_tensor(DLManagedTensor* m) : legacy_(m) {
    require<shape_error>(m != nullptr, "dlpack::managed_tensor: expected a DLManagedTensor, got a null pointer");
  }
  /// Takes `m`. A major version other than abi_major_version has another layout past `deleter`:
  /// the tensor is released at once (DLPack's rule for a consumer) and refused.
  explicit managed_tensor(DLManagedTensorVersioned* m) {
    require<shape_error>(m != nullptr, "dlpack::managed_tensor: expected a DLManagedTensorVersioned, got a null pointer");
    if (m->version.major != abi_major_version) {
      const DLPackVersion v = m->version;
      if (m->deleter) m->deleter(m);
      fail<format_error>("dlpack::managed_tensor: expected a DLManagedTensorVersioned of DLPack major version ",
                         abi_major_version, ", got version ", v.major, ".", v.minor, " (released unread)");
    }
    versioned_ = m;
  }
  managed_tensor(managed_tensor&& o) noexcept
      : legacy_(std::exchange(o.legacy_, nullptr)), versioned_(std::exchange(o.versioned_, nullptr)) {}
  managed_tensor& operator=(managed_tensor&& o) noexcept {
    if (this != &o) {
      reset();
      legacy_ = std::exchange(o.legacy_, nullptr);
      versioned_ = std::exchange(o.versioned_, nullptr);
    }
    return *this;
  }
  managed_tensor(const managed_tensor&) = delete;
  managed_tensor& operator=(const managed_tensor&) = delete;
  ~managed_tensor() { reset(); }

  explicit operator bool() const { return legacy_ != nullptr || versioned_ != nullptr; }
  /// Whether the producer handed a DLManagedTensorVersioned.
  bool versioned() const { return versioned_ != nullptr; }
  /// The producer's flags (flag_read_only, flag_is_copied, …); 0 for an unversioned tensor.
  std::uint64_t flags() const { return versioned_ ? versioned_->flags : 0; }
  bool read_only() const { return (flags() & flag_read_only) != 0; }

  /// The tensor, to read.
  const DLTensor& tensor() const {
    require<shape_error>(bool(*this), "dlpack::managed_tensor: empty (moved from or released)");
    return versioned_ ? versioned_->dl_tensor : legacy_->dl_tensor;
  }
  /// The tensor, to write into (an output of forward/backward): refused if the producer marked it read-only.
  const DLTensor& mutable_tensor(const char* what = "tensor") const {
    const DLTensor& t = tensor();
    require<shape_error>(!read_only(), what, ": expected a writable tensor, got one its producer marked read-only "
                         "(DLPACK_FLAG_BITMASK_READ_ONLY)");
    return t;
  }
  /// A grun view of the tensor; valid while this owner holds it. A view of non-const elements is
  /// refused if the producer marked the tensor read-only.
  template <class T, int Rank, class Space = host_space>
  tensor_view<T, Rank, Space> view(const char* what = "tensor") const {
    if constexpr (std::is_const_v<T>) return dlpack::view<T, Rank, Space>(tensor(), what);
    else return dlpack::view<T, Rank, Space>(mutable_tensor(what), what);
  }
  /// Gives up ownership of an unversioned tensor (the caller now calls the deleter).
  DLManagedTensor* release() {
    require<shape_error>(!versioned_, "dlpack::managed_tensor::release: expected an unversioned DLManagedTensor, "
                         "holds a DLManagedTensorVersioned (use release_versioned)");
    return std::exchange(legacy_, nullptr);
  }
  /// Gives up ownership of a versioned tensor (the caller now calls the deleter).
  DLManagedTensorVersioned* release_versioned() {
    require<shape_error>(!legacy_, "dlpack::managed_tensor::release_versioned: expected a DLManagedTensorVersioned, "
                         "holds an unversioned DLManagedTensor (use release)");
    return std::exchange(versioned_, nullptr);
  }
  void reset() noexcept {
    if (DLManagedTensor* m = std::exchange(legacy_, nullptr); m && m->deleter) m->deleter(m);
    if (DLManagedTensorVersioned* m = std::exchange(versioned_, nullptr); m && m->deleter) m->deleter(m);
  }

 private:
  DLManagedTensor* legacy_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
};

namespace detail {
/// A managed tensor (DLManagedTensor or DLManagedTensorVersioned) with its own shape and stride
/// arrays and the owner of the storage.
template <class Managed, int Rank>
struct exported {
  Managed managed{};
  std::int64_t shape[Rank > 0 ? Rank : 1]{};
  std::int64_t strides[Rank > 0 ? Rank : 1]{};
  std::shared_ptr<const void> owner;
  static void deleter(Managed* self) { delete static_cast<exported*>(self->manager_ctx); }
};

template <class Managed, class T, int Rank, class Space>
std::unique_ptr<exported<Managed, Rank>> export_view(tensor_view<T, Rank, Space> v, std::shared_ptr<const void> owner,
                                                     int device_id) {
  auto e = std::make_unique<exported<Managed, Rank>>();
  for (int i = 0; i < Rank; ++i) {
    e->shape[i] = v.extent(i);
    e->strides[i] = v.stride(i);
  }
  e->owner = std::move(owner);
  DLTensor& t = e->managed.dl_tensor;
  t.data = const_cast<std::remove_const_t<T>*>(v.data());
  t.device = std::is_same_v<Space, host_space> ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, device_id};
  t.ndim = Rank;
  t.dtype = dtype_of<T>();
  t.shape = e->shape;
  t.strides = e->strides;
  t.byte_offset = 0;
  e->managed.manager_ctx = e.get();
  e->managed.deleter = &exported<Managed, Rank>::deleter;
  return e;
}
}  // namespace detail

/// A DLManagedTensor over the storage of `v` for a consumer (a framework's from_dlpack). `owner`
/// keeps that storage alive until the consumer calls the deleter, which releases it. CUDA views
/// name `device_id` (the device the storage is on).
template <class T, int Rank, class Space>
DLManagedTensor* to_dlpack(tensor_view<T, Rank, Space> v, std::shared_ptr<const void> owner, int device_id = 0) {
  return &detail::export_view<DLManagedTensor>(v, std::move(owner), device_id).release()->managed;
}

/// The same as a DLPack 1.0 DLManagedTensorVersioned: version 1.0 (grun writes nothing a 1.0
/// consumer cannot read), flag_read_only when the view's elements are const.
template <class T, int Rank, class Space>
DLManagedTensorVersioned* to_dlpack_versioned(tensor_view<T, Rank, Space> v, std::shared_ptr<const void> owner,
                                              int device_id = 0) {
  auto e = detail::export_view<DLManagedTensorVersioned>(v, std::move(owner), device_id);
  e->managed.version = {abi_major_version, 0};
  e->managed.flags = std::is_const_v<T> ? flag_read_only : 0;
  return &e.release()->managed;
}

/// module.forward on DLTensors in host memory: h, out [N, d], gates [P] (out may be h itself).
/// saved: where a training forward keeps what its backward would recompute (see saved_activations).
template <class Module, class Exec>
void forward(const Module& module, const Exec& ex, const DLTensor& h, const positions& pos, const DLTensor& out,
             const DLTensor& gates, saved_activations<param_value_t<typename Module::params_type>>* saved = nullptr) {
  using T = param_value_t<typename Module::params_type>;
  const auto hv = view<const T, 2>(h, "h");
  const auto ov = view<T, 2>(out, "out");
  const auto gv = view<T, 1>(gates, "gates");
  if (saved) module.forward(ex, hv, pos, ov, gv, *saved);
  else module.forward(ex, hv, pos, ov, gv);
}

/// module.backward on DLTensors in host memory: gradients land in module.gradients() (overwritten),
/// dh [N, d] is written (it may be dout itself); dgates may be a null pointer (no gradient at the gates).
/// dgates' dtype is the module's, or for float16/bfloat16 modules float32 (what a gate loss computes
/// in: no rounding to 16 bits on the way, see grun::gate_gradient_for). saved: what forward saved, or null.
template <class Module, class Exec>
void backward(Module& module, const Exec& ex, const DLTensor& h, const positions& pos, const DLTensor& dout,
              const DLTensor* dgates, const DLTensor& dh,
              const saved_activations<param_value_t<typename Module::params_type>>* saved = nullptr) {
  using T = param_value_t<typename Module::params_type>;
  using A = acc_t<T>;
  const auto hv = view<const T, 2>(h, "h");
  const auto dv = view<const T, 2>(dout, "dout");
  const auto dhv = view<T, 2>(dh, "dh");
  const auto run = [&](auto dgv) {
    if (saved) module.backward(ex, hv, pos, dv, dgv, dhv, *saved);
    else module.backward(ex, hv, pos, dv, dgv, dhv);
  };
  if (!dgates) return run(vector_view<const T>());
  if constexpr (!std::is_same_v<T, A>) {
    constexpr DLDataType t = detail::dtype_of<T>(), a = detail::dtype_of<A>();
    const DLDataType g = dgates->dtype;
    const auto is = [&](DLDataType w) { return g.code == w.code && g.bits == w.bits && g.lanes == 1; };
    require<shape_error>(is(t) || is(a), "dgates: expected dtype ", detail::dtype_text(t), " or ", detail::dtype_text(a),
                         ", got ", detail::dtype_text(g));
    if (is(a)) return run(view<const A, 1>(*dgates, "dgates"));
  }
  run(view<const T, 1>(*dgates, "dgates"));
}

}  // namespace grun::dlpack
