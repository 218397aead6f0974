// The DLPack adapter (grun/adapters/dlpack.hpp): a module run on DLTensors — compact, padded rows,
// a byte offset — gives bit for bit what it gives on grun's own matrices; every layout grun cannot
// take is refused by name; a managed tensor's deleter runs exactly once; an exported tensor keeps its
// storage alive until the consumer lets go; DLPack 1.x's versioned tensors are taken and handed out
// (version checked, read-only honoured).
#include <grun/adapters/dlpack.hpp>
#include <grun/grun.hpp>

#include "../test_intervention_common.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <vector>

using namespace grun;
using Catch::Contains;

// test_dlpack_adapter_v1 is this file built against a DLPack 1.x header: grun must use the header's
// own DLManagedTensorVersioned there (test_dlpack_adapter, on Debian's 0.6, uses grun's declaration).
#if GRUN_TEST_DLPACK_HEADER_DECLARES_VERSIONED
static_assert(DLPACK_MAJOR_VERSION == 1, "test_dlpack_adapter_v1 must see a DLPack 1.x header");
static_assert(std::is_same_v<dlpack::DLManagedTensorVersioned, ::DLManagedTensorVersioned>);
static_assert(dlpack::flag_read_only == DLPACK_FLAG_BITMASK_READ_ONLY);
#endif

namespace {

using unlearner = gated_intervention<gate::linear, reft::loreft<4>>;

/// A DLTensor over host memory (shape and strides kept by the caller).
DLTensor dl(void* data, std::vector<std::int64_t>& shape, std::int64_t* strides, DLDataType dtype = {kDLFloat, 32, 1},
            std::uint64_t byte_offset = 0, DLDevice device = {kDLCPU, 0}) {
  DLTensor t{};
  t.data = data;
  t.device = device;
  t.ndim = int(shape.size());
  t.dtype = dtype;
  t.shape = shape.data();
  t.strides = strides;
  t.byte_offset = byte_offset;
  return t;
}

}  // namespace

TEST_CASE("dlpack adapter: compact, padded and offset tensors give grun's results bit for bit", "[dlpack]") {
  const index_t n = 5, d = 11;
  unlearner::module<float> m(d, 3);
  const auto hv = grun_test::random_floats(n * d, 1), dv = grun_test::random_floats(n * d, 2);
  const auto pos = positions::rows({4, 1});
  // the reference: grun's own views
  std::vector<float> out_ref(std::size_t(n * d)), g_ref(2), dh_ref(std::size_t(n * d));
  const matrix_view<const float> h_ref(hv.data(), {n, d}), dout_ref(dv.data(), {n, d});
  m.forward(exec::host, h_ref, pos, matrix_view<float>(out_ref.data(), {n, d}), vector_view<float>(g_ref.data(), {2}));
  m.backward(exec::host, h_ref, pos, dout_ref, vector_view<const float>(), matrix_view<float>(dh_ref.data(), {n, d}));
  const std::vector<float> grads_ref(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());

  std::vector<std::int64_t> shape{n, d}, gshape{2};
  std::vector<float> out(std::size_t(n * d)), g(2), dh(std::size_t(n * d));
  SECTION("compact (strides NULL)") {
    std::vector<float> h = hv, dout = dv;
    dlpack::forward(m, exec::host, dl(h.data(), shape, nullptr), pos, dl(out.data(), shape, nullptr),
                    dl(g.data(), gshape, nullptr));
    const DLTensor dout_t = dl(dout.data(), shape, nullptr);
    dlpack::backward(m, exec::host, dl(h.data(), shape, nullptr), pos, dout_t, nullptr, dl(dh.data(), shape, nullptr));
  }
  SECTION("rows padded to 16 floats, starting 3 floats into the buffer (byte_offset)") {
    const index_t ld = 16;
    std::vector<float> h(std::size_t(3 + n * ld), 9.f), dout(std::size_t(3 + n * ld), 9.f);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < d; ++j) {
        h[std::size_t(3 + i * ld + j)] = hv[std::size_t(i * d + j)];
        dout[std::size_t(3 + i * ld + j)] = dv[std::size_t(i * d + j)];
      }
    std::int64_t strides[2] = {ld, 1};
    const DLTensor ht = dl(h.data(), shape, strides, {kDLFloat, 32, 1}, 3 * sizeof(float));
    const DLTensor dt = dl(dout.data(), shape, strides, {kDLFloat, 32, 1}, 3 * sizeof(float));
    dlpack::forward(m, exec::host, ht, pos, dl(out.data(), shape, nullptr), dl(g.data(), gshape, nullptr));
    dlpack::backward(m, exec::host, ht, pos, dt, nullptr, dl(dh.data(), shape, nullptr));
    const auto v = dlpack::view<const float, 2>(ht);
    CHECK(v.data() == h.data() + 3);
    CHECK(v.stride(0) == ld);
  }
  CHECK(out == out_ref);
  CHECK(g == g_ref);
  CHECK(dh == dh_ref);
  CHECK(std::memcmp(m.owned_gradients().data(), grads_ref.data(), grads_ref.size() * sizeof(float)) == 0);
}

