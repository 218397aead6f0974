// Element offsets past 2^31 and 2^32 (issue 4: "64-bit index arithmetic wherever T × V or T × d can
// pass 2^31"): the token NLL and KL over logits [T, V], RMU's mean squared error and the fused
// intervention (linear and mlp gates, every schedule) over h [N, d], with T·V and N·d above 2^32
// elements — an offset computed in int32 would turn negative, one in uint32 would wrap to the first
// rows. The shapes are real ones: 32,768 tokens of a 152,064-word vocabulary (Qwen's), and 1.1 M
// rows of a 4096-wide model.
//
// What makes the references cheap: every large input is a compact one repeated — row n of the device
// tensor is row n mod M of a small host matrix (tiled). Per-row results repeat with it, so
// exec::host on the M compact rows gives the expected value of every row (every nll, lse, KL and
// gate is checked; h', dh and dlogits on the rows around each 2^31 and 2^32 boundary and the ends),
// and a parameter gradient, a sum over rows, is the compact backward with each row's upstream
// gradient multiplied by how often the row occurs (the backward is linear in dout and dgates). A
// wrapped offset does not land on a row of the same class: 2^31 and 2^32 are not multiples of
// M · V or M · d (M = 7, odd), so it reads or writes another class's values, or outside the buffer.
//
// On a GPU the cases ask for ~29 GiB (the losses) and ~44 GiB (the intervention: its four [N, d]
// tensors and a margin for the mlp gate's activations) of free device memory; with less they skip
// visibly (exit 77, like a missing device). The emulated program
// (tests/emulation) runs the same cases at small sizes: it checks the cases themselves.
#include <grun/cuda/kl.cuh>
#include <grun/cuda/losses.cuh>
#include <grun/cuda/nll.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fused_intervention_check.hpp"

namespace gc = grun::cuda;
namespace fd = grun::cuda::fused::detail;
using grun::cuda_space;
using grun::index_t;
using namespace grun::test::fused_case;

