#pragma once
// grun/io/adapter.hpp — saving and loading trained interventions as safetensors.
//
// An adapter is one or more *sites* (a decoder layer's block output), each holding a stack of K
// gated_intervention modules (K = 1 for a single unlearning request). Every parameter becomes one
// named tensor, named generically from each policy's `param_names` (no per-policy code here), with
// the key names of the reference implementations so checkpoints move between C++ and Python:
// pyreft's LoreftIntervention / the GRUN reference's GatedLoreftIntervention state_dict.
//
// Key mapping, per module k at site layer l (prefix `layers.<l>.modules.<k>.`):
//
//   | grun field (memory shape)       | key after the prefix  | file shape | reference module                 |
//   |---------------------------------|-----------------------|------------|----------------------------------|
//   | reft.rotate_layer  R    [r, d]  | rotate_layer          | [d, r] (ᵀ) | rotate_layer (LowRankRotateLayer) |
//   | reft.weight        W    [r, d]  | weight                | [r, d]     | learned_source.weight (nn.Linear) |
//   | reft.bias          b    [r]     | bias                  | [r]        | learned_source.bias               |
//   | gate::linear  weight    [1, d]  | gate_func.weight      | [1, d]     | gate_func = nn.Linear(d, 1)       |
//   | gate::linear  bias      [1]     | gate_func.bias        | [1]        |                                   |
//   | gate::mlp     w1 [H1, d]  b1    | gate_func.0.weight/.bias   [H1, d] / [H1]  | gate_func = nn.Sequential(     |
//   | gate::mlp     w2 [H2, H1] b2    | gate_func.2.weight/.bias   [H2, H1] / [H2] |   Linear, ReLU, Linear, ReLU,  |
//   | gate::mlp     w3 [1, H2]  b3    | gate_func.4.weight/.bias   [1, H2] / [1]   |   Linear)  (the paper's mlp_3) |
//   | gate::always  (no parameters)   | —                     |            | plain LoReFT                      |
//   | ortho::householder raw v [r, d] | rotate_layer_raw      | [r, d]     | grun only (see below)             |
//
// - R is stored [r, d] in memory (rows orthonormal) but pyreft's rotate_layer weight is [d, r]
//   (columns orthonormal), so that one tensor is transposed on write and read. direft's W2 shares
//   the rotate_layer slot and its transposition.
// - With a parametrizing ortho policy (householder) `rotate_layer` holds the materialized R (what
//   pyreft and a serving process need) and `rotate_layer_raw` the trainable raw vectors, which a
//   householder module loads; any other ortho policy loads `rotate_layer` (and ignores `_raw`).
// - The reference code keeps one state_dict per intervention (pyvene keys such as
//   `layer.20.comp.block_output.unit.pos.nunit.1#0`); here all sites share one file under the
//   `layers.<l>.modules.<k>.` prefix. Stripping the prefix gives the reference state_dict.
//
// `__metadata__` (all values strings, as the format requires):
//   format "grun.adapter", format_version "1", gate / reft / ortho (policy names, e.g.
//   "gate::linear", "reft::loreft", "ortho::qr_retraction"), rank, hidden_size, layers ("20,25,31"),
//   modules (K per site), positions ("last_prompt_token" | "all" | "explicit"), stack_scale_a,
//   stack_scale_b (s(K) = a·K + b), dtype, model_fingerprint (free text; empty = unknown).
// Loading checks format, gate and reft kinds (format_error), rank and hidden size (shape_error), and
// the fingerprint when the caller passes one (format_error); every expected tensor must be present
// with its exact shape, and no unexpected tensor may be. Writes are atomic (io/atomic_file.hpp).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../intervention.hpp"
#include "../optim/adamw.hpp"
#include "../stack.hpp"
#include "safetensors.hpp"

