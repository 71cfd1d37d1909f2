"""The config-facing entry to the data stage: which source, which settings, one call."""

from __future__ import annotations

import os
import time

from sftlab.config import DataSource, SFTConfig
from sftlab.data.container import Examples, Pairs
from sftlab.data.examples import TargetSettings
from sftlab.data.mixture import MixturePart, mixture_key, write_mixture
from sftlab.data.preference import (
    PAIR_KIND,
    SFT_KIND,
    UNPAIRED_KIND,
    looks_like_pairs,
    prepare_pairs,
    prepare_unpaired,
    require_kind,
)
from sftlab.data.prepare import default_cache_dir, prepare_examples
from sftlab.data.prompts import GenerationPrompts, generation_prompts
from sftlab.data.store import EXAMPLES, PAIRS, UNPAIRED, built_entry
from sftlab.errors import ConfigError


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
        tools=config.tools,  # parsed by the config (a .json file or JSON text becomes the list)
        chat_template_kwargs=config.chat_template_kwargs,
        reasoning_when_missing=config.reasoning_when_missing,
        reasoning_when_dropped=config.reasoning_when_dropped,
        train_on_reasoning=config.train_on_reasoning,
    )


def _split_source(config: SFTConfig, eval: bool, source):
    if source is None:
        name = "eval_data" if eval else "train_data"
        source = getattr(config, name)
        if source is None:
            raise ConfigError(
                f"{name} is not set",
                field=name,
                fix=f"set {name}: to a data file, a folder or a list of sources"
                + (", or pass train_dataset= to train()" if not eval else ""),
            )
    return source


def prepare_split(config: SFTConfig, tokenizer, eval: bool = False, source=None) -> Examples:
    """Examples for train_data (or eval_data), with the config's settings; `source` overrides the
    config's data (any source load_records accepts). A list of sources is a mixture (mixture.py)."""
    source = _split_source(config, eval, source)
    if isinstance(source, list) and source and all(isinstance(item, DataSource) for item in source):
        return prepare_mixture(config, tokenizer, source)
    return prepare_examples(
        source,
        tokenizer,
        target_settings(config),
        split=config.eval_split if eval else config.train_split,
        text_field=config.text_field,
        skip_invalid_records=config.skip_invalid_records,
        cache_dir=config.cache_dir,
        use_cache=config.use_cache,
        fields=config.fields,
        alpaca_layout=config.alpaca_layout,
        workers=config.preprocessing_workers,
    )


def is_preference_split(config: SFTConfig, eval: bool = False, source=None) -> bool:
    """Whether train_data (or eval_data, or `source`) holds preference pairs: its first record has
    `chosen` or `rejected` (after the field map; a mixture: its first source's), or the config's
    objective is KTO (unpaired examples, prepared through the same path)."""
    if config.objective == "kto":
        return True
    source = _split_source(config, eval, source)
    if isinstance(source, list) and source and all(isinstance(item, DataSource) for item in source):
        first = source[0]
        fields = first.fields if first.fields is not None else config.fields
        return looks_like_pairs(first.path, first.split, fields, first.alpaca_layout or config.alpaca_layout)
    split = config.eval_split if eval else config.train_split
    return looks_like_pairs(source, split, config.fields, config.alpaca_layout)


def prepare_preference_split(config: SFTConfig, tokenizer, eval: bool = False, source=None) -> Pairs:
    """Preference pairs for train_data (or eval_data), with the config's settings (max_length,
    truncation, max_prompt_length, the chat settings); `source` overrides the config's data."""
    source = _split_source(config, eval, source)
    if isinstance(source, list) and source and all(isinstance(item, DataSource) for item in source):
        return prepare_mixture(config, tokenizer, source, field="eval_data" if eval else "train_data", preference=True)
    prepare = prepare_unpaired if config.objective == "kto" else prepare_pairs
    return prepare(
        source,
        tokenizer,
        target_settings(config),
        max_prompt_length=config.max_prompt_length,
        split=config.eval_split if eval else config.train_split,
        text_field=config.text_field,
        skip_invalid_records=config.skip_invalid_records,
        cache_dir=config.cache_dir,
        use_cache=config.use_cache,
        fields=config.fields,
        alpaca_layout=config.alpaca_layout,
        workers=config.preprocessing_workers,
    )


