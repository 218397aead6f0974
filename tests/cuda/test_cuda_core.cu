// check.cuh: checked CUDA calls, device discovery, device buffers, storage bridges.
#include <grun/cuda/check.cuh>
#include <grun/cuda/scratch.cuh>
#include <grun/gate/linear.hpp>
#include <grun/intervention.hpp>
#include <grun/reft/loreft.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "agreement.hpp"

namespace gc = grun::cuda;

TEST_CASE("GRUN_CUDA_CHECK throws grun::error naming the call, file, line and the runtime's words", "[nodevice][core]") {
  try {
    GRUN_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("no exception");
  } catch (const grun::error& e) {
    const std::string what = e.what();
    CHECK(what.rfind("grun: ", 0) == 0);
    CHECK(what.find("cudaErrorInvalidValue") != std::string::npos);
    CHECK(what.find("test_cuda_core.cu:") != std::string::npos);
    CHECK(what.find(cudaGetErrorString(cudaErrorInvalidValue)) != std::string::npos);
  }
  CHECK_NOTHROW(GRUN_CUDA_CHECK(cudaSuccess));
}

TEST_CASE("device discovery never throws; allocation without a device is a grun::error", "[nodevice][core]") {
  const bool present = gc::device_available();
  CHECK(present == (gc::device_count() > 0));
  if (!present) {
    WARN("no CUDA device: checking that a device allocation fails by name");
    CHECK_THROWS_AS(gc::device_buffer<float>(16), grun::error);
    CHECK_NOTHROW(gc::device_buffer<float>(0));  // empty buffers need no device
  }
  CHECK_THROWS_AS(gc::device_buffer<float>(-1), grun::shape_error);
}

TEST_CASE("a host view handed to a cuda_space requirement is a shape_error", "[nodevice][core]") {
  grun::buffer<float> h(4);
  CHECK_THROWS_AS(gc::require_device_view(h.view(), "x"), grun::shape_error);
  CHECK_NOTHROW(gc::require_device_view(grun::vector_view<float, grun::cuda_space>(nullptr, {0}), "x"));
}

namespace {
template <class T>
__global__ void roundtrip_kernel(const float* in, T* out, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) { gc::dstore(out + i, in[i]); back[i] = gc::dload(out + i); }
}
}  // namespace

TEMPLATE_TEST_CASE("device conversions of half/bfloat16 equal the host's bit for bit", "[core]", grun::half, grun::bfloat16) {
  GRUN_REQUIRE_DEVICE();
  std::vector<float> in;
  for (float v : {0.f, -0.f, 1.f, -2.5f, 65504.f, 65520.f, 1e-8f, 6.1e-5f, 3.14159f, 1e30f, -1e-40f}) in.push_back(v);
  grun::test::fill_uniform(std::span<float>(in.data(), in.size()), 1, -4.f, 4.f);
  for (int k = 0; k < 1000; ++k) in.push_back(std::ldexp(1.f + k / 1000.f, (k % 60) - 30));
  gc::device_buffer<float> in_d{std::span<const float>(in)}, back_d{grun::index_t(in.size())};
  gc::device_buffer<TestType> out_d(grun::index_t(in.size()));
  roundtrip_kernel<<<unsigned((in.size() + 255) / 256), 256>>>(in_d.data(), out_d.data(), back_d.data(), int(in.size()));
  GRUN_CUDA_CHECK_LAUNCH();
  const auto out = out_d.to_host();
  const auto back = back_d.to_host();
  for (std::size_t i = 0; i < in.size(); ++i) {
    const TestType h = grun::store<TestType>(in[i]);
    INFO("x = " << in[i]);
    CHECK(out[i].bits == h.bits);
    CHECK(back[i] == grun::load<float>(h));
  }
}

