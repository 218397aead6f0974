// The emulation's own contracts (tests/emulation): warp and CTA barriers in one kernel, the order
// threads and CTAs run in (a race shows), static shared memory that starts as 0xFF bytes in every
// CTA, cub's warp reduction order, cub::DeviceReduce, events and device properties, stream order,
// and cuBLASLt's matmul — its numbers and the misuses it must refuse as the device library would
// (the emulated agreement tests rely on those refusals to catch glue bugs).
// Kernels here are plain functions launched through ::grun_emu::launch, as rewritten launches are.
#include <catch2/catch.hpp>

#include <cub/block/block_reduce.cuh>
#include <cub/device/device_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cublasLt.h>

#include "run_order.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

namespace {

template <class T>
struct device_array {
  T* ptr = nullptr;
  std::size_t n;
  explicit device_array(std::size_t count) : n(count) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ptr), sizeof(T) * n) == cudaSuccess); }
  device_array(const std::vector<T>& host) : device_array(host.size()) {
    REQUIRE(cudaMemcpy(ptr, host.data(), sizeof(T) * n, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~device_array() { cudaFree(ptr); }
  std::vector<T> to_host() const {
    std::vector<T> out(n);
    REQUIRE(cudaMemcpy(out.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }
};

constexpr int threads = 96;  // three warps

/// Each warp sums its lanes' inputs (cub::WarpReduce), then — after a CTA barrier — thread 0 sums
/// the warp totals through shared memory; between the two, every warp passes a second warp barrier
/// that reads a neighbour lane's slot (so a warp barrier that opened early would show).
void warps_then_cta(const float* in, float* warp_totals, float* neighbour, float* total) {
  using WR = cub::WarpReduce<float>;
  __shared__ typename WR::TempStorage tmp[threads / 32];
  __shared__ float slot[threads];
  __shared__ float totals[threads / 32];
  const int t = int(threadIdx.x), warp = t / 32, lane = t % 32;
  const float s = WR(tmp[warp]).Sum(in[t]);
  if (lane == 0) totals[warp] = s;
  slot[t] = in[t] * 2.f;
  __syncwarp();
  neighbour[t] = slot[warp * 32 + (lane + 1) % 32];
  __syncthreads();
  if (t == 0) {
    float acc = 0.f;
    for (int w = 0; w < threads / 32; ++w) {
      warp_totals[w] = totals[w];
      acc += totals[w];
    }
    *total = acc;
  }
}

/// D [m, n] = op(A) op(B) (+ beta C) with the problem's layouts, through the shim; returns the status.
struct matmul_case {
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  std::uint64_t m = 5, n = 3, k = 7;
  cudaDataType_t type = CUDA_R_32F, out_type = CUDA_R_32F;
  std::uint32_t alignment = 4;  // promised for every operand
  float beta = 0.f;
  const float* scalars = nullptr;  // {alpha, beta} for the device pointer mode (else alpha 1 and beta, host)

  cublasStatus_t run(const void* A, std::int64_t lda, const void* B, std::int64_t ldb, void* D, std::int64_t ldd,
                     std::uint64_t a_rows_override = 0) const {
    cublasLtHandle_t h = nullptr;
    REQUIRE(cublasLtCreate(&h) == CUBLAS_STATUS_SUCCESS);
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    REQUIRE(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS);
    if (scalars != nullptr) {
      const std::int32_t mode = CUBLASLT_POINTER_MODE_DEVICE;
      REQUIRE(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof mode) ==
              CUBLAS_STATUS_SUCCESS);
    }
    const bool an = ta == CUBLAS_OP_N, bn = tb == CUBLAS_OP_N;
    REQUIRE(cublasLtMatrixLayoutCreate(&a, type, a_rows_override ? a_rows_override : (an ? m : k), an ? k : m, lda) ==
            CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatrixLayoutCreate(&b, type, bn ? k : n, bn ? n : k, ldb) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatrixLayoutCreate(&d, out_type, m, n, ldd) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS);
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      REQUIRE(cublasLtMatmulPreferenceSetAttribute(pref, attr, &alignment, sizeof alignment) == CUBLAS_STATUS_SUCCESS);
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h, op, a, b, d, d, pref, 1, &result, &found);
    if (s == CUBLAS_STATUS_SUCCESS) {
      REQUIRE(found == 1);
      const float alpha = 1.f;
      s = cublasLtMatmul(h, op, scalars ? scalars : &alpha, A, a, B, b, scalars ? scalars + 1 : &beta, D, d, D, d,
                         &result.algo, nullptr, 0, nullptr);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(d);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(op);
    cublasLtDestroy(h);
    return s;
  }
};

/// Every thread writes its slot of dynamic shared memory and reads its right neighbour's (thread
/// blockDim − 1 reads thread 0's) — with a barrier between the two when `synced`, else a race: the
/// neighbour's value, or the 0xFF bytes (−1) the CTA's shared memory starts as, by who ran first.
void neighbour_slot(int* seen, bool synced) {
  int* slot = reinterpret_cast<int*>(::grun_emu::dynamic_shared());
  const int t = int(threadIdx.x), n = int(blockDim.x);
  slot[t] = t + 1;
  if (synced) __syncthreads();
  seen[int(blockIdx.x) * n + t] = slot[(t + 1) % n];
}

/// The place of each CTA in the grid's run: *counter counts the CTAs that have started.
void cta_place(int* place, int* counter) {
  if (threadIdx.x == 0) place[blockIdx.x] = atomicAdd(counter, 1);
}

/// CTA 0 writes a static __shared__ variable (marked, as rewrite_launches.py marks a kernel's);
/// every CTA then reads it without a barrier's worth of writing of its own: CTA 0 its value, the
/// others the 0xFF bytes every CTA starts with (not CTA 0's leftovers).
void leftover_shared(int* seen) {
  __shared__ int value;
  GRUN_EMU_SHARED_REGION(value);
  if (blockIdx.x == 0 && threadIdx.x == 0) value = 42;
  __syncthreads();
  if (threadIdx.x == 0) seen[blockIdx.x] = value;
}

/// Sets the scheduler's order for a scope and restores the one before.
struct order_scope {
  ::grun_emu::run_order before = ::grun_emu::order();
  explicit order_scope(::grun_emu::run_order o) { ::grun_emu::set_order(o); }
  ~order_scope() { ::grun_emu::set_order(before); }
};

constexpr int race_threads = 64, race_ctas = 2;

/// neighbour_slot over race_ctas CTAs under `o`: what each thread saw.
std::vector<int> neighbours_seen(::grun_emu::run_order o, bool synced) {
  const order_scope scope(o);
  device_array<int> seen(race_threads * race_ctas);
  ::grun_emu::launch(dim3(race_ctas), dim3(race_threads), sizeof(int) * race_threads)(neighbour_slot, seen.ptr, synced);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  return seen.to_host();
}

std::vector<int> cta_places(::grun_emu::run_order o, int ctas) {
  const order_scope scope(o);
  device_array<int> place{std::size_t(ctas)}, counter{std::vector<int>{0}};
  ::grun_emu::launch(dim3(unsigned(ctas)), dim3(32))(cta_place, place.ptr, counter.ptr);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  return place.to_host();
}

std::vector<float> ramp(std::size_t n, float scale) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = scale * float(int(i % 11) - 5);
  return v;
}

}  // namespace

TEST_CASE("emulation: warp barriers and a CTA barrier in one kernel; cub's warp reduction order", "[emulation]") {
  std::vector<float> in(threads);
  for (int t = 0; t < threads; ++t) in[std::size_t(t)] = t % 2 ? 1e8f : 1.f + float(t);  // order-sensitive sums
  const device_array<float> din(in), warp_totals(threads / 32), neighbour(threads), total(1);
  ::grun_emu::launch(dim3(1), dim3(threads))(warps_then_cta, din.ptr, warp_totals.ptr, neighbour.ptr, total.ptr);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  const auto wt = warp_totals.to_host(), nb = neighbour.to_host();
  for (int w = 0; w < threads / 32; ++w) {
    // cub's shuffle-down tree: offsets 1, 2, 4, 8, 16, lane 0's partial at each step.
    std::vector<float> part(in.begin() + 32 * w, in.begin() + 32 * (w + 1));
    for (int offset = 1; offset < 32; offset *= 2)
      for (int l = 0; l + offset < 32; l += 2 * offset) part[std::size_t(l)] += part[std::size_t(l + offset)];
    CHECK(wt[std::size_t(w)] == part[0]);
  }
  for (int t = 0; t < threads; ++t) CHECK(nb[std::size_t(t)] == 2.f * in[std::size_t((t / 32) * 32 + (t % 32 + 1) % 32)]);
  CHECK(total.to_host()[0] == (wt[0] + wt[1]) + wt[2]);
}

TEST_CASE("emulation: cuBLASLt matmul, every transpose and storage type, against a plain loop", "[emulation]") {
  const std::uint64_t m = 5, n = 3, k = 7;
  for (auto ta : {CUBLAS_OP_N, CUBLAS_OP_T})
    for (auto tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      INFO("transposes " << int(ta) << ", " << int(tb));
      const bool an = ta == CUBLAS_OP_N, bn = tb == CUBLAS_OP_N;
      const std::int64_t lda = std::int64_t(an ? m : k) + 2, ldb = std::int64_t(bn ? k : n) + 1, ldd = m + 3;
      const auto a = ramp(std::size_t(lda) * (an ? k : m), 0.25f), b = ramp(std::size_t(ldb) * (bn ? n : k), 0.5f);
      auto d0 = std::vector<float>(std::size_t(ldd) * n, std::numeric_limits<float>::quiet_NaN());
      const device_array<float> da(a), db(b), dd(d0);
      matmul_case c;
      c.ta = ta;
      c.tb = tb;
      REQUIRE(c.run(da.ptr, lda, db.ptr, ldb, dd.ptr, ldd) == CUBLAS_STATUS_SUCCESS);  // beta = 0: C's NaN unread
      const auto d = dd.to_host();
      for (std::uint64_t j = 0; j < n; ++j)
        for (std::uint64_t i = 0; i < m; ++i) {
          double want = 0;
          for (std::uint64_t l = 0; l < k; ++l)
            want += double(an ? a[i + l * lda] : a[l + i * lda]) * double(bn ? b[l + j * ldb] : b[j + l * ldb]);
          CHECK(d[i + j * ldd] == float(want));  // small integers times powers of two: exact
        }
      CHECK(std::isnan(d[m]));  // past the rows: untouched
    }
  // bf16 inputs, fp32 output, beta = 1 adds to D.
  std::vector<__nv_bfloat16> a(m * k), b(k * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = __float2bfloat16_rn(float(int(i % 5) - 2));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = __float2bfloat16_rn(float(int(i % 3) - 1));
  const device_array<__nv_bfloat16> da(a), db(b);
  const device_array<float> dd(std::vector<float>(m * n, 10.f));
  matmul_case c;
  c.type = CUDA_R_16BF;
  c.alignment = 2;  // row pitch 5 elements: 10 bytes
  c.beta = 1.f;
  REQUIRE(c.run(da.ptr, m, db.ptr, k, dd.ptr, m) == CUBLAS_STATUS_SUCCESS);
  const auto d = dd.to_host();
  for (std::uint64_t j = 0; j < n; ++j)
    for (std::uint64_t i = 0; i < m; ++i) {
      float want = 10.f;
      for (std::uint64_t l = 0; l < k; ++l) want += __bfloat162float(a[i + l * m]) * __bfloat162float(b[l + j * k]);
      CHECK(d[i + j * m] == want);
    }
  // Device pointer mode: alpha = 0.25 and beta = 1 read from device memory.
  const device_array<float> scalars(std::vector<float>{0.25f, 1.f});
  const device_array<float> da32(ramp(m * k, 1.f)), db32(ramp(k * n, 1.f)), dd32(std::vector<float>(m * n, 3.f));
  matmul_case scaled;
  scaled.scalars = scalars.ptr;
  REQUIRE(scaled.run(da32.ptr, m, db32.ptr, k, dd32.ptr, m) == CUBLAS_STATUS_SUCCESS);
  const auto a32 = ramp(m * k, 1.f), b32 = ramp(k * n, 1.f), d32 = dd32.to_host();
  for (std::uint64_t j = 0; j < n; ++j)
    for (std::uint64_t i = 0; i < m; ++i) {
      float want = 0.f;
      for (std::uint64_t l = 0; l < k; ++l) want += a32[i + l * m] * b32[l + j * k];
      CHECK(d32[i + j * m] == 0.25f * want + 3.f);
    }
}

TEST_CASE("emulation: cuBLASLt matmul sums k as one fp32 fma chain per element, in order, at any width", "[emulation]") {
  // n = 75: on AVX2 + FMA columns run 32 at a time (the last block padded with zero columns) and
  // rows two at a time (m = 9: the last alone); every element must be the same chain of fused
  // multiply-adds as one column at a time.
  const std::uint64_t m = 9, n = 75, k = 301;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto ta : {CUBLAS_OP_N, CUBLAS_OP_T})
    for (auto tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      INFO("transposes " << int(ta) << ", " << int(tb));
      const bool an = ta == CUBLAS_OP_N, bn = tb == CUBLAS_OP_N;
      const std::int64_t lda = std::int64_t(an ? m : k) + 1, ldb = std::int64_t(bn ? k : n) + 3;
      std::vector<float> a(std::size_t(lda) * (an ? k : m)), b(std::size_t(ldb) * (bn ? n : k));
      for (auto& v : a) v = u(rng);
      for (auto& v : b) v = u(rng);
      const device_array<float> da(a), db(b), dd(std::vector<float>(m * n, 0.f));
      matmul_case c;
      c.ta = ta;
      c.tb = tb;
      c.m = m;
      c.n = n;
      c.k = k;
      REQUIRE(c.run(da.ptr, lda, db.ptr, ldb, dd.ptr, std::int64_t(m)) == CUBLAS_STATUS_SUCCESS);
      const auto d = dd.to_host();
      int differ = 0;
      for (std::uint64_t j = 0; j < n; ++j)
        for (std::uint64_t i = 0; i < m; ++i) {
          float want = 0.f;
          for (std::uint64_t l = 0; l < k; ++l)
            want = std::fma(an ? a[i + l * lda] : a[l + i * lda], bn ? b[l + j * ldb] : b[j + l * ldb], want);
          differ += d[i + j * m] != want;
        }
      CHECK(differ == 0);
    }
}

TEST_CASE("emulation: cub::DeviceReduce Sum and Max over a transform iterator", "[emulation]") {
  const std::vector<float> x = {3.f, -7.5f, 2.f, 0.f, 7.25f};
  const device_array<float> dx(x), out(1);
  struct magnitude {
    float operator()(float v) const { return std::fabs(v); }
  };
  const auto it = thrust::make_transform_iterator(dx.ptr, magnitude{});
  std::size_t bytes = 0;
  REQUIRE(cub::DeviceReduce::Max(nullptr, bytes, it, out.ptr, x.size()) == cudaSuccess);
  REQUIRE(bytes > 0);
  const device_array<unsigned char> tmp(bytes);
  REQUIRE(cub::DeviceReduce::Max(tmp.ptr, bytes, it, out.ptr, x.size()) == cudaSuccess);
  CHECK(out.to_host()[0] == 7.5f);
  REQUIRE(cub::DeviceReduce::Sum(tmp.ptr, bytes, it, out.ptr, x.size()) == cudaSuccess);
  CHECK(out.to_host()[0] == 19.75f);
  REQUIRE(cub::DeviceReduce::Max(tmp.ptr, bytes, dx.ptr, out.ptr, 0) == cudaSuccess);
  CHECK(out.to_host()[0] == std::numeric_limits<float>::lowest());  // cub's identity for an empty Max
  // Host memory where the device's is expected.
  float host_out = 0.f;
  CHECK(cub::DeviceReduce::Max(tmp.ptr, bytes, it, &host_out, x.size()) == cudaErrorInvalidValue);
}

TEST_CASE("emulation: events time host work in order; the device's properties name the emulation", "[emulation]") {
  cudaEvent_t a = nullptr, b = nullptr;
  REQUIRE(cudaEventCreate(&a) == cudaSuccess);
  REQUIRE(cudaEventCreate(&b) == cudaSuccess);
  float ms = -1.f;
  CHECK(cudaEventElapsedTime(&ms, a, b) == cudaErrorInvalidResourceHandle);  // neither recorded yet
  CHECK(cudaGetLastError() == cudaErrorInvalidResourceHandle);
  REQUIRE(cudaEventRecord(a) == cudaSuccess);
  REQUIRE(cudaEventRecord(b) == cudaSuccess);
  REQUIRE(cudaEventSynchronize(b) == cudaSuccess);
  REQUIRE(cudaEventElapsedTime(&ms, a, b) == cudaSuccess);
  CHECK(ms >= 0.f);
  CHECK(cudaEventDestroy(a) == cudaSuccess);
  CHECK(cudaEventDestroy(b) == cudaSuccess);
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  CHECK(std::strstr(prop.name, "emulation") != nullptr);
  CHECK(cudaGetDeviceProperties(&prop, 1) == cudaErrorInvalidDevice);
  CHECK(cudaGetLastError() == cudaErrorInvalidDevice);
}

TEST_CASE("emulation: cuBLASLt refuses what the device library refuses or faults on", "[emulation]") {
  const std::uint64_t m = 8, n = 4, k = 8;
  const device_array<float> a(ramp(m * k + 8, 1.f)), b(ramp(k * n + 8, 1.f)), d(m * n + 8);
  matmul_case c;
  c.m = m;
  c.n = n;
  c.k = k;
  CHECK(c.run(a.ptr, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_SUCCESS);
  // Host memory where the layout says device.
  std::vector<float> host_b(k * n, 1.f);
  CHECK(c.run(a.ptr, m, host_b.data(), k, d.ptr, m) == CUBLAS_STATUS_INVALID_VALUE);
  // An operand running past its allocation.
  CHECK(c.run(a.ptr + 16, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_INVALID_VALUE);
  // Shapes that do not agree, a leading dimension below the rows.
  CHECK(c.run(a.ptr, m + 1, b.ptr, k, d.ptr, m, m + 1) == CUBLAS_STATUS_INVALID_VALUE);
  CHECK(c.run(a.ptr, m - 1, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_INVALID_VALUE);
  // Mixed input types: fp16 A and B with a bf16 D.
  matmul_case mixed = c;
  mixed.type = CUDA_R_16F;
  mixed.out_type = CUDA_R_16BF;
  CHECK(mixed.run(a.ptr, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_NOT_SUPPORTED);
  // 16-byte alignment promised, a 4-byte aligned operand given: the misaligned access.
  matmul_case aligned = c;
  aligned.alignment = 16;
  CHECK(aligned.run(a.ptr, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_SUCCESS);
  CHECK(aligned.run(a.ptr + 1, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_EXECUTION_FAILED);
  CHECK(aligned.run(a.ptr, m + 1, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_EXECUTION_FAILED);  // pitch 36 bytes
  // Device pointer mode with alpha and beta in host memory.
  const std::vector<float> host_scalars = {1.f, 0.f};
  matmul_case device_mode = c;
  device_mode.scalars = host_scalars.data();
  CHECK(device_mode.run(a.ptr, m, b.ptr, k, d.ptr, m) == CUBLAS_STATUS_INVALID_VALUE);
}

namespace {
void set_value(float* p, float v) { *p = v; }  // launched with one thread
void copy_value(const float* from, float* to) { *to = *from; }
}  // namespace

TEST_CASE("emulation: a created stream's work waits in line until something waits for it", "[emulation]") {
  cudaStream_t s = nullptr, t = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&t, cudaStreamNonBlocking) == cudaSuccess);
  const device_array<float> x(std::vector<float>{1.f}), y(std::vector<float>{1.f});
  ::grun_emu::launch(dim3(1), dim3(1), 0, s)(set_value, x.ptr, 2.f);
  CHECK(x.to_host()[0] == 1.f);  // the legacy stream does not wait for a non-blocking one
  float back = 0.f;
  REQUIRE(cudaMemcpyAsync(&back, x.ptr, sizeof(float), cudaMemcpyDeviceToHost, s) == cudaSuccess);
  CHECK(back == 2.f);  // a copy to the host on the stream: the stream's work first
  // From host memory the source is taken when the copy is issued.
  float src = 3.f;
  REQUIRE(cudaMemcpyAsync(x.ptr, &src, sizeof(float), cudaMemcpyHostToDevice, s) == cudaSuccess);
  src = 4.f;
  // Across streams through an event: t's copy of x into y waits for s's work up to the recording only.
  cudaEvent_t e = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess);
  REQUIRE(cudaEventRecord(e, s) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, s)(set_value, x.ptr, 5.f);
  REQUIRE(cudaStreamWaitEvent(t, e, 0) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(y.ptr, x.ptr, sizeof(float), cudaMemcpyDeviceToDevice, t) == cudaSuccess);
  REQUIRE(cudaStreamSynchronize(t) == cudaSuccess);
  CHECK(y.to_host()[0] == 3.f);  // x as the recording left it: not 4 (taken at issue), not 5 (after it)
  REQUIRE(cudaEventSynchronize(e) == cudaSuccess);
  CHECK(x.to_host()[0] == 3.f);
  REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
  CHECK(x.to_host()[0] == 5.f);
  // A stream-ordered free: the block stays until its stream passes the free.
  cudaMemPool_t pool = nullptr;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  REQUIRE(cudaMemPoolCreate(&pool, &props) == cudaSuccess);
  void* p = nullptr;
  REQUIRE(cudaMallocFromPoolAsync(&p, 64, pool, s) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, s)(set_value, static_cast<float*>(p), 6.f);
  REQUIRE(cudaFreeAsync(p, s) == cudaSuccess);
  CHECK(::grun_emu::in_device_memory(p, sizeof(float)));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK_FALSE(::grun_emu::in_device_memory(p, sizeof(float)));
  // A destroyed stream's work still runs — later, as a device finishes it after cudaStreamDestroy
  // returns: when something waits for the device, or for an event recorded on the stream.
  ::grun_emu::launch(dim3(1), dim3(1), 0, t)(set_value, y.ptr, 7.f);
  REQUIRE(cudaStreamDestroy(t) == cudaSuccess);
  CHECK(y.to_host()[0] == 3.f);  // t was non-blocking: the legacy stream's copy does not wait for it
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(y.to_host()[0] == 7.f);
  cudaStream_t u = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&u, cudaStreamNonBlocking) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, u)(set_value, y.ptr, 8.f);
  REQUIRE(cudaEventRecord(e, u) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, u)(set_value, y.ptr, 9.f);
  REQUIRE(cudaStreamDestroy(u) == cudaSuccess);
  CHECK(y.to_host()[0] == 7.f);
  REQUIRE(cudaEventSynchronize(e) == cudaSuccess);
  CHECK(y.to_host()[0] == 8.f);  // up to the recording only
  // A blocking stream's: the legacy stream's work follows it, destroyed or not.
  cudaStream_t v = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&v, cudaStreamDefault) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, v)(set_value, x.ptr, 10.f);
  REQUIRE(cudaStreamDestroy(v) == cudaSuccess);
  CHECK(x.to_host()[0] == 10.f);
  CHECK(y.to_host()[0] == 8.f);  // u's last launch: still in line (u was non-blocking)
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(y.to_host()[0] == 9.f);
  CHECK(cudaEventDestroy(e) == cudaSuccess);
  CHECK(cudaStreamDestroy(s) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("emulation: work no one waits for runs when the thread that issued it ends", "[emulation]") {
  // As a GPU runs what was launched whether or not anyone waits: the main thread's leftovers run as
  // the program exits (a kernel that faults there fails the run); another thread's when it ends.
  cudaStream_t live = nullptr, gone = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&live, cudaStreamNonBlocking) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&gone, cudaStreamNonBlocking) == cudaSuccess);
  const device_array<float> x(std::vector<float>{1.f}), y(std::vector<float>{1.f});
  std::thread([&] {
    ::grun_emu::launch(dim3(1), dim3(1), 0, live)(set_value, x.ptr, 2.f);
    ::grun_emu::launch(dim3(1), dim3(1), 0, gone)(set_value, y.ptr, 3.f);
    CHECK(cudaStreamDestroy(gone) == cudaSuccess);
    CHECK(*x.ptr == 1.f);  // read directly: issued, not run
  }).join();
  CHECK(*x.ptr == 2.f);  // still read directly: nothing here waited
  CHECK(*y.ptr == 3.f);
  CHECK(cudaStreamDestroy(live) == cudaSuccess);
}