namespace grun::io {

inline constexpr std::string_view adapter_format = "grun.adapter";
inline constexpr int adapter_format_version = 1;

/// What an adapter records beyond its parameters and policy kinds.
struct adapter_info {
  std::vector<index_t> layers;                 // decoder layer of each site, in site order
  std::string positions = "last_prompt_token";  // "last_prompt_token" | "all" | "explicit"
  std::string model_fingerprint;               // identifies the base model; empty = unknown
  double stack_scale_a = 0.0, stack_scale_b = 1.0;  // s(K) = a·K + b
};

struct adapter_save_options {
  st_dtype dtype = st_dtype::f32;  // F32, BF16, F16 (or F64)
};

struct adapter_load_options {
  std::string expected_fingerprint;  // non-empty: the file's model_fingerprint must equal it
  bool accept_unknown_fingerprint = false;  // ... or be empty ("unknown": a file another tool wrote)
  bool check_finite = true;          // reject NaN / Inf parameters (numeric_error)
};

/// A loaded adapter: one stack per site, in the order of info.layers.
template <class Stack>
struct loaded_adapter {
  adapter_info info;
  std::vector<Stack> sites;
  metadata_map metadata;
};

/// Key prefix of module k at layer l.
inline std::string module_prefix(index_t layer, index_t k) {
  return "layers." + std::to_string(layer) + ".modules." + std::to_string(k) + ".";
}

namespace detail {

inline const char* positions_modes[] = {"last_prompt_token", "all", "explicit"};

inline void check_positions_mode(const std::string& m, const std::string& where) {
  for (const char* ok : positions_modes) if (m == ok) return;
  fail<format_error>(where, ": positions: expected \"last_prompt_token\", \"all\" or \"explicit\", got \"", m, "\"");
}

inline std::string join_layers(const std::vector<index_t>& layers) {
  std::string s;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(layers[i]);
  }
  return s;
}

template <class Int>
Int parse_int(const std::string& s, const std::string& where, const char* key) {
  Int v{};
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  require<format_error>(ec == std::errc() && ptr == s.data() + s.size() && !s.empty(), where, ": __metadata__[\"", key,
                        "\"]: expected an integer, got \"", s, "\"");
  return v;
}
inline double parse_double(const std::string& s, const std::string& where, const char* key) {
  double v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  require<format_error>(ec == std::errc() && ptr == s.data() + s.size() && !s.empty() && std::isfinite(v), where,
                        ": __metadata__[\"", key, "\"]: expected a finite number, got \"", s, "\"");
  return v;
}
inline std::string format_double(double x) {
  char buf[64];
  const auto [ptr, ec] = std::to_chars(buf, buf + sizeof buf, x);  // shortest round-trip form
  return std::string(buf, ec == std::errc() ? ptr : buf);
}

inline std::vector<index_t> parse_layers(const std::string& s, const std::string& where) {
  std::vector<index_t> out;
  require<format_error>(!s.empty(), where, ": __metadata__[\"layers\"]: expected a comma-separated list of layer "
                        "indices, got an empty string");
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = s.find(',', start);
    const std::string part = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const index_t l = parse_int<index_t>(part, where, "layers");
    require<format_error>(l >= 0, where, ": __metadata__[\"layers\"]: expected non-negative layer indices, got ", l);
    require<format_error>(std::find(out.begin(), out.end(), l) == out.end(), where,
                          ": __metadata__[\"layers\"]: expected each layer once, got layer ", l, " twice");
    out.push_back(l);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

inline const std::string& meta(const safetensors_file& f, const char* key) {
  const auto it = f.metadata().find(key);
  if (it == f.metadata().end())
    fail<format_error>(f.source(), ": expected __metadata__[\"", key, "\"] (a grun adapter), it is missing");
  return it->second;
}

/// Calls f(field, name, is_rotation) for every leaf of one module, gate fields first, with the
/// file key (without the module prefix).
template <class I, class P, class F>
void for_each_named_leaf(P& p, F&& f) {
  using gate = typename I::gate_type;
  using reft = typename I::reft_type;
  boost::pfr::for_each_field(p.gate, [&](auto& field, std::size_t i) {
    static_assert(grun::detail::is_param<std::remove_cvref_t<decltype(field)>>::value,
                  "grun::io: gate parameter fields must be grun::param (one per param_names entry)");
    f(field, "gate_func." + std::string(gate::param_names[i]), false);
  });
  boost::pfr::for_each_field(p.reft, [&](auto& field, std::size_t i) {
    static_assert(grun::detail::is_param<std::remove_cvref_t<decltype(field)>>::value,
                  "grun::io: reft parameter fields must be grun::param (one per param_names entry)");
    const std::string_view n = reft::param_names[i];
    f(field, std::string(n), n == "rotate_layer");
  });
}

/// [rows, cols] row-major → [cols, rows] row-major.
template <class T>
std::vector<T> transposed(const T* src, index_t rows, index_t cols) {
  std::vector<T> out(static_cast<std::size_t>(rows * cols));
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) out[std::size_t(j * rows + i)] = src[i * cols + j];
  return out;
}

}  // namespace detail

