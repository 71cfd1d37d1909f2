#!/usr/bin/env bash
# Create .venv (if missing) and install the exact versions of constraints-cpu.txt into it: the CPU build of
# torch, then sftlab in editable mode with the extras given (default: test; several: "test,demo").
# constraints-cpu.txt pins every package CI tests with, so a new release upstream changes nothing here until
# scripts/lock.sh regenerates the file (README, "Upgrading the pinned versions").
# SFTLAB_VENV and SFTLAB_CONSTRAINTS point it at another venv / constraints file (scripts/lock.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
venv="${SFTLAB_VENV:-.venv}"
constraints="${SFTLAB_CONSTRAINTS:-constraints-cpu.txt}"
python="$venv/bin/python"

pip_install() {
  # pip install -q, its output less the warnings some pip configurations print about index locations
  # they cannot read; pip's exit status is kept (grep finding nothing to print is not a failure).
  local log status=0
  log="$(mktemp)"
  "$python" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return "$status"
}

if [ ! -x "$python" ]; then
  python3 -m venv "$venv"
fi
pip_install --upgrade pip
# torch first, the +cpu build pinned in the constraints. PyPI's Linux wheel of torch is the CUDA build: it
# requires cuda-toolkit, nvidia-cudnn-cu13, nvidia-nccl-cu13 and triton, several GB that a CPU run never
# uses. pip's configured indexes are tried first (a mirror or wheel folder that has the +cpu build), then
# PyTorch's CPU index (SFTLAB_TORCH_INDEX overrides it).
torch_pin="$(grep -m1 '^torch==' "$constraints")"
if torch_log="$(pip_install -c "$constraints" "$torch_pin" 2>&1)"; then
  [ -z "$torch_log" ] || echo "$torch_log"
else
  index="${SFTLAB_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  echo "setup.sh: $torch_pin is not on pip's configured indexes; trying $index" >&2
  pip_install -c "$constraints" --extra-index-url "$index" "$torch_pin" || { echo "$torch_log" >&2; exit 1; }
fi
pip_install -c "$constraints" -e ".[${extras}]"
"$python" -c "import torch, transformers, sftlab; print(f'sftlab {sftlab.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