TEST_CASE("dlpack adapter: a float16 module takes float32 dgates (a gate loss's own dtype)", "[dlpack]") {
  const index_t n = 4, d = 9;
  unlearner::module<half> m(d, 3);
  const auto hf = grun_test::random_floats(n * d, 1), df = grun_test::random_floats(n * d, 2, 0.1);
  std::vector<half> h(hf.size()), dout(df.size()), dh(hf.size());
  for (std::size_t i = 0; i < hf.size(); ++i) { h[i] = store<half>(hf[i]); dout[i] = store<half>(df[i]); }
  const auto pos = positions::rows({3, 0, 2});
  std::vector<float> dg32 = {0.5f, -1.25f, 3.f};  // values float16 holds exactly
  std::vector<half> dg16 = {store<half>(0.5f), store<half>(-1.25f), store<half>(3.f)};
  std::vector<std::int64_t> shape{n, d}, gshape{3};
  const DLDataType f16{kDLFloat, 16, 1};
  auto run = [&](const DLTensor& dgates) {
    dlpack::backward(m, exec::host, dl(h.data(), shape, nullptr, f16), pos, dl(dout.data(), shape, nullptr, f16), &dgates,
                     dl(dh.data(), shape, nullptr, f16));
    return std::vector<half>(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
  };
  const auto from16 = run(dl(dg16.data(), gshape, nullptr, f16));
  const auto dh16 = dh;
  const auto from32 = run(dl(dg32.data(), gshape, nullptr));
  CHECK(std::memcmp(from16.data(), from32.data(), sizeof(half) * from16.size()) == 0);
  CHECK(std::memcmp(dh16.data(), dh.data(), sizeof(half) * dh.size()) == 0);
  std::vector<std::int32_t> bad(3);
  CHECK_THROWS_WITH(run(dl(bad.data(), gshape, nullptr, {kDLInt, 32, 1})),
                    Contains("dgates: expected dtype float16 or float32, got int32"));
}

TEST_CASE("dlpack adapter: an mlp-gate module's forward keeps its activations for the backward (same bits)",
          "[dlpack]") {
  using mlp_unlearner = gated_intervention<gate::mlp<16, 8>, reft::loreft<4>>;
  const index_t n = 30, d = 24, P = 20;
  mlp_unlearner::module<half> m(d, 5);
  const auto hf = grun_test::random_floats(n * d, 1), df = grun_test::random_floats(n * d, 2, 0.1);
  std::vector<half> h(hf.size()), dout(df.size()), out(hf.size()), dh(hf.size()), g(static_cast<std::size_t>(P));
  for (std::size_t i = 0; i < hf.size(); ++i) { h[i] = store<half>(hf[i]); dout[i] = store<half>(df[i]); }
  std::vector<index_t> rows;
  for (index_t i = 0; i < P; ++i) rows.push_back(n - 1 - i);
  const auto pos = positions::rows(rows);
  std::vector<float> dg(std::size_t(P), 0.25f);
  std::vector<std::int64_t> shape{n, d}, gshape{P};
  const DLDataType f16{kDLFloat, 16, 1};
  auto run = [&](saved_activations<half>* saved) {
    dlpack::forward(m, exec::host, dl(h.data(), shape, nullptr, f16), pos, dl(out.data(), shape, nullptr, f16),
                    dl(g.data(), gshape, nullptr, f16), saved);
    const DLTensor dgt = dl(dg.data(), gshape, nullptr);
    dlpack::backward(m, exec::host, dl(h.data(), shape, nullptr, f16), pos, dl(dout.data(), shape, nullptr, f16), &dgt,
                     dl(dh.data(), shape, nullptr, f16), saved);
    std::vector<half> all(m.owned_gradients().data(), m.owned_gradients().data() + m.owned_gradients().size());
    all.insert(all.end(), dh.begin(), dh.end());
    all.insert(all.end(), out.begin(), out.end());
    return all;
  };
  const auto recomputed = run(nullptr);
  saved_activations<half> saved;
  const auto from_saved = run(&saved);
  CHECK(saved.filled());
  CHECK(saved.width() == 16 + 8 + 1);
  REQUIRE(recomputed.size() == from_saved.size());
  CHECK(std::memcmp(recomputed.data(), from_saved.data(), sizeof(half) * recomputed.size()) == 0);
}

TEST_CASE("dlpack adapter: what grun cannot take is refused by name", "[dlpack]") {
  std::vector<float> buf(64);
  std::vector<std::int64_t> shape{4, 8}, shape3{2, 4, 8}, neg{4, -1};
  using V = decltype(dlpack::view<float, 2>(std::declval<const DLTensor&>()));
  auto v = [](const DLTensor& t) -> V { return dlpack::view<float, 2>(t, "h"); };
  CHECK_THROWS_WITH(v(dl(buf.data(), shape3, nullptr)), Contains("h: expected 2 dimensions, got 3"));
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {kDLInt, 32, 1})), Contains("expected dtype float32, got int32"));
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {kDLBfloat, 16, 1})), Contains("got bfloat16"));
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {kDLFloat, 32, 4})), Contains("got float32x4"));
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {5, 64, 1})), Contains("got code5_64"));  // complex64
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {kDLFloat, 32, 1}, 0, {kDLCUDA, 1})),
                    Contains("expected host memory (kDLCPU or kDLCUDAHost), got a tensor on CUDA:1"));
  CHECK_THROWS_WITH((dlpack::view<float, 2, cuda_space>(dl(buf.data(), shape, nullptr), "h")),
                    Contains("expected CUDA memory (kDLCUDA or kDLCUDAManaged), got a tensor on CPU"));
  CHECK_THROWS_WITH(v(dl(buf.data(), shape, nullptr, {kDLFloat, 32, 1}, 2)), Contains("multiple of 4"));
  std::int64_t backwards[2] = {-8, 1};
  CHECK_THROWS_WITH(v(dl(buf.data() + 24, shape, backwards)), Contains("expected non-negative strides"));
  CHECK_THROWS_WITH(v(dl(buf.data(), neg, nullptr)), Contains("expected non-negative sizes, got -1"));
  CHECK_THROWS_WITH(v(dl(nullptr, shape, nullptr)), Contains("null data pointer"));
  std::vector<std::int64_t> empty{0, 8};
  CHECK(v(dl(nullptr, empty, nullptr)).size() == 0);  // no elements, no data needed
  // pinned host memory is host memory
  CHECK_NOTHROW(v(dl(buf.data(), shape, nullptr, {kDLFloat, 32, 1}, 0, {kDLCUDAHost, 0})));
  // row indices: int64 on the host
  std::vector<std::int64_t> rows{3, 0}, rshape{2};
  CHECK(dlpack::positions_from(dl(rows.data(), rshape, nullptr, {kDLInt, 64, 1})).size() == 2);
  std::vector<std::int32_t> rows32{3, 0};
  CHECK_THROWS_WITH(dlpack::positions_from(dl(rows32.data(), rshape, nullptr, {kDLInt, 32, 1})),
                    Contains("rows: expected dtype int64, got int32"));
  // a module's hidden size is checked as on grun's own views
  unlearner::module<float> m(5, 1);
  std::vector<std::int64_t> gshape{1};
  std::vector<float> g(1);
  CHECK_THROWS_AS(dlpack::forward(m, exec::host, dl(buf.data(), shape, nullptr), positions::rows({0}),
                                  dl(buf.data(), shape, nullptr), dl(g.data(), gshape, nullptr)),
                  shape_error);
}

