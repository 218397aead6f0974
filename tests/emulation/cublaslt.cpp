// tests/emulation/cublaslt.cpp — the cuBLASLt calls grun makes (kernels/grun/cuda/intervention_mlp.cuh),
// over the emulated device memory of runtime.cpp: descriptors, the heuristic and the matmul
//
//   D = alpha op(A) op(B) + beta C      column-major, fp32 compute (CUBLAS_COMPUTE_32F, fp32 scale)
//
// with the types and shapes cuBLASLt takes and the contracts it holds its caller to, so that a
// mistake in the glue fails here as it would on the device instead of passing on a kind CPU:
//   - the operands' shapes must agree (op(A) [m, k], op(B) [k, n], C and D [m, n]) and every
//     leading dimension cover its rows: else CUBLAS_STATUS_INVALID_VALUE;
//   - A and B share one type of fp32, fp16, bf16 (cuBLASLt does not mix input types), C and D
//     share one, which is fp32 or the inputs' type: else CUBLAS_STATUS_NOT_SUPPORTED;
//   - A, B, C, D and the workspace must be device memory covering what the layouts span, alpha
//     and beta host memory (the default pointer mode);
//   - the algorithm the heuristic returns assumes the alignments the preference promised (256
//     bytes unless told less): a matmul whose addresses or row pitches break that promise is the
//     misaligned access the device would fault on — CUBLAS_STATUS_EXECUTION_FAILED, with the reason
//     on stderr;
//   - with beta = 0, C is not read (cuBLAS's rule: C may hold NaN then).
// The sum over k is fp32 fused multiply-adds in order; cuBLASLt's tensor-core kernels sum in
// another order, so results agree with the device to fp32 rounding, not bitwise.
#include <cuda_emulation.hpp>

#include <cublasLt.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

struct cublasLtContext {};

namespace {

/// The descriptors' contents, kept in the opaque structs' data words (cublasLt.h's semi-opaque types).
struct layout {
  cudaDataType_t type;
  std::uint64_t rows, cols;  // column-major
  std::int64_t ld;
};
struct operation {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  cublasLtPointerMode_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;  // where alpha and beta are: host or device
};
constexpr std::uint32_t default_alignment = 256;  // cuBLASLt's, unless the preference says less
struct preference {
  std::uint64_t max_workspace = 0;
  std::uint32_t alignment[4] = {default_alignment, default_alignment, default_alignment, default_alignment};  // A, B, C, D
};
/// What a heuristic answer carries: the alignments its kernel may assume (a null algo: the defaults).
struct algorithm {
  std::uint32_t magic = 0x6c746d6d;  // "lmmt": an algo the heuristic filled
  std::uint32_t alignment[4] = {default_alignment, default_alignment, default_alignment, default_alignment};
};

template <class S, class Opaque>
S read(const Opaque* o) {
  static_assert(sizeof(S) <= sizeof(o->data) && std::is_trivially_copyable_v<S>);
  S s;
  std::memcpy(&s, o->data, sizeof(S));
  return s;
}
template <class S, class Opaque>
void write(Opaque* o, const S& s) {
  static_assert(sizeof(S) <= sizeof(o->data) && std::is_trivially_copyable_v<S>);
  std::memcpy(o->data, &s, sizeof(S));
}
/// An attribute's value, when the buffer holds exactly one V.
template <class V>
bool value_of(const void* buf, std::size_t bytes, V& out) {
  if (buf == nullptr || bytes != sizeof(V)) return false;
  std::memcpy(&out, buf, sizeof(V));
  return true;
}

std::size_t element_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }
bool storage_type(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }

/// Elements [0, ld (cols − 1) + rows) of a layout: what its matrix spans in memory.
std::size_t span_bytes(const layout& l) {
  if (l.rows == 0 || l.cols == 0) return 0;
  return element_size(l.type) * std::size_t(std::uint64_t(l.ld) * (l.cols - 1) + l.rows);
}

