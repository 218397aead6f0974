#pragma once
// grun/cuda/optim.cuh — cuda::adamw: optim::adamw for parameters that live on the device.
//
//   grun::cuda::device_params<unlearner::params<float, grun::cuda_space>> p(...), g(*p);
//   grun::cuda::adamw<unlearner::params<float, grun::cuda_space>> opt(*p, {.lr = 4e-3});
//   unlearner::backward(grun::exec::cuda, *p, h, pos, dout, dgates, dh, *g);
//   opt.step(grun::exec::cuda, *p, *g);   // norm, clip, ONE fused AdamW launch, QR retraction of R
//
// Same options, same per-step scalars (optim::detail::fold_coeffs) and the same update math
// (optim::adamw_update, run by kernels/grun/cuda/adamw.cuh) as the host optimizer; the moments m, v
// are device_param_states in the compute type (fp32 for half and bfloat16 parameters). A step
// synchronizes the stream twice: once for the gradient norm (clipping and the finiteness check
// need it on the host before anything changes) and once in the retraction (a degenerate R is
// reported as numeric_error). As on the host a step is all-or-nothing: before the update, the
// parameters and moments are copied on the stream (device to device), and put back when the
// post-step hook throws.
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "adamw.cuh"
#include "check.cuh"
#include "retract.cuh"

#include <grun/intervention.hpp>
#include <grun/optim/adamw.hpp>
#include <grun/ortho/none.hpp>
#include <grun/ortho/qr_retraction.hpp>

namespace grun::cuda {

/// optim::retract_after_step on the device: a gated_intervention module whose ortho policy is
/// qr_retraction gets its R retracted by one block (retract.cuh); ortho::none needs nothing.
/// A parametrization (householder) keeps R orthonormal by construction: its raw tensor is updated
/// like any other parameter and nothing is retracted, as on the host.
template <class P>
void retract_after_step(const exec::cuda_t& ex, const P& p) {
  if constexpr (optim::detail::module_params_traits<P>::value) {
    using I = typename optim::detail::module_params_traits<P>::intervention;
    using R = typename I::reft_type;
    using O = typename I::ortho_type;
    // ortho::none (noreft's default, or named with loreft) leaves R unconstrained: nothing to do,
    // as on the host. (It once fell into the static_assert below: cuda::adamw did not compile
    // for noreft modules.)
    if constexpr (R::has_rotation && !O::is_parametrization && !std::is_same_v<O, ortho::none>) {
      static_assert(std::is_same_v<O, ortho::qr_retraction>,
                    "grun::cuda::adamw: the device retraction exists for ortho::qr_retraction (and ortho::none)");
      // Refused here, at compile time: qr_retract's run-time rank check came after the AdamW update,
      // so step() threw with the parameters, moments and step count already changed.
      static_assert(I::rank <= detail::retract_max_rank,
                    "grun::cuda::adamw: the device QR retraction handles rank r <= 32 (one block); for a larger "
                    "rank pass step() a post-step hook");
      qr_retract(ex, R::rotation(p.reft));
    }
  }
}

template <class Params>
class adamw {
 public:
  using params_type = Params;
  using value_type = param_value_t<Params>;
  using acc_type = acc_t<value_type>;
  using state_type = device_param_state<acc_type>;

  /// State shaped like `shape` (a cuda_space aggregate; only its extents are read), zeroed.
  explicit adamw(const Params& shape, optim::adamw_options opt = {}) : opt_(opt), m_(shape), v_(shape) {
    optim::detail::check_adamw_options(opt_);
  }

  const optim::adamw_options& options() const { return opt_; }
  void set_lr(double lr) {
    optim::adamw_options o = opt_;
    o.lr = lr;
    optim::detail::check_adamw_options(o);
    opt_ = o;
  }
  std::int64_t steps() const { return t_; }
  /// Forgets the moments and the step count. device_buffer::zero is a cudaMemset on the default
  /// stream, unordered with a non-blocking executor stream: wait for it, so the next step (on any
  /// stream) reads zeros and its writes cannot be overwritten by a late memset.
  void reset() {
    m_.zero();
    v_.zero();
    if (m_.size() > 0) GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    t_ = 0;
  }
  /// The moments, in acc_type, leaf k shaped like the parameters' leaf k.
  state_type& first_moment() { return m_; }
  state_type& second_moment() { return v_; }
  const state_type& first_moment() const { return m_; }
  const state_type& second_moment() const { return v_; }

