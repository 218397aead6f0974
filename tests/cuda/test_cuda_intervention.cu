// gated_intervention on exec::cuda agrees with exec::host: forward (out, gates), backward (dh and
// parameter gradients), a stack of K modules in one launch, odd d, P = 1, empty position lists, and
// ortho::householder (R materialized on the device, dL/dR pulled back).
#include "fused_intervention_check.hpp"
#include "norm_gate.hpp"

using grun::cuda_space;
using grun::index_t;
using namespace grun::test::fused_case;  // host_reference (the setup and exec::host's results), to_device, flat

namespace {

/// exec::cuda (the fused kernels, or the generic path where they do not apply) against exec::host's reference.
template <class I, class T>
void check_agreement(index_t N, index_t d, std::vector<index_t> rows, index_t K, index_t trained, double scale) {
  using Dp = dparams<I, T>;
  host_reference<I, T> ref({N, d, std::move(rows), K, trained, scale}, {11, 7});
  const auto& pos = ref.pos;
  const index_t P = pos.size();
  INFO("d = " << d << ", N = " << N << ", P = " << P << ", K = " << K << ", policy " << I::gate_type::name << " + "
              << I::reft_type::name);
  const std::span<const Dp> modules(ref.device_views);

  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  gc::device_matrix<T> hd(ref.h), doutd(ref.dout), outd(N, d), dhd(N, d), gatesd(K, P), dgatesd(ref.dgates);
  gc::device_params<Dp> grads_d(I::template shape<T, cuda_space>(d));
  cuda_impl::forward(grun::exec::cuda, modules, scale, cdview<T>(hd.view()), pos, outd.view(), gatesd.view());
  cuda_impl::backward(grun::exec::cuda, modules, scale, trained, cdview<T>(hd.view()), pos, cdview<T>(doutd.view()),
                      cdview<T>(dgatesd.view()), dhd.view(), *grads_d);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const double tol = grun::test::tolerance<T>();
  CHECK(grun::test::rel_error(outd.to_host().storage.span(), ref.out.storage.span()) < tol);
  if (P > 0) CHECK(grun::test::rel_error(gatesd.to_host().storage.span(), ref.gates.storage.span()) < tol);
  CHECK(grun::test::rel_error(dhd.to_host().storage.span(), ref.dh.storage.span()) < tol);
  const auto gd = flat<I, T>(grads_d);
  CHECK(grun::test::rel_error(std::span<const T>(gd), std::span<const T>(ref.grads.data(), std::size_t(ref.grads.size()))) <
        (P > 0 ? tol : 1.0));
  if (P == 0)
    for (const T& x : gd) CHECK(grun::load<float>(x) == 0.f);

  // Determinism: a second backward gives the same bits.
  gc::device_params<Dp> again(I::template shape<T, cuda_space>(d));
  cuda_impl::backward(grun::exec::cuda, modules, scale, trained, cdview<T>(hd.view()), pos, cdview<T>(doutd.view()),
                      cdview<T>(dgatesd.view()), dhd.view(), *again);
  const auto gd2 = flat<I, T>(again);
  CHECK(std::memcmp(gd.data(), gd2.data(), sizeof(T) * gd.size()) == 0);
}

template <class I, class T>
void check_sizes() {
  check_agreement<I, T>(5, 37, {3}, 1, 0, 1.0);                       // d odd, P = 1
  check_agreement<I, T>(40, 64, {0, 5, 9, 17, 39, 21}, 1, 0, 1.0);    // a position list
  check_agreement<I, T>(12, 33, {}, 1, 0, 1.0);                        // empty position list
  check_agreement<I, T>(70, 96, iota(70), 3, 1, 0.6 * 3 + 0.6);       // stack of K = 3, train the middle one
}

}  // namespace