TEST_CASE("dlpack adapter: a managed tensor's deleter runs exactly once; export keeps the storage alive",
          "[dlpack]") {
  // consumer side: managed_tensor
  static int deleted = 0;
  deleted = 0;
  std::vector<float> buf(6, 1.f);
  std::vector<std::int64_t> shape{2, 3};
  auto* m = new DLManagedTensor{};
  m->dl_tensor = dl(buf.data(), shape, nullptr);
  m->deleter = [](DLManagedTensor* self) { ++deleted; delete self; };
  {
    dlpack::managed_tensor a(m);
    CHECK(a.view<float, 2>().extent(1) == 3);
    dlpack::managed_tensor b(std::move(a));
    CHECK_FALSE(a);
    CHECK_THROWS_WITH(a.tensor(), Contains("empty"));
    dlpack::managed_tensor c;
    c = std::move(b);
    CHECK(deleted == 0);
  }
  CHECK(deleted == 1);
  CHECK_THROWS_AS(dlpack::managed_tensor(static_cast<DLManagedTensor*>(nullptr)), shape_error);
  CHECK_THROWS_AS(dlpack::managed_tensor(static_cast<dlpack::DLManagedTensorVersioned*>(nullptr)), shape_error);

  // producer side: to_dlpack over grun storage owned by a shared_ptr
  auto storage = std::make_shared<host_matrix<float>>(3, 4);
  for (index_t i = 0; i < 12; ++i) storage->storage[i] = float(i);
  DLManagedTensor* e = dlpack::to_dlpack(storage->view(), storage);
  CHECK(storage.use_count() == 2);
  {
    dlpack::managed_tensor imported(e);  // a consumer (here grun itself) takes it
    const auto v = imported.view<const float, 2>();
    CHECK(v.data() == storage->storage.data());
    CHECK(v.extent(0) == 3);
    CHECK(v(2, 3) == 11.f);
    CHECK(imported.tensor().device.device_type == kDLCPU);
  }
  CHECK(storage.use_count() == 1);  // the consumer's deleter released it
}

