#pragma once
// grun/adapters/torch.hpp — libtorch glue: autograd functions, torch::nn modules and a runtime
// factory. Glue only: every number is computed by grun (intervention.hpp, loss/token_nll.hpp).
//
// ---- the public surface (namespace grun::torch_adapter) ------------------------------------
//
//   Flat parameters. One module's parameters live in ONE 1-D tensor, the fields of its
//   gated_intervention<G, R, O>::params laid out back to back in declaration order (gate fields,
//   then reft fields), exactly as grun::owned_params carves its buffer:
//     index_t flat_size<I>(index_t d);                              // its length for hidden size d
//     I::params<T, S> bind_params<I, T, S = host_space>(flat, d);   // params aggregate over flat's data
//     std::vector<named_tensor> named_params<I>(flat, d);           // "gate.weight", "reft.rotate_layer", …
//                                                                   // as views into flat (for IO)
//   Autograd functions (differentiable in h, the trainable flat and, through the gates output, a gate loss):
//     std::tuple<Tensor, Tensor> apply_intervention<I>(h [.., d], flat [n], rows int64 [P]);
//         -> (h' [.., d] = h with rows + g(h)Δ(h), gates [P])
//     std::tuple<Tensor, Tensor> apply_stack<I>(h, frozen [K-1, n], flat [n] or [0], rows, scale);
//         -> (h' = h + scale·Σ_k g_kΔ_k, gates [K, P]); modules = frozen rows, then flat (the trained one)
//     Tensor token_nll(logits [T, V], labels int64 [T]);   -> nll [T] (float, double for double logits)
//   Type-erased modules (what a runtime choice of the policies returns: see torch_kinds.hpp for
//   make_intervention / make_intervention_stack and the rest of the runtime kinds):
//     any_intervention (a torch::nn::Module; one parameter "flat"):
//       forward(h, rows) -> (h', gates [P]);  flat();  retract();  parameter_count();  dim();
//       gate_kind(); reft_kind(); rank();  named_params()  (views into flat, for IO)
//     any_intervention_stack (a torch::nn::Module; parameters "module0", "module1", …):
//       forward(h, rows) -> (h', gates [K, P]);  append(seed) (freezes the current trainable module and
//       adds a new trainable one);  append_frozen(flat);  trainable();  module_flat(k);  size();
//       scale(); scale_a(); scale_b(); set_scale(a, b);  retract();  named_params(k);  kinds/rank/dim as above
//   Typed modules (the same interface, plus the grun parameter aggregates for grun's optimizer):
//     intervention<Gate, Reft, Ortho = default_ortho_t<Reft>>(d, seed, dtype = kFloat)
//       params_view<T>(), grads_view<T>()   (I::params<T> over flat and flat.grad(), CPU)
//     intervention_stack<Gate, Reft, Ortho>(d, a, b, dtype)
//
// Training:   torch::optim::AdamW opt(m->parameters(), …);  loss.backward(); opt.step(); m->retract();
//       or:   grun::optim::adamw<I::params<float>> opt(m->params_view<float>(), {.lr = 4e-3});
//             loss.backward();  opt.step(m->params_view<float>(), m->grads_view<float>());  (retracts itself)
//
// ---- conventions -----------------------------------------------------------------------
//  * dtypes: h and flat share one storage type, float32 / float64 / float16 / bfloat16 (grun computes
//    in float, double for double). The modules cast h to their parameter dtype through autograd and
//    cast the outputs back, so a bf16 model can drive a float32 module.
//  * devices: CPU runs on exec::host with at::get_num_threads() workers (results never depend on the
//    thread count). CUDA tensors run on exec::cuda on the current stream when this header is compiled
//    by nvcc with GRUN_TORCH_CUDA defined and the kernels/ headers included first; otherwise they are
//    rejected with grun::error "built without CUDA kernels". All tensors of one call share a device
//    (rows may live anywhere: positions are host data, copied to the CPU). On CUDA, half and bfloat16
//    keep their storage type (the fused kernels' 16-bit paths). tests/torch_cuda is such a build (the
//    kernels' includes, the link, libtorch_cuda loaded before torch is asked about CUDA).
//  * layout: non-contiguous inputs are handled, not rejected: they are copied with .contiguous()
//    (gradients are returned in the caller's shape). Wrong rank, dtype, device, length, or a row index
//    outside [0, N) or repeated → grun::shape_error naming expected vs got, before any work.
//  * rows index h viewed as [N, d], N = numel / d (batch × seq_len): see grun::positions.
//  * compile time: each gated_intervention type used costs its forward and backward in two compute
//    types. The 54 runtime kinds are compiled once, in grun::torch_kinds (torch_kinds.hpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/nn/module.h>

#if defined(GRUN_TORCH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../gate/always.hpp"
#include "../gate/linear.hpp"
#include "../gate/mlp.hpp"
#include "../intervention.hpp"
#include "../loss/token_nll.hpp"
#include "../reft/direft.hpp"
#include "../reft/loreft.hpp"
#include "torch_view.hpp"