TEST_CASE("cuda intervention: wrong shapes on device views are a shape_error before any launch", "[nodevice][intervention]") {
  // Fake device addresses: only the host-side checks run, nothing is dereferenced.
  auto p = lin_lo4::shape<float, cuda_space>(8);
  float* fake = reinterpret_cast<float*>(std::uintptr_t(0x1000));
  grun::for_each_param(p, [&](auto& leaf) { leaf.data = fake; });
  const grun::matrix_view<const float, cuda_space> h(fake, {4, 9});  // d = 9, params are for d = 8
  const grun::matrix_view<float, cuda_space> out(fake, {4, 9});
  const grun::vector_view<float, cuda_space> gates(fake, {1});
  CHECK_THROWS_AS(lin_lo4::forward(grun::exec::cuda, p, h, grun::positions::rows({1}), out, gates), grun::shape_error);
  const grun::matrix_view<const float, cuda_space> h8(fake, {4, 8});
  CHECK_THROWS_AS(lin_lo4::forward(grun::exec::cuda, p, h8, grun::positions::rows({7}), out, gates), grun::shape_error);
}

TEMPLATE_TEST_CASE("cuda intervention agrees with exec::host: linear + loreft", "[intervention]", float, grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_sizes<lin_lo4, TestType>();
}
TEMPLATE_TEST_CASE("cuda intervention agrees with exec::host: mlp + loreft", "[intervention]", float, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  check_sizes<mlp_lo4, TestType>();
}
TEMPLATE_TEST_CASE("cuda intervention agrees with exec::host: always + noreft, linear + direft", "[intervention]", float,
                   grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_sizes<all_no2, TestType>();
  check_sizes<lin_di4, TestType>();
}

namespace {
/// 16-bit storage with dgates in fp32, the type grun's gate losses write (acc_t<T>; see
/// grun::gate_gradient_for): the device reads them as exec::host does — one of them, 7e4, is past
/// half's range (65504), where a rounding to T would have made it inf — and fp32 dgates that T holds
/// exactly give the same bits as T dgates. Through the public front end (fused or mlp path) or the
/// generic path.
template <class I, class T>
void check_fp32_dgates(bool generic) {
  using Dp = dparams<I, T>;
  using Hp = hparams<I, T>;
  const index_t N = 40, d = 72;
  host_reference<I, T> ref({N, d, {0, 5, 9, 17, 39, 21}, 1, 0, 1.0}, {11, 7});
  const auto& pos = ref.pos;
  const index_t P = pos.size();
  INFO(I::gate_type::name << " + " << I::reft_type::name << ", " << (generic ? "generic path" : "front end"));
  grun::host_matrix<float> dg(1, P);
  for (index_t q = 0; q < P; ++q) dg.storage[q] = grun::load<float>(ref.dgates.storage[q]);
  // The large value goes where the gate is most saturated (as gate_bce's large gradients do: they
  // come from gates near 0 or 1), so σ'(z) keeps the parameter gradients within T's range.
  index_t qs = 0;
  auto slope = [&](index_t q) { const float g = grun::load<float>(ref.gates.storage[q]); return g * (1 - g); };
  for (index_t q = 1; q < P; ++q) qs = slope(q) < slope(qs) ? q : qs;
  dg.storage[qs] = 7e4f;
  using host_impl = grun::detail::intervention_impl<grun::exec::host_t, I>;
  grun::owned_params<Hp> grads_h(I::template shape<T>(d));
  grun::host_matrix<T> dh_h(N, d);
  host_impl::backward(grun::exec::host, std::span<const Hp>(ref.host_views), 1.0, 0,
                      grun::matrix_view<const T>(ref.h.view()), pos, grun::matrix_view<const T>(ref.dout.view()),
                      grun::matrix_view<const float>(dg.view()), dh_h.view(), *grads_h);
  for (index_t i = 0; i < grads_h.size(); ++i) REQUIRE(std::isfinite(grun::load<float>(grads_h.data()[i])));

  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  gc::device_matrix<T> hd(ref.h), doutd(ref.dout), dhd(N, d);
  auto device_backward = [&](auto dgates_d, dview<T> dh, const Dp& grads) {  // dgates_d: [1, P] on the device
    using G = std::remove_pointer_t<decltype(dgates_d.data())>;
    if (generic)
      cuda_impl::template generic_backward<T, cuda_space>(grun::exec::cuda, std::span<const Dp>(ref.device_views), 1.0,
                                                          0, cdview<T>(hd.view()), pos, cdview<T>(doutd.view()),
                                                          dgates_d, dh, grads);
    else
      I::backward(grun::exec::cuda, ref.device_views[0], cdview<T>(hd.view()), pos, cdview<T>(doutd.view()),
                  grun::vector_view<G, cuda_space>(dgates_d.data(), {P}), dh, grads);
  };
  gc::device_matrix<float> dgd(dg);
  gc::device_params<Dp> grads_d(I::template shape<T, cuda_space>(d));
  device_backward(grun::matrix_view<const float, cuda_space>(dgd.view()), dhd.view(), *grads_d);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const double tol = grun::test::tolerance<T>();
  CHECK(grun::test::rel_error(dhd.to_host().storage.span(), dh_h.storage.span()) < tol);
  const auto gd = flat<I, T>(grads_d);
  CHECK(grun::test::rel_error(std::span<const T>(gd), std::span<const T>(grads_h.data(), std::size_t(grads_h.size()))) < tol);

  // In T's range: fp32 and T dgates, the same values, give the same bits.
  for (index_t q = 0; q < P; ++q) dg.storage[q] = grun::load<float>(ref.dgates.storage[q]);
  gc::device_matrix<float> dgd2(dg);
  gc::device_matrix<T> dgt(ref.dgates), dh2(N, d);
  gc::device_params<Dp> from_fp32(I::template shape<T, cuda_space>(d)), from_t(I::template shape<T, cuda_space>(d));
  device_backward(grun::matrix_view<const float, cuda_space>(dgd2.view()), dhd.view(), *from_fp32);
  device_backward(cdview<T>(dgt.view()), dh2.view(), *from_t);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto a = flat<I, T>(from_fp32), b = flat<I, T>(from_t);
  CHECK(std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0);
  const auto dha = dhd.to_host(), dhb = dh2.to_host();
  CHECK(std::memcmp(dha.storage.data(), dhb.storage.data(), sizeof(T) * std::size_t(N * d)) == 0);
}
}  // namespace

