"""sftlab: supervised fine-tuning of causal language models with exact targets and a sparse loss."""

__version__ = "0.1.0"

from sftlab.errors import ConfigError, DataError, SftlabError, TrainingError  # noqa: E402
from sftlab.examples import IGNORE, Examples, TargetSettings  # noqa: E402
from sftlab.prepare import prepare_examples  # noqa: E402
from sftlab.sources import load_records  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "Examples",
    "IGNORE",
    "SftlabError",
    "TargetSettings",
    "TrainingError",
    "load_records",
    "prepare_examples",
]

from sftlab.config import SFTConfig, load_config  # noqa: E402
from sftlab.training import TrainResult, train  # noqa: E402

__all__ += ["SFTConfig", "TrainResult", "load_config", "train"]
