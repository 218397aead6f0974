// The fused intervention kernels (kernels/grun/cuda/intervention_fused.cuh) agree with exec::host:
// linear + loreft<4>, fp32 / bf16 / fp16, over every shape of check_all (fused_intervention_check.hpp).
// The other fused cases live in test_cuda_intervention_fused_{direft,ranks,generic,mlp}.cu, so nvcc
// compiles them in parallel.
#include "fused_intervention_check.hpp"
#include "instances_knobs.hpp"

using namespace grun::test::fused_case;

static_assert(grun::detail::intervention_impl<grun::exec::cuda_t, lin_lo4>::fused);

TEST_CASE("fused intervention: policy selection needs no device", "[nodevice][intervention]") {
  CHECK(grun::cuda::fused::supported<grun::gate::always, grun::reft::noreft<2>, grun::ortho::none>);
  CHECK_FALSE(grun::cuda::fused::supported<grun::gate::mlp<>, grun::reft::loreft<4>, grun::ortho::qr_retraction>);
}

// The shared cases run in the instance library (a shared library); the schedule tests set the knobs
// here. One copy of each knob, or those tests would run the default schedule only (instances_knobs.hpp).
TEST_CASE("fused intervention: the instance library reads the schedule knobs this program sets", "[nodevice]") {
  const auto library = schedule_knobs_seen_by_instances();
  const auto program = schedule_knobs_seen_here();
  CHECK(library.forward_plan == program.forward_plan);
  CHECK(library.coef_plan == program.coef_plan);
  CHECK(library.slot_plan == program.slot_plan);
  CHECK(library.slot_limit == program.slot_limit);
}

// The public question: which configurations exec::cuda runs on the fused kernels (the mlp gate's
// included), and which fall to the generic per-row path (double storage; a policy of the user's:
// test_cuda_intervention_fused_generic.cu).
static_assert(grun::cuda::runs_fused<lin_lo4, grun::bfloat16> && grun::cuda::runs_fused<lin_lo4, float>);
static_assert(grun::cuda::runs_fused<mlp_lo4, grun::half> && grun::cuda::runs_fused<all_di8, grun::bfloat16>);
static_assert(!grun::cuda::runs_fused<lin_lo4, double>);

TEMPLATE_TEST_CASE("fused intervention agrees with exec::host: linear + loreft<4>", "[intervention][fused]", float,
                   grun::bfloat16, grun::half) {
  GRUN_REQUIRE_DEVICE();
  check_all<lin_lo4, TestType>();
}

/// The saved-activations cases' setup: one linear + loreft<4> module (bf16: the forward keeps e and z)
/// over every row of h [N, 64], its host reference, and the module's forward and backward on an
/// executor, keeping in / reading from a saved_activations.
struct saved_case {
  using T = grun::bfloat16;
  using Dp = dparams<lin_lo4, T>;
  grun::index_t N, d = 64;
  host_reference<lin_lo4, T> ref;
  gc::device_matrix<T> h, dout;
  gc::device_buffer<T> gates;
  grun::positions pos;
  explicit saved_case(grun::index_t n, seeds s = {21, 13})
      : N(n), ref({n, 64, iota(n)}, s), h(ref.h), dout(ref.dout), gates(n), pos(grun::positions::all(n)) {}
  void forward(const grun::exec::cuda_t& ex, gc::device_matrix<T>& out, grun::saved_activations<T>& saved) {
    lin_lo4::forward(ex, ref.device_views[0], cdview<T>(h.view()), pos, out.view(), gates.template view<1>({{N}}), saved);
  }
  void backward(const grun::exec::cuda_t& ex, gc::device_matrix<T>& dh, gc::device_params<Dp>& grads,
                const grun::saved_activations<T>& saved) {
    lin_lo4::backward(ex, ref.device_views[0], cdview<T>(h.view()), pos, cdview<T>(dout.view()),
                      grun::vector_view<const T, grun::cuda_space>(), dh.view(), *grads, saved);
  }
  /// Bit for bit the same values.
  static bool same(std::span<const T> a, std::span<const T> b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
  }
  gc::device_params<Dp> new_grads() const { return gc::device_params<Dp>(lin_lo4::template shape<T, grun::cuda_space>(d)); }
};

TEST_CASE("fused intervention: saved activations stay with the executor that saved them", "[intervention][saved]") {
  GRUN_REQUIRE_DEVICE();
  using T = saved_case::T;
  saved_case c(16);
  gc::device_matrix<T> out(c.N, c.d), dh(c.N, c.d);
  auto grads = c.new_grads();
  lin_lo4::module<T> host_module(c.d, 21);
  grun::saved_activations<T> saved;
  c.forward(grun::exec::cuda, out, saved);
  REQUIRE(saved.width() == 5);
  REQUIRE(saved.on_device());
  // A host backward cannot read device memory: refused, naming both sides.
  grun::host_matrix<T> hdh(c.N, c.d);
  CHECK_THROWS_WITH(host_module.backward(grun::exec::host, grun::matrix_view<const T>(c.ref.h.view()), c.pos,
                                         grun::matrix_view<const T>(c.ref.dout.view()), grun::vector_view<const T>(),
                                         hdh.view(), saved),
                    Catch::Contains("expected ones saved by a forward on exec::host, got ones in device memory"));
  // The device backward takes them (and is held to the host in check_all).
  c.backward(grun::exec::cuda, dh, grads, saved);
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  // Moved, not copied: the device block goes with it.
  grun::saved_activations<T> moved = std::move(saved);
  CHECK(moved.on_device());
  static_assert(!std::is_copy_constructible_v<grun::saved_activations<T>>);
}