  /// params ← AdamW(params, grads) in one launch, then the retraction. Returns the gradients'
  /// global L2 norm before clipping; numeric_error (nothing changed) when it is not finite.
  double step(const exec::cuda_t& ex, const Params& params, const Params& grads) {
    return step(ex, params, grads, [&](const Params& p) { retract_after_step(ex, p); });
  }
  /// As above with a caller-supplied post-step hook instead of retract_after_step.
  template <class PostStep>
    requires std::invocable<PostStep&, const Params&>
  double step(const exec::cuda_t& ex, const Params& params, const Params& grads, PostStep&& post_step) {
    check_shapes(params, grads);
    const double norm = grad_norm(ex, grads);
    require<numeric_error>(std::isfinite(norm), "cuda::adamw::step: expected finite gradients, got global norm ", norm,
                           " (parameters left unchanged)");
    // Stream-ordered device copies of what the hook's failure would leave half-updated.
    const cudaStream_t s = stream_of(ex);
    const index_t n = parameter_count(params);
    detail::stream_scratch<value_type> saved_params(n, s);
    detail::stream_scratch<acc_type> saved_moments(2 * m_.size(), s);
    copy_leaves_async(params, saved_params.ptr, s, /*to_leaves=*/false);
    copy_async(saved_moments.ptr, m_.data(), m_.size(), s);
    copy_async(saved_moments.ptr + m_.size(), v_.data(), v_.size(), s);
    ++t_;
    optim::detail::adamw_impl<exec::cuda_t>::step(ex, params, grads, m_, v_,
                                                  optim::detail::fold_coeffs<acc_type>(opt_, t_, norm));
    try {
      post_step(params);
    } catch (...) {
      copy_leaves_async(params, saved_params.ptr, s, /*to_leaves=*/true);
      copy_async(m_.data(), saved_moments.ptr, m_.size(), s);
      copy_async(v_.data(), saved_moments.ptr + m_.size(), v_.size(), s);
      GRUN_CUDA_CHECK(cudaStreamSynchronize(s));
      --t_;
      throw;
    }
    return norm;
  }

  /// Global L2 norm of a device aggregate: one cub::DeviceReduce sum of squares per leaf into a
  /// device array (stream-ordered, no sync in between), one copy to the host, one stream
  /// synchronization; the leaves' sums are added on the host in leaf order, in double.
  static double grad_norm(const exec::cuda_t& ex, const Params& grads) {
    index_t leaves = 0;
    for_each_param(grads, [&](const auto& leaf) { leaves += leaf.size() > 0 ? 1 : 0; });
    if (leaves == 0) return 0.0;
    require_device("cuda::adamw::step (gradient norm)");
    const cudaStream_t s = stream_of(ex);
    detail::stream_scratch<double> sums(leaves, s);
    index_t i = 0;
    for_each_param(grads, [&](const auto& leaf) {
      if (leaf.size() > 0) detail::sum_of_squares_async(leaf.data, leaf.size(), sums.ptr + i++, s);
    });
    std::vector<double> host(static_cast<std::size_t>(leaves));
    GRUN_CUDA_CHECK(cudaMemcpyAsync(host.data(), sums.ptr, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, s));
    GRUN_CUDA_CHECK(cudaStreamSynchronize(s));
    double total = 0;
    for (const double x : host) total += x;
    return std::sqrt(total);
  }

 private:
  void check_shapes(const Params& params, const Params& grads) const {
    optim::detail::check_adamw_shapes(m_, params, grads, "cuda::adamw::step");
  }
  template <class U>
  static void copy_async(U* dst, const U* src, index_t n, cudaStream_t s) {
    if (n > 0) GRUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(U) * std::size_t(n), cudaMemcpyDeviceToDevice, s));
  }
  /// Copies every leaf of params into `flat` (back to back, for_each_param order), or back.
  static void copy_leaves_async(const Params& params, value_type* flat, cudaStream_t s, bool to_leaves) {
    index_t at = 0;
    for_each_param(params, [&](const auto& leaf) {
      if (to_leaves) copy_async(leaf.data, flat + at, leaf.size(), s);
      else copy_async(flat + at, leaf.data, leaf.size(), s);
      at += leaf.size();
    });
  }

  optim::adamw_options opt_;
  state_type m_, v_;
  std::int64_t t_ = 0;
};

}  // namespace grun::cuda