// A named namespace, not an anonymous one: nvcc's host stubs spell the kernels' template arguments
// through it, and an alias in an anonymous namespace comes out ambiguous there.
namespace grun::test::large_index {

#if defined(GRUN_CUDA_EMULATION)
constexpr index_t tokens = 40, vocab = 1000, rows = 75, hidden = 200, sparse_positions = 8;
#else
constexpr index_t tokens = 32768, vocab = 152064, rows = 1'100'000, hidden = 4096, sparse_positions = 64;
#endif
constexpr index_t period = 7;  // the compact inputs' row count M

using T = grun::bfloat16;
using A = grun::acc_t<T>;

/// dst [n_rows, cols] = src [period, cols] repeated: row n of dst is row n mod period of src.
template <class U>
__global__ void tile_rows_kernel(const U* src, index_t m, U* dst, index_t n_rows, index_t cols) {
  for (index_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const U* s = src + (n % m) * cols;
    U* o = dst + n * cols;
    for (index_t i = threadIdx.x; i < cols; i += blockDim.x) o[i] = s[i];
  }
}
template <class U>
gc::device_buffer<U> tiled(std::span<const U> compact, index_t m, index_t n_rows, index_t cols) {
  REQUIRE(index_t(compact.size()) == m * cols);
  const gc::device_buffer<U> src(compact);
  gc::device_buffer<U> dst(n_rows * cols);
  tile_rows_kernel<U><<<unsigned(std::min<index_t>(n_rows, 65535)), 256>>>(src.data(), m, dst.data(), n_rows, cols);
  GRUN_CUDA_CHECK_LAUNCH();
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  return dst;
}

/// Fills a device buffer with NaN (all bits set), so an element a kernel should write and did not
/// cannot pass for a value.
template <class U>
void poison(U* p, index_t n) {
  GRUN_CUDA_CHECK(cudaMemset(p, 0xFF, sizeof(U) * std::size_t(n)));
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
}

/// Whether the device has `bytes` free; if not, the case skips visibly (counted like a missing device).
bool device_memory_for(double bytes, const char* what) {
  std::size_t free = 0, total = 0;
  GRUN_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  if (double(free) >= bytes) return true;
  ++grun::test::skipped_cases();
  WARN("SKIPPED: " << what << " needs " << bytes / double(1 << 30) << " GiB of device memory, "
                   << double(free) / double(1 << 30) << " GiB free — this test case did not run");
  return false;
}

/// The rows a check downloads: the first and last three, and those on both sides of the rows in
/// which an element offset (row · cols + column) passes 2^31 and 2^32.
std::vector<index_t> boundary_rows(index_t n_rows, index_t cols) {
  std::vector<index_t> r;
  auto add = [&](index_t n) {
    if (n >= 0 && n < n_rows) r.push_back(n);
  };
  for (index_t n = 0; n < 3; ++n) add(n);
  for (const int bits : {31, 32}) {
    const index_t b = (index_t(1) << bits) / cols;
    for (index_t n = b - 2; n <= b + 2; ++n) add(n);
  }
  for (index_t n = n_rows - 3; n < n_rows; ++n) add(n);
  std::sort(r.begin(), r.end());
  r.erase(std::unique(r.begin(), r.end()), r.end());
  return r;
}

/// Row n of a device matrix [*, cols].
template <class U>
std::vector<U> row_of(const U* dev, index_t n, index_t cols) {
  std::vector<U> out(static_cast<std::size_t>(cols));
  GRUN_CUDA_CHECK(cudaMemcpy(out.data(), dev + n * cols, sizeof(U) * out.size(), cudaMemcpyDeviceToHost));
  return out;
}

/// The expected per-row values of every row: compact[n mod M].
template <class U>
std::vector<U> repeated(std::span<const U> compact, index_t n_rows) {
  std::vector<U> out(static_cast<std::size_t>(n_rows));
  for (index_t n = 0; n < n_rows; ++n) out[std::size_t(n)] = compact[std::size_t(n % index_t(compact.size()))];
  return out;
}

template <class U>
std::span<const U> row_span(const grun::host_matrix<U>& m, index_t n) {
  return std::span<const U>(m.storage.data() + n * m.cols, std::size_t(m.cols));
}

/// The token NLL and KL (bf16 logits) over [tokens, vocab]: every row's loss and log-sum-exps, and
/// dlogits on the boundary rows.
void check_losses() {
  const index_t Tn = tokens, V = vocab, M = period;
  INFO("T = " << Tn << ", V = " << V << " (" << double(Tn) * double(V) / double(index_t(1) << 32) << " · 2^32 elements)");
  if (!device_memory_for(3.0 * double(Tn) * double(V) * sizeof(T) + double(1 << 30), "the losses at T·V > 2^32"))
    return;

  // The compact problem: M rows of logits and reference logits, their labels (class 3 masked) and
  // upstream gradients.
  grun::host_matrix<T> x(M, V), r(M, V);
  grun::test::fill_uniform(x.storage.span(), 11, -8.f, 8.f);
  grun::test::fill_uniform(r.storage.span(), 12, -8.f, 8.f);
  std::vector<std::int64_t> y(static_cast<std::size_t>(M));
  std::vector<A> dloss(static_cast<std::size_t>(M));
  for (index_t m = 0; m < M; ++m) {
    y[std::size_t(m)] = m == 3 ? grun::loss::ignore_index : (m * 21701 + 5) % V;
    dloss[std::size_t(m)] = A(0.5f + 0.25f * float(m));
  }
  const auto hx = grun::matrix_view<const T>(x.view()), hr = grun::matrix_view<const T>(r.view());
  const grun::vector_view<const std::int64_t> hy(y.data(), {M});
  const grun::vector_view<const A> hdl(dloss.data(), {M});

  const auto xd = tiled<T>(x.storage.span(), M, Tn, V), rd = tiled<T>(r.storage.span(), M, Tn, V);
  const auto yd = tiled<std::int64_t>(y, M, Tn, 1);
  const auto dld = tiled<A>(dloss, M, Tn, 1);
  gc::device_buffer<T> dxd(Tn * V);
  const grun::matrix_view<const T, cuda_space> xv(xd.data(), {Tn, V}), rv(rd.data(), {Tn, V});
  const grun::vector_view<const std::int64_t, cuda_space> yv(yd.data(), {Tn});
  const grun::vector_view<const A, cuda_space> dlv(dld.data(), {Tn});
  const grun::matrix_view<T, cuda_space> dxv(dxd.data(), {Tn, V});
  const auto checked_rows = boundary_rows(Tn, V);

  // dlogits on the boundary rows against the compact host rows.
  auto check_dlogits = [&](const grun::host_matrix<T>& expect) {
    for (const index_t t : checked_rows) {
      INFO("dlogits row " << t << " (elements from " << t * V << ")");
      CHECK(grun::test::rel_error(std::span<const T>(row_of(dxd.data(), t, V)), row_span(expect, t % M)) <
            grun::test::tolerance<T>());
    }
  };

  SECTION("token NLL") {
    grun::buffer<A> nll(M), lse(M);
    grun::host_matrix<T> dx(M, V);
    grun::loss::token_nll_forward(grun::exec::host, hx, hy, nll.view(), lse.view());
    grun::loss::token_nll_backward(grun::exec::host, hx, hy, grun::vector_view<const A>(lse.data(), {M}), hdl, dx.view());

    gc::device_buffer<A> nll_d(Tn), lse_d(Tn);
    grun::loss::token_nll_forward(grun::exec::cuda, xv, yv, nll_d.view(), lse_d.view());
    poison(dxd.data(), Tn * V);
    grun::loss::token_nll_backward(grun::exec::cuda, xv, yv, grun::vector_view<const A, cuda_space>(lse_d.data(), {Tn}),
                                   dlv, dxv);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    // Every row's nll and lse: fp32 results from the same stored logits (fp32 tolerance).
    CHECK(grun::test::rel_error(nll_d.to_host(), repeated<A>(nll.span(), Tn)) < 1e-5);
    CHECK(grun::test::rel_error(lse_d.to_host(), repeated<A>(lse.span(), Tn)) < 1e-5);
    check_dlogits(dx);
  }

  SECTION("token KL") {
    grun::buffer<A> kl(M), lse(M), lse_ref(M);
    grun::host_matrix<T> dx(M, V);
    grun::loss::token_kl_forward(grun::exec::host, hx, hr, hy, kl.view(), lse.view(), lse_ref.view());
    grun::loss::token_kl_backward(grun::exec::host, hx, hr, hy, grun::vector_view<const A>(lse.data(), {M}),
                                  grun::vector_view<const A>(lse_ref.data(), {M}), hdl, dx.view());

    gc::device_buffer<A> kl_d(Tn), lse_d(Tn), lse_ref_d(Tn);
    grun::loss::token_kl_forward(grun::exec::cuda, xv, rv, yv, kl_d.view(), lse_d.view(), lse_ref_d.view());
    poison(dxd.data(), Tn * V);
    grun::loss::token_kl_backward(grun::exec::cuda, xv, rv, yv, grun::vector_view<const A, cuda_space>(lse_d.data(), {Tn}),
                                  grun::vector_view<const A, cuda_space>(lse_ref_d.data(), {Tn}), dlv, dxv);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(grun::test::rel_error(kl_d.to_host(), repeated<A>(kl.span(), Tn)) < 1e-5);
    CHECK(grun::test::rel_error(lse_d.to_host(), repeated<A>(lse.span(), Tn)) < 1e-5);
    CHECK(grun::test::rel_error(lse_ref_d.to_host(), repeated<A>(lse_ref.span(), Tn)) < 1e-5);
    check_dlogits(dx);
  }
}

/// rmu_retain (bf16) over hidden [rows, hidden]: L = (1/(N·d)) Σ (h − h_ref)², and weight · 2(h − h_ref)/(N·d)
/// added into dh, on the boundary rows. Expected values in double from the stored compact rows.
void check_rmu_retain() {
  const index_t N = rows, d = hidden, M = period;
  INFO("rmu_retain, N = " << N << ", d = " << d);
  if (!device_memory_for(3.0 * double(N) * double(d) * sizeof(T) + double(1 << 30), "rmu_retain at N·d > 2^32"))
    return;
  grun::host_matrix<T> h(M, d), h_ref(M, d);
  grun::test::fill_uniform(h.storage.span(), 21, -2.f, 2.f);
  grun::test::fill_uniform(h_ref.storage.span(), 22, -2.f, 2.f);
  const auto hd = tiled<T>(h.storage.span(), M, N, d), h_refd = tiled<T>(h_ref.storage.span(), M, N, d);
  gc::device_buffer<T> dhd(N * d);  // zeros: a loss adds its gradient
  grun::loss::inputs<T, cuda_space> in;
  in.retain.hidden = grun::matrix_view<const T, cuda_space>(hd.data(), {N, d});
  in.retain.hidden_ref = grun::matrix_view<const T, cuda_space>(h_refd.data(), {N, d});
  grun::loss::grads<T, cuda_space> g;
  g.retain.hidden = grun::matrix_view<T, cuda_space>(dhd.data(), {N, d});
  const double weight = 0.75, inv = 1.0 / (double(N) * double(d));
  const double value = grun::loss::rmu_retain{}.evaluate(grun::exec::cuda, in, g, A(weight));
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());