TEST_CASE("dlpack adapter: DLPack 1.x versioned tensors — version checked, read-only honoured, export round-trips",
          "[dlpack]") {
  static int deleted = 0;
  deleted = 0;
  const index_t n = 4, d = 9;
  std::vector<std::int64_t> shape{n, d}, gshape{2};
  const auto hv = grun_test::random_floats(n * d, 3);
  std::vector<float> h = hv, out(std::size_t(n * d)), g(2);
  const auto make = [&](void* data, std::vector<std::int64_t>& sh, std::uint64_t flags, std::uint32_t major = 1) {
    auto* m = new dlpack::DLManagedTensorVersioned{};
    m->version = {major, 3};  // a later minor version: the same layout, read as usual
    m->flags = flags;
    m->dl_tensor = dl(data, sh, nullptr);
    m->deleter = [](dlpack::DLManagedTensorVersioned* self) { ++deleted; delete self; };
    return m;
  };

  SECTION("a module runs on versioned tensors; its results are grun's own bit for bit") {
    unlearner::module<float> m(d, 5);
    const auto pos = positions::rows({3, 0});
    std::vector<float> out_ref(std::size_t(n * d)), g_ref(2);
    m.forward(exec::host, matrix_view<const float>(hv.data(), {n, d}), pos,
              matrix_view<float>(out_ref.data(), {n, d}), vector_view<float>(g_ref.data(), {2}));
    {
      const dlpack::managed_tensor ht(make(h.data(), shape, dlpack::flag_read_only)),
          ot(make(out.data(), shape, 0)), gt(make(g.data(), gshape, 0));
      CHECK(ht.versioned());
      CHECK(ht.read_only());
      CHECK_FALSE(ot.read_only());
      dlpack::forward(m, exec::host, ht.tensor(), pos, ot.mutable_tensor("out"), gt.mutable_tensor("gates"));
    }
    CHECK(deleted == 3);
    CHECK(std::memcmp(out.data(), out_ref.data(), out.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(g.data(), g_ref.data(), g.size() * sizeof(float)) == 0);
  }
  SECTION("a read-only tensor gives const views only, and is refused as an output by name") {
    const dlpack::managed_tensor t(make(h.data(), shape, dlpack::flag_read_only | dlpack::flag_is_copied));
    CHECK(t.view<const float, 2>().extent(1) == d);
    CHECK_THROWS_AS((t.view<float, 2>("out")), shape_error);
    CHECK_THROWS_WITH((t.view<float, 2>("out")), Contains("out: expected a writable tensor") && Contains("read-only"));
    CHECK_THROWS_WITH(t.mutable_tensor("dh"), Contains("dh: expected a writable tensor"));
    CHECK(deleted == 0);
  }
  SECTION("another major version is released unread and refused by name") {
    CHECK_THROWS_AS(dlpack::managed_tensor(make(h.data(), shape, 0, 2)), format_error);
    CHECK(deleted == 1);
    CHECK_THROWS_WITH(dlpack::managed_tensor(make(h.data(), shape, 0, 0)),
                      Contains("expected a DLManagedTensorVersioned of DLPack major version 1, got version 0.3"));
    CHECK(deleted == 2);
  }
  SECTION("ownership moves; release hands on the right kind") {
    dlpack::managed_tensor a(make(h.data(), shape, 0));
    dlpack::managed_tensor b(std::move(a));
    CHECK_FALSE(a);
    CHECK(b.versioned());
    CHECK_THROWS_WITH(b.release(), Contains("use release_versioned"));
    dlpack::DLManagedTensorVersioned* raw = b.release_versioned();
    CHECK_FALSE(b);
    CHECK(deleted == 0);
    raw->deleter(raw);
    CHECK(deleted == 1);
    std::vector<float> buf(6);
    std::vector<std::int64_t> s23{2, 3};
    auto* legacy = new DLManagedTensor{};
    legacy->dl_tensor = dl(buf.data(), s23, nullptr);
    legacy->deleter = [](DLManagedTensor* self) { ++deleted; delete self; };
    dlpack::managed_tensor c(legacy);
    CHECK_FALSE(c.versioned());
    CHECK(c.flags() == 0);
    CHECK_THROWS_WITH(c.release_versioned(), Contains("use release"));
    c = dlpack::managed_tensor(make(h.data(), shape, 0));  // the unversioned one is released first
    CHECK(deleted == 2);
    c.reset();
    CHECK(deleted == 3);
  }
  SECTION("to_dlpack_versioned: version 1.0, read-only for const views, storage kept until the deleter") {
    auto storage = std::make_shared<host_matrix<float>>(3, 4);
    for (index_t i = 0; i < 12; ++i) storage->storage[i] = float(i);
    dlpack::DLManagedTensorVersioned* w = dlpack::to_dlpack_versioned(storage->view(), storage);
    const auto cv = matrix_view<const float>(storage->storage.data(), {3, 4});
    dlpack::DLManagedTensorVersioned* r = dlpack::to_dlpack_versioned(cv, storage);
    CHECK(w->version.major == 1);
    CHECK(w->version.minor == 0);
    CHECK(w->flags == 0);
    CHECK(r->flags == dlpack::flag_read_only);
    CHECK(storage.use_count() == 3);
    {
      const dlpack::managed_tensor a(w), b(r);
      CHECK(a.view<float, 2>()(2, 3) == 11.f);
      CHECK(b.view<const float, 2>().data() == storage->storage.data());
      CHECK_THROWS_AS((b.view<float, 2>()), shape_error);
      CHECK(a.tensor().strides[0] == 4);
    }
    CHECK(storage.use_count() == 1);
  }
}
