#!/usr/bin/env bash
# benchmarks/gpu_check.sh — everything issue 4 asks of a GPU slot, in one go (target: < 5 minutes).
#
#   1. configure + build ONLY the CUDA targets (tests/cuda, benchmarks/cuda) with nvcc,
#      for the GPU present (CMAKE_CUDA_ARCHITECTURES=native unless GRUN_CUDA_ARCHS is set);
#   2. run the CUDA tests with ctest (they must PASS here, not skip);
#   3. run bench_cuda (cudaEvent timings + the D2D copy bandwidth of this run);
#   4. run torch_reference.py (PyTorch eager and torch.compile of the same math), if torch imports;
#   5. print ONE table: grun time, % of copy bandwidth, torch eager / compile times and ratios.
#
# Usage: benchmarks/gpu_check.sh [--quick] [--no-compile] [--build-dir DIR] [--jobs N]
#   --quick       small sizes (checks the script itself in ~1 minute)
#   --no-compile  skip torch.compile (its first compile can take a minute)
# Exit status: non-zero when the build or a CUDA test fails, or no GPU is visible.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="$root/build-gpu-check"
jobs="$(nproc 2>/dev/null || echo 8)"
quick=""
nocompile=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --no-compile) nocompile="--no-compile" ;;
    --build-dir) build="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
archs="${GRUN_CUDA_ARCHS:-native}"
start=$(date +%s)
log() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PATH="/usr/local/cuda/bin:$PATH"

log "configure ($build, CUDA archs: $archs)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRUN_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DGRUN_BUILD_BENCHMARKS=OFF -DGRUN_BUILD_EXAMPLES=OFF >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cuda_tests=$(cd "$root/tests/cuda" && ls test_cuda_*.cu | sed 's/\.cu$//' | tr '\n' ' ')
log "build CUDA tests: $cuda_tests"
cmake --build "$build" -j "$jobs" --target $cuda_tests
# The benchmark is built standalone so nothing but the CUDA targets is compiled.
log "build bench_cuda"
cmake -S "$here/cuda" -B "$build/bench" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  >"$build.bench-configure.log" 2>&1 || { cat "$build.bench-configure.log"; exit 1; }
cmake --build "$build/bench" -j "$jobs"

log "CUDA tests"
test_rc=0
(cd "$build" && ctest -L cuda --output-on-failure 2>&1) | tee "$build.ctest.log" || true
grep -q "tests passed, 0 tests failed" "$build.ctest.log" || test_rc=1
if grep -q "(Skipped)" "$build.ctest.log"; then
  echo "gpu_check.sh: CUDA tests were SKIPPED — the tests saw no CUDA device" >&2
  test_rc=1
fi

log "bench_cuda $quick"
results="$build/results.txt"
"$build/bench/bench_cuda" $quick | tee "$results"

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "torch_reference.py $quick $nocompile"
  timeout 200 python3 "$here/cuda/torch_reference.py" $quick $nocompile | tee -a "$results" \
    || echo "gpu_check.sh: torch_reference.py failed or timed out; table shows what finished" >&2
else
  echo "gpu_check.sh: PyTorch with CUDA not importable; table without torch columns" >&2
fi

log "table"
python3 - "$results" <<'PY'
import sys
ms, nbytes, device, torch_info = {}, {}, "?", ""
for line in open(sys.argv[1]):
    p = line.split()
    if not p: continue
    if p[0] == "DEVICE": device = " ".join(p[1:])
    elif p[0] == "TORCH": torch_info = " ".join(p[1:])
    elif p[0] == "RESULT":
        ms[p[1]] = float(p[2])
        if len(p) > 3: nbytes[p[1]] = float(p[3])