namespace grun::torch_adapter {

using at::Tensor;

/// One named parameter tensor of a module: a view into its flat tensor, shaped as the file stores
/// it ([cols] for a vector, [rows, cols] for a matrix; R stays [r, d] — IO transposes if it must).
struct named_tensor {
  std::string name;  // "gate.<param_name>" or "reft.<param_name>" (policy param_names)
  Tensor tensor;
};

namespace detail {

template <class T> struct type_tag { using type = T; };

/// Calls f(type_tag<T>{}) for the grun storage type of an at::ScalarType.
template <class F>
decltype(auto) dispatch_dtype(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: return f(type_tag<float>{});
    case at::kDouble: return f(type_tag<double>{});
    case at::kHalf: return f(type_tag<grun::half>{});
    case at::kBFloat16: return f(type_tag<grun::bfloat16>{});
    default:
      fail<shape_error>(what, ": expected dtype Float, Double, Half or BFloat16, got ", c10::toString(st));
  }
  return f(type_tag<float>{});  // unreachable: fail throws
}

/// The storage type grun computes an intervention in. On the CPU, half and bfloat16 are widened to
/// float before the call and the results rounded back after it — the same arithmetic as grun's own
/// half path (which loads to float, computes in float and rounds once), with half the template
/// instantiations. CUDA tensors (GRUN_TORCH_CUDA) keep their storage type.
inline at::ScalarType compute_dtype(const Tensor& t, const char* what) {
  const at::ScalarType st = t.scalar_type();
  require<shape_error>(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, what,
                       ": expected dtype Float, Double, Half or BFloat16, got ", c10::toString(st));
#if defined(GRUN_TORCH_CUDA)
  if (t.is_cuda()) return st;
#endif
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

/// dispatch_dtype restricted to what compute_dtype returns.
template <class F>
decltype(auto) dispatch_compute(at::ScalarType st, const char* what, F&& f) {
#if defined(GRUN_TORCH_CUDA)
  return dispatch_dtype(st, what, std::forward<F>(f));
#else
  if (st == at::kDouble) return f(type_tag<double>{});
  require<shape_error>(st == at::kFloat, what, ": expected compute dtype Float or Double, got ", c10::toString(st));
  return f(type_tag<float>{});
#endif
}

inline std::int64_t dtype_code(at::ScalarType st) { return static_cast<std::int64_t>(st); }
inline at::ScalarType dtype_of(const c10::IValue& v) { return static_cast<at::ScalarType>(v.toInt()); }

inline void require_device(const Tensor& t, const char* what) {
  require<shape_error>(t.defined(), what, ": expected a defined tensor, got an undefined one");
  require<shape_error>(t.is_cpu() || t.is_cuda(), what, ": expected a CPU or CUDA tensor, got device ",
                       t.device().str());
}
/// Autograd inspects its inputs before any forward runs: undefined tensors are caught here first.
inline void require_defined(std::initializer_list<std::pair<const Tensor&, const char*>> ts, const char* op) {
  for (const auto& [t, name] : ts)
    require<shape_error>(t.defined(), op, ": ", name, ": expected a defined tensor, got an undefined one");
}
inline void require_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  require<shape_error>(a.device() == b.device(), a_name, " and ", b_name, ": expected the same device, got ",
                       a.device().str(), " and ", b.device().str());
}

/// Calls f(executor, memory_space{}) for the device of `t`.
template <class F>
decltype(auto) on_executor(const Tensor& t, const char* what, F&& f) {
  require_device(t, what);
  if (t.is_cuda()) {
#if defined(GRUN_TORCH_CUDA)
    const c10::cuda::CUDAGuard guard(t.device());
    return f(exec::cuda(static_cast<void*>(at::cuda::getCurrentCUDAStream(t.device().index()).stream())),
             cuda_space{});
#else
    fail<error>(what, ": got a CUDA tensor, but grun's torch adapter was built without CUDA kernels (compile this "
                      "translation unit with nvcc, define GRUN_TORCH_CUDA and include the kernels/ headers first)");
#endif
  }
  return f(exec::host_t{static_cast<unsigned>(std::max(1, at::get_num_threads()))}, host_space{});
}

/// Points each leaf of a shaped aggregate at consecutive elements of `base` (owned_params' carving).
template <class P, class V>
P carve(P shaped, V* base) {
  index_t off = 0;
  for_each_param(shaped, [&](auto& leaf) { leaf.data = base + off; off += leaf.size(); });
  return shaped;
}

inline Tensor contiguous_rows(const Tensor& h, const char* what) {
  require_device(h, what);
  require<shape_error>(h.dim() >= 1 && h.size(-1) >= 1, what, ": expected a tensor [.., d] with d >= 1, got shape ",
                       std::string(c10::str(h.sizes())));
  return h.contiguous().reshape({-1, h.size(-1)});
}

/// rows: int64 [P] on any device → grun::positions (distinct, non-negative; the range is checked against N later).
inline positions positions_from(const Tensor& rows, const char* what) {
  require<shape_error>(rows.defined(), what, ": rows: expected an int64 tensor [P], got an undefined tensor");
  require<shape_error>(rows.scalar_type() == at::kLong, what, ": rows: expected dtype Long (int64), got ",
                       c10::toString(rows.scalar_type()));
  require<shape_error>(rows.dim() == 1, what, ": rows: expected 1 dimension [P], got shape ",
                       std::string(c10::str(rows.sizes())));
  const Tensor r = rows.to(at::kCPU).contiguous();
  const auto* p = r.data_ptr<std::int64_t>();
  return positions::rows(std::vector<index_t>(p, p + r.numel()));
}

/// The positions a forward used, kept for its backward as a copy: the caller's `rows` tensor may be
/// refilled or resized in between (a reused position buffer), and saved_data is not version-checked.
inline c10::IValue saved_positions(const positions& pos) {
  return c10::IValue(std::vector<std::int64_t>(pos.span().begin(), pos.span().end()));
}
inline positions restored_positions(const c10::IValue& saved) { return positions::rows(saved.toIntVector()); }

/// The backward of these functions writes its results through raw pointers: it is not itself
/// differentiable, so a double backward (create_graph = true) is refused instead of returning
/// gradients that silently lack grun's second-order part.
inline void refuse_double_backward(const char* what) {
  require<error>(!at::GradMode::is_enabled(), what, ": expected a first-order backward, got one with create_graph = "
                 "true (the backward is not itself differentiable; double backward is not supported)");
}

/// Whether autograd records a call on these inputs: grad mode on and an input that requires grad.
/// Asked before apply (inside a Function's forward grad mode is always off).
inline bool autograd_records(const Tensor& h, const Tensor& flat) {
  return at::GradMode::is_enabled() && (h.requires_grad() || flat.requires_grad());
}

/// A forward's saved_activations kept in the autograd context for its backward (as a capsule: no
/// class registration needed), so the backward skips what the forward already computed, as
/// libtorch's own autograd would. Only where there may be something to save — exec::host with a gate
/// that has a saved form; exec::cuda where the tensor-core forward may keep e and z (16-bit storage;
/// see saved_activations) — and autograd records the call (`records`: autograd_records, decided by
/// the caller of apply). An inference forward keeps nothing.
template <class T>
struct saved_capsule : torch::CustomClassHolder {
  saved_activations<T> saved;
};
template <class I, class T, class E>
saved_activations<T>* keep_saved(torch::autograd::AutogradContext* ctx, bool records, index_t d) {
  using impl = grun::detail::intervention_impl<E, I>;
  bool worth = false;
  if constexpr (std::is_same_v<E, exec::host_t>) worth = impl::saved_width(d) != 0;
  else if constexpr (requires { impl::template may_save<T>(d); }) worth = impl::template may_save<T>(d);
  if (!records || !worth) return nullptr;
  auto capsule = c10::make_intrusive<saved_capsule<T>>();
  saved_activations<T>* saved = &capsule->saved;  // owned by ctx from here on
  ctx->saved_data["activations"] = c10::IValue::make_capsule(std::move(capsule));
  return saved;
}
/// What keep_saved kept (null: nothing; the backward recomputes). T is the forward's compute type.
template <class T>
const saved_activations<T>* kept_saved(torch::autograd::AutogradContext* ctx) {
  const auto it = ctx->saved_data.find("activations");
  if (it == ctx->saved_data.end()) return nullptr;
  return &c10::static_intrusive_pointer_cast<saved_capsule<T>>(it->second.toCapsule())->saved;
}

/// An incoming gradient as a dense tensor shaped and typed like `like` (zeros where autograd gave none). A zero-
/// size gradient may arrive expanded (stride 0), which contiguous() keeps: it is made anew.
inline Tensor dense_grad(const Tensor& g, const Tensor& like) {
  if (!g.defined() || g.numel() == 0) return at::zeros_like(like);
  return g.to(like.scalar_type()).contiguous().reshape(like.sizes());
}

}  // namespace detail

