# Shared by scripts/demo and scripts/test: create or update .venv, install macmesh, and on Linux
# preload an optimized BLAS (MLX's CPU backend links reference BLAS; OpenBLAS is ~9-30x faster on
# matmuls here). Sourced, not executed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "macmesh needs Python >= 3.11 (found: $("$PY" --version 2>&1 || echo none)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment in .venv"
  "$PY" -m venv "$VENV"
fi

# Reinstall only when the dependency list changed: a stamp holds the hash of pyproject.toml.
STAMP="$VENV/.macmesh-installed"
WANT="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$REPO/pyproject.toml")"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  say "installing macmesh and its dependencies into .venv"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -e "$REPO[dev]"
  echo "$WANT" > "$STAMP"
fi

# Optimized BLAS on Linux, when we can have it; everything still works without it.
if [ "$(uname -s)" = "Linux" ]; then
  OPENBLAS="$(ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 2>/dev/null | head -n1 || true)"
  if [ -z "$OPENBLAS" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing OpenBLAS (libopenblas0-pthread) for faster MLX on CPU"
    if ! apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1; then
      apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || true
    fi
    OPENBLAS="$(ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 2>/dev/null | head -n1 || true)"
  fi
  if [ -n "$OPENBLAS" ]; then
    export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
  else
    say "OpenBLAS not available: MLX uses its reference BLAS (slower, still correct)"
  fi
fi

export PATH="$VENV/bin:$PATH"