def prepare_mixture(
    config: SFTConfig, tokenizer, sources: list[DataSource], field: str = "train_data", preference: bool = False
) -> Examples | Pairs:
    """Each source prepared (and cached) with its own field map and format options, then mixed
    as their weight / max_samples / epochs say, from the config's seed. With `preference`, the
    sources are preference pairs (KTO: unpaired examples) mixed the same way; a source of another
    kind than the run's is refused, naming it (`field`[i]) and its record."""
    started = time.perf_counter()
    settings = target_settings(config)
    kto = preference and config.objective == "kto"
    wanted = (UNPAIRED_KIND if kto else PAIR_KIND) if preference else SFT_KIND
    layout = (UNPAIRED if kto else PAIRS) if preference else EXAMPLES
    parts, entries = [], []
    for position, spec in enumerate(sources):
        fields = spec.fields if spec.fields is not None else config.fields
        alpaca_layout = spec.alpaca_layout or config.alpaca_layout
        name = f"{field}[{position}]" + (f" ({spec.name})" if spec.name else "")
        require_kind(spec.path, wanted, name, spec.split, fields, alpaca_layout)
        common = dict(
            split=spec.split,
            text_field=spec.text_field or config.text_field,
            skip_invalid_records=config.skip_invalid_records,
            cache_dir=config.cache_dir,
            use_cache=config.use_cache,
            fields=fields,
            alpaca_layout=alpaca_layout,
            workers=config.preprocessing_workers,
        )
        if preference:
            prepare = prepare_unpaired if kto else prepare_pairs
            examples = prepare(spec.path, tokenizer, settings, max_prompt_length=config.max_prompt_length, **common)
        else:
            examples = prepare_examples(spec.path, tokenizer, settings, **common)
        parts.append(MixturePart(spec.name or spec.path, examples, spec.weight, spec.max_samples, spec.epochs))
        entries.append(examples.stats.get("cache_entry"))
    cached = config.use_cache and all(entries)  # a mixture of uncached sources is not cached either
    root = (config.cache_dir or default_cache_dir()) if cached else None
    key = mixture_key(parts, config.seed, [os.path.basename(entry or "") for entry in entries])
    examples, folder = built_entry(
        root, key, lambda folder: write_mixture(parts, config.seed, folder, layout), layout=layout
    )
    examples.stats["seconds"] = time.perf_counter() - started
    if folder is not None:
        examples.stats["cache_entry"] = folder
    return examples


def prepare_generation_prompts(config: SFTConfig, tokenizer, source=None) -> GenerationPrompts:
    """The eval prompts that evaluation by generation answers (data/prompts.py): the first
    eval_generate_samples of eval_data (or `source`), through the field maps and settings its
    examples are made with; a mixture's sources take turns."""
    source = source if source is not None else config.eval_data
    if source is None:
        raise ConfigError(
            "eval_generate_samples is set but there is no eval data to take prompts from",
            field="eval_generate_samples",
            fix="set eval_data (or pass eval_dataset), or eval_generate_samples: 0",
        )
    settings, limit = target_settings(config), config.eval_generate_samples
    common = dict(limit=limit, skip_invalid_records=config.skip_invalid_records)
    if isinstance(source, list) and source and all(isinstance(item, DataSource) for item in source):
        parts = [
            generation_prompts(
                spec.path,
                tokenizer,
                settings,
                split=spec.split,
                text_field=spec.text_field or config.text_field,
                fields=spec.fields if spec.fields is not None else config.fields,
                alpaca_layout=spec.alpaca_layout or config.alpaca_layout,
                name=spec.name or spec.path,
                **common,
            )
            for spec in source
        ]
        result = GenerationPrompts(stop_token_ids=sorted({i for part in parts for i in part.stop_token_ids}))
        for part in parts:
            result.records_read += part.records_read
            result.usable += part.usable
            result.unusable.update(part.unusable)
            result.formats.update(part.formats)
        turns = max(len(part.prompts) for part in parts)
        result.prompts = [part.prompts[i] for i in range(turns) for part in parts if i < len(part.prompts)][:limit]
    else:
        result = generation_prompts(
            source,
            tokenizer,
            settings,
            split=config.eval_split,
            text_field=config.text_field,
            fields=config.fields,
            alpaca_layout=config.alpaca_layout,
            **common,
        )
    if not result.prompts:
        raise ConfigError(
            "eval_generate_samples is set but no eval record has a prompt and a reply to compare with",
            field="eval_generate_samples",
            found=f"{result.records_read} records: {dict(result.unusable)}",
            fix="give eval_data as prompt/completion records or conversations, or set eval_generate_samples: 0",
        )
    return result
