#!/usr/bin/env bash
# benchmarks/gpu_slot.sh — one call on a lent GPU machine, everything in it: gpu_check.sh on a prebuilt
# bundle (tests, bench_cuda, PyTorch / Liger, the table), bench_cuda's extra groups, ncu on the fused
# intervention kernels and on every kernel of one call of four fwd+bwd rows, compute-sanitizer
# (memcheck on the intervention test programs, racecheck and synccheck on the fused kernels'
# program). Each step is bounded; what it wrote lands in OUT (at most 8 files, for transfers that
# return few files).
#
# Usage: benchmarks/gpu_slot.sh [--bundle DIR] [--out DIR] [--wheels DIR]
#   --bundle  a bundle from benchmarks/gpu_bundle.sh: its folder, or its .tar.gz (unpacked here into a
#             temporary folder)      (default: build-gpu-bundle, else build-gpu-bundle.tar.gz)
#   --out     where results go                               (default: $OUT, else gpu-slot-out)
#   --wheels  Python wheels to install first with --no-deps into a private target (e.g. liger-kernel,
#             which the lent machines lack and cannot fetch)
# Files in OUT: env.txt, gpu_check.log, results.txt (gpu_check.sh --table-only reprints the table),
# extra.txt (bench_cuda --only intervention_scaling), fastest.txt (the table again with the fastest
# measured schedules as the run's defaults), ncu.txt (the kernels' profiles, then step 3b's per-kernel
# times), memcheck.txt (every compute-sanitizer run's summary), logs.tgz (every log).
# Exit status: gpu_check.sh's (0 all passed; 1 a test or bench_cuda failed; 2 bad arguments; 3 no GPU).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
bundle=""
out="${OUT:-$root/gpu-slot-out}"
wheels=""
while [[ $# -gt 0 ]]; do
  if [[ $# -lt 2 ]]; then echo "gpu_slot.sh: $1 needs a value" >&2; exit 2; fi
  case "$1" in
    --bundle) bundle="$(realpath -m "$2")" ;;
    --out) out="$2" ;;
    --wheels) wheels="$2" ;;
    *) echo "gpu_slot.sh: unknown argument $1 (expected --bundle, --out, --wheels)" >&2; exit 2 ;;
  esac
  shift 2
done
if [[ -z $bundle ]]; then
  bundle="$root/build-gpu-bundle"
  [[ ! -d $bundle && -f $bundle.tar.gz ]] && bundle="$bundle.tar.gz"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ -f $bundle ]]; then
  # The archive gpu_bundle.sh writes beside the folder (the folder alone is near a device call's 64 MiB).
  mkdir -p "$work/bundle"
  if ! tar xzf "$bundle" -C "$work/bundle" 2>"$work/untar.log"; then
    echo "gpu_slot.sh: --bundle $bundle: expected a .tar.gz made by benchmarks/gpu_bundle.sh, could not unpack it:" \
      "$(head -c 300 "$work/untar.log")" >&2
    exit 2
  fi
  bundle="$work/bundle"
fi
if [[ ! -f $bundle/MANIFEST || ! -f $bundle/bin/bench_cuda ]]; then
  echo "gpu_slot.sh: --bundle $bundle: expected a bundle made by benchmarks/gpu_bundle.sh (MANIFEST, bin/), found none" >&2
  exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/env.txt" 2>&1
uname -r >>"$out/env.txt"
if [[ -n $wheels ]] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$wheels"/*.whl \
    >>"$out/env.txt" 2>&1 && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. The check itself (its own budget: 240 s; no torch.compile pass starts after 150 s).
GRUN_GPU_CHECK_BUDGET_S="${GRUN_GPU_CHECK_BUDGET_S:-240}" GRUN_COMPILE_CUTOFF_S="${GRUN_COMPILE_CUTOFF_S:-150}" \
  bash "$here/gpu_check.sh" --prebuilt "$bundle" --build-dir "$work/gc" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check.sh exit $rc after $(elapsed) s" | tee -a "$out/gpu_check.log"