// ---- flat parameters ---------------------------------------------------------------------
/// Length of the flat parameter tensor of intervention I for hidden size d.
template <class I>
index_t flat_size(index_t d) {
  return parameter_count(I::template shape<float>(d));
}

/// A grun parameter aggregate over the data of `flat` ([flat_size<I>(d)], dtype T, contiguous, in Space).
/// Throws shape_error on any mismatch. The aggregate aliases the tensor: keep the tensor alive.
template <class I, class T, class Space = host_space>
typename I::template params<T, Space> bind_params(const Tensor& flat, index_t d, const char* what = "flat") {
  check<T, 1>(flat, what);
  const index_t n = flat_size<I>(d);
  require<shape_error>(flat.numel() == n, what, ": expected ", n, " parameters (", I::gate_type::name, " + ",
                       I::reft_type::name, ", r = ", I::rank, ", d = ", d, "), got ", flat.numel());
  require<shape_error>(flat.is_contiguous(), what, ": expected a contiguous tensor, got stride ", flat.stride(0));
  if constexpr (std::is_same_v<Space, host_space>)
    require<shape_error>(flat.is_cpu(), what, ": expected a CPU tensor, got one on ", flat.device().str());
  else
    require<shape_error>(flat.is_cuda(), what, ": expected a CUDA tensor, got one on ", flat.device().str());
  return detail::carve(I::template shape<T, Space>(d), static_cast<T*>(flat.data_ptr()));
}

/// Named views into `flat` ("gate.<name>", "reft.<name>", in layout order), for IO.
template <class I>
std::vector<named_tensor> named_params(const Tensor& flat, index_t d) {
  require<shape_error>(flat.defined() && flat.dim() == 1 && flat.numel() == flat_size<I>(d),
                       "named_params: expected a 1-D flat tensor of ", flat_size<I>(d), " parameters, got ",
                       flat.defined() ? std::string(c10::str(flat.sizes())) : std::string("an undefined tensor"));
  const auto shaped = I::template shape<float>(d);
  std::vector<named_tensor> out;
  index_t off = 0;
  auto group = [&](const auto& params, const auto& names, const char* prefix) {
    std::size_t i = 0;
    for_each_param(params, [&](const auto& leaf) {
      Tensor v = flat.narrow(0, off, leaf.size());
      v = leaf.is_vector ? v.view({leaf.cols}) : v.view({leaf.rows, leaf.cols});
      out.push_back({std::string(prefix) + std::string(names[i]), v});
      off += leaf.size();
      ++i;
    });
  };
  group(shaped.gate, I::gate_type::param_names, "gate.");
  group(shaped.reft, I::reft_type::param_names, "reft.");
  return out;
}

