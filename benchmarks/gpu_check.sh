#!/usr/bin/env bash
# benchmarks/gpu_check.sh — everything issue 4 asks of a GPU slot, in one go (target: < 5 minutes).
#
#   0. stop at once, before building anything, when nvidia-smi shows no NVIDIA GPU;
#   1. configure + build ONLY the CUDA targets (tests/cuda, benchmarks/cuda) with nvcc, for the GPU
#      present (CMAKE_CUDA_ARCHITECTURES=native unless GRUN_CUDA_ARCHS is set); the tests and
#      bench_cuda build side by side, every CUDA test file is its own TU (ninja -k 0: one broken
#      file does not stop the others). With --prebuilt DIR nothing is built: DIR is a bundle that
#      benchmarks/gpu_bundle.sh made on a machine without a GPU (the way to use a short lent slot,
#      whose machine may lack Boost / Catch2 / nlohmann_json and whose minutes nvcc would spend);
#   2. run the CUDA tests with ctest, or the bundle's test programs (they must PASS here, not skip) —
#      tests/torch_cuda's too, built or run against this machine's torch where it imports;
#   3. run bench_cuda (cudaEvent timings + the D2D copy bandwidth of this run);
#   4. run torch_reference.py (PyTorch eager of the same math, then torch.compile while time remains,
#      Liger's fused cross entropy if liger_kernel imports), if torch imports with CUDA;
#   5. print ONE table (benchmarks/cuda/gpu_table.py): GPU name, grun time, % of copy bandwidth,
#      torch eager / compile times and ratios, issue 4's targets MET / MISSED, the time of each phase.
#
# Usage: benchmarks/gpu_check.sh [--quick] [--no-compile] [--build-dir DIR] [--jobs N] [--prebuilt BUNDLE]
#        benchmarks/gpu_check.sh --table-only RESULTS_FILE
#   --quick       small sizes (checks the script itself in ~1 minute)
#   --no-compile  skip torch.compile (its first compile can take a minute)
#   --table-only  print the table of an earlier run's results file (BUILD_DIR/results.txt); needs no GPU
#   --prebuilt    run the programs of a gpu_bundle.sh bundle instead of building (results still go to
#                 BUILD_DIR)
# Environment:
#   GRUN_CUDA_ARCHS=90          CUDA architectures to build (default: native)
#   GRUN_GPU_CHECK_BUDGET_S=300 the whole run's time budget: torch_reference.py is stopped at its end
#   GRUN_COMPILE_CUTOFF_S=180   no torch.compile pass starts later than this many seconds into the run
#   GRUN_TRY_LIGER=1            pip install --no-deps liger-kernel if it does not import (failure is fine)
#   GRUN_NVIDIA_SMI=nvidia-smi  the device query (tests point it at `false` to act out a GPU-less machine)
# Exit status: 0 all passed; 1 a build, a CUDA test or bench_cuda failed (or tests skipped);
#              2 bad arguments; 3 no NVIDIA GPU visible (nothing was built).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
build="$root/build-gpu-check"
jobs="$(nproc 2>/dev/null || echo 8)"
quick=""
nocompile=""
table_only=""
prebuilt=""
while [[ $# -gt 0 ]]; do
  if [[ $1 == --build-dir || $1 == --jobs || $1 == --table-only || $1 == --prebuilt ]] && [[ $# -lt 2 ]]; then
    echo "gpu_check.sh: $1 needs a value" >&2; exit 2
  fi
  case "$1" in
    --quick) quick="--quick" ;;
    --no-compile) nocompile="--no-compile" ;;
    --build-dir) build="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --table-only) table_only="$2"; shift ;;
    --prebuilt) prebuilt="$(realpath -m "$2")"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [[ -n $table_only ]]; then
  exec python3 "$here/cuda/gpu_table.py" "$table_only"
fi

