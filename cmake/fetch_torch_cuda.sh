#!/usr/bin/env bash
# Fetches a CUDA build of libtorch's C++ side (headers, libc10, libc10_cuda, libtorch_cpu) so that
# nvcc can build the libtorch adapter's CUDA path (grun/adapters/torch.hpp with GRUN_TORCH_CUDA) and
# its test, tests/torch_cuda. Debian's libtorch-dev has no CUDA; PyPI's torch wheel is a CUDA 13.0
# build (its dependencies name cuda-toolkit 13.0.2), the CUDA this machine's nvcc is. Its CPU side
# (libtorch_cpu, libc10) is also the libtorch the clang preset builds its libtorch parts against
# (GRUN_TORCH_FROM_WHEEL): Debian's 1.13 headers do not compile as C++20 under clang.
#
#   cmake/fetch_torch_cuda.sh            # download (if needed), verify, extract; print the directory
#   cmake/fetch_torch_cuda.sh --print    # only print where the directory is expected (no network)
#
# Where it goes: ${GRUN_CACHE_DIR:-$HOME/.cache/grun}/torch-2.11.0-cu130 with include/, lib/ and
# VERSION — the layout of an installed torch package (site-packages/torch), so CMake's
# -DGRUN_TORCH_CUDA_DIR and -DGRUN_TORCH_WHEEL_DIR may name either. Only what building and linking
# need is kept (~490 MB of the wheel's 1 GB): libtorch_cuda.so is not, the test loads it at run
# time, and only on a machine with a GPU, from the torch installed there
# (tests/torch_cuda/CMakeLists.txt says why). Idempotent; the wheel's sha256 is pinned; any failure
# exits non-zero with a message, and a partial directory is never left where CMake looks.
set -euo pipefail

readonly torch_version="2.11.0"
readonly wheel_spec="torch==$torch_version"
readonly wheel_file="torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl"
readonly wheel_sha256="7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a"

fetch_name=fetch_torch_cuda
source "$(dirname "${BASH_SOURCE[0]}")/fetch_common.sh"
target="$cache_dir/torch-$torch_version-cu130"
stamp="$target/.grun-from-$wheel_sha256"

if [ "${1:-}" = "--print" ]; then echo "$target"; exit 0; fi
if [ -f "$stamp" ] && [ -f "$target/lib/libtorch_cpu.so" ] && [ -f "$target/include/torch/extension.h" ]; then
  say "libtorch $torch_version (CUDA 13.0) present: $target"
  exit 0
fi

mkdir -p "$cache_dir" || die "cannot create $cache_dir"
work="$(mktemp -d "$cache_dir/.torch-cuda.XXXXXX")"  # same filesystem as the target: the final move is a rename
trap 'rm -rf "$work"' EXIT

say "downloading $wheel_spec (530 MB; its C++ headers and four libraries are kept)"
pip_download_pinned "$wheel_spec" "$wheel_file" "$wheel_sha256" "$work" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311

"$python" - "$work/$wheel_file" "$work/torch" "$torch_version" <<'PY' || die "could not extract the wheel"
import os, sys, zipfile
wheel, out, version = sys.argv[1], sys.argv[2], sys.argv[3]
libs = {"libc10.so", "libc10_cuda.so", "libtorch_cpu.so", "libgomp.so.1"}
kept = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith("/"):
            continue
        if name.startswith("torch/include/") or (name.startswith("torch/lib/") and name[len("torch/lib/"):] in libs):
            z.extract(name, os.path.dirname(out))
            kept += 1
missing = [l for l in sorted(libs) if not os.path.isfile(os.path.join(out, "lib", l))]
if missing:
    sys.exit(f"the wheel lacks torch/lib/{', '.join(missing)}")
with open(os.path.join(out, "VERSION"), "w") as f:
    f.write(version + "\n")
print(f"grun fetch_torch_cuda: extracted {kept} files")
PY
[ -f "$work/torch/include/ATen/cuda/CUDAContext.h" ] || die "the wheel's headers lack ATen/cuda/CUDAContext.h (not a CUDA build?)"
touch "$work/torch/.grun-from-$wheel_sha256"

rm -rf "$target"
mv "$work/torch" "$target" || die "cannot move the extracted files into $target"
say "installed: $target"