TEST_CASE("device_buffer round-trips host data and hands out cuda_space views", "[core]") {
  GRUN_REQUIRE_DEVICE();
  std::vector<int> h = {1, 2, 3, 4, 5, 6};
  gc::device_buffer<int> d{std::span<const int>(h)};
  CHECK(d.to_host() == h);
  auto v = d.view<2>({2, 3});
  static_assert(std::is_same_v<decltype(v)::memory_space, grun::cuda_space>);
  CHECK(v.extent(1) == 3);
  CHECK_THROWS_AS(d.view<2>({4, 3}), grun::shape_error);
  CHECK_NOTHROW(gc::require_device_pointer(d.data(), "d"));
  CHECK_THROWS_AS(gc::require_device_pointer(h.data(), "h"), grun::shape_error);
}

namespace {
using module_t = grun::gated_intervention<grun::gate::linear, grun::reft::loreft<4>>;
using dparams_t = module_t::params<float, grun::cuda_space>;

/// Every leaf of p lies inside p's own storage, in declaration order, end to end.
bool leaves_seated(const gc::device_params<dparams_t>& p) {
  const float* next = p.data();
  bool ok = true;
  grun::for_each_param(*p, [&](const auto& leaf) {
    ok = ok && leaf.data == next;
    next += leaf.size();
  });
  return ok && next == p.data() + p.size();
}
}  // namespace

// Containers move device_params on growth only when the move cannot throw; otherwise they copy, and
// a copy must carry its own leaves (a stack of modules in a std::vector read freed memory before).
static_assert(std::is_nothrow_move_constructible_v<gc::device_params<dparams_t>>);
static_assert(std::is_nothrow_move_constructible_v<gc::device_buffer<float>>);

TEST_CASE("device_params: copies and moves keep every leaf inside their own storage", "[core]") {
  GRUN_REQUIRE_DEVICE();
  const grun::index_t d = 40;
  std::vector<float> values;
  std::vector<gc::device_params<dparams_t>> stack;
  for (int k = 0; k < 9; ++k) {  // growth reallocates several times
    gc::device_params<dparams_t> p(module_t::shape<float, grun::cuda_space>(d));
    values.assign(std::size_t(p.size()), float(k));
    GRUN_CUDA_CHECK(cudaMemcpy(p.data(), values.data(), sizeof(float) * values.size(), cudaMemcpyHostToDevice));
    stack.push_back(std::move(p));
  }
  for (std::size_t k = 0; k < stack.size(); ++k) {
    INFO("module " << k);
    CHECK(leaves_seated(stack[k]));
    std::vector<float> back(std::size_t(stack[k].size()));
    // Read through a leaf view (what the kernels use), not through data().
    GRUN_CUDA_CHECK(cudaMemcpy(back.data(), (*stack[k]).reft.rotate_layer.data, sizeof(float) * 4 * std::size_t(d),
                               cudaMemcpyDeviceToHost));
    CHECK(back[0] == float(k));
  }
  gc::device_params<dparams_t> copy(stack[3]);
  CHECK(leaves_seated(copy));
  CHECK(copy.data() != stack[3].data());
  gc::device_params<dparams_t> assigned;
  assigned = stack[5];
  CHECK(leaves_seated(assigned));
  CHECK(assigned.data() != stack[5].data());
  const float* before = stack[7].data();
  gc::device_params<dparams_t> moved(std::move(stack[7]));
  CHECK(moved.data() == before);
  CHECK(leaves_seated(moved));
}

TEST_CASE("scratch pool: call scratch stays mapped across synchronizations until release_scratch", "[core]") {
  GRUN_REQUIRE_DEVICE();
  const cudaMemPool_t pool = gc::scratch_pool();
  CHECK(pool == gc::scratch_pool());  // one pool per device
  auto reserved = [&] {
    std::uint64_t bytes = 0;
    GRUN_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &bytes));
    return bytes;
  };
  { gc::detail::stream_scratch<float> s(grun::index_t(8) << 20, nullptr); }  // 32 MiB, freed stream-ordered
  GRUN_CUDA_CHECK(cudaDeviceSynchronize());  // the default pool would hand its memory back here
  CHECK(reserved() >= (std::uint64_t(32) << 20));
  gc::release_scratch();
  CHECK(reserved() == 0);
}