if [[ -n $prebuilt ]] && [[ ! -f $prebuilt/MANIFEST || ! -f $prebuilt/bin/bench_cuda ]]; then
  echo "gpu_check.sh: --prebuilt $prebuilt: expected a bundle made by benchmarks/gpu_bundle.sh" \
       "(MANIFEST and bin/bench_cuda), found none" >&2
  exit 2
fi

archs="${GRUN_CUDA_ARCHS:-native}"
budget="${GRUN_GPU_CHECK_BUDGET_S:-300}"
compile_cutoff="${GRUN_COMPILE_CUTOFF_S:-180}"
smi="${GRUN_NVIDIA_SMI:-nvidia-smi}"
start=$(date +%s)
log() { printf '[gpu_check %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

# 0. A GPU, or stop before spending minutes on nvcc.
gpu_info="$("$smi" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)" || gpu_info=""
if [[ -z $gpu_info || $gpu_info == *"No devices"* || $gpu_info == *"has failed"* ]]; then
  echo "gpu_check.sh: no NVIDIA GPU visible ('$smi' is missing, failed, or lists no GPU); nothing was built" >&2
  exit 3
fi
log "GPU: $gpu_info"
export PATH="/usr/local/cuda/bin:$PATH"

mkdir -p "$build"
results="$build/results.txt"
{ echo "SMI $gpu_info"; [[ -n $quick ]] && echo "MODE quick"; true; } >"$results"
note() { echo "NOTE $*" >>"$results"; log "$*"; }
phase_start=$start
phase_done() { local now; now=$(date +%s); echo "PHASE $1 $(( now - phase_start ))" >>"$results"; phase_start=$now; }
rc=0

# 1. Build (configure both projects, then the tests and the benchmark side by side) — or take a bundle.
if [[ -n $prebuilt ]]; then
  # A copy that dropped the execute bits (some transfers do) still runs.
  chmod u+x "$prebuilt"/bin/* 2>/dev/null || true
  log "prebuilt bundle $prebuilt: $(tr '\n' ';' <"$prebuilt/MANIFEST")"
  note "prebuilt bundle: $(head -n 1 "$prebuilt/MANIFEST")"
  here_commit="$(git -C "$root" rev-parse HEAD 2>/dev/null || true)"
  if [[ -n $here_commit ]] && ! grep -q "^commit $here_commit" "$prebuilt/MANIFEST"; then
    note "the bundle was built from another commit than this tree's $here_commit"
  fi
  # cuBLASLt (0.5 GB) is not in the bundle: the GPU machine's CUDA toolkit or PyTorch's wheels have it.
  wheel_libs="$(python3 - 2>/dev/null <<'PY' || true
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "libcublasLt.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)"
  export LD_LIBRARY_PATH="$prebuilt/lib:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib${wheel_libs:+:$wheel_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cuda_test_programs=("$prebuilt"/bin/test_cuda_* "$prebuilt/bin/device_loop_cuda")
  bench_bin="$prebuilt/bin/bench_cuda"
  # The libtorch adapter on CUDA tensors runs against this machine's torch (its libtorch_cpu and the
  # libtorch_cuda it loads), which must be the version the bundle linked it with.
  if [[ -f $prebuilt/bin/test_torch_adapter_cuda ]]; then
    linked="$(sed -n 's/^torch //p' "$prebuilt/MANIFEST")"
    machine_torch="$(python3 -c 'import os, torch; print(torch.__version__.split("+")[0], os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null || true)"
    if [[ -z $machine_torch ]]; then
      note "test_torch_adapter_cuda not run: torch does not import on this machine"
    elif [[ ${machine_torch%% *} != "$linked" ]]; then
      note "test_torch_adapter_cuda not run: the bundle linked it with torch $linked, this machine has ${machine_torch%% *}"
    else
      export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:${machine_torch#* }"
      cuda_test_programs+=("$prebuilt/bin/test_torch_adapter_cuda")
    fi
  fi
  missing="$(ldd "${cuda_test_programs[@]}" "$bench_bin" 2>/dev/null | grep "not found" | sort -u | tr -d '\t' | tr '\n' ' ' || true)"
  [[ -n $missing ]] && note "shared libraries not found for the bundle's programs: $missing(LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
  phase_done build
else
  # 1. Configure both projects, then build the tests and the benchmark side by side.
  log "configure ($build, CUDA archs: $archs)"
  # The libtorch adapter's CUDA test builds against this machine's torch where it imports.
  torch_pkg="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRUN_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$archs" -DGRUN_BUILD_BENCHMARKS=OFF -DGRUN_BUILD_EXAMPLES=ON \
    ${torch_pkg:+-DGRUN_TORCH_CUDA_DIR="$torch_pkg"} >"$build/gpu_check.configure.log" 2>&1 \
    || { cat "$build/gpu_check.configure.log"; exit 1; }
  # The benchmark is configured standalone so nothing but the CUDA targets is compiled.
  cmake -S "$here/cuda" -B "$build/bench" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$archs" \
    >"$build/gpu_check.bench-configure.log" 2>&1 || { cat "$build/gpu_check.bench-configure.log"; exit 1; }
  phase_done configure
  cuda_tests=$(cd "$root/tests/cuda" && ls test_cuda_*.cu | sed 's/\.cu$//' | tr '\n' ' ')
  # examples/device_loop: the whole training loop on the device, next to the host run (ctest label cuda).
  cuda_tests+="device_loop_cuda "
  ninja -C "$build" -t targets all 2>/dev/null | grep -q '^test_torch_adapter_cuda:' && cuda_tests+="test_torch_adapter_cuda "
  log "build with -j $jobs: bench_cuda and CUDA tests $cuda_tests(logs: $build/gpu_check.*.log)"
  cmake --build "$build/bench" -j "$jobs" >"$build/gpu_check.bench-build.log" 2>&1 &
  bench_build_pid=$!
  if ! cmake --build "$build" -j "$jobs" --target $cuda_tests -- -k 0 >"$build/gpu_check.build.log" 2>&1; then
    grep -E "error|FAILED" "$build/gpu_check.build.log" | head -n 40 >&2 || true
    note "building the CUDA tests FAILED (the tests that built still run; see $build/gpu_check.build.log)"
    rc=1
  fi
  if ! wait $bench_build_pid; then
    grep -E "error|FAILED" "$build/gpu_check.bench-build.log" | head -n 40 >&2 || true
    note "building bench_cuda FAILED (see $build/gpu_check.bench-build.log)"
    rc=1
  fi
  phase_done build
  bench_bin="$build/bench/bench_cuda"
fi

# 2. The CUDA tests: on a GPU every one must pass, none may skip.
log "CUDA tests"
if [[ -n $prebuilt ]]; then
  # Each program runs all its cases (bad-input and device), four programs at a time; exit 0 passed,
  # 77 skipped (no device, or too little free device memory for a large case), anything else failed
  # (124: stopped after 120 s).
  status_file="$build/gpu_check.test-status.txt"
  : >"$status_file"
  printf '%s\n' "${cuda_test_programs[@]}" | xargs -P 4 -I{} bash -c \
    'name=$(basename "$1"); code=0; timeout 120 "$1" >"$2/gpu_check.test.$name.log" 2>&1 || code=$?; echo "$name $code" >>"$3"' \
    _ {} "$build" "$status_file"
  passed=0; failed=0; skipped=0
  while read -r name code; do
    tail -n 2 "$build/gpu_check.test.$name.log" | sed "s/^/[$name] /"
    case $code in
      0) passed=$((passed + 1)) ;;
      77) skipped=$((skipped + 1)); log "$name: SKIPPED (no CUDA device, or too little free device memory; see its log)" ;;
      *) failed=$((failed + 1)); log "$name: FAILED (exit $code); its last lines:"; tail -n 40 "$build/gpu_check.test.$name.log" ;;
    esac
  done < <(sort "$status_file")
  summary="$passed of ${#cuda_test_programs[@]} test programs passed, $failed failed, $skipped skipped"
  log "$summary (logs: $build/gpu_check.test.*.log)"
  (( failed > 0 )) && { note "CUDA tests FAILED: $summary"; rc=1; }
  (( skipped > 0 )) && { note "CUDA tests were SKIPPED — no CUDA device, or too little free device memory (see the logs)"; rc=1; }
else
  (cd "$build" && ctest -L cuda --output-on-failure --timeout 120 -j 4 2>&1) | tee "$build/gpu_check.ctest.log" || true
  if ! grep -q "tests passed, 0 tests failed" "$build/gpu_check.ctest.log"; then
    note "CUDA tests FAILED: $(grep -E "tests passed|tests failed" "$build/gpu_check.ctest.log" | tail -n 1)"
    rc=1
  fi
  if grep -q "(Skipped)" "$build/gpu_check.ctest.log"; then
    note "CUDA tests were SKIPPED — no CUDA device, or too little free device memory (see the logs)"
    rc=1
  fi
fi
phase_done tests

# 3. grun's timings.
log "bench_cuda $quick"
if [[ -x "$bench_bin" ]]; then
  bench_rc=0
  timeout 150 "$bench_bin" $quick | tee -a "$results" || bench_rc=$?
  if (( bench_rc == 77 )); then
    note "bench_cuda saw no CUDA device (exit 77): no grun timings"
    rc=1
  elif (( bench_rc != 0 )); then
    note "bench_cuda failed (exit $bench_rc; 124: stopped after 150 s); the table shows what it printed"
    rc=1
  fi
else
  note "bench_cuda was not built: no grun timings"
fi
phase_done bench_cuda

# 4. PyTorch (and Liger) on the same math; torch.compile only while time remains.
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  if [[ "${GRUN_TRY_LIGER:-0}" == 1 ]] && ! python3 -c "import liger_kernel" 2>/dev/null; then
    # --no-deps: never let pip replace the installed torch / triton.
    log "GRUN_TRY_LIGER=1: pip install --no-deps liger-kernel (90 s at most)"
    timeout 90 python3 -m pip install --quiet --no-deps liger-kernel >"$build/gpu_check.liger-install.log" 2>&1 \
      || note "pip install liger-kernel failed or timed out (no network?); no Liger rows"
  fi
  elapsed=$(( $(date +%s) - start ))
  if [[ -n $nocompile ]]; then
    compile_args=(--no-compile)
    note "torch.compile skipped (--no-compile)"
  elif (( elapsed > compile_cutoff )); then
    compile_args=(--no-compile)
    note "torch.compile skipped: ${elapsed} s elapsed before PyTorch started, past the ${compile_cutoff} s cutoff (GRUN_COMPILE_CUTOFF_S)"
  else
    compile_args=(--compile-deadline $(( start + compile_cutoff )))
  fi
  torch_limit=$(( budget - elapsed - 10 ))
  (( torch_limit < 60 )) && torch_limit=60
  log "torch_reference.py $quick ${compile_args[*]} (stopped after $torch_limit s)"
  timeout "$torch_limit" python3 "$here/cuda/torch_reference.py" $quick "${compile_args[@]}" | tee -a "$results" \
    || note "torch_reference.py failed or was stopped after $torch_limit s; the table shows what finished"
  phase_done torch
else
  note "PyTorch with CUDA not importable: table without torch columns"
fi

# 5. The table.
log "table"
python3 "$here/cuda/gpu_table.py" "$results" || rc=1
total=$(( $(date +%s) - start ))
(( total > budget )) && log "over the ${budget} s budget (GRUN_GPU_CHECK_BUDGET_S)"
log "done in $total s (exit $rc); results: $results (reprint: $0 --table-only $results)"
exit $rc
