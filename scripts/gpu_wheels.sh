#!/usr/bin/env bash
# The wheels the GPU check machine lacks (Python 3.12; ../shared/docs/DESIGN.md, environment facts), downloaded here
# into .whl/ (git-ignored, a few MB) so a device call can carry them:
#
#   bash scripts/gpu_wheels.sh
#   # device: carry [".whl"], command:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site OUT=$OUT bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
mkdir -p .whl
"$PIP" download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    megatron-core==0.19.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 \
    latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
ls -la .whl
du -sh .whl
