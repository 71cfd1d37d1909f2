"""examples -> micro-batches: padded batches, padding-free packed rows, and the step plan.

The step plan decides, from the seed alone, which examples every optimizer step sees and how
they split into micro-batches and processes. A step holds batch_size x accumulation x world
items (examples, or packed rows), so 8x1, 2x4 and 4x1 on 2 processes see the same 8 items in
the same step: only the split differs. A resumed run rebuilds the plan and skips to its step.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import torch

from sftlab.data.container import IGNORE, Examples


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of example indices, each holding at most `capacity` tokens, by best-fit decreasing.

    Longest first; each example goes to the open bin it fills most tightly (the one with the
    least room left that still fits it), else to a new bin. Deterministic: ties go to the
    bin opened first.

    O(n log n): examples of one length are placed together. Among bins with room >= L, the one
    with the least room r (lowest id first) stays the tightest fit while it takes floor(r / L)
    of them in a row (its room drops below any other room >= L), then the next one takes its
    turn; a new bin likewise takes floor(capacity / L). So a length touches only the bins it
    fills, found through buckets of bins by room left. 10M examples take seconds, where a sorted
    list of rooms (insort) took 11 s for 1M.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by index
    ordered = lengths[order]
    if ordered[0] > capacity:
        raise ValueError(f"example {int(order[0])} has {int(ordered[0])} tokens, more than the bin capacity {capacity}")
    if int(ordered.sum()) <= capacity:
        # The first bin always has room for everything left, so best-fit never opens a second: one
        # bin, in processing order, as the loop below would give. Said here rather than run, since
        # the loop's cost grows with the capacity (the rooms' bit mask is `capacity` bits wide:
        # max_length 1e9 took 44 s and ~1 GB for one row), and past this point capacity < the
        # data's token count, so the packer's cost is bounded by the data, not by max_length.
        return [order.tolist()]
    rooms = _Rooms()
    placed = np.empty(len(order), dtype=np.int64)  # bin of the k-th example in processing order
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    for start, end in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
        length = int(ordered[start])
        if length == 0:
            # An empty example leaves every room as it was: all of them go to the tightest bin.
            placed[start:end] = rooms.open(1, capacity)[0] if rooms.bins == 0 else rooms.tightest()
            continue
        position = start
        while position < end:
            room = rooms.least_at_least(length)
            if room is None:
                break
            ids = rooms.take(room)
            per_bin = room // length
            full = min(len(ids), (end - position) // per_bin)
            placed[position : position + full * per_bin] = np.repeat(ids[:full], per_bin)
            position += full * per_bin
            rooms.add(room - per_bin * length, ids[:full])
            rest = ids[full:]
            if len(rest) and position < end:  # fewer than per_bin left: the next bin takes them all
                rooms.add(room - (end - position) * length, rest[:1])
                placed[position:end] = rest[0]
                position, rest = end, rest[1:]
            rooms.add(room, rest)
        if position < end:
            per_bin = capacity // length
            count = end - position
            first = rooms.bins
            new = rooms.open(-(-count // per_bin), None)
            placed[position:end] = first + np.arange(count) // per_bin
            full = count // per_bin
            rooms.add(capacity - per_bin * length, new[:full])
            if full < len(new):
                rooms.add(capacity - (count - full * per_bin) * length, new[full:])
    # Each bin lists its examples in the order they were placed (processing order).
    by_bin = order[np.argsort(placed, kind="stable")].tolist()
    bounds = np.cumsum(np.bincount(placed, minlength=rooms.bins)).tolist()
    # The collector paused: it would scan the growing list of lists (none cyclic) again and
    # again, 1.7 of the 2.4 s for 1M examples.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return [by_bin[a:b] for a, b in zip([0] + bounds[:-1], bounds)]
    finally:
        if collecting:
            gc.enable()


class _Rooms:
    """Open bins grouped by the room they have left: per room value, the bin ids in increasing
    order, and a bit mask of the room values that have bins (the next one >= L is one shift)."""

    def __init__(self):
        self.buckets: dict[int, list[np.ndarray]] = {}
        self.mask = 0
        self.bins = 0

    def open(self, count: int, room: int | None) -> np.ndarray:
        ids = np.arange(self.bins, self.bins + count, dtype=np.int64)
        self.bins += count
        if room is not None:
            self.add(room, ids)
        return ids

    def least_at_least(self, length: int) -> int | None:
        above = self.mask >> length
        return None if not above else length + (above & -above).bit_length() - 1

    def tightest(self) -> int:
        room = (self.mask & -self.mask).bit_length() - 1
        ids = self.take(room)
        self.add(room, ids)
        return int(ids[0])

    def take(self, room: int) -> np.ndarray:
        """Every bin with this room left, lowest id first; they leave the bucket."""
        runs = self.buckets.pop(room)
        self.mask &= ~(1 << room)
        return runs[0] if len(runs) == 1 else np.sort(np.concatenate(runs))

    def add(self, room: int, ids: np.ndarray) -> None:
        if len(ids):
            self.buckets.setdefault(room, []).append(ids)
            self.mask |= 1 << room


def plan_epoch(
    item_lengths: np.ndarray,
    *,
    batch_size: int,
    accumulation: int,
    world_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = False,
    shuffle: bool = True,
) -> list[list[list[int]]]:
    """Steps of one epoch; step[k] is the list of world x accumulation micro-batches (item indices).

    Micro-batch (rank r, accumulation j) of a step is `step[r * accumulation + j]`. The last
    step may be short: its items are spread so each slot gets some; a slot left empty (fewer
    items than slots) is an empty list, which the loop runs as a fully masked micro-batch so
    every process still does the same number of forward/backward passes.
    With shuffle=False items are taken in their order (grouping by length still sorts inside
    each mega-batch, and steps keep their order).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(item_lengths)) if shuffle else np.arange(len(item_lengths))
    per_step = batch_size * accumulation * world_size
    if group_by_length:
        # Sort inside mega-batches of 50 steps: similar lengths share a micro-batch, order stays random.
        mega = per_step * 50
        order = (
            np.concatenate(
                [
                    chunk[np.argsort(-item_lengths[chunk], kind="stable")]
                    for chunk in np.array_split(order, max(1, math.ceil(len(order) / mega)))
                ]
            )
            if len(order)
            else order
        )
    slots = accumulation * world_size
    steps = []
    for start in range(0, len(order), per_step):
        items = order[start : start + per_step].tolist()
        if len(items) == per_step:
            steps.append([items[k * batch_size : (k + 1) * batch_size] for k in range(slots)])
        else:
            steps.append([part.tolist() for part in np.array_split(np.asarray(items, dtype=np.int64), slots)])
    if group_by_length and shuffle and steps:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return steps