/// The problem a descriptor set describes, checked: m, n, k from the layouts, or a status.
struct problem {
  operation op;
  layout a, b, c, d;
  std::uint64_t m = 0, n = 0, k = 0;
};
cublasStatus_t make_problem(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                            cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D, problem& p) {
  if (!desc || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
  p.op = read<operation>(desc);
  p.a = read<layout>(A);
  p.b = read<layout>(B);
  p.c = read<layout>(C);
  p.d = read<layout>(D);
  if (p.op.compute != CUBLAS_COMPUTE_32F || p.op.scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (p.a.type != p.b.type || !storage_type(p.a.type) || p.c.type != p.d.type ||
      (p.d.type != CUDA_R_32F && p.d.type != p.a.type))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool an = p.op.trans_a == CUBLAS_OP_N, bn = p.op.trans_b == CUBLAS_OP_N;
  p.m = p.d.rows;
  p.n = p.d.cols;
  p.k = an ? p.a.cols : p.a.rows;
  const bool shapes = (an ? p.a.rows : p.a.cols) == p.m && (bn ? p.b.rows : p.b.cols) == p.k &&
                      (bn ? p.b.cols : p.b.rows) == p.n && p.c.rows == p.m && p.c.cols == p.n;
  for (const layout* l : {&p.a, &p.b, &p.c, &p.d})
    if (l->ld < 1 || std::uint64_t(l->ld) < l->rows) return CUBLAS_STATUS_INVALID_VALUE;
  return shapes ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

float load(const void* base, cudaDataType_t t, std::size_t i) {
  switch (t) {
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(base)[i]);
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}
void store(void* base, cudaDataType_t t, std::size_t i, float v) {
  switch (t) {
    case CUDA_R_16F: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    case CUDA_R_16BF: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[i] = v;
  }
}

/// A broken promise to the device: the reason on stderr (the status alone would not name it).
cublasStatus_t refuse(cublasStatus_t status, const char* what, const char* matrix) {
  std::fprintf(stderr, "grun CUDA emulation: cublasLtMatmul: %s %s\n", matrix, what);
  return status;
}

/// The matmul itself (below the runtime calls), as cublasLtMatmul issues it.
void multiply(const problem& p, const void* A, const void* B, const void* C, void* D, float a_scale, float b_scale);

}  // namespace

extern "C" {

// A handle holds nothing here, and grun keeps one per device for the program's life (never
// destroyed, as cuBLASLt allows): one static context serves every handle, so none is a leak at exit.
cublasStatus_t CUBLASWINAPI cublasLtCreate(cublasLtHandle_t* handle) {
  static cublasLtContext the_context;
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = &the_context;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtDestroy(cublasLtHandle_t handle) {
  return handle == nullptr ? CUBLAS_STATUS_NOT_INITIALIZED : CUBLAS_STATUS_SUCCESS;
}
const char* CUBLASWINAPI cublasLtGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS (emulated)";
  }
}

// Init writes a descriptor into space the caller owns (cublasLt.h's inline *Init pass its size);
// Create allocates that space and inits it.
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescInit_internal(cublasLtMatmulDesc_t desc, size_t size,
                                                            cublasComputeType_t compute, cudaDataType_t scale) {
  if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(*desc)) return CUBLAS_STATUS_ALLOC_FAILED;
  *desc = cublasLtMatmulDescOpaque_t{};
  operation op;
  op.compute = compute;
  op.scale = scale;
  write(desc, op);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                                     cudaDataType_t scale) {
  if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *desc = new cublasLtMatmulDescOpaque_t;
  return cublasLtMatmulDescInit(*desc, compute, scale);
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete desc;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                                           const void* buf, size_t bytes) {
  if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  operation op = read<operation>(desc);
  std::int32_t value = 0;
  if (!value_of(buf, bytes, value)) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
    case CUBLASLT_MATMUL_DESC_TRANSB:
      if (value != CUBLAS_OP_N && value != CUBLAS_OP_T) return CUBLAS_STATUS_INVALID_VALUE;
      (attr == CUBLASLT_MATMUL_DESC_TRANSA ? op.trans_a : op.trans_b) = cublasOperation_t(value);
      break;
    case CUBLASLT_MATMUL_DESC_POINTER_MODE:  // single values only: the vector modes are not modelled
      if (value != CUBLASLT_POINTER_MODE_HOST && value != CUBLASLT_POINTER_MODE_DEVICE) return CUBLAS_STATUS_NOT_SUPPORTED;
      op.pointer_mode = cublasLtPointerMode_t(value);
      break;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;  // not modelled: the glue that needs it says so
  }
  write(desc, op);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutInit_internal(cublasLtMatrixLayout_t out, size_t size, cudaDataType type,
                                                              uint64_t rows, uint64_t cols, int64_t ld) {
  if (out == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(*out)) return CUBLAS_STATUS_ALLOC_FAILED;
  *out = cublasLtMatrixLayoutOpaque_t{};
  write(out, layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* out, cudaDataType type, uint64_t rows,
                                                       uint64_t cols, int64_t ld) {
  if (out == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *out = new cublasLtMatrixLayoutOpaque_t;
  return cublasLtMatrixLayoutInit(*out, type, rows, cols, ld);
}
cublasStatus_t CUBLASWINAPI cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceInit_internal(cublasLtMatmulPreference_t pref, size_t size) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (size < sizeof(*pref)) return CUBLAS_STATUS_ALLOC_FAILED;
  *pref = cublasLtMatmulPreferenceOpaque_t{};
  write(pref, preference{});
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *pref = new cublasLtMatmulPreferenceOpaque_t;
  return cublasLtMatmulPreferenceInit(*pref);
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete pref;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t CUBLASWINAPI cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                                 cublasLtMatmulPreferenceAttributes_t attr,
                                                                 const void* buf, size_t bytes) {
  if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  preference p = read<preference>(pref);
  bool ok = false;
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: ok = value_of(buf, bytes, p.max_workspace); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: ok = value_of(buf, bytes, p.alignment[0]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: ok = value_of(buf, bytes, p.alignment[1]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: ok = value_of(buf, bytes, p.alignment[2]); break;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: ok = value_of(buf, bytes, p.alignment[3]); break;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: {  // the emulated matmul never splits k
      std::uint32_t mask = 0;
      ok = value_of(buf, bytes, mask);
      break;
    }
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  for (const std::uint32_t a : p.alignment) ok = ok && a != 0 && (a & (a - 1)) == 0;
  if (!ok) return CUBLAS_STATUS_INVALID_VALUE;
  write(pref, p);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                           cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                           cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                           cublasLtMatmulPreference_t pref, int requested,
                                                           cublasLtMatmulHeuristicResult_t results[], int* returned) {
  if (handle == nullptr || pref == nullptr || requested < 1 || results == nullptr || returned == nullptr)
    return CUBLAS_STATUS_INVALID_VALUE;
  *returned = 0;
  problem p;
  if (const cublasStatus_t s = make_problem(desc, A, B, C, D, p); s != CUBLAS_STATUS_SUCCESS) return s;
  const preference pr = read<preference>(pref);
  algorithm algo;
  std::memcpy(algo.alignment, pr.alignment, sizeof algo.alignment);
  results[0] = cublasLtMatmulHeuristicResult_t{};
  write(&results[0].algo, algo);
  results[0].workspaceSize = 0;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t CUBLASWINAPI cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                           const void* A, cublasLtMatrixLayout_t Adesc, const void* B,
                                           cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                                           cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                                           const cublasLtMatmulAlgo_t* algo_in, void* workspace, size_t workspace_bytes,
                                           cudaStream_t stream) {
  if (handle == nullptr || alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  problem p;
  if (const cublasStatus_t s = make_problem(desc, Adesc, Bdesc, Cdesc, Ddesc, p); s != CUBLAS_STATUS_SUCCESS) return s;
  const algorithm algo = algo_in != nullptr ? read<algorithm>(algo_in) : algorithm{};
  if (algo.magic != algorithm{}.magic) return CUBLAS_STATUS_INVALID_VALUE;
  // The pointer mode says where alpha and beta live; the other memory is a fault (device) or garbage (host).
  const bool on_device = p.op.pointer_mode == CUBLASLT_POINTER_MODE_DEVICE;
  for (const void* scalar : {alpha, beta})
    if (::grun_emu::in_device_memory(scalar, sizeof(float)) != on_device)
      return refuse(CUBLAS_STATUS_INVALID_VALUE,
                    on_device ? "is not device memory (the pointer mode is device)" : "is device memory (the pointer mode is host)",
                    scalar == alpha ? "alpha" : "beta");
  const float a_scale = *static_cast<const float*>(alpha), b_scale = *static_cast<const float*>(beta);
  const struct {
    const void* ptr;
    const layout& l;
    const char* name;
    std::uint32_t alignment;
    bool read;  // C is not read when beta = 0
  } operands[] = {{A, p.a, "A", algo.alignment[0], true},
                  {B, p.b, "B", algo.alignment[1], true},
                  {C, p.c, "C", algo.alignment[2], b_scale != 0.f},
                  {D, p.d, "D", algo.alignment[3], true}};
  for (const auto& o : operands) {
    const std::size_t bytes = span_bytes(o.l);
    if (bytes == 0 || !o.read) continue;
    if (!::grun_emu::in_device_memory(o.ptr, bytes))
      return refuse(CUBLAS_STATUS_INVALID_VALUE, "is not device memory covering its layout", o.name);
    const std::uint64_t pitch = std::uint64_t(o.l.ld) * element_size(o.l.type);
    if ((reinterpret_cast<std::uintptr_t>(o.ptr) | pitch) % o.alignment != 0)
      return refuse(CUBLAS_STATUS_EXECUTION_FAILED, "breaks the alignment its algorithm was chosen for (a misaligned access)",
                    o.name);
  }
  if (workspace_bytes > 0 && !::grun_emu::in_device_memory(workspace, workspace_bytes))
    return refuse(CUBLAS_STATUS_INVALID_VALUE, "is not device memory of the size given", "the workspace");
  // Checked when issued, computed in the stream's order (host scalars taken now, device ones then).
  ::grun_emu::issue(stream, [=] {
    const float as = on_device ? *static_cast<const float*>(alpha) : a_scale;
    const float bs = on_device ? *static_cast<const float*>(beta) : b_scale;
    multiply(p, A, B, C, D, as, bs);
  });
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"

namespace {

/// The dot products of row x [k] of op(A) with every column of op(B), held as bt [k][n] (k-major: the
/// columns' elements at one l are adjacent): out[j] = Σ_l x[l]·bt[l][j], each a chain of fp32 fused
/// multiply-adds in l order from 0 — the same chain whichever way it is run. Generic: one column at a
/// time (std::fma, a libm call without -mfma).
void dots_scalar(const float* x, const float* bt, std::size_t k, std::size_t n, float* out) {
  for (std::size_t j = 0; j < n; ++j) {
    float acc = 0.f;
    for (std::size_t l = 0; l < k; ++l) acc = std::fma(x[l], bt[l * n + j], acc);
    out[j] = acc;
  }
}

#if defined(__x86_64__)
/// dots_scalar for columns j0 … j0 + 31 and ROWS rows of op(A) (x, x + k, …; out, out + n, …) on AVX2 + FMA:
/// 4·ROWS vectors of 8 chains side by side, so the latency of one chain's fma hides behind the others
/// (the scalar loop waited ~4 cycles per multiply-add, through a call) and each loaded vector of bt
/// serves ROWS rows. A vfmadd is a correctly rounded fma per lane: the same bits as dots_scalar.
/// Not instrumented by AddressSanitizer (its checks were most of the loop): it reads only multiply's
/// own buffers, sized there; the operands' bounds are checked as they are widened into them.
constexpr std::size_t avx2_width = 32;
template <int ROWS>
__attribute__((target("avx2,fma"), no_sanitize_address)) void dots_avx2(const float* x, const float* bt, std::size_t k, std::size_t n,
                                                      std::size_t j0, float* out) {
  __m256 acc[ROWS][4];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (std::size_t l = 0; l < k; ++l) {
    const float* b = bt + l * n + j0;
    const __m256 y[4] = {_mm256_loadu_ps(b), _mm256_loadu_ps(b + 8), _mm256_loadu_ps(b + 16), _mm256_loadu_ps(b + 24)};
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xl = _mm256_set1_ps(x[std::size_t(r) * k + l]);
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(xl, y[v], acc[r][v]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + std::size_t(r) * n + 8 * v, acc[r][v]);
}
bool have_avx2_fma() {
  static const bool have = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  return have;
}
#endif

/// Rows [i0, i0 + ROWS) of op(A)·op(B) into out [ROWS][n]: dots_avx2 where it runs (n a multiple of
/// avx2_width then: bt's rows padded with zero columns), else dots_scalar.
template <int ROWS>
void dot_rows(const float* a, const float* bt, std::size_t k, std::size_t n, std::size_t i0, float* out) {
#if defined(__x86_64__)
  if (have_avx2_fma()) {
    for (std::size_t j = 0; j < n; j += avx2_width) dots_avx2<ROWS>(a + i0 * k, bt, k, n, j, out + j);
    return;
  }
#endif
  for (int r = 0; r < ROWS; ++r) dots_scalar(a + (i0 + std::size_t(r)) * k, bt, k, n, out + std::size_t(r) * n);
}

/// D = alpha · op(A) op(B) + beta · C: op(A) as rows of k and op(B) as bt [k][nb] (nb: n, or n rounded
/// up to dots_avx2's width, the extra columns zero), widened to fp32 (each element read once, the
/// layouts' bounds checked by AddressSanitizer there); then D's elements as dot products (dots_scalar's
/// chains), scaled, plus beta · C.
void multiply(const problem& p, const void* A, const void* B, const void* C, void* D, float a_scale, float b_scale) {
  const bool an = p.op.trans_a == CUBLAS_OP_N, bn = p.op.trans_b == CUBLAS_OP_N;
  const std::size_t m = p.m, n = p.n, k = p.k, lda = std::size_t(p.a.ld), ldb = std::size_t(p.b.ld),
                    ldc = std::size_t(p.c.ld), ldd = std::size_t(p.d.ld);
#if defined(__x86_64__)
  const std::size_t nb = have_avx2_fma() ? (n + avx2_width - 1) / avx2_width * avx2_width : n;
#else
  const std::size_t nb = n;
#endif
  // Kept from call to call: fresh vectors of this size were mapped and faulted in by the OS each time.
  constexpr std::size_t pair = 2;  // rows of op(A) per pass over bt
  static thread_local std::vector<float> a, bt, dots, result;  // result: all of D, then stored (C may be D)
  a.resize(m * k);
  dots.resize(pair * nb);
  bt.assign(k * nb, 0.f);
  result.resize(m * n);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t l = 0; l < k; ++l) a[i * k + l] = load(A, p.a.type, an ? i + l * lda : l + i * lda);
  for (std::size_t j = 0; j < n; ++j)
    for (std::size_t l = 0; l < k; ++l) bt[l * nb + j] = load(B, p.b.type, bn ? l + j * ldb : j + l * ldb);
  for (std::size_t i0 = 0; i0 < m; i0 += pair) {
    const std::size_t rows = m - i0 < pair ? m - i0 : pair;
    if (rows == pair) dot_rows<2>(a.data(), bt.data(), k, nb, i0, dots.data());
    else dot_rows<1>(a.data(), bt.data(), k, nb, i0, dots.data());
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t j = 0; j < n; ++j) {
        const std::size_t i = i0 + r;
        float v = a_scale * dots[r * nb + j];
        if (b_scale != 0.f) v = std::fma(b_scale, load(C, p.c.type, i + j * ldc), v);
        result[i + j * m] = v;
      }
  }
  for (std::size_t j = 0; j < n; ++j)
    for (std::size_t i = 0; i < m; ++i) store(D, p.d.type, i + j * ldd, result[i + j * m]);
}

}  // namespace