TEMPLATE_TEST_CASE("cuda intervention: fp32 dgates on 16-bit storage (a gate loss's own type), past half's range",
                   "[intervention]", grun::half, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  for (const bool generic : {false, true}) {
    check_fp32_dgates<lin_lo4, TestType>(generic);
    check_fp32_dgates<mlp_lo4, TestType>(generic);
  }
}

// double storage computes in double on exec::host; on exec::cuda it takes the generic path (the
// fused kernels compute in fp32 and their 4-column slot loads assumed 4 | elements per 16 bytes: with
// double they read misaligned 32-byte vectors and skipped the last 2 columns when d % 4 == 2).
static_assert(!grun::cuda::fused::takes_storage<double> && grun::cuda::fused::takes_storage<grun::bfloat16>);

TEST_CASE("cuda intervention agrees with exec::host: double storage (generic path)", "[intervention]") {
  GRUN_REQUIRE_DEVICE();
  check_agreement<lin_lo4, double>(9, 38, {8, 1, 2}, 1, 0, 1.0);         // d % 4 = 2
  check_agreement<lin_lo4, double>(12, 40, {11, 0, 5, 6}, 2, 1, 0.8);    // stack of K = 2
  check_agreement<mlp_lo4, double>(9, 38, {8, 1, 2}, 1, 0, 1.0);         // mlp gate: no cuBLASLt type for double
}

// ortho::householder: each call materializes R from the raw vectors on the device, runs the same
// intervention with R as an ordinary matrix (fused, mlp gate or generic path), and the backward pulls
// dL/dR back to dL/dv — against exec::host, which materializes and pulls back in double on the host.
namespace hh {
using lin_lo4 = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>, grun::ortho::householder>;
using mlp_lo4 = grun::gated_intervention<grun::gate::mlp<>, grun::reft::loreft<4>, grun::ortho::householder>;
using lin_lo3 = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<3>, grun::ortho::householder>;
// Once R is materialized they take the plain intervention's path, and the traits say so.
static_assert(grun::cuda::runs_fused<lin_lo4, grun::bfloat16> && grun::cuda::runs_fused<mlp_lo4, float>);
static_assert(!grun::cuda::runs_fused<lin_lo3, double>);
}  // namespace hh

