#!/usr/bin/env bash
# One setup script for README and CI: installs every system dependency of grun from
# Debian's packages and fetches the example model from PyPI. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=(
  build-essential cmake ninja-build pkg-config
  ccache                  # a rebuild (another clone, CI again) compiles only what changed
  clang                   # the second compiler: `--preset clang` builds the host library's tests with it
  libboost1.81-dev        # Boost.PFR: reflection over parameter structs
  catch2                  # tests (Catch2 v2)
  libbenchmark-dev        # Google Benchmark
  nlohmann-json3-dev      # safetensors / GGUF headers, reports
  libeigen3-dev           # Eigen adapter
  libdlpack-dev           # DLPack adapter (the header only)
  libtorch-dev            # libtorch adapter, side-by-side benchmarks, the example host stack
  libopenblas0-openmp     # an optimized BLAS for libtorch (the reference BLAS is ~5x slower)
  python3-torch           # gradcheck of the TORCH_LIBRARY ops (matches libtorch-dev)
  libcli11-dev libfmt-dev # grun-unlearn CLI
  libpcre2-dev            # tokenizer pre-tokenizer regex
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "grun setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "grun setup: system packages present"
fi

if [ -x "$here/cmake/fetch_model.sh" ]; then
  "$here/cmake/fetch_model.sh"
fi
# ggml for the ggml adapter's tests: no Debian package, so built from the sources in a PyPI sdist
# (once; cached next to the model).
if [ -x "$here/cmake/fetch_ggml.sh" ]; then
  "$here/cmake/fetch_ggml.sh"
fi
# A DLPack 1.x header for the second build of the DLPack adapter's tests (Debian's is 0.6): from a
# PyPI wheel that ships it (once; cached likewise).
if [ -x "$here/cmake/fetch_dlpack.sh" ]; then
  "$here/cmake/fetch_dlpack.sh"
fi
# libtorch 2.11's C++ side, a CUDA build (Debian's libtorch-dev is 1.13, without CUDA), from PyPI's
# torch wheel (once; cached likewise): for nvcc to build the libtorch adapter's CUDA path and its test
# (tests/torch_cuda), and for the clang preset to build and run every libtorch part but the op library
# with clang (Debian's 1.13 headers do not compile as C++20 under clang).
if [ -x "$here/cmake/fetch_torch_cuda.sh" ]; then
  "$here/cmake/fetch_torch_cuda.sh"
fi