def pad_batch(examples: Examples, indices: list[int], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded batch: pad id in inputs, -100 in targets, attention mask zero on pads."""
    masked = not indices
    indices = indices or [0]  # an empty slot runs example 0 with every target masked
    length = max(int(examples.offsets[i + 1] - examples.offsets[i]) for i in indices)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    targets = torch.full((len(indices), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, index in enumerate(indices):
        ids, tgt = examples[index]
        input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        if not masked:
            targets[row, : len(ids)] = torch.from_numpy(tgt.astype(np.int64))
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "targets": targets,
        "attention_mask": attention_mask,
        "record_index": [] if masked else [int(examples.record_index[i]) for i in indices],
        "real_tokens": 0 if masked else int(attention_mask.sum()),
    }


def pack_batch(examples: Examples, rows: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Packed rows without padding between examples: `position_ids` restart at 0 for every
    example and no attention mask is passed, which is how transformers keeps attention inside
    each example (it derives the block-diagonal mask from the position resets). Rows are
    padded at the end to the longest row; pads form their own position run and have target -100."""
    masked = not rows
    rows = rows or [[0]]
    row_lengths = [sum(int(examples.offsets[i + 1] - examples.offsets[i]) for i in row) for row in rows]
    length = max(row_lengths)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    record_index = []
    for r, row in enumerate(rows):
        cursor = 0
        for index in row:
            ids, tgt = examples[index]
            n = len(ids)
            input_ids[r, cursor : cursor + n] = torch.from_numpy(ids.astype(np.int64))
            if not masked:
                targets[r, cursor : cursor + n] = torch.from_numpy(tgt.astype(np.int64))
            position_ids[r, cursor : cursor + n] = torch.arange(n)
            cursor += n
            record_index.append(int(examples.record_index[index]))
        position_ids[r, cursor:] = torch.arange(length - cursor)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "record_index": [] if masked else record_index,
        "real_tokens": 0 if masked else sum(row_lengths),
        "row_lengths": row_lengths,  # real tokens per row (the trailing pads are not)
    }


class StepPlan:
    """Which items each optimizer step trains on; items are examples, or packed rows of examples.
    `collate(examples, indices, pad_id, pad_to_multiple_of)`: how an objective other than SFT makes
    a batch of its items (preference pairs); anything with `lengths` can then be planned."""

    def __init__(
        self,
        examples: Examples,
        *,
        packing: bool,
        max_length: int,
        batch_size: int,
        accumulation: int,
        world_size: int,
        seed: int,
        group_by_length: bool,
        shuffle: bool = True,
        collate=None,
    ):
        self.examples = examples
        self.packing = packing
        self.collate_items = collate
        lengths = examples.lengths
        if packing:
            self.items = best_fit_decreasing(lengths, max_length)
            self.item_lengths = np.array([int(lengths[row].sum()) for row in self.items], dtype=np.int64)
        else:
            self.items = None
            self.item_lengths = lengths
        self.accumulation = accumulation
        self.kwargs = dict(
            batch_size=batch_size,
            accumulation=accumulation,
            world_size=world_size,
            seed=seed,
            group_by_length=group_by_length and not packing,
            shuffle=shuffle,
        )
        self.steps_per_epoch = math.ceil(len(self.item_lengths) / (batch_size * accumulation * world_size))
        self._epoch, self._steps = None, None

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro-batches (item indices) for optimizer step `step`."""
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._steps = epoch, plan_epoch(self.item_lengths, epoch=epoch, **self.kwargs)
        slots = self._steps[step % self.steps_per_epoch]
        return slots[rank * self.accumulation : (rank + 1) * self.accumulation]

    def collate(self, items: list[int], pad_id: int, pad_to_multiple_of: int | None) -> dict:
        if self.collate_items is not None:  # packed: the rows' items; else one item per row
            rows = [self.items[i] for i in items] if self.packing else items
            return self.collate_items(self.examples, rows, pad_id, pad_to_multiple_of)
        if self.packing:
            return pack_batch(self.examples, [self.items[i] for i in items], pad_id, pad_to_multiple_of)
        return pad_batch(self.examples, items, pad_id, pad_to_multiple_of)


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps when given (> 0), else the epochs' worth, at least one."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * steps_per_epoch))