  auto diff = [&](index_t m, index_t j) {
    return grun::load<double>(h.storage[m * d + j]) - grun::load<double>(h_ref.storage[m * d + j]);
  };
  double total = 0;
  for (index_t m = 0; m < M; ++m)
    for (index_t j = 0; j < d; ++j) total += double((N - m + M - 1) / M) * diff(m, j) * diff(m, j);
  const double tol = grun::test::tolerance<T>();
  CHECK(std::abs(value - total * inv) <= tol * total * inv);
  for (const index_t n : boundary_rows(N, d)) {
    INFO("dh row " << n << " (elements from " << n * d << ")");
    std::vector<double> want(static_cast<std::size_t>(d));
    for (index_t j = 0; j < d; ++j) want[std::size_t(j)] = weight * 2.0 * diff(n % M, j) * inv;
    CHECK(grun::test::rel_error(std::span<const T>(row_of(dhd.data(), n, d)), std::span<const double>(want)) < tol);
  }
}

/// The fused intervention I (bf16) over h [rows, hidden], every row selected: each forward schedule,
/// the backward under each coefficient × slot schedule, and the backward from the forward's kept
/// values.
template <class I>
void check_every_row() {
  using Dp = dparams<I, T>;
  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  const index_t N = rows, d = hidden, M = period;
  INFO(I::gate_type::name << " + " << I::reft_type::name << "<" << I::rank << ">, N = " << N << ", d = " << d << " ("
                          << double(N) * double(d) / double(index_t(1) << 32) << " · 2^32 elements), every row");
  if (!device_memory_for(4.0 * double(N) * double(d) * sizeof(T) + 4.0 * double(N) * 512 * sizeof(float) +
                             double(2 << 30),
                         "the intervention at N·d > 2^32"))
    return;

  // The compact problem (modules, h, dout, dgates: host_reference's), its per-row results, and its
  // gradient sums: row m occurs count(m) times among the N.
  const config compact{M, d, iota(M)};
  const host_reference<I, T> ref(compact, {21, 13});
  const auto h_wide = widen(ref.h);
  const wide_reference<I> per_row(ref, 1.0, 0, h_wide, widen(ref.dout), widen(ref.dgates));
  auto dout_sum = widen(ref.dout), dgates_sum = widen(ref.dgates);
  for (index_t m = 0; m < M; ++m) {
    const double count = double((N - m + M - 1) / M);
    for (index_t i = 0; i < d; ++i) dout_sum.storage[m * d + i] *= count;
    dgates_sum.storage[m] *= count;
  }
  const wide_reference<I> summed(ref, 1.0, 0, h_wide, dout_sum, dgates_sum);

  const auto hd = tiled<T>(ref.h.storage.span(), M, N, d), doutd = tiled<T>(ref.dout.storage.span(), M, N, d);
  const auto dgatesd = tiled<T>(ref.dgates.storage.span(), M, N, 1);
  gc::device_buffer<T> outd(N * d), gatesd(N);
  const grun::matrix_view<const T, cuda_space> hv(hd.data(), {N, d}), doutv(doutd.data(), {N, d}),
      dgv(dgatesd.data(), {1, N});
  const grun::matrix_view<T, cuda_space> outv(outd.data(), {N, d}), gv(gatesd.data(), {1, N});
  const auto pos = grun::positions::all(N);
  const auto modules = std::span<const Dp>(ref.device_views);
  const double tol = grun::test::tolerance<T>();
  const auto checked_rows = boundary_rows(N, d);
  const std::vector<double> per_row_gates(per_row.gates.storage.data(), per_row.gates.storage.data() + M);

  auto check_forward = [&] {
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(grun::test::rel_error(gatesd.to_host(), repeated(std::span<const double>(per_row_gates), N)) < tol);
    for (const index_t n : checked_rows) {
      INFO("h' row " << n << " (elements from " << n * d << ")");
      CHECK(grun::test::rel_error(std::span<const T>(row_of(outd.data(), n, d)), row_span(per_row.out, n % M)) < tol);
    }
  };
  under_each_forward_schedule([&] {
    poison(outd.data(), N * d);
    poison(gatesd.data(), N);
    cuda_impl::forward(grun::exec::cuda, modules, 1.0, hv, pos, outv, gv);
    check_forward();
  });

  gc::device_buffer<T> dhd(N * d);
  const grun::matrix_view<T, cuda_space> dhv(dhd.data(), {N, d});
  const std::vector<double> grads_sum(summed.grads.data(), summed.grads.data() + summed.grads.size());
  // One backward (from `saved` when given) under the given schedules, checked: dh on the boundary
  // rows, every gradient leaf on its own scale.
  auto check_backward = [&](fd::coef_schedule coef, fd::slot_schedule slot, const grun::saved_activations<T>* saved) {
    INFO("coefficient schedule " << int(coef) << ", slot schedule " << int(slot) << (saved ? ", from kept values" : ""));
    gc::device_params<Dp> grads(I::template shape<T, cuda_space>(d));
    poison(dhd.data(), N * d);
    const auto before_coef = fd::coef_plan;
    const auto before_slot = fd::slot_plan;
    fd::coef_plan = coef;
    fd::slot_plan = slot;
    grun::detail::run_backward<I>(grun::exec::cuda, modules, 1.0, 0, hv, pos, doutv, dgv, dhv, *grads, saved, "test");
    fd::coef_plan = before_coef;
    fd::slot_plan = before_slot;
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    for (const index_t n : checked_rows) {
      INFO("dh row " << n << " (elements from " << n * d << ")");
      CHECK(grun::test::rel_error(std::span<const T>(row_of(dhd.data(), n, d)), row_span(per_row.dh, n % M)) < tol);
    }
    check_gradient_leaves(*ref.grads, flat<I, T>(grads), grads_sum, tol);
  };
  for (const auto coef : {fd::coef_schedule::stream, fd::coef_schedule::resident, fd::coef_schedule::tensor})
    for (const auto slot : {fd::slot_schedule::cuda_cores, fd::slot_schedule::tensor}) check_backward(coef, slot, nullptr);

  // The forward keeping e and z (and the mlp gate's activations) of every row, and the backward from them.
  grun::saved_activations<T> saved;
  poison(outd.data(), N * d);
  poison(gatesd.data(), N);
  grun::detail::run_forward<I>(grun::exec::cuda, modules, 1.0, hv, pos, outv, gv, &saved);
  check_forward();
  CHECK(saved.on_device());
  check_backward(fd::coef_plan, fd::slot_plan, &saved);
}

