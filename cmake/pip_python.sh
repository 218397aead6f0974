# Sourced by cmake/fetch_model.sh and cmake/fetch_common.sh (for fetch_ggml.sh, fetch_dlpack.sh): sets `python` to a python3 that has pip
# ($GRUN_PYTHON, pyenv's, the system's, ...) or leaves it empty.
python=""
for candidate in "${GRUN_PYTHON:-}" python3 /usr/bin/python3 python; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
    python="$candidate"; break
  fi
done
