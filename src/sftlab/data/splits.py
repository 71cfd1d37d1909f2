"""The config-facing entry to the data stage: which source, which settings, one call."""

from __future__ import annotations

from sftlab.config import SFTConfig
from sftlab.errors import ConfigError
from sftlab.data.examples import Examples, TargetSettings
from sftlab.data.prepare import prepare_examples


def target_settings(config: SFTConfig) -> TargetSettings:
    return TargetSettings(
        max_length=config.max_length,
        truncation=config.truncation,
        completion_only_loss=config.completion_only_loss,
        assistant_only_loss=config.assistant_only_loss,
        last_assistant_only=config.last_assistant_only,
        chat_template=config.chat_template,
    )


def prepare_split(config: SFTConfig, tokenizer, eval: bool = False, source=None) -> Examples:
    """Examples for train_data (or eval_data), with the config's settings; `source` overrides the path."""
    if source is None:
        source = config.eval_data if eval else config.train_data
        if source is None:
            raise ConfigError("eval_data is not set", field="eval_data")
    return prepare_examples(
        source,
        tokenizer,
        target_settings(config),
        split=config.eval_split if eval else config.train_split,
        text_field=config.text_field,
        skip_invalid_records=config.skip_invalid_records,
        cache_dir=config.cache_dir,
        use_cache=config.use_cache,
    )