// ---- autograd: one gated intervention ----------------------------------------------------
namespace detail {

template <class I>
struct intervention_function : torch::autograd::Function<intervention_function<I>> {
  static constexpr const char* op = "grun::torch_adapter::gated_intervention";

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& h,
                                                const Tensor& flat, const Tensor& rows, bool records) {
    require_device(flat, op);
    require_same_device(h, "h", flat, "flat");
    require<shape_error>(flat.scalar_type() == h.scalar_type(), op, ": flat: expected the dtype of h (",
                         c10::toString(h.scalar_type()), "), got ", c10::toString(flat.scalar_type()));
    const at::ScalarType ct = compute_dtype(h, op);
    const Tensor x = contiguous_rows(h, op).to(ct);  // [N, d]
    const index_t d = x.size(1);
    const Tensor p = flat.contiguous().to(ct);
    const positions pos = positions_from(rows, op);
    // The output is allocated in h's shape and written through an [N, d] view: returned as it is
    // (not as a view of an internal tensor), so the caller may modify it in place.
    Tensor out_full = at::empty(h.sizes(), x.options());
    Tensor out = out_full.view(x.sizes());
    Tensor gates = at::empty({pos.size()}, x.options());
    dispatch_compute(ct, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      on_executor(x, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        using E = std::remove_cvref_t<decltype(ex)>;
        const auto params = bind_params<I, T, S>(p, d, "flat");
        const auto hv = view<const T, 2, S>(x, "h");
        const auto outv = view<T, 2, S>(out, "out");
        const auto gv = view<T, 1, S>(gates, "gates");
        if (auto* saved = keep_saved<I, T, E>(ctx, records, d)) I::forward(ex, params, hv, pos, outv, gv, *saved);
        else I::forward(ex, params, hv, pos, outv, gv);
      });
    });
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, p});
    ctx->saved_data["rows"] = saved_positions(pos);
    ctx->saved_data["shape"] = h.sizes().vec();
    ctx->saved_data["dtype"] = dtype_code(h.scalar_type());
    return {out_full.to(h.scalar_type()), gates.to(h.scalar_type())};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& p = saved[1];
    const index_t d = x.size(1);
    refuse_double_backward(op);
    const positions pos = restored_positions(ctx->saved_data["rows"]);
    const Tensor dout = dense_grad(grad[0], x);
    const Tensor dg = grad[1].defined() ? grad[1].to(x.scalar_type()).contiguous() : Tensor();
    Tensor dh = at::empty_like(x);
    Tensor dflat = at::empty_like(p);
    dispatch_compute(x.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      on_executor(x, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        const vector_view<const T, S> dgv = dg.defined() ? view<const T, 1, S>(dg, "dgates") : vector_view<const T, S>();
        // grads are written through a mutable aggregate; params only read.
        const auto params = bind_params<I, T, S>(p, d, "flat");
        const auto hv = view<const T, 2, S>(x, "h");
        const auto doutv = view<const T, 2, S>(dout, "dout");
        const auto dhv = view<T, 2, S>(dh, "dh");
        const auto grads = bind_params<I, T, S>(dflat, d, "dflat");
        if (const auto* saved = kept_saved<T>(ctx)) I::backward(ex, params, hv, pos, doutv, dgv, dhv, grads, *saved);
        else I::backward(ex, params, hv, pos, doutv, dgv, dhv, grads);
      });
    });
    const at::ScalarType st = dtype_of(ctx->saved_data["dtype"]);
    return {dh.view(ctx->saved_data["shape"].toIntVector()).to(st), dflat.to(st), Tensor(), Tensor()};
  }
};

/// K modules: frozen [Kf, n] (rows) then an optional trainable flat [n] (numel 0: none).
template <class I>
struct stack_function : torch::autograd::Function<stack_function<I>> {
  static constexpr const char* op = "grun::torch_adapter::intervention_stack";

  template <class T, class S>
  static std::vector<typename I::template params<T, S>> modules(const Tensor& frozen, const Tensor& flat, index_t d) {
    std::vector<typename I::template params<T, S>> v;
    const index_t n = flat_size<I>(d);
    for (index_t k = 0; k < frozen.size(0); ++k)
      v.push_back(carve(I::template shape<T, S>(d), static_cast<T*>(frozen.data_ptr()) + k * n));
    if (flat.numel() != 0) v.push_back(bind_params<I, T, S>(flat, d, "flat"));
    return v;
  }

