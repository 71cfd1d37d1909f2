"""source -> records -> validated records -> examples, with statistics and an on-disk cache.

The cache key hashes the data, the tokenizer (vocabulary, merges, special tokens, chat
template) and every setting that changes the examples, so a second run with the same inputs
loads the arrays back instead of tokenizing again, and any change re-prepares. The entry is
where the examples are written as they are made (store.py); every caller reads it back
memory-mapped, so the processes of one machine share one copy of the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from sftlab import __version__
from sftlab.data.chat import stop_tokens_of
from sftlab.data.container import Examples
from sftlab.data.examples import CHAT_STATS, TargetSettings
from sftlab.data.fields import FieldMap
from sftlab.data.sources import open_records
from sftlab.data.store import built_entry
from sftlab.data.workers import Counts, Recipe, build_store
from sftlab.files import cache_root

# 2: conversations as served (several examples per record, chat statistics)
# 3: streamed into the entry (field maps and the Alpaca layout in the key)
# 4: checksums.json in every entry (entries without one would be rebuilt as damaged anyway)
CACHE_FORMAT = 4


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "prepared")


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
    fields: dict[str, str] | None = None,
    alpaca_layout: str = "alpaca",
    workers: int | None = None,
) -> Examples:
    """Read, validate and tokenize `source` into examples; `examples.stats` says what happened
    to every record.

    The records are streamed in chunks and each chunk's examples are appended to a cache entry
    on disk as they are made; the examples returned are that entry, memory-mapped. `fields`
    renames the source's fields to sftlab's (see fields.py); `workers` processes share the work
    (None: what pays on this machine, see `default_workers`)."""
    started = time.perf_counter()
    stream = open_records(source, split)
    recipe = Recipe(tokenizer, settings, text_field, skip_invalid_records, FieldMap(dict(fields or {}), alpaca_layout))
    workers = default_workers(stream) if workers is None else max(1, int(workers))

    def build(folder: str) -> None:
        _build(stream, recipe, folder, workers)

    # Files and datasets are identified without parsing them, so a hit reads no record.
    key = _cache_key(stream.fingerprint(), recipe) if use_cache else "uncached"
    root = (cache_dir or default_cache_dir()) if use_cache else None
    examples, folder = built_entry(root, key, build, waiting=_waiting, max_length=settings.max_length)
    examples.stats["seconds"] = time.perf_counter() - started
    if folder is not None:
        examples.stats["cache_entry"] = folder
    return examples


def default_workers(stream) -> int:
    """Preparation processes that pay for a source on this machine.

    One process already keeps two cores busy (Python renders while the tokenizer's threads
    encode: 1.9 cores at 200k chats), and a spawned worker costs seconds to start and its own
    tokenizer: measured on 2 cores, 2 workers took 28 s against 20 s for 20k chats and 84 s
    against 87 s for 200k (docs/benchmarks.md). So: one per two cores, from 4 cores and for data
    of at least 50 MB or 50,000 records, else one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    large = (stream.size or 0) >= 50_000_000 or (stream.length or 0) >= 50_000
    return max(1, cores // 2) if cores >= 4 and large else 1


def _waiting(entry: str) -> None:
    print(f"waiting for another process to finish preparing {entry}", file=sys.stderr, flush=True)


def _build(stream, recipe: Recipe, folder: str, workers: int) -> None:
    """The entry's arrays and stats.json, written into `folder`."""
    counts = build_store(stream, recipe, folder, workers)
    lengths = np.diff(np.load(os.path.join(folder, "offsets.npy"), mmap_mode="r"))
    stats = summarize(counts, lengths)
    stats["source"] = stream.name
    with open(os.path.join(folder, "stats.json"), "w") as handle:
        json.dump(stats, handle)


def summarize(counts: Counts, lengths: np.ndarray) -> dict:
    """The statistics of a preparation: counts from the pass, percentiles of the example lengths."""
    percentiles = {}
    if len(lengths):
        for q in (0, 50, 90, 99, 100):
            percentiles[f"p{q}"] = int(np.percentile(lengths, q, method="nearest"))
    stats = {
        "records": counts.records,
        "formats": dict(counts.formats),
        "examples": counts.examples,
        "skipped_invalid": dict(counts.skipped),
        "truncated": counts.truncated,
        "dropped": dict(counts.dropped),
        "tokens": counts.tokens,
        "supervised_tokens": counts.supervised,
        "supervised_fraction": counts.supervised / counts.tokens if counts.tokens else 0.0,
        "length": percentiles,
    }
    if counts.chat is not None:
        stats["chat"] = {key: int(counts.chat[key]) for key in CHAT_STATS}
    return stats


def _cache_key(data: str, recipe: Recipe) -> str:
    settings = recipe.settings
    parts = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "data": data,
        "tokenizer": tokenizer_fingerprint(recipe.tokenizer),
        "settings": asdict(settings),
        "text_field": recipe.text_field,
        "skip_invalid_records": recipe.skip_invalid,
    }
    if recipe.field_map.fields:
        parts["fields"] = recipe.field_map.fields
    if recipe.field_map.alpaca_layout != "alpaca":
        parts["alpaca_layout"] = recipe.field_map.alpaca_layout
    stops, eos = sorted(stop_tokens_of(recipe.tokenizer)), recipe.tokenizer.eos_token
    if stops != ([str(eos)] if eos else []):
        # The generation config's stop tokens close turns of templates that write no end marker (GLM).
        parts["stop_tokens"] = stops
    if settings.chat_template and os.path.isfile(settings.chat_template):
        # A template given as a file: its text, not its path, shapes the examples.
        with open(settings.chat_template, "rb") as handle:
            parts["chat_template_file"] = hashlib.sha256(handle.read()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