/// The fused intervention I (bf16) over h [rows, hidden] at a few positions, most of them past the
/// 2^31 and 2^32 element boundaries, out of order: each forward schedule and the default backward.
/// Rows not selected are copied (h' = h, dh = dout), bit for bit.
template <class I>
void check_sparse_rows() {
  using Dp = dparams<I, T>;
  using cuda_impl = grun::detail::intervention_impl<grun::exec::cuda_t, I>;
  const index_t N = rows, d = hidden, P = sparse_positions;
  INFO(I::gate_type::name << " + " << I::reft_type::name << "<" << I::rank << ">, N = " << N << ", d = " << d << ", "
                          << P << " positions");
  if (!device_memory_for(4.0 * double(N) * double(d) * sizeof(T) + double(1 << 30), "the intervention at N·d > 2^32"))
    return;

  // The compact problem is the P selected rows; on the device row n holds compact row n mod P, and
  // position j is a row ≡ j (mod P): q_j · P + j, q_j spread over the upper half of the rows out of
  // order (0 for j = 0).
  const config compact{P, d, iota(P)};
  const host_reference<I, T> ref(compact, {31, 17});
  const wide_reference<I> wide(ref, 1.0, 0, widen(ref.h), widen(ref.dout), widen(ref.dgates));
  std::vector<index_t> at(static_cast<std::size_t>(P));
  const index_t q_max = N / P - 1;
  for (index_t j = 0; j < P; ++j) at[std::size_t(j)] = (j == 0 ? 0 : q_max - (j * 7919) % (q_max / 2 + 1)) * P + j;
  const auto pos = grun::positions::rows(at);

  const auto hd = tiled<T>(ref.h.storage.span(), P, N, d), doutd = tiled<T>(ref.dout.storage.span(), P, N, d);
  const gc::device_buffer<T> dgatesd(ref.dgates.storage.span());
  gc::device_buffer<T> outd(N * d), gatesd(P), dhd(N * d);
  const grun::matrix_view<const T, cuda_space> hv(hd.data(), {N, d}), doutv(doutd.data(), {N, d}),
      dgv(dgatesd.data(), {1, P});
  const grun::matrix_view<T, cuda_space> outv(outd.data(), {N, d}), gv(gatesd.data(), {1, P}), dhv(dhd.data(), {N, d});
  const auto modules = std::span<const Dp>(ref.device_views);
  const double tol = grun::test::tolerance<T>();
  // Rows beside the positions that are not positions themselves: copies.
  std::vector<index_t> copied;
  for (const index_t p : at)
    for (const index_t n : {p - 1, p + 1})
      if (n >= 0 && n < N && std::find(at.begin(), at.end(), n) == at.end()) copied.push_back(n);
  auto same_row = [&](const T* dev, index_t n, std::span<const T> want) {
    const auto got = row_of(dev, n, d);
    return std::memcmp(got.data(), want.data(), sizeof(T) * got.size()) == 0;
  };

  under_each_forward_schedule([&] {
    poison(outd.data(), N * d);
    cuda_impl::forward(grun::exec::cuda, modules, 1.0, hv, pos, outv, gv);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(grun::test::rel_error(gatesd.to_host(), wide.gates.storage) < tol);
    for (index_t j = 0; j < P; ++j) {
      INFO("h' at position " << j << ", row " << at[std::size_t(j)]);
      CHECK(grun::test::rel_error(std::span<const T>(row_of(outd.data(), at[std::size_t(j)], d)), row_span(wide.out, j)) <
            tol);
    }
    for (const index_t n : copied) {
      INFO("h' row " << n << " (not selected)");
      CHECK(same_row(outd.data(), n, row_span(ref.h, n % P)));
    }
  });

  gc::device_params<Dp> grads(I::template shape<T, cuda_space>(d));
  poison(dhd.data(), N * d);
  cuda_impl::backward(grun::exec::cuda, modules, 1.0, 0, hv, pos, doutv, dgv, dhv, *grads);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  for (index_t j = 0; j < P; ++j) {
    INFO("dh at position " << j << ", row " << at[std::size_t(j)]);
    CHECK(grun::test::rel_error(std::span<const T>(row_of(dhd.data(), at[std::size_t(j)], d)), row_span(wide.dh, j)) < tol);
  }
  for (const index_t n : copied) {
    INFO("dh row " << n << " (not selected)");
    CHECK(same_row(dhd.data(), n, row_span(ref.dout, n % P)));
  }
  const std::vector<double> want(wide.grads.data(), wide.grads.data() + wide.grads.size());
  check_gradient_leaves(*ref.grads, flat<I, T>(grads), want, tol);
}

}  // namespace grun::test::large_index

