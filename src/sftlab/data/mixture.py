"""Several sources as one set of examples: each source is prepared (and cached) on its own, then
its examples are drawn by weight, max_samples or epochs, deterministically from the seed, into
an entry of the mixture's own.

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

from sftlab.data.container import IGNORE, Examples
from sftlab.data.examples import CHAT_STATS
from sftlab.data.store import StoreWriter
from sftlab.errors import DataError

_GATHER = 8192  # examples copied at a time


@dataclass(frozen=True)
class MixturePart:
    """One prepared source and how much of it the mixture takes (at most one option)."""

    name: str
    examples: Examples
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
            raise DataError("a weighted source has no examples to draw from", source=parts[i].name,
                            found=f"dropped: {parts[i].examples.stats.get('dropped')}",
                            fix="check the source with `sftlab inspect`, or remove it from the mixture")
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
        "sources": [{"entry": key, "weight": p.weight, "max_samples": p.max_samples, "epochs": p.epochs}
                    for key, p in zip(source_keys, parts)],
    }
    return "mix-" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:28]


def write_mixture(parts: list[MixturePart], seed: int, folder: str) -> None:
    """The mixture's examples and stats.json, written into `folder` (a chunk of examples at a time)."""
    writer = StoreWriter(folder)
    sources = []
    for position, (part, count) in enumerate(zip(parts, mixture_counts(parts))):
        chosen = drawn(len(part.examples), count, seed, position)
        tokens = supervised = 0
        for start in range(0, len(chosen), _GATHER):
            batch = _gathered(part.examples, chosen[start : start + _GATHER])
            writer.append(batch)
            tokens += len(batch.input_ids)
            supervised += int((batch.targets != IGNORE).sum())
        option = {key: getattr(part, key) for key in ("weight", "max_samples", "epochs") if getattr(part, key) is not None}
        sources.append({"name": part.name, **option, "examples_available": len(part.examples), "examples": int(count),
                        "tokens": tokens, "supervised_tokens": supervised})
    writer.close()
    lengths = np.diff(np.load(f"{folder}/offsets.npy", mmap_mode="r"))
    with open(f"{folder}/stats.json", "w") as handle:
        json.dump(mixture_stats(parts, sources, lengths), handle)


def _gathered(examples: Examples, indices: np.ndarray) -> Examples:
    """Examples `indices` of `examples` (memory-mapped) copied into arrays of their own."""
    starts = examples.offsets[indices]
    lengths = examples.offsets[indices + 1] - starts
    offsets = np.zeros(len(indices) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Token positions of every chosen example, one after another.
    positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
    return Examples(np.asarray(examples.input_ids[positions]), np.asarray(examples.targets[positions]), offsets,
                    np.asarray(examples.record_index[indices], dtype=np.int64))


def mixture_stats(parts: list[MixturePart], sources: list[dict], lengths: np.ndarray) -> dict:
    """What the sources' preparations counted, added up, and what the mixture holds, per source."""
    def summed(key):
        total: dict = {}
        for part in parts:
            for reason, count in part.examples.stats.get(key, {}).items():
                total[reason] = total.get(reason, 0) + count
        return total

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
        "length": {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (0, 50, 90, 99, 100)} if len(lengths) else {},
    }
    chats = [p.examples.stats["chat"] for p in parts if "chat" in p.examples.stats]
    if chats:
        stats["chat"] = {key: sum(chat.get(key, 0) for chat in chats) for key in CHAT_STATS}
    stats["source"] = f"mixture of {len(parts)} sources"
    stats["sources"] = sources
    return stats