  static void check(const Tensor& x, const Tensor& frozen, const Tensor& flat) {
    const index_t d = x.size(1), n = flat_size<I>(d);
    require_device(frozen, "intervention_stack: frozen");
    require_device(flat, "intervention_stack: flat");
    require_same_device(x, "h", frozen, "frozen");
    require_same_device(x, "h", flat, "flat");
    for (const auto& [t, name] : {std::pair{frozen, "frozen"}, std::pair{flat, "flat"}})
      require<shape_error>(t.scalar_type() == x.scalar_type(), op, ": ", name, ": expected the dtype of h (",
                           c10::toString(x.scalar_type()), "), got ", c10::toString(t.scalar_type()));
    require<shape_error>(frozen.dim() == 2 && frozen.size(1) == n, op, ": frozen: expected shape [K - 1, ", n,
                         "] (one flat module per row), got ", std::string(c10::str(frozen.sizes())));
    require<shape_error>(flat.dim() == 1 && (flat.numel() == n || flat.numel() == 0), op, ": flat: expected shape [",
                         n, "] (or [0]: no trainable module), got ", std::string(c10::str(flat.sizes())));
    require<shape_error>(frozen.size(0) + (flat.numel() ? 1 : 0) >= 1, op,
                         ": expected at least one module, got an empty stack");
  }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& h,
                                                const Tensor& frozen_in, const Tensor& flat_in, const Tensor& rows,
                                                double scale, bool records) {
    Tensor x = contiguous_rows(h, op);
    const index_t d = x.size(1);
    check(x, frozen_in, flat_in);
    const at::ScalarType ct = compute_dtype(h, op);
    x = x.to(ct);
    const Tensor frozen = frozen_in.contiguous().to(ct), flat = flat_in.contiguous().to(ct);
    const positions pos = positions_from(rows, op);
    const index_t K = frozen.size(0) + (flat.numel() ? 1 : 0);
    Tensor out_full = at::empty(h.sizes(), x.options());  // returned as is: see intervention_function
    Tensor out = out_full.view(x.sizes());
    Tensor gates = at::empty({K, pos.size()}, x.options());
    dispatch_compute(ct, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      on_executor(x, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        using E = std::remove_cvref_t<decltype(ex)>;
        const auto mods = modules<T, S>(frozen, flat, d);
        const matrix_view<const T, S> hv = view<const T, 2, S>(x, "h");
        I::template check_exec<E, S>();
        I::check_inputs(mods[0], hv, pos, op);
        grun::detail::run_forward<I>(ex, std::span<const typename I::template params<T, S>>(mods), scale, hv, pos,
                                     view<T, 2, S>(out, "out"), view<T, 2, S>(gates, "gates"),
                                     keep_saved<I, T, E>(ctx, records, d));
      });
    });
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, frozen, flat});
    ctx->saved_data["rows"] = saved_positions(pos);
    ctx->saved_data["shape"] = h.sizes().vec();
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dtype"] = dtype_code(h.scalar_type());
    return {out_full.to(h.scalar_type()), gates.to(h.scalar_type())};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &frozen = saved[1], &flat = saved[2];
    const index_t d = x.size(1);
    const double scale = ctx->saved_data["scale"].toDouble();
    refuse_double_backward(op);
    const positions pos = restored_positions(ctx->saved_data["rows"]);
    const bool trainable = flat.numel() != 0;
    const index_t K = frozen.size(0) + (trainable ? 1 : 0);
    const Tensor dout = dense_grad(grad[0], x);
    const Tensor dg = grad[1].defined() ? grad[1].to(x.scalar_type()).contiguous() : Tensor();
    Tensor dh = at::empty_like(x);
    // Without a trainable module the parameter gradients of module 0 are computed and dropped.
    Tensor dflat = at::empty({flat_size<I>(d)}, x.options());
    dispatch_compute(x.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      on_executor(x, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        const auto mods = modules<T, S>(frozen, flat, d);
        const matrix_view<const T, S> dgv =
            dg.defined() ? view<const T, 2, S>(dg, "dgates") : matrix_view<const T, S>();
        grun::detail::run_backward<I>(
            ex, std::span<const typename I::template params<T, S>>(mods), scale, trainable ? K - 1 : index_t(0),
            view<const T, 2, S>(x, "h"), pos, view<const T, 2, S>(dout, "dout"), dgv, view<T, 2, S>(dh, "dh"),
            bind_params<I, T, S>(dflat, d, "dflat"), kept_saved<T>(ctx), op);
      });
    });
    const at::ScalarType st = dtype_of(ctx->saved_data["dtype"]);
    return {dh.view(ctx->saved_data["shape"].toIntVector()).to(st), Tensor(), trainable ? dflat.to(st) : Tensor(),
            Tensor(), Tensor(), Tensor()};
  }
};

struct token_nll_function : torch::autograd::Function<token_nll_function> {
  static constexpr const char* op = "grun::torch_adapter::token_nll";

  static void check(const Tensor& logits, const Tensor& labels) {
    require_device(logits, "token_nll: logits");
    require_device(labels, "token_nll: labels");
    require_same_device(logits, "logits", labels, "labels");
    require<shape_error>(logits.dim() == 2, op, ": logits: expected shape [T, V], got ",
                         std::string(c10::str(logits.sizes())));
    require<shape_error>(labels.scalar_type() == at::kLong, op, ": labels: expected dtype Long (int64), got ",
                         c10::toString(labels.scalar_type()));
    require<shape_error>(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels: expected shape [",
                         logits.size(0), "], got ", std::string(c10::str(labels.sizes())));
  }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& logits_in,
                                                const Tensor& labels_in) {
    check(logits_in, labels_in);
    const Tensor logits = logits_in.contiguous(), labels = labels_in.contiguous();
    const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor nll = at::empty({logits.size(0)}, logits.options().dtype(acc));
    Tensor lse = at::empty_like(nll);
    dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      on_executor(logits, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        loss::token_nll_forward(ex, view<const T, 2, S>(logits, "logits"),
                                view<const std::int64_t, 1, S>(labels, "labels"), view<A, 1, S>(nll, "nll"),
                                view<A, 1, S>(lse, "lse"));
      });
    });
    ctx->save_for_backward({logits, labels, lse});
    return {nll};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &labels = saved[1], &lse = saved[2];
    refuse_double_backward(op);
    const Tensor dnll = grad[0].to(lse.scalar_type()).contiguous();
    Tensor dlogits = at::empty_like(logits);
    dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      on_executor(logits, op, [&](const auto& ex, auto space) {
        using S = decltype(space);
        loss::token_nll_backward(ex, view<const T, 2, S>(logits, "logits"),
                                 view<const std::int64_t, 1, S>(labels, "labels"), view<const A, 1, S>(lse, "lse"),
                                 view<const A, 1, S>(dnll, "dnll"), view<T, 2, S>(dlogits, "dlogits"));
      });
    });
    return {dlogits, Tensor()};
  }
};

}  // namespace detail