// ---- one module <-> named tensors (the generic layer) ------------------------------------------
/// Appends module `p`'s tensors under `prefix`, converted to `dtype`.
template <class I, class T>
void append_module_tensors(std::vector<tensor_record>& out, const std::string& prefix,
                           const module_params<I, T, host_space>& p, st_dtype dtype) {
  using ortho = typename I::ortho_type;
  using reft = typename I::reft_type;
  detail::for_each_named_leaf<I>(p, [&](const auto& leaf, const std::string& name, bool is_rotation) {
    const std::span<const T> values(leaf.data, static_cast<std::size_t>(leaf.size()));
    if (!is_rotation) {
      out.push_back(make_tensor<T>(prefix + name, leaf.shape(), values, dtype));
      return;
    }
    // rotate_layer: pyreft's [d, r] layout; the materialized R when R is parametrized.
    if constexpr (reft::has_rotation && ortho::is_parametrization) {
      const host_matrix<T> R = I::rotation(p);
      const auto t = detail::transposed(R.storage.data(), R.rows, R.cols);
      out.push_back(make_tensor<T>(prefix + name, {leaf.cols, leaf.rows}, std::span<const T>(t), dtype));
      out.push_back(make_tensor<T>(prefix + name + "_raw", leaf.shape(), values, dtype));
    } else {
      const auto t = detail::transposed(leaf.data, leaf.rows, leaf.cols);
      out.push_back(make_tensor<T>(prefix + name, {leaf.cols, leaf.rows}, std::span<const T>(t), dtype));
    }
  });
}

/// Reads module tensors under `prefix` into `p` (storage already shaped for the expected d). Records
/// every key it reads (or deliberately ignores) in `consumed`.
template <class I, class T>
void read_module_tensors(const safetensors_file& f, const std::string& prefix, const module_params<I, T, host_space>& p,
                         std::set<std::string>& consumed) {
  using ortho = typename I::ortho_type;
  detail::for_each_named_leaf<I>(p, [&](const auto& leaf, const std::string& name, bool is_rotation) {
    const std::span<T> dst(leaf.data, static_cast<std::size_t>(leaf.size()));
    if (!is_rotation) {
      const auto v = decode<T>(f, prefix + name, leaf.shape());
      std::copy(v.begin(), v.end(), dst.begin());
      consumed.insert(prefix + name);
      return;
    }
    const std::string raw_key = prefix + name + "_raw";
    if constexpr (ortho::is_parametrization) {
      if (!f.find(raw_key))
        fail<format_error>(f.source(), ": expected tensor \"", raw_key, "\" (the raw vectors ", ortho::name,
                           " trains), the file has none: it was saved with another ortho policy (",
                           f.metadata().count("ortho") ? f.metadata().at("ortho") : std::string("unknown"), ")");
      const auto v = decode<T>(f, raw_key, leaf.shape());
      std::copy(v.begin(), v.end(), dst.begin());
      require<shape_error>(f.at(prefix + name).shape == std::vector<index_t>{leaf.cols, leaf.rows}, f.source(),
                           ": tensor \"", prefix + name, "\": expected shape [", leaf.cols, ", ", leaf.rows, "]");
    } else {
      const auto v = decode<T>(f, prefix + name, std::vector<index_t>{leaf.cols, leaf.rows});  // [d, r]
      const auto t = detail::transposed(v.data(), leaf.cols, leaf.rows);                      // → [r, d]
      std::copy(t.begin(), t.end(), dst.begin());
    }
    consumed.insert(prefix + name);
    if (f.find(raw_key)) consumed.insert(raw_key);
  });
}

