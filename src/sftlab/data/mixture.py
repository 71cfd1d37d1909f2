"""Several sources as one set of examples (or of preference pairs, or of KTO's unpaired examples):
each source is prepared (and cached) on its own, then its items are drawn by weight, max_samples
or epochs, deterministically from the seed, into an entry of the mixture's own. Below, "example"
stands for a pair as well: the counts and the draw are the same.

How many examples source i gives, of the n_i it holds:

    no option      n_i, every example once
    max_samples m  min(m, n_i)
    epochs e       e * n_i, rounded half up
    weight w_i     the weighted sources share N = (the sum of their n_j) in proportion to their
                   weights: floor(N * w_i / W) each (W: the sum of the weights), and the examples
                   left over go one each to the largest remainders (ties: the earlier source)

Which ones: a count of q * n_i + r takes every example q times, then r of them drawn without
replacement by numpy.random.default_rng([seed, i]), kept in the source's order. The examples of
the mixture are source 0's, then source 1's, ...; the step plan shuffles them. The mixture is
drawn once: every training epoch visits the same examples in a new order, and a resumed run,
which draws it again from the seed, trains on the same ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from sftlab.data.container import IGNORE, Examples, Pairs
from sftlab.data.examples import CHAT_STATS
from sftlab.data.store import EXAMPLES, Layout, StoreWriter
from sftlab.errors import DataError

_GATHER = 8192  # examples copied at a time


@dataclass(frozen=True)
class MixturePart:
    """One prepared source and how much of it the mixture takes (at most one option)."""

    name: str
    examples: Examples | Pairs  # its prepared items: examples, or pairs in a preference mixture
    weight: float | None = None
    max_samples: int | None = None
    epochs: float | None = None


def mixture_counts(parts: list[MixturePart]) -> list[int]:
    """Examples each part gives (see the module docstring)."""
    counts = []
    for part in parts:
        n = len(part.examples)
        if part.max_samples is not None:
            counts.append(min(part.max_samples, n))
        elif part.epochs is not None:
            counts.append(math.floor(Fraction(part.epochs) * n + Fraction(1, 2)))
        else:
            counts.append(n)
    weighted = [i for i, part in enumerate(parts) if part.weight is not None]
    for i in weighted:
        if len(parts[i].examples) == 0:
            raise DataError(
                "a weighted source has no examples to draw from",
                source=parts[i].name,
                found=f"dropped: {parts[i].examples.stats.get('dropped')}",
                fix="check the source with `sftlab inspect`, or remove it from the mixture",
            )
    if weighted:
        total = sum(len(parts[i].examples) for i in weighted)
        weights = {i: Fraction(parts[i].weight) for i in weighted}  # exact: no float rounding in the shares
        shares = {i: total * weights[i] / sum(weights.values()) for i in weighted}
        for i in weighted:
            counts[i] = math.floor(shares[i])
        left = total - sum(counts[i] for i in weighted)
        for i in sorted(weighted, key=lambda i: (-(shares[i] - math.floor(shares[i])), i))[:left]:
            counts[i] += 1
    return counts


def drawn(n: int, count: int, seed: int, position: int) -> np.ndarray:
    """Indices of the `count` examples taken from a source of `n` (see the module docstring)."""
    if n == 0:
        return np.zeros(0, np.int64)
    repeats, rest = divmod(count, n)
    parts = [np.arange(n, dtype=np.int64)] * repeats
    if rest:
        rng = np.random.default_rng([seed, position])
        parts.append(np.sort(rng.choice(n, size=rest, replace=False)).astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def mixture_key(parts: list[MixturePart], seed: int, source_keys: list[str]) -> str:
    """The cache key of a mixture: its sources' entries, how much of each, and the seed."""
    description = {
        "mixture": 1,
        "seed": seed,
        "sources": [
            {"entry": key, "weight": p.weight, "max_samples": p.max_samples, "epochs": p.epochs}
            for key, p in zip(source_keys, parts)
        ],
    }
    return "mix-" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:28]


def write_mixture(parts: list[MixturePart], seed: int, folder: str, layout: Layout = EXAMPLES) -> None:
    """The mixture's items and stats.json, written into `folder` (a chunk of items at a time).
    `layout`: what the parts hold (store.EXAMPLES, PAIRS or UNPAIRED)."""
    writer = StoreWriter(folder, layout)
    item = layout.item
    sources = []
    for position, (part, count) in enumerate(zip(parts, mixture_counts(parts))):
        chosen = drawn(len(part.examples), count, seed, position)
        option = {
            key: getattr(part, key) for key in ("weight", "max_samples", "epochs") if getattr(part, key) is not None
        }
        source = {"name": part.name, **option, f"{item}s_available": len(part.examples), f"{item}s": int(count)}
        source["tokens"] = 0
        if layout is EXAMPLES:
            source["supervised_tokens"] = 0
        if "desirable" in layout.per_item:
            source["desirable"] = 0
        for start in range(0, len(chosen), _GATHER):
            batch = _gathered(part.examples, chosen[start : start + _GATHER], layout)
            writer.append(batch)
            source["tokens"] += sum(len(getattr(batch, names[0])) for _, names in layout.ragged)
            if layout is EXAMPLES:
                source["supervised_tokens"] += int((batch.targets != IGNORE).sum())
            if "desirable" in layout.per_item:
                source["desirable"] += int(np.sum(batch.desirable))
        sources.append(source)
    writer.close()
    if layout is EXAMPLES:
        lengths = np.diff(np.load(f"{folder}/offsets.npy", mmap_mode="r"))
        stats = mixture_stats(parts, sources, lengths)
    else:
        stats = pair_mixture_stats(parts, sources, folder, layout)
    with open(f"{folder}/stats.json", "w") as handle:
        json.dump(stats, handle)


