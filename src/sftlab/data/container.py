"""The containers after tokenization: SFT examples (aligned input_ids / targets) and preference
pairs (prompt, chosen, rejected), each stored flat.

It imports numpy only, so the stages after tokenization (batching, the loss, the store) can use
it, and IGNORE, without importing the tokenizer, Jinja or the chat code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain

import numpy as np

IGNORE = -100


@dataclass
class Examples:
    """Examples stored flat: example i is input_ids[offsets[i]:offsets[i+1]] (and the same for targets)."""

    input_ids: np.ndarray
    targets: np.ndarray
    offsets: np.ndarray
    record_index: np.ndarray  # source record of each example, so later errors can name it
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.targets[start:end]

    @cached_property
    def lengths(self) -> np.ndarray:
        # Once: callers index it per example (evaluate sorts by it), and a memory-mapped offsets
        # array would otherwise be read and diffed again on every call.
        return np.diff(self.offsets)

    @classmethod
    def concatenate(cls, parts: list["Examples"], stats: dict | None = None) -> "Examples":
        """The examples of `parts` one after another (in memory)."""
        if not parts:
            return cls.from_lists([], stats=stats)
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + start for p, start in zip(parts, starts)])
        return cls(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.targets for p in parts]),
                   offsets.astype(np.int64), np.concatenate([p.record_index for p in parts]).astype(np.int64), stats or {})

    @classmethod
    def from_lists(cls, pairs: list[tuple[list[int], list[int]]], record_index=None, stats=None) -> "Examples":
        lengths = [len(ids) for ids, _ in pairs]
        offsets = np.zeros(len(pairs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # chain.from_iterable walks the lists in C: twice as fast as a nested generator expression.
        flat_ids = np.fromiter(chain.from_iterable(ids for ids, _ in pairs), dtype=np.int32, count=int(offsets[-1]))
        flat_targets = np.fromiter(chain.from_iterable(tg for _, tg in pairs), dtype=np.int32, count=int(offsets[-1]))
        index = np.arange(len(pairs)) if record_index is None else np.asarray(record_index, dtype=np.int64)
        return cls(flat_ids, flat_targets, offsets, index, stats or {})


@dataclass
class Pairs:
    """Preference pairs stored flat: pair i is the prompt P = prompt_ids[prompt_offsets[i]:prompt_offsets[i+1]]
    as inference feeds it, and the chosen and rejected completions C and R (each the served
    continuation of P through its end-of-turn marker), stored the same way. Every token of C and R
    is trained; P is context only."""

    prompt_ids: np.ndarray
    prompt_offsets: np.ndarray
    chosen_ids: np.ndarray
    chosen_offsets: np.ndarray
    rejected_ids: np.ndarray
    rejected_offsets: np.ndarray
    record_index: np.ndarray  # source record of each pair, so later errors can name it
    stats: dict = field(default_factory=dict)
    # KTO's unpaired examples: True where the completion is desirable; `rejected` then holds the
    # mismatched completion that estimates the KL reference point (data/preference.py).
    desirable: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.prompt_ids[self.prompt_offsets[i] : self.prompt_offsets[i + 1]],
                self.chosen_ids[self.chosen_offsets[i] : self.chosen_offsets[i + 1]],
                self.rejected_ids[self.rejected_offsets[i] : self.rejected_offsets[i + 1]])

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens of each pair's shared row [P | C | R]."""
        return np.diff(self.prompt_offsets) + np.diff(self.chosen_offsets) + np.diff(self.rejected_offsets)

    @classmethod
    def from_lists(cls, triples: list[tuple[list[int], list[int], list[int]]], record_index=None, stats=None) -> "Pairs":
        arrays = []
        for part in range(3):
            lengths = [len(triple[part]) for triple in triples]
            offsets = np.zeros(len(triples) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = np.fromiter(chain.from_iterable(triple[part] for triple in triples), dtype=np.int32, count=int(offsets[-1]))
            arrays += [ids, offsets]
        index = np.arange(len(triples)) if record_index is None else np.asarray(record_index, dtype=np.int64)
        return cls(*arrays, index, stats or {})