/// The `__metadata__` of an adapter of intervention I with K modules per site.
template <class I>
metadata_map adapter_metadata(const adapter_info& info, index_t d, index_t modules, st_dtype dtype) {
  return {
      {"format", std::string(adapter_format)},
      {"format_version", std::to_string(adapter_format_version)},
      {"gate", I::gate_type::name},
      {"reft", I::reft_type::name},
      {"ortho", I::ortho_type::name},
      {"rank", std::to_string(I::rank)},
      {"hidden_size", std::to_string(d)},
      {"layers", detail::join_layers(info.layers)},
      {"modules", std::to_string(modules)},
      {"positions", info.positions},
      {"stack_scale_a", detail::format_double(info.stack_scale_a)},
      {"stack_scale_b", detail::format_double(info.stack_scale_b)},
      {"dtype", std::string(name_of(dtype))},
      {"model_fingerprint", info.model_fingerprint},
  };
}

/// Checks an adapter file's metadata against intervention I (and hidden size `d` when d > 0);
/// returns the adapter_info it records plus K and d.
template <class I>
adapter_info check_adapter_metadata(const safetensors_file& f, index_t d, const adapter_load_options& opt,
                                    index_t* modules_out = nullptr, index_t* d_out = nullptr) {
  const std::string& w = f.source();
  const std::string& fmt = detail::meta(f, "format");
  require<format_error>(fmt == adapter_format, w, ": expected __metadata__[\"format\"] = \"", adapter_format,
                        "\", got \"", fmt, "\"");
  const int version = detail::parse_int<int>(detail::meta(f, "format_version"), w, "format_version");
  require<format_error>(version >= 1 && version <= adapter_format_version, w, ": expected adapter format_version 1..",
                        adapter_format_version, ", got ", version, " (written by a newer grun?)");
  const std::string& gate = detail::meta(f, "gate");
  require<format_error>(gate == I::gate_type::name, w, ": expected gate \"", I::gate_type::name,
                        "\", the file holds \"", gate, "\"");
  const std::string& reft = detail::meta(f, "reft");
  require<format_error>(reft == I::reft_type::name, w, ": expected reft \"", I::reft_type::name,
                        "\", the file holds \"", reft, "\"");
  const index_t rank = detail::parse_int<index_t>(detail::meta(f, "rank"), w, "rank");
  require<shape_error>(rank == I::rank, w, ": expected rank ", I::rank, ", the file holds rank ", rank);
  const index_t fd = detail::parse_int<index_t>(detail::meta(f, "hidden_size"), w, "hidden_size");
  require<shape_error>(fd >= 1, w, ": expected hidden_size >= 1, got ", fd);
  if (d > 0) require<shape_error>(fd == d, w, ": expected hidden size ", d, ", the file holds hidden size ", fd);
  // Every module holds at least rank × hidden_size parameters of 2 bytes or more: a hidden size the
  // data cannot hold is refused before anything is sized by it (a hostile 10^12 would allocate).
  require<format_error>(std::uint64_t(fd) <= f.data().size() / (2 * std::uint64_t(rank)), w, ": hidden_size ", fd,
                        " at rank ", rank, " needs more than the file's ", f.data().size(), " data bytes");
  if (!opt.expected_fingerprint.empty()) {
    const std::string& fp = detail::meta(f, "model_fingerprint");
    require<format_error>(fp == opt.expected_fingerprint || (fp.empty() && opt.accept_unknown_fingerprint), w, ": expected model fingerprint \"",
                          opt.expected_fingerprint, "\", the adapter was trained on \"", fp, "\"");
  }
  adapter_info info;
  info.layers = detail::parse_layers(detail::meta(f, "layers"), w);
  info.positions = detail::meta(f, "positions");
  detail::check_positions_mode(info.positions, w);
  info.model_fingerprint = detail::meta(f, "model_fingerprint");
  info.stack_scale_a = detail::parse_double(detail::meta(f, "stack_scale_a"), w, "stack_scale_a");
  info.stack_scale_b = detail::parse_double(detail::meta(f, "stack_scale_b"), w, "stack_scale_b");
  const index_t k = detail::parse_int<index_t>(detail::meta(f, "modules"), w, "modules");
  require<format_error>(k >= 1, w, ": expected __metadata__[\"modules\"] >= 1, got ", k);
  if (modules_out) *modules_out = k;
  if (d_out) *d_out = fd;
  return info;
}