TEMPLATE_TEST_CASE("cuda intervention with ortho::householder agrees with exec::host", "[intervention][householder]",
                   float, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  check_sizes<hh::lin_lo4, TestType>();                                          // fused kernels
  check_agreement<hh::mlp_lo4, TestType>(40, 64, {0, 5, 9, 17, 39, 21}, 2, 1, 0.8);  // mlp gate, a stack
}

TEST_CASE("cuda intervention with ortho::householder agrees with exec::host: double storage (generic path)",
          "[intervention][householder]") {
  GRUN_REQUIRE_DEVICE();
  check_agreement<hh::lin_lo3, double>(9, 38, {8, 1, 2}, 1, 0, 1.0);
  check_agreement<hh::lin_lo3, double>(12, 40, {11, 0, 5, 6}, 2, 1, 0.8);
}

TEST_CASE("cuda intervention with ortho::householder: the generic path called directly, fp32 dgates",
          "[intervention][householder]") {
  GRUN_REQUIRE_DEVICE();
  for (const bool generic : {false, true}) check_fp32_dgates<hh::lin_lo4, grun::bfloat16>(generic);
}

TEST_CASE("cuda intervention with ortho::householder: the backward from saved activations", "[intervention][householder]") {
  GRUN_REQUIRE_DEVICE();
  using I = hh::lin_lo4;
  using T = grun::bfloat16;
  const index_t N = 24, d = 64;
  host_reference<I, T> ref({N, d, iota(N)}, {21, 13});
  const auto pos = grun::positions::all(N);
  gc::device_matrix<T> hd(ref.h), doutd(ref.dout), outd(N, d), dhd(N, d);
  gc::device_buffer<T> gatesd(N);
  gc::device_params<dparams<I, T>> grads_d(I::template shape<T, cuda_space>(d));
  grun::saved_activations<T> saved;
  I::forward(grun::exec::cuda, ref.device_views[0], cdview<T>(hd.view()), pos, outd.view(), gatesd.template view<1>({{N}}),
             saved);
  CHECK(saved.width() == 5);  // the fused forward kept e and z for the backward
  I::backward(grun::exec::cuda, ref.device_views[0], cdview<T>(hd.view()), pos, cdview<T>(doutd.view()),
              grun::vector_view<const T, cuda_space>(), dhd.view(), *grads_d, saved);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  // The host reference's backward took dgates; this one none: compare with a host backward without them.
  grun::owned_params<hparams<I, T>> grads_h(I::template shape<T>(d));
  grun::host_matrix<T> dh_h(N, d);
  I::backward(grun::exec::host, ref.host_views[0], grun::matrix_view<const T>(ref.h.view()), pos,
              grun::matrix_view<const T>(ref.dout.view()), grun::vector_view<const T>(), dh_h.view(), *grads_h);
  const double tol = grun::test::tolerance<T>();
  CHECK(grun::test::rel_error(outd.to_host().storage.span(), ref.out.storage.span()) < tol);
  CHECK(grun::test::rel_error(dhd.to_host().storage.span(), dh_h.storage.span()) < tol);
  const auto gd = flat<I, T>(grads_d);
  CHECK(grun::test::rel_error(std::span<const T>(gd), std::span<const T>(grads_h.data(), std::size_t(grads_h.size()))) < tol);
}