/// h' = h with rows + g(h)Δ(h), gates [P]; differentiable in h and flat (and through gates).
template <class I>
std::tuple<Tensor, Tensor> apply_intervention(const Tensor& h, const Tensor& flat, const Tensor& rows) {
  detail::require_defined({{h, "h"}, {flat, "flat"}, {rows, "rows"}}, "grun::torch_adapter::gated_intervention");
  auto r = detail::intervention_function<I>::apply(h, flat, rows, detail::autograd_records(h, flat));
  return {r[0], r[1]};
}

/// h' = h + scale · Σ_k g_k Δ_k over modules = rows of `frozen` [K-1, n] then `flat` [n] (the trained
/// one; pass an empty [0] tensor for none); gates [K, P]. Differentiable in h and flat only.
template <class I>
std::tuple<Tensor, Tensor> apply_stack(const Tensor& h, const Tensor& frozen, const Tensor& flat, const Tensor& rows,
                                       double scale) {
  detail::require_defined({{h, "h"}, {frozen, "frozen"}, {flat, "flat"}, {rows, "rows"}},
                          "grun::torch_adapter::intervention_stack");
  auto r = detail::stack_function<I>::apply(h, frozen.detach(), flat, rows, scale,
                                            detail::autograd_records(h, flat));
  return {r[0], r[1]};
}

/// Per-token nll [T] = lse(logits_t) − logits_t[labels_t] (0 where labels == −100), fused one-pass
/// forward and backward (loss/token_nll.hpp). float for float/half/bf16 logits, double for double.
inline Tensor token_nll(const Tensor& logits, const Tensor& labels) {
  detail::require_defined({{logits, "logits"}, {labels, "labels"}}, "grun::torch_adapter::token_nll");
  return detail::token_nll_function::apply(logits, labels)[0];
}

// ---- type-erased modules (the runtime kinds of torch_kinds.hpp build them) ----------------
namespace detail {
template <class G> constexpr const char* gate_kind_of() {
  if constexpr (std::is_same_v<G, gate::linear>) return "linear";
  else if constexpr (std::is_same_v<G, gate::always>) return "always";
  else if constexpr (std::is_same_v<G, gate::mlp<>>) return "mlp";
  else return G::name;
}
template <class R> constexpr const char* reft_kind_of() {
  if constexpr (std::is_same_v<R, reft::loreft<R::rank>>) return "loreft";
  else if constexpr (std::is_same_v<R, reft::noreft<R::rank>>) return "noreft";
  else if constexpr (std::is_same_v<R, reft::direft<R::rank>>) return "direft";
  else return R::name;
}

/// A fresh flat tensor for I, initialized by grun::init(seed) (in T on the CPU, then cast to dtype).
template <class I>
Tensor init_flat(index_t d, std::uint64_t seed, at::ScalarType dtype) {
  const at::ScalarType ct = compute_dtype(at::empty({0}, at::TensorOptions().dtype(dtype)), "torch_adapter: parameter dtype");
  Tensor flat = at::empty({flat_size<I>(d)}, at::TensorOptions().dtype(ct));
  dispatch_compute(ct, "torch_adapter: parameter dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    init(bind_params<I, T>(flat, d), seed);
  });
  return flat.to(dtype);
}

/// I::retract on a flat tensor of any device / dtype (host code: through a CPU compute-dtype copy
/// unless flat already is one).
template <class I>
void retract_flat(Tensor& flat, index_t d) {
  if constexpr (I::reft_type::has_rotation && !I::ortho_type::is_parametrization) {
    const at::NoGradGuard no_grad;
    const at::ScalarType ct = flat.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor host = flat.is_cpu() && flat.is_contiguous() && flat.scalar_type() == ct
                      ? flat
                      : flat.to(at::kCPU, ct).contiguous();
    dispatch_compute(ct, "torch_adapter::retract", [&](auto tag) {
      I::retract(bind_params<I, typename decltype(tag)::type>(host, d, "flat"));
    });
    // copy_ is an in-place op torch counts; the raw writes into flat's own storage are not, so
    // count them: a graph that saved flat before the retraction then refuses its backward
    // ("modified by an inplace operation") instead of differentiating at the retracted values.
    if (!host.is_same(flat)) flat.copy_(host);
    else torch::autograd::impl::bump_version(flat);
  }
}

/// Runs a module's forward in the parameters' dtype, returning outputs in h's dtype.
template <class Fn>
std::tuple<Tensor, Tensor> in_param_dtype(const Tensor& h, const Tensor& flat, Fn&& fn) {
  require<shape_error>(h.defined(), "torch_adapter: forward: h: expected a defined tensor");
  (void)compute_dtype(h, "torch_adapter: forward: h");  // an integer h is refused, not cast to the parameters' dtype
  require_same_device(h, "h", flat, "the module's parameters (move the module with ->to(device))");
  if (h.scalar_type() == flat.scalar_type()) return fn(h);
  auto [y, g] = fn(h.to(flat.scalar_type()));
  return {y.to(h.scalar_type()), g.to(h.scalar_type())};
}
}  // namespace detail

