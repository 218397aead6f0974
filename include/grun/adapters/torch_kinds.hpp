#pragma once
// grun/adapters/torch_kinds.hpp — the libtorch adapter's policies chosen at run time (a CLI's
// --gate / --reft / --rank, a Python op's string arguments), behind one small virtual interface.
//
//   gate kinds "linear" | "mlp" (mlp<256, 64>) | "always";  reft kinds "loreft" | "noreft" | "direft";
//   ranks 1, 2, 4, 8, 16, 32 (a rank is a compile-time constant in grun; these are instantiated).
//
//   const intervention_kind& k = intervention_kind_of("mlp", "loreft", 4);   // grun::error if unknown
//   k.flat_size(d);  k.init_flat(d, seed, dtype);  k.retract_flat(flat, d);
//   k.apply(h, flat, rows) -> (h', gates [P]);  k.apply_stack(h, frozen, flat, rows, scale) -> (h', gates [K, P])
//   k.make_module(d, seed, dtype);  k.make_stack(d, a, b, dtype)
//   make_intervention(gate, reft, rank, d, seed, dtype = kFloat)           (= the kind's make_module)
//   make_intervention_stack(gate, reft, rank, d, a = 0, b = 1, dtype = kFloat)
//   save_adapter(path, stacks, info) / load_adapter(path, d, options)     (grun::io's adapter files)
//
// Why a compiled part: the 54 kinds are 54 gated_intervention types, each with forward and backward
// autograd functions in two compute types. Instantiating them costs minutes of compile time per
// translation unit, so they are instantiated ONCE, in three translation units (one per gate family,
// so they build in parallel), and every caller links them:
//   * CMake, from this source tree: target grun::torch_kinds (built when libtorch is found).
//   * Anything else (an installed grun, another build system): one translation unit of the program
//     holds
//         #include <grun/adapters/torch_kinds_impl.hpp>
//         GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::linear)
//         GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::mlp<>)
//         GRUN_INSTANTIATE_TORCH_KINDS(grun::gate::always)
//     (or the three in three TUs). Without it, a call below fails to link, naming kind_with_gate.
// The statically typed API of torch.hpp (intervention<G, R>, apply_intervention<I>, …) stays header-only.
#include <grun/adapters/torch.hpp>
#include <grun/io/adapter.hpp>

#include <filesystem>
#include <memory>
#include <span>
#include <string_view>
#include <tuple>
#include <vector>

namespace grun::torch_adapter {

/// One runtime choice of gate × ReFT × rank (default ortho policy of the ReFT: qr_retraction for
/// loreft, none for noreft and direft) and every operation the adapter offers for it. The objects are
/// immutable singletons (intervention_kind_of returns references to them); all calls are thread-safe
/// as far as the tensors passed are.
class intervention_kind {
 public:
  virtual std::string_view gate() const noexcept = 0;  // "linear" | "mlp" | "always"
  virtual std::string_view reft() const noexcept = 0;  // "loreft" | "noreft" | "direft"
  virtual index_t rank() const noexcept = 0;

  /// Parameters of one module at hidden size d (the flat layout of torch.hpp).
  virtual index_t flat_size(index_t d) const = 0;
  /// A fresh flat tensor from grun::init(seed), on the CPU in `dtype`.
  virtual Tensor init_flat(index_t d, std::uint64_t seed, at::ScalarType dtype = at::kFloat) const = 0;
  /// Keeps R on its constraint set (QR retraction for loreft); no-op for the others.
  virtual void retract_flat(Tensor& flat, index_t d) const = 0;
  /// apply_intervention<I>: (h' = h with rows + g(h)Δ(h), gates [P]); differentiable in h and flat.
  virtual std::tuple<Tensor, Tensor> apply(const Tensor& h, const Tensor& flat, const Tensor& rows) const = 0;
  /// apply_stack<I>: (h' = h + scale·Σ_k g_kΔ_k, gates [K, P]); modules = rows of frozen, then flat.
  virtual std::tuple<Tensor, Tensor> apply_stack(const Tensor& h, const Tensor& frozen, const Tensor& flat,
                                                 const Tensor& rows, double scale) const = 0;
  virtual std::shared_ptr<any_intervention> make_module(index_t d, std::uint64_t seed,
                                                        at::ScalarType dtype = at::kFloat) const = 0;
  virtual std::shared_ptr<any_intervention_stack> make_stack(index_t d, double a = 0.0, double b = 1.0,
                                                             at::ScalarType dtype = at::kFloat) const = 0;
  /// grun::io::save_adapter of one stack per site (every stack of this kind, the same d and size;
  /// parameters written in opt.dtype, F32 by default). Nothing is written unless all checks pass.
  virtual void save_adapter(const std::filesystem::path& path,
                            std::span<const std::shared_ptr<any_intervention_stack>> sites,
                            const io::adapter_info& info, io::adapter_save_options opt = {}) const = 0;
  /// grun::io::load_adapter of an adapter file already read into stacks of this kind (every module
  /// frozen, float32 on the CPU); d > 0 must match the file's hidden size. The file's kinds must be
  /// this kind's (format_error).
  virtual std::vector<std::shared_ptr<any_intervention_stack>> load_adapter(const io::safetensors_file& file,
                                                                            index_t d,
                                                                            const io::adapter_load_options& opt,
                                                                            io::adapter_info& info) const = 0;

