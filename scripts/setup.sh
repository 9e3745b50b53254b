#!/usr/bin/env bash
# Create .venv with the project and its test tools. Idempotent: re-running is a no-op
# unless pyproject.toml changed. CPU machines get the CPU build of torch (pinned, small);
# machines with an NVIDIA driver get pip's default CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/pip install -q torch
    else
      .venv/bin/pip install -q "torch==${TORCH_CPU_VERSION:-2.13.0}"
    fi
  fi
  .venv/bin/pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