namespace detail {
inline void require_all_consumed(const safetensors_file& f, const std::set<std::string>& consumed) {
  for (const auto& t : f.tensors())
    require<format_error>(consumed.count(t.name) == 1, f.source(), ": unexpected tensor \"", t.name,
                          "\" (not a parameter of the adapter the metadata describes)");
}
template <class Stack>
void check_site_layers(const adapter_info& info, std::size_t sites) {
  require<shape_error>(info.layers.size() == sites, "save_adapter: expected one layer index per site: ", sites,
                       " sites, info.layers has ", info.layers.size());
  std::set<index_t> seen;
  for (index_t l : info.layers) {
    require<shape_error>(l >= 0, "save_adapter: expected non-negative layer indices, got ", l);
    require<shape_error>(seen.insert(l).second, "save_adapter: expected distinct layers, got layer ", l, " twice");
  }
}
}  // namespace detail

// ---- stacks -------------------------------------------------------------------------------------
/// Saves one intervention_stack per site (site i at decoder layer info.layers[i]). Every site must
/// hold the same number of modules and hidden size; the stack scale recorded is info's (a, b),
/// which must reproduce each stack's scale().
template <class G, class R, class O, class T>
void save_adapter(const std::filesystem::path& path, std::span<const intervention_stack<G, R, O, T>> sites,
                  const adapter_info& info, adapter_save_options opt = {}) {
  using stack = intervention_stack<G, R, O, T>;
  using I = typename stack::intervention;
  require<shape_error>(!sites.empty(), "save_adapter: expected at least one site, got none");
  detail::check_site_layers<stack>(info, sites.size());
  detail::check_positions_mode(info.positions, "save_adapter");
  require<format_error>(is_grun_float(opt.dtype), "save_adapter: expected dtype F32, BF16, F16 or F64, got ",
                        name_of(opt.dtype));
  const index_t d = sites[0].dim(), k = sites[0].size();
  require<shape_error>(k >= 1, "save_adapter: site 0 holds no module");
  std::vector<tensor_record> records;
  for (std::size_t s = 0; s < sites.size(); ++s) {
    const stack& st = sites[s];
    require<shape_error>(st.dim() == d, "save_adapter: site ", s, ": expected hidden size ", d, ", got ", st.dim());
    require<shape_error>(st.size() == k, "save_adapter: site ", s, ": expected ", k,
                         " modules (as site 0), got ", st.size());
    const double expect = info.stack_scale_a * double(k) + info.stack_scale_b;
    require<shape_error>(std::fabs(st.scale() - expect) <= 1e-12 * std::max(1.0, std::fabs(expect)),
                         "save_adapter: site ", s, ": stack scale ", st.scale(), " differs from info's a·K + b = ",
                         expect);
    for (index_t m = 0; m < k; ++m)
      append_module_tensors<I, T>(records, module_prefix(info.layers[s], m), st.module(m), opt.dtype);
  }
  write_safetensors(path, records, adapter_metadata<I>(info, d, k, opt.dtype));
}

/// One site.
template <class G, class R, class O, class T>
void save_adapter(const std::filesystem::path& path, const intervention_stack<G, R, O, T>& site,
                  const adapter_info& info, adapter_save_options opt = {}) {
  save_adapter(path, std::span<const intervention_stack<G, R, O, T>>(&site, 1), info, opt);
}

