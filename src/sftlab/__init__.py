"""sftlab: supervised fine-tuning of causal language models with exact targets and a sparse loss."""

__version__ = "0.1.0"

from sftlab.config import SFTConfig, load_config  # noqa: E402
from sftlab.errors import ConfigError, DataError, SftlabError, TrainingError  # noqa: E402
from sftlab.data.container import IGNORE, Examples, Pairs  # noqa: E402
from sftlab.data.examples import TargetSettings  # noqa: E402
from sftlab.data.preference import prepare_pairs, prepare_unpaired  # noqa: E402
from sftlab.data.prepare import prepare_examples  # noqa: E402
from sftlab.data.sources import load_records  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "Examples",
    "IGNORE",
    "Pairs",
    "SFTConfig",
    "SftlabError",
    "TargetSettings",
    "TrainResult",
    "TrainingError",
    "load_config",
    "load_records",
    "prepare_examples",
    "prepare_pairs",
    "prepare_unpaired",
    "train",
]


def __getattr__(name: str):
    # The training loop imports torch and transformers (~8 s); `sftlab config` and config errors
    # should not wait for them, so it is imported on first use.
    if name in ("train", "TrainResult"):
        from sftlab.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'sftlab' has no attribute {name!r}")
