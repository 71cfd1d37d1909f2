"""The config-facing entry to the data stage: which source, which settings, one call."""

from __future__ import annotations

import json
import os

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
        train_on_roles=tuple(config.train_on_roles),
        chat_examples=config.chat_examples,
        tools=dataset_tools(config.tools),
        chat_template_kwargs=config.chat_template_kwargs,
    )


def dataset_tools(tools: list | str | None) -> list | None:
    """The config's `tools`: a list as given, or read from a .json file or from JSON text."""
    if tools is None or isinstance(tools, list):
        return tools
    text = tools
    if os.path.isfile(tools):
        with open(tools, encoding="utf-8") as handle:
            text = handle.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("tools is neither a .json file nor JSON text", field="tools", found=f"{error.msg} in {tools[:60]!r}",
                          expected="a list of function schemas, a path to a .json file holding one, or its JSON text") from None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError("tools must be a list of function schemas", field="tools", found=type(value).__name__,
                          expected='[{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...]')
    return value


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