cp "$work/gc/results.txt" "$out/" 2>/dev/null
(( rc == 3 )) && exit 3

# The bundle's programs outside gpu_check.sh: its libcudart, the machine's cuBLASLt.
lt="$(dirname "$(find /usr/local /opt -name 'libcublasLt.so.1*' 2>/dev/null | head -n 1)" 2>/dev/null)"
export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64${lt:+:$lt}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$bundle/bin"
chmod u+x "$bin"/* 2>/dev/null

# 2. bench_cuda's groups outside the table's main rows.
timeout 60 "$bin/bench_cuda" --only intervention_scaling >"$out/extra.txt" 2>&1

# 2b. The fastest measured schedules as the run's defaults (gpu_table.py --fastest-flags: the loreft4
# forward's and fwd+bwd's): the intervention target rows timed again under those bench_cuda options,
# and the table over them (the first run's other rows, PyTorch's included) — where the targets would
# stand were they the library's defaults, measured in the same call: the flip to make next.
flags="$(python3 "$here/cuda/gpu_table.py" --fastest-flags "$out/results.txt" 2>/dev/null)"
if [[ -n $flags ]]; then
  # The first run's lines but the rows timed again and its SCHEDULES line: a row the second run does
  # not print then shows as not measured, not as the first run's default.
  grep -v -E '^(SCHEDULES |RESULT intervention_linear_(loreft4|direft4)_(fwd|fwd_inplace|fwdbwd|fwdbwd_saved) )' \
    "$out/results.txt" >"$work/fastest_results.txt"
  # shellcheck disable=SC2086  # the options, one word each
  timeout 60 "$bin/bench_cuda" --only intervention_linear_loreft4,intervention_linear_direft4 $flags 2>&1 |
    grep -E '^(RESULT|SCHEDULES|FAILED) ' >>"$work/fastest_results.txt"
  { echo "bench_cuda $flags: the fastest measured schedules as the run's defaults (the rows they move are timed again)"
    python3 "$here/cuda/gpu_table.py" "$work/fastest_results.txt"; } >"$out/fastest.txt" 2>&1
else
  echo "the library's default schedules were the fastest measured (or no table): nothing timed again" >"$out/fastest.txt"
fi
cat "$out/fastest.txt"
echo "fastest schedules done after $(elapsed) s"

# 3. ncu on the fused intervention kernels (one launch each; --clock-control none leaves the clocks alone),
# then the kernels of one call of four fwd+bwd rows (3b). A profile not started by ncu_until_s seconds
# into the call is skipped (and says so), so that step 4 runs within a device call's limit whatever
# the steps before it took.
ncu_until_s="${GRUN_SLOT_NCU_UNTIL_S:-330}"
ncu_in_time() {  # $1: what would be profiled
  (( $(elapsed) <= ncu_until_s )) && return 0
  echo "== $1: skipped, $(elapsed) s into the call (profiles start until ${ncu_until_s} s)" >>"$out/ncu.txt"
  return 1
}
ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
: >"$out/ncu.txt"
if [[ -n $ncu ]]; then
  # Each kernel under the bench_cuda options that make its schedule the run's default, so that -c 1
  # takes its first launch in the loreft4 group's default rows (coef_kernel --saved: the variant that
  # reads the forward's kept values). The two l1tex metrics: shared-memory load bank conflicts against
  # all shared-load wavefronts.
  for job in "forward_tensor_kernel --schedule tensor" "forward_tensor_kernel --schedule tensor_apply" \
             "forward_tensor_kernel --schedule tensor_pipelined" "forward_kernel --schedule stream" \
             "forward_kernel --schedule resident" "coef_kernel --coef-schedule stream" "coef_kernel --saved" \
             "coef_tensor_kernel --coef-schedule tensor" "slot_kernel --slot-schedule cuda_cores" \
             "slot_tensor_kernel --slot-schedule tensor" "sum_slots_kernel --slot-schedule cuda_cores"; do
    # shellcheck disable=SC2086  # a kernel's name, then its options, one word each
    set -- $job
    kernel=$1
    shift
    ncu_in_time "ncu $kernel (bench_cuda $*)" || continue
    echo "== ncu $kernel (bench_cuda $*)" >>"$out/ncu.txt"
    timeout 40 "$ncu" --clock-control none -k "regex:$kernel" -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats \
      --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum \
      "$bin/bench_cuda" --only intervention_linear_loreft4 "$@" >>"$out/ncu.txt" 2>&1 ||
      echo "ncu $kernel ($*): exit $?" >>"$out/ncu.txt"
  done
  # 3b. Every kernel of one call of the fwd+bwd rows whose time has more than one or two kernels in it
  # (the mlp gate's cuBLASLt matmuls and elementwise steps, the backward's packing and slot sums, the
  # user gate's row kernels): bench_cuda --profile runs the row's call once more between
  # cudaProfilerStart/Stop, ncu times each kernel of it, kernel_times.py lists them beside the row's
  # median (what is left is time between kernels).
  for job in "intervention_mlp_loreft4 intervention_mlp_loreft4_fwdbwd" \
             "intervention_mlp_loreft4 intervention_mlp_loreft4_fwdbwd_saved" \
             "intervention_linear_loreft4 intervention_linear_loreft4_fwdbwd" \
             "intervention_user_gate_loreft4 intervention_user_gate_loreft4_fwdbwd"; do
    # shellcheck disable=SC2086  # a bench_cuda group, then its row
    set -- $job
    ncu_in_time "kernels of one $2 call" || continue
    echo "== ncu --profile-from-start off: bench_cuda --only $1 --profile $2" >>"$out/ncu.txt"
    timeout 45 "$ncu" --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
      --log-file "$work/kernels.$2.csv" "$bin/bench_cuda" --only "$1" --profile "$2" >"$work/kernels.$2.log" 2>&1 ||
      echo "ncu --profile $2: exit $?" >>"$out/ncu.txt"
    python3 "$here/cuda/kernel_times.py" --row "$2" --results "$out/results.txt" "$work/kernels.$2.csv" \
      >>"$out/ncu.txt" 2>&1
  done
else
  echo "no ncu on this machine" >"$out/ncu.txt"
fi
echo "ncu done after $(elapsed) s"

# 4. compute-sanitizer, six runs side by side, 90 s each at most: memcheck on four programs, and racecheck
# (shared-memory hazards) and synccheck (barriers) on the fused intervention kernels, the schedules that
# stage tiles and parameters in shared memory — what the CPU emulation's alternating thread order
# checks only as far as interleavings go. A run cut short by the limit says so (exit 124).
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)"
: >"$out/memcheck.txt"
if [[ -n $sanitizer ]]; then
  for job in "memcheck test_cuda_intervention_fused" "memcheck test_cuda_intervention" \
             "memcheck test_cuda_intervention_fused_mlp" "memcheck test_cuda_core" \
             "racecheck test_cuda_intervention_fused" "synccheck test_cuda_intervention_fused"; do
    set -- $job  # a tool, then a program
    { timeout 90 "$sanitizer" --tool "$1" --print-limit 20 "$bin/$2"; echo "exit $?"; } >"$work/$1.$2.log" 2>&1 &
  done
  wait
  for f in "$work"/{memcheck,racecheck,synccheck}.*.log; do
    [[ -f $f ]] || continue
    name="$(basename "$f" .log)"
    echo "== ${name%%.*} ${name#*.}"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race reported|Barrier error|passed|failed|Program hit|^exit [0-9]+$" "$f" |
      head -n 8
  done >"$out/memcheck.txt"
else
  echo "no compute-sanitizer on this machine" >"$out/memcheck.txt"
fi
cat "$out/memcheck.txt"

tar czf "$out/logs.tgz" -C "$work" --exclude=./site --exclude=./bundle . 2>/dev/null
echo "gpu_slot.sh done after $(elapsed) s (gpu_check.sh exit $rc); results in $out"
exit "$rc"
