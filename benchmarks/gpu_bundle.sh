#!/usr/bin/env bash
# benchmarks/gpu_bundle.sh — build, on a machine WITHOUT a GPU, everything gpu_check.sh runs on one,
# into a folder small enough to travel with the working tree to a short GPU slot.
#
# Why: a lent GPU machine is described as having nvcc, CMake and PyTorch; the development packages
# grun's build finds (Boost, Catch2, nlohmann_json) are not listed, nothing can be fetched there,
# and every minute of its time counts; nvcc spends minutes on
# the CUDA tests. Built here (same nvcc 13.0; glibc ≥ 2.34, libstdc++ of GCC 12 needed there), the
# slot only runs the programs:
#
#   benchmarks/gpu_bundle.sh                              # here: ~16 min of nvcc on 2 cores
#   benchmarks/gpu_check.sh --prebuilt build-gpu-bundle   # there: tests, bench_cuda, PyTorch, table
#   benchmarks/gpu_slot.sh --bundle build-gpu-bundle.tar.gz   # or: the whole call, from the archive
#
# The bundle: bin/ (every tests/cuda test, examples' device_loop_cuda, bench_cuda, and
# tests/torch_cuda's test_torch_adapter_cuda where a CUDA libtorch was fetched; stripped),
# lib/ (libcudart.so.13, and the tests' shared cases, libgrun_cuda_test_instances.so; cuBLASLt,
# 0.5 GB, is taken from the GPU machine's CUDA or PyTorch; the scripts put lib/ on LD_LIBRARY_PATH), and
# MANIFEST (the commit, whether the tree had changes, the architectures, nvcc's version, the torch
# version test_torch_adapter_cuda was linked with). It is
# written to DIR.tmp and renamed to DIR only when complete: a failed build never leaves a bundle.
# The same bundle is also written as DIR.tar.gz (about 43% of the folder's size): a device call carries
# at most 64 MiB with the working tree and the folder alone is ~79 MiB, so carry the archive
# (gpu_slot.sh --bundle DIR.tar.gz unpacks it there). It too is written under a temporary name first.
#
# Usage: benchmarks/gpu_bundle.sh [--out DIR] [--jobs N]
#   --out DIR   the bundle (default: build-gpu-bundle in the repository root; build-* is git-ignored)
#   --jobs N    parallel nvcc jobs (default: nproc)
# Environment: GRUN_CUDA_ARCHS=90  architectures to build (90: H100 and H200)
# Exit status: 0 bundle written; 1 a build failed; 2 bad arguments.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="$root/build-gpu-bundle"
jobs="$(nproc 2>/dev/null || echo 2)"
while [[ $# -gt 0 ]]; do
  if [[ $1 == --out || $1 == --jobs ]] && [[ $# -lt 2 ]]; then
    echo "gpu_bundle.sh: $1 needs a value" >&2; exit 2
  fi
  case "$1" in
    --out) out="$(realpath -m "$2")"; shift ;;
    --jobs) jobs="$2"; shift ;;
    *) echo "gpu_bundle.sh: unknown argument $1 (expected --out DIR or --jobs N)" >&2; exit 2 ;;
  esac
  shift
done
archs="${GRUN_CUDA_ARCHS:-90}"
start=$(date +%s)
log() { printf '[gpu_bundle %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
export PATH="/usr/local/cuda/bin:$PATH"
command -v nvcc >/dev/null || { echo "gpu_bundle.sh: nvcc not found (expected CUDA 13 under /usr/local/cuda)" >&2; exit 1; }

# The build trees are kept next to the bundle (DIR.build) so a second run only rebuilds what changed.
build="$out.build"
staging="$out.tmp"
rm -rf "$staging"
mkdir -p "$build" "$staging/bin" "$staging/lib"

log "configure ($build, CUDA archs: $archs)"
cmake -S "$root" -B "$build/grun" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRUN_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DGRUN_BUILD_BENCHMARKS=OFF -DGRUN_BUILD_EXAMPLES=ON \
  >"$build/configure.log" 2>&1 || { cat "$build/configure.log" >&2; exit 1; }
cmake -S "$here/cuda" -B "$build/bench" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  >"$build/bench-configure.log" 2>&1 || { cat "$build/bench-configure.log" >&2; exit 1; }

tests=$(cd "$root/tests/cuda" && ls test_cuda_*.cu | sed 's/\.cu$//' | tr '\n' ' ')
# tests/torch_cuda's program exists where configure found a CUDA libtorch (cmake/fetch_torch_cuda.sh).
torch_target=""
if ninja -C "$build/grun" -t targets all 2>/dev/null | grep -q '^test_torch_adapter_cuda:'; then
  torch_target=test_torch_adapter_cuda
else
  log "no CUDA libtorch configured (run cmake/fetch_torch_cuda.sh): the bundle has no test_torch_adapter_cuda"
fi
log "build with -j $jobs: $tests device_loop_cuda $torch_target bench_cuda (logs: $build/*.log)"
cmake --build "$build/grun" -j "$jobs" --target $tests device_loop_cuda $torch_target >"$build/build.log" 2>&1 \
  || { grep -E "error|FAILED" "$build/build.log" | head -n 40 >&2; echo "gpu_bundle.sh: build failed, no bundle written" >&2; exit 1; }
cmake --build "$build/bench" -j "$jobs" >"$build/bench-build.log" 2>&1 \
  || { grep -E "error|FAILED" "$build/bench-build.log" | head -n 40 >&2; echo "gpu_bundle.sh: bench_cuda failed, no bundle written" >&2; exit 1; }

for t in $tests; do cp "$build/grun/tests/cuda/$t" "$staging/bin/"; done
cp "$build/grun/examples/device_loop_cuda" "$build/bench/bench_cuda" "$staging/bin/"

# The libtorch adapter on CUDA tensors (built above where a CUDA libtorch was found): it runs there
# against the GPU machine's own torch, which must be the version it was linked with.
torch_version=""
if [[ -n $torch_target ]]; then
  cp "$build/grun/tests/torch_cuda/test_torch_adapter_cuda" "$staging/bin/"
  torch_dir="$(sed -n 's/^GRUN_TORCH_CUDA_DIR:PATH=//p' "$build/grun/CMakeCache.txt")"
  torch_version="$(cat "$torch_dir/VERSION" 2>/dev/null || echo unknown)"
fi
cp "$build/grun/tests/cuda/libgrun_cuda_test_instances.so" "$staging/lib/"
strip "$staging"/bin/*
strip --strip-unneeded "$staging"/lib/libgrun_cuda_test_instances.so
cudart="$(ldd "$staging/bin/bench_cuda" | awk '/libcudart\.so/ { print $3 }')"
[[ -n $cudart ]] && cp -L "$cudart" "$staging/lib/"

# Every test program starts from the bundle, as it will there (its [nodevice] cases need no GPU): a
# library left out of lib/ fails here, not in the slot.
for t in $tests; do
  LD_LIBRARY_PATH="$staging/lib" "$staging/bin/$t" "[nodevice]" >"$build/nodevice-$t.log" 2>&1 \
    || { tail -n 20 "$build/nodevice-$t.log" >&2; echo "gpu_bundle.sh: $t does not run from the bundle, no bundle written" >&2; exit 1; }
done

commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
dirty="$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | head -c1)"
{
  echo "commit $commit${dirty:+ (with uncommitted changes)}"
  echo "archs $archs"
  echo "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -n)"
  echo "tests $tests"
  [[ -n $torch_version ]] && echo "torch $torch_version"
  true
} >"$staging/MANIFEST"

rm -rf "$out"
mv "$staging" "$out"
tar czf "$out.tar.gz.tmp" -C "$out" . && mv "$out.tar.gz.tmp" "$out.tar.gz" \
  || { rm -f "$out.tar.gz.tmp"; echo "gpu_bundle.sh: could not write $out.tar.gz" >&2; exit 1; }
size=$(du -sm "$out" | cut -f1)
packed=$(( ($(stat -c %s "$out.tar.gz") + 1048575) / 1048576 ))
log "bundle $out: ${size} MiB; archive $out.tar.gz: ${packed} MiB (a device call carries at most 64 MiB with the working tree: carry the archive)"
(( packed > 56 )) && log "warning: the archive leaves under 8 MiB of the 64 MiB a device call carries for the working tree and wheels"
cat "$out/MANIFEST"