def _gathered(items, indices: np.ndarray, layout: Layout = EXAMPLES):
    """Items `indices` of `items` (memory-mapped) copied into arrays of their own."""
    arrays = {}
    for offsets_name, names in layout.ragged:
        offsets = getattr(items, offsets_name)
        starts = offsets[indices]
        lengths = offsets[indices + 1] - starts
        gathered = np.zeros(len(indices) + 1, np.int64)
        np.cumsum(lengths, out=gathered[1:])
        # Value positions of every chosen item, one after another.
        positions = np.repeat(starts - gathered[:-1], lengths) + np.arange(int(gathered[-1]), dtype=np.int64)
        for name in names:
            arrays[name] = np.asarray(getattr(items, name)[positions])
        arrays[offsets_name] = gathered
    for name in layout.per_item:
        arrays[name] = np.asarray(getattr(items, name)[indices])
    return layout.container(**arrays)


def _summed(parts: list[MixturePart], key: str) -> dict:
    total: dict = {}
    for part in parts:
        for reason, count in part.examples.stats.get(key, {}).items():
            total[reason] = total.get(reason, 0) + count
    return total


def _chat_stats(parts: list[MixturePart]) -> dict | None:
    chats = [p.examples.stats["chat"] for p in parts if "chat" in p.examples.stats]
    return {key: sum(chat.get(key, 0) for chat in chats) for key in CHAT_STATS} if chats else None


def pair_mixture_stats(parts: list[MixturePart], sources: list[dict], folder: str, layout: Layout) -> dict:
    """A preference mixture's statistics: what the sources' preparations counted, added up, and
    what the mixture holds (tokens of each part, lengths of the pairs), per source too."""
    ends = {
        part: int(np.load(f"{folder}/{part}_offsets.npy", mmap_mode="r")[-1])
        for part in ("prompt", "chosen", "rejected")
    }
    lengths = sum(np.diff(np.load(f"{folder}/{offsets}.npy", mmap_mode="r")) for offsets, _ in layout.ragged)
    stats = {
        "records": sum(p.examples.stats.get("records", 0) for p in parts),
        "formats": _summed(parts, "formats"),
        "skipped_invalid": _summed(parts, "skipped_invalid"),
        "skipped_replies": _summed(parts, "skipped_replies"),
        "truncated": sum(p.examples.stats.get("truncated", 0) for p in parts),
        "truncated_prompt": sum(p.examples.stats.get("truncated_prompt", 0) for p in parts),
        "truncated_completion": sum(p.examples.stats.get("truncated_completion", 0) for p in parts),
        "dropped": _summed(parts, "dropped"),
        "pairs": sum(s["pairs"] for s in sources),
        "prompt_tokens": ends["prompt"],
        "chosen_tokens": ends["chosen"],
        "rejected_tokens": ends["rejected"],
        "tokens": sum(ends.values()),
        "length": {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (0, 50, 90, 99, 100)}
        if len(lengths)
        else {},
    }
    if "desirable" in layout.per_item:
        stats["desirable"] = sum(s["desirable"] for s in sources)
        stats["undesirable"] = stats["pairs"] - stats["desirable"]
    chat = _chat_stats(parts)
    if chat is not None:
        stats["chat"] = chat
    stats["source"] = f"mixture of {len(parts)} sources"
    stats["sources"] = sources
    return stats


def mixture_stats(parts: list[MixturePart], sources: list[dict], lengths: np.ndarray) -> dict:
    """What the sources' preparations counted, added up, and what the mixture holds, per source."""

    def summed(key):
        return _summed(parts, key)

    tokens = sum(s["tokens"] for s in sources)
    supervised = sum(s["supervised_tokens"] for s in sources)
    stats = {
        "records": sum(p.examples.stats.get("records", 0) for p in parts),
        "formats": summed("formats"),
        "examples": int(len(lengths)),
        "skipped_invalid": summed("skipped_invalid"),
        "truncated": sum(p.examples.stats.get("truncated", 0) for p in parts),
        "dropped": summed("dropped"),
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_fraction": supervised / tokens if tokens else 0.0,
        "length": {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (0, 50, 90, 99, 100)}
        if len(lengths)
        else {},
    }
    chats = [p.examples.stats["chat"] for p in parts if "chat" in p.examples.stats]
    if chats:
        stats["chat"] = {key: sum(chat.get(key, 0) for chat in chats) for key in CHAT_STATS}
    stats["source"] = f"mixture of {len(parts)} sources"
    stats["sources"] = sources
    return stats