/// Sites held in a vector.
template <class G, class R, class O, class T>
void save_adapter(const std::filesystem::path& path, const std::vector<intervention_stack<G, R, O, T>>& sites,
                  const adapter_info& info, adapter_save_options opt = {}) {
  save_adapter(path, std::span<const intervention_stack<G, R, O, T>>(sites), info, opt);
}

/// Loads an adapter saved by save_adapter from a safetensors file already read (a caller that looked
/// at its metadata first, e.g. to choose the Stack type, need not read it again). opt.check_finite
/// is the read's business there: pass it to safetensors_file::read.
template <class Stack>
loaded_adapter<Stack> load_adapter(const safetensors_file& f, const adapter_load_options& opt = {}, index_t d = 0) {
  using I = typename Stack::intervention;
  using T = typename Stack::params_type::value_type;
  index_t k = 0, fd = 0;
  loaded_adapter<Stack> out;
  out.info = check_adapter_metadata<I>(f, d, opt, &k, &fd);
  out.metadata = f.metadata();
  std::set<std::string> consumed;
  owned_params<typename Stack::params_type> scratch(I::template shape<T>(fd));
  for (index_t layer : out.info.layers) {
    Stack st(fd, out.info.stack_scale_a, out.info.stack_scale_b);
    for (index_t m = 0; m < k; ++m) {
      read_module_tensors<I, T>(f, module_prefix(layer, m), *scratch, consumed);
      st.append(*scratch);
    }
    out.sites.push_back(std::move(st));
  }
  detail::require_all_consumed(f, consumed);
  return out;
}

/// Loads an adapter saved by save_adapter into stacks of the given type (policies checked against
/// the metadata; d comes from the file unless `d` > 0, which must then match).
template <class Stack>
loaded_adapter<Stack> load_adapter(const std::filesystem::path& path, const adapter_load_options& opt = {},
                                   index_t d = 0) {
  return load_adapter<Stack>(safetensors_file::read(path, read_options{.check_finite = opt.check_finite}), opt, d);
}

// ---- single modules ------------------------------------------------------------------------------
namespace detail {
template <class M> concept intervention_module = requires(const M& m) {
  typename M::intervention;
  typename M::params_type;
  { m.dim() } -> std::convertible_to<index_t>;
  m.parameters();
};
}  // namespace detail

/// Saves one module (gated_intervention<…>::module<T>) as a one-site, one-module adapter.
/// info.layers must name exactly one layer.
template <detail::intervention_module M>
void save_adapter(const std::filesystem::path& path, const M& module, const adapter_info& info,
                  adapter_save_options opt = {}) {
  using I = typename M::intervention;
  using T = typename M::params_type::value_type;
  detail::check_site_layers<M>(info, 1);
  detail::check_positions_mode(info.positions, "save_adapter");
  require<format_error>(is_grun_float(opt.dtype), "save_adapter: expected dtype F32, BF16, F16 or F64, got ",
                        name_of(opt.dtype));
  std::vector<tensor_record> records;
  append_module_tensors<I, T>(records, module_prefix(info.layers[0], 0), module.parameters(), opt.dtype);
  write_safetensors(path, records, adapter_metadata<I>(info, module.dim(), 1, opt.dtype));
}

/// Loads module `k` of the site at `layer` (default: the file's first site, module 0) into an
/// existing module of the same policies and hidden size. Returns the file's adapter_info. Unlike
/// load_adapter, other sites' tensors may be present (they are simply not read).
template <detail::intervention_module M>
adapter_info load_module(const std::filesystem::path& path, M& module, const adapter_load_options& opt = {},
                         index_t layer = -1, index_t k = 0) {
  using I = typename M::intervention;
  using T = typename M::params_type::value_type;
  const auto f = safetensors_file::read(path, read_options{.check_finite = opt.check_finite});
  index_t kk = 0;
  adapter_info info = check_adapter_metadata<I>(f, module.dim(), opt, &kk);
  if (layer < 0) layer = info.layers.front();
  require<format_error>(std::find(info.layers.begin(), info.layers.end(), layer) != info.layers.end(), f.source(),
                        ": expected a site at layer ", layer, ", the file has layers ", detail::join_layers(info.layers));
  require<format_error>(k >= 0 && k < kk, f.source(), ": expected module index in [0, ", kk, "), got ", k);
  // Read into a temporary first: a failure half-way must not leave the module half-overwritten.
  owned_params<typename M::params_type> tmp(I::template shape<T>(module.dim()));
  std::set<std::string> consumed;
  read_module_tensors<I, T>(f, module_prefix(layer, k), *tmp, consumed);
  auto& dst = module.owned_parameters();
  std::copy(tmp.data(), tmp.data() + tmp.size(), dst.data());
  return info;
}