 protected:
  intervention_kind() = default;
  ~intervention_kind() = default;
  intervention_kind(const intervention_kind&) = delete;
  intervention_kind& operator=(const intervention_kind&) = delete;
};

namespace detail {
/// The kind for gate family Gate, reft × rank (validated by the caller). Declared here, defined in
/// torch_kinds_impl.hpp and instantiated once by GRUN_INSTANTIATE_TORCH_KINDS(Gate).
template <class Gate>
const intervention_kind& kind_with_gate(std::string_view reft, std::int64_t rank);

inline constexpr std::int64_t instantiated_ranks[] = {1, 2, 4, 8, 16, 32};
}  // namespace detail

/// The kind named by (gate, reft, rank); grun::error naming the accepted values for anything else.
inline const intervention_kind& intervention_kind_of(std::string_view gate, std::string_view reft,
                                                     std::int64_t rank) {
  require<error>(gate == "linear" || gate == "mlp" || gate == "always", "torch_adapter: gate kind \"", gate,
                 "\" unknown; expected linear, mlp or always");
  require<error>(reft == "loreft" || reft == "noreft" || reft == "direft", "torch_adapter: reft kind \"", reft,
                 "\" unknown; expected loreft, noreft or direft");
  require<error>(std::ranges::find(detail::instantiated_ranks, rank) != std::end(detail::instantiated_ranks),
                 "torch_adapter: rank ", rank, " is not instantiated; expected one of 1, 2, 4, 8, 16, 32");
  if (gate == "linear") return detail::kind_with_gate<gate::linear>(reft, rank);
  if (gate == "mlp") return detail::kind_with_gate<gate::mlp<>>(reft, rank);
  return detail::kind_with_gate<gate::always>(reft, rank);
}

/// A module chosen at run time; unknown kinds or ranks throw grun::error naming the accepted values.
inline std::shared_ptr<any_intervention> make_intervention(std::string_view gate, std::string_view reft,
                                                           std::int64_t rank, index_t d, std::uint64_t seed,
                                                           at::ScalarType dtype = at::kFloat) {
  return intervention_kind_of(gate, reft, rank).make_module(d, seed, dtype);
}

/// An empty stack chosen at run time (same kinds); s(K) = a·K + b.
inline std::shared_ptr<any_intervention_stack> make_intervention_stack(std::string_view gate, std::string_view reft,
                                                                       std::int64_t rank, index_t d, double a = 0.0,
                                                                       double b = 1.0,
                                                                       at::ScalarType dtype = at::kFloat) {
  return intervention_kind_of(gate, reft, rank).make_stack(d, a, b, dtype);
}

/// Saves one stack per site (site i at decoder layer info.layers[i]) as a grun adapter file; the
/// kind is the first stack's, which every other must share.
inline void save_adapter(const std::filesystem::path& path,
                         std::span<const std::shared_ptr<any_intervention_stack>> sites, const io::adapter_info& info,
                         io::adapter_save_options opt = {}) {
  require<shape_error>(!sites.empty() && sites.front(), "torch_adapter::save_adapter: expected at least one stack, got ",
                       sites.empty() ? "none" : "a null pointer");
  const any_intervention_stack& first = *sites.front();
  intervention_kind_of(first.gate_kind(), first.reft_kind(), first.rank()).save_adapter(path, sites, info, opt);
}

/// A grun adapter file read back as torch stacks (every module frozen, float32 on the CPU).
struct loaded_stacks {
  io::adapter_info info;
  const intervention_kind* kind = nullptr;
  std::vector<std::shared_ptr<any_intervention_stack>> sites;  // in the order of info.layers
};

/// Loads an adapter file whose kinds are any of the runtime kinds (read from its metadata); d > 0 must
/// match the file's hidden size. Errors: grun::format_error / shape_error naming the file and the field.
inline loaded_stacks load_adapter(const std::filesystem::path& path, index_t d = 0,
                                  const io::adapter_load_options& opt = {}) {
  // Read once: the metadata names the kind, and the kind loads from the same mapped file.
  const io::safetensors_file f = io::safetensors_file::read(path, io::read_options{.check_finite = opt.check_finite});
  // Metadata names are "gate::mlp", "reft::loreft": the kind is the part after "::".
  auto kind_name = [&](const char* key) {
    const std::string& v = io::detail::meta(f, key);
    const auto colons = v.find("::");
    return colons == std::string::npos ? v : v.substr(colons + 2);
  };
  const std::string gate = kind_name("gate"), reft = kind_name("reft");
  const index_t rank = io::detail::parse_int<index_t>(io::detail::meta(f, "rank"), f.source(), "rank");
  loaded_stacks out;
  out.kind = &intervention_kind_of(gate, reft, rank);
  out.sites = out.kind->load_adapter(f, d, opt, out.info);
  return out;
}

}  // namespace grun::torch_adapter
