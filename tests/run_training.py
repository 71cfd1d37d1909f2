"""One training run in a process of its own, for the tests that need one.

    python tests/run_training.py MODEL_DIR RECORDS_JSON OUTPUT_DIR key=value ...
    torchrun --standalone --nproc_per_node 2 tests/run_training.py MODEL_DIR RECORDS_JSON OUTPUT_DIR key=value ...

test_equivalence.py runs it under torchrun (2 CPU processes, gloo); test_train_e2e.py kills
it mid-run and resumes. The records are read from a JSON file and passed to `train` as a list;
key=value pairs are config values. `optimizer=sgd` swaps AdamW for plain SGD (lr =
learning_rate), so an update is the gradient itself.
"""

from __future__ import annotations

import json
import sys

import torch

from sftlab.config import make_config, parse_overrides
from sftlab.training.loop import train


def main(model_dir: str, records_path: str, output_dir: str, *pairs: str) -> None:
    values = parse_overrides(list(pairs))
    optimizer = values.pop("optimizer", None)
    config = make_config(
        {"model": model_dir, "train_data": records_path, "output_dir": output_dir, "use_cache": False, **values}
    )
    with open(records_path) as handle:
        records = json.load(handle)
    sgd = (lambda params: torch.optim.SGD(params, lr=config.learning_rate)) if optimizer == "sgd" else None
    train(config, train_dataset=records, optimizer=sgd)


if __name__ == "__main__":
    main(*sys.argv[1:])