/// The type-erased single module the CLI codes against. A torch::nn::Module with one parameter
/// "flat"; torch::optim optimizers train it through parameters(). Call retract() after each step.
class any_intervention : public torch::nn::Module {
 public:
  /// (h' [.., d], gates [P]) for rows int64 [P] into h viewed as [N, d].
  virtual std::tuple<Tensor, Tensor> forward(const Tensor& h, const Tensor& rows) = 0;
  /// Keeps R on its constraint set (QR retraction for loreft); no-op otherwise.
  virtual void retract() = 0;
  virtual std::string gate_kind() const = 0;
  virtual std::string reft_kind() const = 0;
  virtual index_t rank() const = 0;
  /// "gate.<name>" / "reft.<name>" views into flat() (see named_params<I>).
  virtual std::vector<named_tensor> named_params() const = 0;

  index_t dim() const { return d_; }
  index_t parameter_count() const { return flat_.numel(); }
  const Tensor& flat() const { return flat_; }
  /// Tells autograd that flat changed through a raw view (grun's AdamW over params_view): a graph
  /// that saved flat before then refuses its backward, as after any in-place op.
  void mark_written() { torch::autograd::impl::bump_version(flat_); }

 protected:
  any_intervention(index_t d, Tensor flat) : d_(d) { flat_ = register_parameter("flat", std::move(flat)); }
  index_t d_;
  Tensor flat_;
};

/// A gated_intervention<Gate, Reft, Ortho> module owning its flat parameters.
template <class Gate, class Reft, class Ortho = default_ortho_t<Reft>>
class intervention final : public any_intervention {
 public:
  using grun_type = grun::gated_intervention<Gate, Reft, Ortho>;
  template <class T> using params_type = typename grun_type::template params<T>;

  /// Hidden size d, parameters from grun::init(seed), stored in `dtype` on the CPU.
  intervention(index_t d, std::uint64_t seed, at::ScalarType dtype = at::kFloat)
      : any_intervention(d, detail::init_flat<grun_type>(d, seed, dtype)) {}

  std::tuple<Tensor, Tensor> forward(const Tensor& h, const Tensor& rows) override {
    require<shape_error>(h.defined() && h.dim() >= 1 && h.size(-1) == d_, "torch_adapter::intervention: h: expected [.., ",
                         d_, "], got ", h.defined() ? std::string(c10::str(h.sizes())) : std::string("undefined"));
    return detail::in_param_dtype(h, flat_, [&](const Tensor& x) {
      return apply_intervention<grun_type>(x, flat_, rows);
    });
  }
  void retract() override { detail::retract_flat<grun_type>(flat_, d_); }
  std::string gate_kind() const override { return detail::gate_kind_of<Gate>(); }
  std::string reft_kind() const override { return detail::reft_kind_of<Reft>(); }
  index_t rank() const override { return Reft::rank; }
  std::vector<named_tensor> named_params() const override { return torch_adapter::named_params<grun_type>(flat_, d_); }

  /// grun parameter aggregate over flat (CPU, dtype T) — for grun's optimizers and IO. Writes
  /// through it are raw, unseen by autograd's version counter: call mark_written() after them.
  template <class T> params_type<T> params_view() const { return bind_params<grun_type, T>(flat_, d_, "flat"); }
  /// The same over flat.grad(), allocated (zeros) when undefined.
  template <class T> params_type<T> grads_view() {
    if (!flat_.grad().defined()) flat_.mutable_grad() = at::zeros_like(flat_);
    return bind_params<grun_type, T>(flat_.grad(), d_, "flat.grad()");
  }
};

/// The type-erased stack: h' = h + s(K) Σ_k g_k Δ_k, s(K) = a·K + b. Modules are parameters
/// "module0", "module1", …; only the newest appended by append(seed) trains (requires_grad), the
/// others are frozen (requires_grad false). Optimize trainable(), not parameters().
class any_intervention_stack : public torch::nn::Module {
 public:
  /// (h' [.., d], gates [K, P]); with K = 0 returns (h, empty [0, P]).
  virtual std::tuple<Tensor, Tensor> forward(const Tensor& h, const Tensor& rows) = 0;
  /// Freezes the current trainable module (if any) and appends a new trainable one from grun::init(seed).
  virtual void append(std::uint64_t seed) = 0;
  virtual void retract() = 0;  // the trainable module
  virtual std::string gate_kind() const = 0;
  virtual std::string reft_kind() const = 0;
  virtual index_t rank() const = 0;
  virtual index_t module_parameter_count() const = 0;
  virtual std::vector<named_tensor> named_params(index_t k) const = 0;