TEST_CASE("cuda intervention with ortho::householder: a zero or non-finite raw vector is exec::host's numeric_error",
          "[intervention][householder]") {
  GRUN_REQUIRE_DEVICE();
  using I = hh::lin_lo4;
  using T = float;
  const index_t N = 6, d = 40;
  for (const float bad : {0.f, NAN}) {
    for (const index_t K : {index_t(1), index_t(2)}) {
      INFO("v_2 of module " << K - 1 << " set to " << bad << ", K = " << K);
      host_reference<I, T> ref({N, d, {1, 4}, K, K - 1, 1.0}, {11, 7});
      // v_2 of the last module: zero, or one NaN element.
      auto& raw = grun::reft::loreft<4>::rotation((*ref.host_modules.back()).reft);
      for (index_t j = 0; j < d; ++j) raw(2, j) = bad == 0.f ? 0.f : (j == 5 ? NAN : raw(2, j));
      const auto& draw = grun::reft::loreft<4>::rotation((*ref.device_modules.back()).reft);
      GRUN_CUDA_CHECK(cudaMemcpy(draw.data, raw.data, sizeof(T) * std::size_t(raw.size()), cudaMemcpyHostToDevice));
      const std::string expected = K == 1 ? "householder: raw vector v_2 must be nonzero and finite"
                                          : "householder: raw vector v_2 of module 1 must be nonzero and finite";
      // The host says the same (K = 1: word for word).
      if (K == 1)
        CHECK_THROWS_WITH(I::forward(grun::exec::host, ref.host_views[0], grun::matrix_view<const T>(ref.h.view()), ref.pos,
                                     ref.out.view(), grun::vector_view<T>(ref.gates.storage.data(), {2})),
                          Catch::Contains(expected));
      using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
      const std::span<const dparams<I, T>> modules(ref.device_views);
      gc::device_matrix<T> hd(ref.h), doutd(ref.dout), outd(ref.dout), dhd(ref.h), gatesd(K, 2), dgatesd(ref.dgates);
      gc::device_params<dparams<I, T>> grads_d(I::template shape<T, cuda_space>(d));
      CHECK_THROWS_AS(cuda_impl::forward(grun::exec::cuda, modules, 1.0, cdview<T>(hd.view()), ref.pos, outd.view(),
                                         gatesd.view()),
                      grun::numeric_error);
      CHECK_THROWS_WITH(cuda_impl::backward(grun::exec::cuda, modules, 1.0, K - 1, cdview<T>(hd.view()), ref.pos,
                                            cdview<T>(doutd.view()), cdview<T>(dgatesd.view()), dhd.view(), *grads_d),
                        Catch::Contains(expected));
      // Refused before any of the intervention ran: out and dh keep what they held.
      CHECK(grun::test::rel_error(outd.to_host().storage.span(), ref.dout.storage.span()) == 0);
      CHECK(grun::test::rel_error(dhd.to_host().storage.span(), ref.h.storage.span()) == 0);
    }
  }
}

// A gate of the user's (norm_gate.hpp, also tests/test_gate.cpp's): nothing in grun names it, so
// exec::cuda runs its very row math one thread per selected row, as exec::host does. Beside a
// shipped ReFT in float, half or bfloat16 only the gate runs that way: the ReFT takes the fused
// kernels, given the gate's values and exporting dL/dg (intervention_row_gate.cuh). In double, or
// called directly, the generic path runs the whole module per row.
namespace user {
using norm_lo2 = grun::gated_intervention<grun::test::norm_gate, grun::reft::loreft<2>>;
using norm_di4 = grun::gated_intervention<grun::test::norm_gate, grun::reft::direft<4>>;
static_assert(!grun::cuda::runs_fused<norm_lo2, float> && !grun::cuda::runs_fused<norm_lo2, grun::bfloat16>);
static_assert(grun::cuda::runs_fused_reft<norm_lo2, float> && grun::cuda::runs_fused_reft<norm_di4, grun::half>);
static_assert(!grun::cuda::runs_fused_reft<norm_lo2, double>);
static_assert(grun::cuda::runs_fused_reft<lin_lo4, grun::bfloat16>);
}  // namespace user

TEMPLATE_TEST_CASE("cuda intervention agrees with exec::host: a user's gate (its row math; the ReFT fused, or "
                   "the generic path in double)",
                   "[intervention][user_gate]", float, grun::bfloat16, grun::half, double) {
  GRUN_REQUIRE_DEVICE();
  check_sizes<user::norm_lo2, TestType>();
  check_agreement<user::norm_di4, TestType>(40, 64, {0, 5, 9, 17, 39, 21}, 2, 0, 0.8);  // direft, a stack
  check_agreement<user::norm_di4, TestType>(33, 40, iota(33), 3, 2, 1.0);              // every row, in order
}