copy_gbs = nbytes["copy_d2d"] / ms["copy_d2d"] / 1e6 if "copy_d2d" in ms else float("nan")
print(f"\nGPU: {device}   copy bandwidth (cudaMemcpy D2D, read+write): {copy_gbs:.0f} GB/s   {torch_info}")
rows = [
  ("intervention_linear_loreft4_fwd", "fused fwd linear+loreft4 d=4096 T=16384 bf16", "fwd"),
  ("intervention_linear_loreft4_fwd_inplace", "  same, in place (out = h)", "fwd"),
  ("intervention_linear_loreft4_fwdbwd", "fused fwd+bwd linear+loreft4 (same sizes)", "fwdbwd"),
  ("intervention_linear_direft4_fwd", "fused fwd linear+direft4 d=4096 T=16384 bf16", "fwd"),
  ("intervention_linear_direft4_fwd_inplace", "  same, in place (out = h)", "fwd"),
  ("intervention_linear_direft4_fwdbwd", "fused fwd+bwd linear+direft4 (same sizes)", "fwdbwd"),
  ("intervention_linear_loreft4_generic_fwd", "generic fwd linear+loreft4 T=1024 (fallback)", ""),
  ("intervention_linear_loreft4_generic_fwdbwd", "generic fwd+bwd linear+loreft4 T=1024", ""),
  ("intervention_mlp_loreft4_fwd", "mlp<256,64>+loreft4 fwd (cuBLASLt) T=16384", ""),
  ("intervention_mlp_loreft4_fwd_inplace", "  same, in place (out = h)", ""),
  ("intervention_mlp_loreft4_fwdbwd", "mlp<256,64>+loreft4 fwd+bwd (cuBLASLt) T=16384", ""),
  ("nll_fwd", "NLL fwd T=8192 V=131072 bf16", ""),
  ("nll_fwdbwd", "NLL fwd+bwd T=8192 V=131072 bf16", "rw"),
  ("kl_fwd", "KL fwd T=8192 V=131072 bf16", ""),
  ("kl_fwdbwd", "KL fwd+bwd T=8192 V=131072 bf16", "rw"),
  ("adamw_mlp_loreft4", "AdamW mlp+loreft4 d=4096 (1 launch)", ""),
]
def verdict(kind, pct, rw, eager_ratio):
    # Issue 4's targets (H100): fwd ≥ 70% of copy BW; fwd+bwd ≥ 5× eager; NLL fwd+bwd ≤ 2× read+write
    # (kind "rw": time ≤ 2× that of moving the row's own minimal bytes at copy bandwidth; KL too).
    if kind == "fwd": return f"≥70% copy BW: {'MET' if pct >= 70 else 'MISSED'}"
    if kind == "fwdbwd":
        return "≥5× eager: " + ("-" if eager_ratio is None else ("MET" if eager_ratio >= 5 else "MISSED"))
    if kind == "rw": return f"≤2× read+write: {'MET' if rw <= 2 else 'MISSED'}"
    return ""
hdr = f"{'computation':48} {'grun ms':>9} {'GB/s':>7} {'% copy':>7} {'×(r+w)':>7} {'eager ms':>9} {'eager/grun':>10} {'compile ms':>10} {'comp/grun':>9}  target"
print(hdr); print("-" * len(hdr))
for key, label, kind in rows:
    if key not in ms: continue
    t = ms[key]; b = nbytes.get(key, 0)
    gbs = b / t / 1e6 if t else 0
    pct = 100 * gbs / copy_gbs if copy_gbs == copy_gbs else float("nan")
    rw = t / (b / copy_gbs / 1e6) if kind == "rw" and b else float("nan")
    e, c = ms.get(key + "_eager"), ms.get(key + "_compile")
    f = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}"
    rr = lambda v: f"{v / t:9.2f}×" if v is not None else f"{'-':>10}"
    rws = f"{rw:7.2f}" if rw == rw else f"{'':>7}"
    print(f"{label:48} {t:9.3f} {gbs:7.0f} {pct:6.1f}% {rws} {f(e)} {rr(e)} {f(c):>10} {rr(c)}  "
          f"{verdict(kind, pct, rw, None if e is None else e / t)}")
PY
log "done (tests rc=$test_rc)"
exit $test_rc