  /// Freezes the current trainable module (if any) and appends a frozen copy of `flat` (from a file).
  void append_frozen(const Tensor& flat) {
    require<shape_error>(flat.defined() && flat.dim() == 1 && flat.numel() == module_parameter_count(),
                         "intervention_stack::append_frozen: expected a 1-D tensor of ", module_parameter_count(),
                         " parameters, got ", flat.defined() ? std::string(c10::str(flat.sizes())) : std::string("undefined"));
    freeze();
    const torch::NoGradGuard no_grad;
    // In the modules' dtype and device as they are now (->to() may have moved them since construction).
    Tensor t = flat.detach().to(modules_.empty() ? at::TensorOptions().dtype(dtype_) : modules_.front().options()).clone();
    push(t, false);
  }
  index_t size() const { return index_t(modules_.size()); }
  index_t dim() const { return d_; }
  double scale() const { return a_ * double(size()) + b_; }
  double scale_a() const { return a_; }  // s(K) = a·K + b
  double scale_b() const { return b_; }
  void set_scale(double a, double b) { a_ = a; b_ = b; }
  /// The trainable module's flat parameter, or an undefined tensor when every module is frozen.
  Tensor trainable() const { return trainable_ ? modules_.back() : Tensor(); }
  /// Tells autograd that the trainable module changed through a raw view (params_view).
  void mark_written() {
    require<error>(trainable_, "intervention_stack::mark_written: no trainable module (append one first)");
    torch::autograd::impl::bump_version(modules_.back());
  }
  const Tensor& module_flat(index_t k) const {
    require<shape_error>(k >= 0 && k < size(), "intervention_stack: module index ", k, " out of range [0, ", size(), ")");
    return modules_[std::size_t(k)];
  }

 protected:
  any_intervention_stack(index_t d, double a, double b, at::ScalarType dtype) : d_(d), a_(a), b_(b), dtype_(dtype) {}
  /// The trainable module stops training: no grad required, and its last gradient is dropped
  /// (kept, it held memory and read as a live gradient of a frozen module).
  void freeze() {
    if (trainable_) {
      modules_.back().set_requires_grad(false);
      modules_.back().mutable_grad() = Tensor();
    }
    trainable_ = false;
  }
  void push(Tensor t, bool trainable) {
    t.set_requires_grad(trainable);
    modules_.push_back(register_parameter("module" + std::to_string(modules_.size()), std::move(t), trainable));
    trainable_ = trainable;
  }
  /// frozen [Kf, n] (stacked) and the trainable flat (or an empty [0] tensor).
  std::pair<Tensor, Tensor> split() const {
    const index_t kf = size() - (trainable_ ? 1 : 0);
    const auto opts = modules_.front().options().requires_grad(false);
    std::vector<Tensor> fr;
    for (index_t k = 0; k < kf; ++k) fr.push_back(modules_[std::size_t(k)].detach());
    Tensor frozen = fr.empty() ? at::empty({0, module_parameter_count()}, opts) : at::stack(fr);
    return {frozen, trainable_ ? modules_.back() : at::empty({0}, opts)};
  }
  index_t d_;
  double a_, b_;
  at::ScalarType dtype_;
  bool trainable_ = false;
  std::vector<Tensor> modules_;
};

template <class Gate, class Reft, class Ortho = default_ortho_t<Reft>>
class intervention_stack final : public any_intervention_stack {
 public:
  using grun_type = grun::gated_intervention<Gate, Reft, Ortho>;
  template <class T> using params_type = typename grun_type::template params<T>;

  explicit intervention_stack(index_t d, double a = 0.0, double b = 1.0, at::ScalarType dtype = at::kFloat)
      : any_intervention_stack(d, a, b, dtype) {
    (void)flat_size<grun_type>(d);  // validates d
  }

  std::tuple<Tensor, Tensor> forward(const Tensor& h, const Tensor& rows) override {
    require<shape_error>(h.defined() && h.dim() >= 1 && h.size(-1) == d_,
                         "torch_adapter::intervention_stack: h: expected [.., ", d_, "], got ",
                         h.defined() ? std::string(c10::str(h.sizes())) : std::string("undefined"));
    if (modules_.empty()) {
      const positions pos = detail::positions_from(rows, "torch_adapter::intervention_stack");
      pos.validate(h.numel() / d_, "torch_adapter::intervention_stack");
      return {h, at::empty({0, pos.size()}, h.options())};
    }
    // (frozen modules, trainable module) as a pair: before clang 16 a lambda may not capture a
    // structured binding.
    const std::pair<Tensor, Tensor> parts = split();
    return detail::in_param_dtype(h, modules_.front(), [&](const Tensor& x) {
      return apply_stack<grun_type>(x, parts.first, parts.second, rows, scale());
    });
  }
  void append(std::uint64_t seed) override {
    freeze();
    Tensor t = detail::init_flat<grun_type>(d_, seed, dtype_);
    if (!modules_.empty()) t = t.to(modules_.front().options());  // dtype and device as the others now
    push(t, true);
  }
  void retract() override {
    if (trainable_) detail::retract_flat<grun_type>(modules_.back(), d_);
  }
  std::string gate_kind() const override { return detail::gate_kind_of<Gate>(); }
  std::string reft_kind() const override { return detail::reft_kind_of<Reft>(); }
  index_t rank() const override { return Reft::rank; }
  index_t module_parameter_count() const override { return flat_size<grun_type>(d_); }
  std::vector<named_tensor> named_params(index_t k) const override {
    return torch_adapter::named_params<grun_type>(module_flat(k), d_);
  }

  /// grun aggregates over the trainable module and its gradient (CPU, dtype T). Writes through
  /// params_view are raw: call mark_written() after them (see any_intervention::mark_written).
  template <class T> params_type<T> params_view() const {
    require<error>(trainable_, "intervention_stack::params_view: no trainable module (append one first)");
    return bind_params<grun_type, T>(modules_.back(), d_, "trainable module");
  }
  template <class T> params_type<T> grads_view() {
    require<error>(trainable_, "intervention_stack::grads_view: no trainable module (append one first)");
    Tensor& flat = modules_.back();
    if (!flat.grad().defined()) flat.mutable_grad() = at::zeros_like(flat);
    return bind_params<grun_type, T>(flat.grad(), d_, "trainable module's grad()");
  }
};

}  // namespace grun::torch_adapter