TEST_CASE("emulation: the legacy stream's work waits in line too, synchronized with the blocking streams", "[emulation]") {
  cudaStream_t blocking = nullptr, nonblocking = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&blocking, cudaStreamDefault) == cudaSuccess);
  REQUIRE(cudaStreamCreateWithFlags(&nonblocking, cudaStreamNonBlocking) == cudaSuccess);
  const device_array<float> x(std::vector<float>{1.f}), y(std::vector<float>{1.f});
  // Issued, not run: the device memory (host memory here, read directly) still holds the old value
  // until something waits — here a synchronous copy, which follows the legacy stream's work.
  ::grun_emu::launch(dim3(1), dim3(1), 0, nullptr)(set_value, x.ptr, 2.f);
  CHECK(*x.ptr == 1.f);
  CHECK(x.to_host()[0] == 2.f);
  // A blocking stream's work follows the legacy stream's issued before it...
  ::grun_emu::launch(dim3(1), dim3(1), 0, nullptr)(set_value, x.ptr, 3.f);
  ::grun_emu::launch(dim3(1), dim3(1), 0, blocking)(copy_value, x.ptr, y.ptr);
  REQUIRE(cudaStreamSynchronize(blocking) == cudaSuccess);
  CHECK(*y.ptr == 3.f);
  // ...and the legacy stream's work follows a blocking stream's issued before it.
  ::grun_emu::launch(dim3(1), dim3(1), 0, blocking)(set_value, x.ptr, 4.f);
  ::grun_emu::launch(dim3(1), dim3(1), 0, nullptr)(copy_value, x.ptr, y.ptr);
  REQUIRE(cudaStreamSynchronize(nullptr) == cudaSuccess);
  CHECK(*y.ptr == 4.f);
  // A non-blocking stream does not wait for the legacy stream.
  ::grun_emu::launch(dim3(1), dim3(1), 0, nullptr)(set_value, x.ptr, 5.f);
  ::grun_emu::launch(dim3(1), dim3(1), 0, nonblocking)(copy_value, x.ptr, y.ptr);
  REQUIRE(cudaStreamSynchronize(nonblocking) == cudaSuccess);
  CHECK(*y.ptr == 4.f);
  CHECK(*x.ptr == 4.f);
  // An event recorded on the legacy stream: reached up to the recording only.
  cudaEvent_t e = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess);
  REQUIRE(cudaEventRecord(e, nullptr) == cudaSuccess);
  ::grun_emu::launch(dim3(1), dim3(1), 0, nullptr)(set_value, x.ptr, 6.f);
  REQUIRE(cudaEventSynchronize(e) == cudaSuccess);
  CHECK(*x.ptr == 5.f);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(*x.ptr == 6.f);
  CHECK(cudaEventDestroy(e) == cudaSuccess);
  CHECK(cudaStreamDestroy(nonblocking) == cudaSuccess);
  CHECK(cudaStreamDestroy(blocking) == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("emulation: a CTA's threads run both ways between barriers, so a race shows; GRUN_EMU_ORDER pins or shuffles", "[emulation]") {
  using order = ::grun_emu::run_order;
  // Thread t saw its neighbour's write (t + 2), or the 0xFF start (−1): who ran first decides.
  auto wrote = [](const std::vector<int>& seen, int cta, int t) { return seen[std::size_t(cta * race_threads + t)] != -1; };
  SECTION("with the barrier every order gives every thread its neighbour's value") {
    for (const order o : {order{order::alternate}, order{order::forward}, order{order::reverse}, order{order::shuffle, 7}}) {
      const auto seen = neighbours_seen(o, true);
      for (int c = 0; c < race_ctas; ++c)
        for (int t = 0; t < race_threads; ++t) CHECK(seen[std::size_t(c * race_threads + t)] == (t + 1) % race_threads + 1);
    }
  }
  SECTION("alternate (the default): CTA 0 runs in thread order, CTA 1 in reverse — the race shows in one of them") {
    const auto seen = neighbours_seen(order{order::alternate}, false);
    for (int t = 0; t + 1 < race_threads; ++t) {
      CHECK_FALSE(wrote(seen, 0, t));  // its neighbour (rank t + 1) had not run yet
      CHECK(wrote(seen, 1, t));        // it had
    }
    CHECK(wrote(seen, 0, race_threads - 1));  // thread 0 ran before the last
    CHECK_FALSE(wrote(seen, 1, race_threads - 1));
  }
  SECTION("forward and reverse: thread order, or its reverse, in every CTA") {
    const auto fwd = neighbours_seen(order{order::forward}, false), rev = neighbours_seen(order{order::reverse}, false);
    for (int c = 0; c < race_ctas; ++c)
      for (int t = 0; t + 1 < race_threads; ++t) {
        CHECK_FALSE(wrote(fwd, c, t));
        CHECK(wrote(rev, c, t));
      }
  }
  SECTION("shuffle: both outcomes in one CTA") {
    const auto a = neighbours_seen(order{order::shuffle, 1}, false);
    int written = 0;
    for (int t = 0; t < race_threads; ++t) written += wrote(a, 0, t);
    CHECK(written > 0);
    CHECK(written < race_threads);
  }
  SECTION("CTAs: in order, from the last, or an arbitrary permutation") {
    constexpr int ctas = 16;
    const auto fwd = cta_places(order{order::alternate}, ctas), rev = cta_places(order{order::reverse}, ctas);
    for (int c = 0; c < ctas; ++c) {
      CHECK(fwd[std::size_t(c)] == c);
      CHECK(rev[std::size_t(c)] == ctas - 1 - c);
    }
    bool moved = false;
    for (unsigned long long seed = 1; seed <= 4; ++seed) {
      auto shuffled = cta_places(order{order::shuffle, seed}, ctas);
      moved = moved || shuffled != fwd;
      std::sort(shuffled.begin(), shuffled.end());
      CHECK(shuffled == fwd);  // every CTA ran once
    }
    CHECK(moved);
  }
}

TEST_CASE("emulation: a kernel's static shared memory starts as 0xFF bytes in every CTA", "[emulation]") {
  device_array<int> seen(3);
  for (int launch = 0; launch < 2; ++launch) {  // the first launch registers the variable; the second finds it registered
    ::grun_emu::launch(dim3(3), dim3(32))(leftover_shared, seen.ptr);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    CHECK(seen.to_host() == std::vector<int>{42, -1, -1});
  }
}