// ---- optimizer state ------------------------------------------------------------------------------
/// Saves AdamW's state (m, v in their own dtype — the compute type acc_t of the parameters, so fp32
/// for half and bfloat16 parameters — bitwise; step count and hyper-parameters in the metadata) so
/// training resumes exactly. Keys: `m.<i>` / `v.<i>`, i = leaf index in for_each_param order (the
/// shapes are those of the parameters).
template <class Params>
void save_optimizer_state(const std::filesystem::path& path, const optim::adamw<Params>& opt) {
  using S = typename optim::adamw<Params>::acc_type;
  std::vector<tensor_record> records;
  const auto add = [&](const char* prefix, const typename optim::adamw<Params>::state_type& state) {
    index_t i = 0;
    for (const auto& leaf : state.leaves()) {
      records.push_back(make_tensor<S>(prefix + std::to_string(i++), leaf.shape(),
                                       std::span<const S>(leaf.data, static_cast<std::size_t>(leaf.size()))));
    }
  };
  add("m.", opt.first_moment());
  add("v.", opt.second_moment());
  const auto& o = opt.options();
  const metadata_map meta = {
      {"format", "grun.optimizer"}, {"format_version", "1"}, {"optimizer", "adamw"},
      {"step", std::to_string(opt.steps())}, {"lr", detail::format_double(o.lr)},
      {"beta1", detail::format_double(o.beta1)}, {"beta2", detail::format_double(o.beta2)},
      {"eps", detail::format_double(o.eps)}, {"weight_decay", detail::format_double(o.weight_decay)},
      {"max_grad_norm", detail::format_double(o.max_grad_norm)}};
  write_safetensors(path, records, meta);
}

/// Restores state saved by save_optimizer_state into `opt` (same parameter aggregate shape; the
/// hyper-parameters stay those `opt` was built with). Moments of any floating dtype are converted
/// to the optimizer's (files written before the moments moved to acc_t hold them in the parameters'
/// dtype). All-or-nothing: on error `opt` is unchanged.
template <class Params>
void load_optimizer_state(const std::filesystem::path& path, optim::adamw<Params>& opt) {
  using S = typename optim::adamw<Params>::acc_type;
  const auto f = safetensors_file::read(path, read_options{.check_finite = true});
  const std::string& fmt = detail::meta(f, "format");
  require<format_error>(fmt == "grun.optimizer" && detail::meta(f, "optimizer") == "adamw", f.source(),
                        ": expected a grun AdamW state (format \"grun.optimizer\", optimizer \"adamw\"), got format \"",
                        fmt, "\"");
  const auto step = detail::parse_int<std::int64_t>(detail::meta(f, "step"), f.source(), "step");
  require<format_error>(step >= 0, f.source(), ": expected a non-negative step, got ", step);
  auto m = opt.first_moment(), v = opt.second_moment();
  std::set<std::string> consumed;
  const auto read = [&](const char* prefix, const typename optim::adamw<Params>::state_type& state) {
    index_t i = 0;
    for (const auto& leaf : state.leaves()) {
      const std::string key = prefix + std::to_string(i++);
      const auto values = decode<S>(f, key, leaf.shape());
      std::copy(values.begin(), values.end(), leaf.data);
      consumed.insert(key);
    }
  };
  read("m.", m);
  read("v.", v);
  detail::require_all_consumed(f, consumed);
  opt.first_moment() = std::move(m);
  opt.second_moment() = std::move(v);
  opt.set_steps(step);
}

}  // namespace grun::io
