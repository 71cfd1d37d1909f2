#!/usr/bin/env bash
# Create .venv (if missing) with a CPU build of torch and sftlab installed in editable mode.
# torch is pinned through constraints-cpu.txt: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[${extras}]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, sftlab; print(f'sftlab {sftlab.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
