"""source -> records -> validated records -> examples, with statistics and an on-disk cache.

The cache key hashes the data, the tokenizer (vocabulary, merges, special tokens, chat
template) and every setting that changes the examples, so a second run with the same inputs
loads the arrays back instead of tokenizing again, and any change re-prepares.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np

from sftlab import __version__
from sftlab.data.examples import IGNORE, Examples, TargetSettings, build_examples
from sftlab.data.formats import validate_records
from sftlab.data.sources import Records, load_records, source_fingerprint
from sftlab.errors import DataError

CACHE_FORMAT = 2  # 2: conversations as served (several examples per record, chat statistics)
_ARRAYS = ("input_ids", "targets", "offsets", "record_index")


def default_cache_dir() -> str:
    root = os.environ.get("SFTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sftlab")
    return os.path.join(root, "prepared")


def tokenizer_fingerprint(tokenizer) -> str:
    # Serialising a 151k vocabulary takes ~0.2 s: remembered on the tokenizer object, keyed by
    # what can change on it after loading (special tokens, chat template, added tokens).
    state = (str(tokenizer.special_tokens_map), str(getattr(tokenizer, "chat_template", None)), len(tokenizer))
    remembered = getattr(tokenizer, "_sftlab_fingerprint", None)
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    fingerprint = _tokenizer_fingerprint(tokenizer)
    try:
        tokenizer._sftlab_fingerprint = (state, fingerprint)
    except AttributeError:
        pass
    return fingerprint


def _tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(tokenizer("a")["input_ids"]).encode())  # BOS/EOS conventions
    return digest.hexdigest()


def prepare_examples(
    source: Any,
    tokenizer,
    settings: TargetSettings = TargetSettings(),
    *,
    split: str | None = None,
    text_field: str = "text",
    skip_invalid_records: bool = False,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> Examples:
    """Load, validate and tokenize `source`; `examples.stats` says what happened to every record."""
    started = time.perf_counter()
    records = source if isinstance(source, Records) else None
    key = None
    if use_cache:
        # Files and datasets are identified without parsing them, so a hit skips loading records.
        data = records.fingerprint() if records is not None else source_fingerprint(source, split)
        if data is None:
            records = load_records(source, split=split)
            data = records.fingerprint()
        key = _cache_key(data, tokenizer, settings, text_field, skip_invalid_records)
        folder = os.path.join(cache_dir or default_cache_dir(), key)
        cached = _load_cached(folder)
        if cached is not None:
            cached.stats["seconds"] = time.perf_counter() - started
            cached.stats["cached"] = True
            return cached
    if records is None:
        records = load_records(source, split=split)
    validated = validate_records(
        records, text_field=text_field, skip_invalid=skip_invalid_records, vocab_size=len(tokenizer)
    )
    try:
        examples = build_examples(validated.records, tokenizer, settings, skip_invalid=skip_invalid_records)
    except DataError as error:
        raise _located(error, records) from None
    built = examples.stats
    skipped = Counter(validated.skipped) + Counter(built.pop("skipped_invalid", {}))
    examples.stats = summarize(examples, records=len(records), formats=dict(validated.formats), skipped=dict(skipped), **built)
    examples.stats["source"] = records.name
    examples.stats["seconds"] = time.perf_counter() - started
    examples.stats["cached"] = False
    if use_cache:
        _store(os.path.join(cache_dir or default_cache_dir(), key), examples)
    return examples


def _located(error: DataError, records: Records) -> DataError:
    """The error with its record traced to the file (and line) it came from, as validation errors are."""
    if error.index is None or error.source is not None:
        return error
    source, row = records.locate(error.index)
    return type(error)(error.problem, source=source, index=row, field=error.field, found=error.found,
                       expected=error.expected, fix=error.fix)


def summarize(examples: Examples, *, records: int, formats: dict, skipped: dict, truncated: int, dropped: dict,
              chat: dict | None = None) -> dict:
    lengths = examples.lengths
    supervised = int((examples.targets != IGNORE).sum())
    tokens = int(lengths.sum())
    percentiles = {}
    if len(lengths):
        for q in (0, 50, 90, 99, 100):
            percentiles[f"p{q}"] = int(np.percentile(lengths, q, method="nearest"))
    return {
        "records": records,
        "formats": formats,
        "examples": len(examples),
        "skipped_invalid": skipped,
        "truncated": truncated,
        "dropped": dropped,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_fraction": supervised / tokens if tokens else 0.0,
        "length": percentiles,
        **({"chat": chat} if chat is not None else {}),
    }


def _cache_key(data: str, tokenizer, settings: TargetSettings, text_field: str, skip: bool) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "data": data,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
        "text_field": text_field,
        "skip_invalid_records": skip,
    }
    if settings.chat_template and os.path.isfile(settings.chat_template):
        # A template given as a file: its text, not its path, shapes the examples.
        with open(settings.chat_template, "rb") as handle:
            parts["chat_template_file"] = hashlib.sha256(handle.read()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _load_cached(folder: str) -> Examples | None:
    try:
        with open(os.path.join(folder, "stats.json")) as handle:
            stats = json.load(handle)
        arrays = {name: np.load(os.path.join(folder, name + ".npy")) for name in _ARRAYS}
    except (OSError, ValueError, EOFError):  # a missing or damaged entry is a miss (EOFError: empty .npy)
        return None
    return Examples(**arrays, stats=stats)


def _store(folder: str, examples: Examples) -> None:
    """Write to a temporary folder and rename it into place, so a reader never sees half a cache entry."""
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        for name in _ARRAYS:
            np.save(os.path.join(tmp, name + ".npy"), getattr(examples, name))
        with open(os.path.join(tmp, "stats.json"), "w") as handle:
            json.dump(examples.stats, handle)
        if os.path.isdir(folder):  # an entry that failed to load: unreadable, so replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache dir must not stop training