TEMPLATE_TEST_CASE("cuda intervention: a user's gate, fp32 dgates on 16-bit storage, the front end and the "
                   "generic path",
                   "[intervention][user_gate]", grun::half, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  for (const bool generic : {false, true}) check_fp32_dgates<user::norm_lo2, TestType>(generic);
}

TEST_CASE("cuda intervention through the public front end", "[intervention]") {
  GRUN_REQUIRE_DEVICE();
  const index_t N = 8, d = 48;
  lin_lo4::module<float> m(d, 5);
  auto dp = to_device<lin_lo4, float>(m.owned_parameters(), d);
  grun::host_matrix<float> h(N, d), out_h(N, d);
  grun::test::fill_uniform(h.storage.span(), 9);
  grun::buffer<float> g_h(2);
  const auto pos = grun::positions::last_prompt_token({3, 4}, 4);
  m.forward(grun::exec::host, h.view(), pos, out_h.view(), g_h.view());
  gc::device_matrix<float> hd(h), outd(N, d);
  gc::device_buffer<float> gd(2);
  lin_lo4::forward(grun::exec::cuda, *dp, grun::matrix_view<const float, cuda_space>(hd.view()), pos, outd.view(), gd.view());
  CHECK(grun::test::rel_error(outd.to_host().storage.span(), out_h.storage.span()) < 1e-5);
  CHECK(grun::test::rel_error(gd.to_host(), g_h) < 1e-5);
}

TEST_CASE("cuda intervention: one row whose row stride is below d (a transposed [d, 1])", "[intervention]") {
  // Rows that pass through are copied with cudaMemcpy2D, which refused this view's pitch (1 < d).
  GRUN_REQUIRE_DEVICE();
  const index_t d = 40;
  lin_lo4::module<float> m(d, 5);
  const auto& p = *m.owned_parameters();
  auto dp = to_device<lin_lo4, float>(m.owned_parameters(), d);
  grun::host_matrix<float> h(1, d), dout(1, d), out_h(1, d), dh_h(1, d);
  grun::test::fill_uniform(h.storage.span(), 9);
  grun::test::fill_uniform(dout.storage.span(), 10);
  gc::device_matrix<float> hd(h), doutd(dout), outd(1, d), dhd(1, d);
  auto one_row = [&](gc::device_matrix<float>& x) { return grun::matrix_view<float, cuda_space>(x.storage.data(), {1, d}, {1, 1}); };
  for (const auto& pos : {grun::positions(), grun::positions::rows({0})}) {
    INFO("P = " << pos.size());
    const index_t P = pos.size();
    grun::buffer<float> g_h(std::max<index_t>(P, 1));
    grun::owned_params<hparams<lin_lo4, float>> grads_h(lin_lo4::shape<float>(d));
    lin_lo4::forward(grun::exec::host, p, h.view(), pos, out_h.view(), grun::vector_view<float>(g_h.data(), {P}));
    lin_lo4::backward(grun::exec::host, p, h.view(), pos, dout.view(), grun::vector_view<const float>(nullptr, {0}),
                      dh_h.view(), *grads_h);
    gc::device_buffer<float> gd(std::max<index_t>(P, 1));
    gc::device_params<dparams<lin_lo4, float>> grads_d(lin_lo4::shape<float, cuda_space>(d));
    lin_lo4::forward(grun::exec::cuda, *dp, grun::matrix_view<const float, cuda_space>(one_row(hd)), pos, one_row(outd),
                     grun::vector_view<float, cuda_space>(gd.data(), {P}));
    lin_lo4::backward(grun::exec::cuda, *dp, grun::matrix_view<const float, cuda_space>(one_row(hd)), pos,
                      grun::matrix_view<const float, cuda_space>(one_row(doutd)),
                      grun::vector_view<const float, cuda_space>(nullptr, {0}), one_row(dhd), *grads_d);
    CHECK(grun::test::rel_error(outd.to_host().storage.span(), out_h.storage.span()) < 1e-5);
    CHECK(grun::test::rel_error(dhd.to_host().storage.span(), dh_h.storage.span()) < 1e-5);
  }
}

