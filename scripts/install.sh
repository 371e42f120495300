#!/usr/bin/env bash
# Create .venv and install dasd-megatron with its test extras. CPU machines get the pinned CPU torch first
# (a bare `torch` requirement can pull a multi-GB CUDA build); GPU machines keep the torch they have.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[test]"
echo "installed: $(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)' 2>/dev/null)"
