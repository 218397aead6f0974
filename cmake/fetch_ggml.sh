#!/usr/bin/env bash
# Builds ggml (the tensor library under llama.cpp) for grun's ggml adapter tests: the ggml sources
# vendored in the PyPI sdist llama-cpp-python==0.3.36 (ggml 0.25.3), CPU backend only, static,
# installed as a CMake package. Debian has no ggml package; PyPI is the registry we may use.
#
#   cmake/fetch_ggml.sh            # download (if needed), verify, build, install; print the prefix
#   cmake/fetch_ggml.sh --print    # only print where the package is expected (no network)
#
# Where it goes: ${GRUN_CACHE_DIR:-$HOME/.cache/grun}/ggml-0.25.3 (CMake finds it there, or pass
# -DGRUN_GGML_DIR=...). Idempotent: an installed package with its stamp is left alone. The sdist's
# sha256 is pinned. Any failure exits non-zero with a message; a half-built install is never left
# where CMake looks (it is built in a temporary directory and moved into place).
set -euo pipefail

readonly sdist_spec="llama-cpp-python==0.3.36"
readonly sdist_file="llama_cpp_python-0.3.36.tar.gz"
readonly sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
readonly ggml_member="llama_cpp_python-0.3.36/vendor/llama.cpp/ggml"
readonly ggml_version="0.25.3"

fetch_name=fetch_ggml
source "$(dirname "${BASH_SOURCE[0]}")/fetch_common.sh"
prefix="$cache_dir/ggml-$ggml_version"
stamp="$prefix/.grun-built-from-$sdist_sha256"

if [ "${1:-}" = "--print" ]; then echo "$prefix"; exit 0; fi
if [ -f "$stamp" ] && [ -f "$prefix/lib/cmake/ggml/ggml-config.cmake" ]; then
  say "ggml $ggml_version present: $prefix"
  exit 0
fi

command -v cmake >/dev/null 2>&1 || die "cmake not found (cmake/setup.sh installs it)"

mkdir -p "$cache_dir" || die "cannot create $cache_dir"
work="$(mktemp -d "$cache_dir/.ggml-build.XXXXXX")"  # same filesystem as the prefix: the final move is a rename
trap 'rm -rf "$work"' EXIT

say "downloading the sdist $sdist_spec with pip (about 77 MB; only its ggml sources are used)"
pip_download_pinned "$sdist_spec" "$sdist_file" "$sdist_sha256" "$work" --no-binary=:all:

say "extracting $ggml_member"
tar -xzf "$work/$sdist_file" -C "$work" "$ggml_member" || die "could not extract $ggml_member"
src="$work/$ggml_member"
touch "$src/ggml.pc.in"  # the sdist leaves out the pkg-config template that ggml's CMakeLists configures

say "building ggml $ggml_version (CPU backend, static; a few minutes on 2 cores)"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DGGML_OPENMP=OFF -DGGML_BACKEND_DL=OFF -DGGML_CCACHE=OFF \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX="$work/install" \
    >"$work/configure.log" 2>&1 || { tail -20 "$work/configure.log" >&2; die "configuring ggml failed"; }
cmake --build "$work/build" -j "$(nproc 2>/dev/null || echo 2)" >"$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log" >&2; die "building ggml failed"; }
cmake --install "$work/build" >"$work/install.log" 2>&1 || { tail -20 "$work/install.log" >&2; die "installing ggml failed"; }
touch "$work/install/.grun-built-from-$sdist_sha256"

rm -rf "$prefix"
mv "$work/install" "$prefix" || die "cannot move the build into $prefix"
say "installed: $prefix"