namespace {
/// h and dout as [N, d] views of one row each (row stride 0, e.g. a [d] vector expanded to [N, d]),
/// against exec::host on the same rows written out.
template <class I>
void check_broadcast_rows(std::vector<index_t> rows) {
  using T = float;
  using Hp = hparams<I, T>;
  const index_t N = 3, d = 48;
  host_reference<I, T> ref({N, d, std::move(rows), 1, 0, 1.0}, {11, 7});
  const auto& pos = ref.pos;
  const index_t P = pos.size();
  INFO("P = " << P << ", policy " << I::gate_type::name << " + " << I::reft_type::name);
  auto hs = ref.h.storage.span(), dos = ref.dout.storage.span();
  for (index_t r = 1; r < N; ++r)
    for (index_t c = 0; c < d; ++c) {
      hs[std::size_t(r * d + c)] = hs[std::size_t(c)];
      dos[std::size_t(r * d + c)] = dos[std::size_t(c)];
    }
  using host_impl = grun::detail::intervention_impl<grun::exec::host_t, I>;
  grun::owned_params<Hp> grads_h(I::template shape<T>(d));
  host_impl::forward(grun::exec::host, std::span<const Hp>(ref.host_views), 1.0, grun::matrix_view<const T>(ref.h.view()),
                     pos, ref.out.view(), ref.gates.view());
  host_impl::backward(grun::exec::host, std::span<const Hp>(ref.host_views), 1.0, 0,
                      grun::matrix_view<const T>(ref.h.view()), pos, grun::matrix_view<const T>(ref.dout.view()),
                      grun::matrix_view<const T>(ref.dgates.view()), ref.dh.view(), *grads_h);

  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  gc::device_matrix<T> hd(ref.h), doutd(ref.dout), outd(N, d), dhd(N, d), gatesd(1, P), dgatesd(ref.dgates);
  const grun::matrix_view<const T, cuda_space> h_row(hd.view().data(), {N, d}, {0, 1});
  const grun::matrix_view<const T, cuda_space> dout_row(doutd.view().data(), {N, d}, {0, 1});
  gc::device_params<dparams<I, T>> grads_d(I::template shape<T, cuda_space>(d));
  const std::span<const dparams<I, T>> modules(ref.device_views);
  cuda_impl::forward(grun::exec::cuda, modules, 1.0, h_row, pos, outd.view(), gatesd.view());
  cuda_impl::backward(grun::exec::cuda, modules, 1.0, 0, h_row, pos, dout_row, cdview<T>(dgatesd.view()), dhd.view(),
                      *grads_d);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  const double tol = grun::test::tolerance<T>();
  CHECK(grun::test::rel_error(outd.to_host().storage.span(), ref.out.storage.span()) < tol);
  CHECK(grun::test::rel_error(gatesd.to_host().storage.span(), ref.gates.storage.span()) < tol);
  CHECK(grun::test::rel_error(dhd.to_host().storage.span(), ref.dh.storage.span()) < tol);
  const auto gd = flat<I, T>(grads_d);
  CHECK(grun::test::rel_error(std::span<const T>(gd), std::span<const T>(grads_h.data(), std::size_t(grads_h.size()))) < tol);
}
}  // namespace

TEST_CASE("cuda intervention: rows that overlap in memory (a broadcast row, row stride 0)", "[intervention]") {
  // The rows that pass through were copied with cudaMemcpy2D (which refuses a pitch below the width),
  // and the mlp gate handed h to cuBLASLt as is when every row was selected (ld 0 < d: refused).
  GRUN_REQUIRE_DEVICE();
  for (const auto& rows : {std::vector<index_t>{1}, std::vector<index_t>{0, 1, 2}}) {
    check_broadcast_rows<lin_lo4>(rows);
    check_broadcast_rows<mlp_lo4>(rows);
  }
}