TEST_CASE("fused intervention: saved activations live in grun's pool and go without a device-wide wait",
          "[intervention][saved]") {
  GRUN_REQUIRE_DEVICE();
  using T = saved_case::T;
  saved_case c(24);
  gc::device_matrix<T> out(c.N, c.d), out_s(c.N, c.d), dh(c.N, c.d), dh_s(c.N, c.d);
  auto grads = c.new_grads(), grads_s = c.new_grads();
  const auto used = [] {
    std::uint64_t bytes = 0;
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    GRUN_CUDA_CHECK(cudaMemPoolGetAttribute(gc::scratch_pool(), cudaMemPoolAttrUsedMemCurrent, &bytes));
    return bytes;
  };
  // On the legacy default stream: the block is the pool's while the saved_activations holds it.
  const std::uint64_t before = used();
  {
    grun::saved_activations<T> saved;
    c.forward(grun::exec::cuda, out, saved);
    REQUIRE(saved.on_device());
    CHECK(used() >= before + saved.bytes());
    c.backward(grun::exec::cuda, dh, grads, saved);
  }
  CHECK(used() == before);
  // On a stream of the caller's that is destroyed before the saved_activations goes: the release
  // waits on grun's own stream for the backward's event; the same bits as on the default stream.
  cudaStream_t stream = nullptr;
  GRUN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const auto on_stream = grun::exec::cuda(static_cast<void*>(stream));
  {
    grun::saved_activations<T> saved;
    c.forward(on_stream, out_s, saved);
    c.backward(on_stream, dh_s, grads_s, saved);
    GRUN_CUDA_CHECK(cudaStreamSynchronize(stream));
    GRUN_CUDA_CHECK(cudaStreamDestroy(stream));
  }
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(used() == before);
  CHECK(saved_case::same(out.to_host().storage.span(), out_s.to_host().storage.span()));
  CHECK(saved_case::same(dh.to_host().storage.span(), dh_s.to_host().storage.span()));
  CHECK(saved_case::same(flat<lin_lo4, T>(grads), flat<lin_lo4, T>(grads_s)));
}

/// Holds its stream for about `cycles` clock cycles (on the CPU emulation, for none: there a stream's
/// work waits anyway until something waits for the stream).
__global__ void hold_stream_kernel(long long cycles) {
#if defined(__CUDA_ARCH__)
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
#else
  (void)cycles;
#endif
}

TEST_CASE("fused intervention: saved activations go only once every call that read them has run, on any stream",
          "[intervention][saved]") {
  GRUN_REQUIRE_DEVICE();
  using T = saved_case::T;
  saved_case c(24), other(24, {5, 3});
  gc::device_matrix<T> out(c.N, c.d), out_d(c.N, c.d), dh_b(c.N, c.d), dh_c(c.N, c.d);
  auto grads_b = c.new_grads(), grads_c = c.new_grads();
  cudaStream_t b = nullptr, cs = nullptr, ds = nullptr;
  for (cudaStream_t* s : {&b, &cs, &ds}) GRUN_CUDA_CHECK(cudaStreamCreateWithFlags(s, cudaStreamNonBlocking));
  {
    grun::saved_activations<T> saved;
    c.forward(grun::exec::cuda, out, saved);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
    // Two backwards read it: C's is queued first but waits behind ~20 ms of other work, B's runs at
    // once. B's is the last call to touch the block, C's the last to finish.
    hold_stream_kernel<<<1, 1, 0, cs>>>(40'000'000);
    c.backward(grun::exec::cuda(static_cast<void*>(cs)), dh_c, grads_c, saved);
    c.backward(grun::exec::cuda(static_cast<void*>(b)), dh_b, grads_b, saved);
  }  // released: its free is queued on grun's release stream
  // Once the release stream has passed the free, a forward on a third stream takes a block from the
  // pool. Had the free waited for B's backward only, it would have run while C's still waited:
  // - on a GPU the pool could hand the same block to this forward (its reuse is opportunistic), whose
  //   values C's backward would then read — a likely catch, not a certain one;
  // - on the CPU emulation C's work waits until something waits for C, so C's backward would read a
  //   freed block: an AddressSanitizer report, every time (tried: the release without its waits).
  // Freed after C's backward, as it must be, the block cannot be handed out before C has read it.
  GRUN_CUDA_CHECK(cudaStreamSynchronize(b));
  GRUN_CUDA_CHECK(cudaStreamSynchronize(gc::detail::release_stream()));
  {
    grun::saved_activations<T> refill;
    other.forward(grun::exec::cuda(static_cast<void*>(ds)), out_d, refill);
    GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  }
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());
  for (cudaStream_t s : {b, cs, ds}) GRUN_CUDA_CHECK(cudaStreamDestroy(s));
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(saved_case::same(dh_b.to_host().storage.span(), dh_c.to_host().storage.span()));
  CHECK(saved_case::same(flat<lin_lo4, T>(grads_b), flat<lin_lo4, T>(grads_c)));
}
