#!/usr/bin/env bash
# Fetches a DLPack 1.x header (dlpack/dlpack.h, DLPack 1.3) for the second build of grun's DLPack
# adapter tests: Debian's libdlpack-dev is 0.6, which lacks DLManagedTensorVersioned (grun then
# declares it itself); this header has it, so the tests also run against the real declaration.
# Debian has no DLPack 1.x package; the header comes from the PyPI wheel of apache-tvm-ffi (which
# ships DLPack's own header), one pinned file whatever this machine's Python is.
#
#   cmake/fetch_dlpack.sh            # download (if needed), verify, extract; print the include dir
#   cmake/fetch_dlpack.sh --print    # only print where the include dir is expected (no network)
#
# Where it goes: ${GRUN_CACHE_DIR:-$HOME/.cache/grun}/dlpack-1.3/include (CMake looks there, or pass
# -DGRUN_DLPACK1_INCLUDE_DIR=...). Idempotent. The wheel's sha256 is pinned. Any failure exits
# non-zero with a message; a partial header is never left where CMake looks.
set -euo pipefail

readonly wheel_spec="apache-tvm-ffi==0.1.15.post2"
readonly wheel_file="apache_tvm_ffi-0.1.15.post2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
readonly wheel_sha256="8ecebe749834f6ac0f2693d5964acf9ac75d0bc26e6ba64c46eb7ab00ea50fac"
readonly header_member="tvm_ffi/include/dlpack/dlpack.h"
readonly dlpack_version="1.3"

fetch_name=fetch_dlpack
source "$(dirname "${BASH_SOURCE[0]}")/fetch_common.sh"
include_dir="$cache_dir/dlpack-$dlpack_version/include"
stamp="$include_dir/.grun-from-$wheel_sha256"

if [ "${1:-}" = "--print" ]; then echo "$include_dir"; exit 0; fi
if [ -f "$stamp" ] && [ -f "$include_dir/dlpack/dlpack.h" ]; then
  say "DLPack $dlpack_version header present: $include_dir"
  exit 0
fi

mkdir -p "$cache_dir" || die "cannot create $cache_dir"
work="$(mktemp -d "$cache_dir/.dlpack.XXXXXX")"  # same filesystem as the target: the final move is a rename
trap 'rm -rf "$work"' EXIT

say "downloading $wheel_spec (3.4 MB; only its dlpack/dlpack.h is used)"
pip_download_pinned "$wheel_spec" "$wheel_file" "$wheel_sha256" "$work" --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311

mkdir -p "$work/include/dlpack"
"$python" - "$work/$wheel_file" "$header_member" "$work/include/dlpack/dlpack.h" <<'PY' || die "could not extract $header_member"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], "wb") as out:
    out.write(z.read(sys.argv[2]))
PY
grep -q "^#define DLPACK_MAJOR_VERSION 1$" "$work/include/dlpack/dlpack.h" ||
  die "$header_member: expected DLPack major version 1"
touch "$work/include/.grun-from-$wheel_sha256"

rm -rf "$cache_dir/dlpack-$dlpack_version"
mkdir -p "$cache_dir/dlpack-$dlpack_version"
mv "$work/include" "$include_dir" || die "cannot move the header into $include_dir"
say "installed: $include_dir"