using namespace grun::test::large_index;

TEST_CASE("token NLL and KL over logits of more than 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_losses();
}
TEST_CASE("rmu_retain over hidden states of more than 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_rmu_retain();
}
TEST_CASE("fused intervention, linear gate: every row of h past 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_every_row<lin_lo4>();
}
TEST_CASE("fused intervention, mlp gate: every row of h past 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_every_row<mlp_lo4>();
}
TEST_CASE("fused intervention, linear gate: positions past 2^31 and 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_sparse_rows<lin_lo4>();
}
TEST_CASE("fused intervention, mlp gate: positions past 2^31 and 2^32 elements", "[large]") {
  GRUN_REQUIRE_DEVICE();
  check_sparse_rows<mlp_lo4>();
}

// The rows the GPU cases download are the ones an offset wrap would hit first: for each of 2^31 and
// 2^32, the row holding that element, and the rows on both sides of it.
TEST_CASE("the rows checked around 2^31 and 2^32 elements", "[nodevice]") {
  for (const auto& [n_rows, cols] : {std::pair<index_t, index_t>{32768, 152064}, {1'100'000, 4096}, {5, 1000}}) {
    INFO(n_rows << " rows of " << cols);
    const auto checked = boundary_rows(n_rows, cols);
    CHECK(std::is_sorted(checked.begin(), checked.end()));
    CHECK(std::adjacent_find(checked.begin(), checked.end()) == checked.end());
    CHECK(checked.front() == 0);
    CHECK(checked.back() == n_rows - 1);
    for (const int bits : {31, 32}) {
      const index_t element = index_t(1) << bits, row = element / cols;
      if (row >= n_rows) continue;  // the tensor ends before that element
      INFO("element 2^" << bits << " lies in row " << row);
      for (const index_t n : {row - 1, row, row + 1})
        CHECK(std::find(checked.begin(), checked.end(), n) != checked.end());
    }
  }
  CHECK(boundary_rows(5, 1000) == std::vector<index_t>{0, 1, 2, 3, 4});
}
