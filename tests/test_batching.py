"""examples -> micro-batches: best-fit decreasing bins, the step plan, padded and packed batches.

Expected bins and tensors are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftlab.training.batching import best_fit_decreasing, pack_batch, pad_batch, plan_epoch
from sftlab.data.container import IGNORE, Examples

X = IGNORE


# --- best-fit decreasing --------------------------------------------------------------------------


def check_bins(bins, lengths, capacity):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_best_fit_decreasing_hand_worked_bins():
    lengths = np.array([5, 3, 7, 2, 4, 1])
    # Longest first: 7(#2) opens bin A (room 1); 5(#0) opens B (room 3); 4(#4) opens C (room 4);
    # 3(#1) -> B, the tightest fit (room 0); 2(#3) -> C (room 2); 1(#5) -> A (room 1 is tightest).
    bins = best_fit_decreasing(lengths, 8)
    assert bins == [[2, 5], [0, 1], [4, 3]]
    check_bins(bins, lengths, 8)


def test_best_fit_is_not_first_fit():
    # 7 opens A (room 3), 4 opens B (room 6), 4 -> B (room 2), then 1 goes to B (room 2 < 3):
    # first-fit would have put it in A.
    assert best_fit_decreasing(np.array([7, 4, 4, 1]), 10) == [[0], [1, 2, 3]]


def test_best_fit_ties_go_to_the_bin_opened_first():
    # Both bins have room 4 when the 4 arrives; the first one opened wins.
    assert best_fit_decreasing(np.array([6, 6, 4]), 10) == [[0, 2], [1]]


def test_best_fit_exact_capacity_and_too_long():
    assert best_fit_decreasing(np.array([4, 4, 4]), 4) == [[0], [1], [2]]
    assert best_fit_decreasing(np.array([], dtype=np.int64), 4) == []
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        best_fit_decreasing(np.array([3, 9]), 8)


def test_best_fit_random_lengths_respect_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300)
    bins = best_fit_decreasing(lengths, 64)
    check_bins(bins, lengths, 64)
    # No packing needs fewer than ceil(total / capacity) bins; these lengths fill 167 against that 161.
    assert len(bins) == 167 and np.ceil(lengths.sum() / 64) == 161


def reference_best_fit_decreasing(lengths, capacity):
    """The implementation best_fit_decreasing replaced (a sorted list of rooms, O(n^2) inserts):
    the new one must give exactly its bins."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins, room = [], []
    for index in order:
        length = int(lengths[index])
        slot = bisect.bisect_left(room, (length, -1))
        if slot < len(room):
            left, bin_id = room.pop(slot)
            bins[bin_id].append(index)
            bisect.insort(room, (left - length, bin_id))
        else:
            bins.append([index])
            bisect.insort(room, (capacity - length, len(bins) - 1))
    return bins


def test_best_fit_equal_lengths_fill_one_bin_after_another():
    # 3, 3 fill bin A (room 1), the next two bin B (room 1); the 2s fit in neither: C takes all three.
    assert best_fit_decreasing(np.array([3, 3, 3, 3, 2, 2, 2]), 7) == [[0, 1], [2, 3], [4, 5, 6]]


def test_best_fit_same_room_bins_are_used_lowest_id_first():
    # Three 6s leave rooms 4, 4, 4. The first 2 goes to bin 0 (room 2), which is then the tightest
    # fit for the second 2 (room 0); the next two 2s do the same in bin 1; the 1 goes to bin 2.
    assert best_fit_decreasing(np.array([6, 6, 6, 2, 2, 2, 2, 1]), 10) == [[0, 3, 4], [1, 5, 6], [2, 7]]


def test_best_fit_empty_examples_join_the_tightest_bin():
    assert best_fit_decreasing(np.array([0, 5, 0]), 5) == [[1, 0, 2]]
    assert best_fit_decreasing(np.array([0, 0]), 5) == [[0, 1]]


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_gives_the_bins_of_the_reference(seed):
    rng = np.random.default_rng(seed)
    for _ in range(150):
        capacity = int(rng.integers(1, 80))
        n = int(rng.integers(0, 300))
        # Spread lengths, lengths with many ties, and lengths of a few values incl. 0 and capacity.
        kind = int(rng.integers(0, 3))
        if kind == 0:
            lengths = rng.integers(0, capacity + 1, size=n)
        elif kind == 1:
            lengths = rng.integers(1, max(2, capacity // 3), size=n)
        else:
            lengths = rng.choice([0, 1, min(2, capacity), max(1, capacity // 2), capacity], size=n)
        assert best_fit_decreasing(lengths, capacity) == reference_best_fit_decreasing(lengths, capacity), (capacity, lengths.tolist())


def test_best_fit_at_scale_matches_the_reference():
    lengths = np.random.default_rng(9).integers(1, 1025, size=20_000)
    assert best_fit_decreasing(lengths, 1024) == reference_best_fit_decreasing(lengths, 1024)


# --- the step plan --------------------------------------------------------------------------------


def flat(step):
    return [i for slot in step for i in slot]


def test_plan_is_a_function_of_the_seed_and_epoch():
    lengths = np.arange(1, 21)
    kwargs = dict(batch_size=2, accumulation=2, world_size=1)
    a = plan_epoch(lengths, seed=3, epoch=0, **kwargs)
    assert a == plan_epoch(lengths, seed=3, epoch=0, **kwargs)
    assert a != plan_epoch(lengths, seed=4, epoch=0, **kwargs)
    assert a != plan_epoch(lengths, seed=3, epoch=1, **kwargs)
    assert sorted(i for step in a for i in flat(step)) == list(range(20))  # each item once per epoch


def test_plan_same_items_per_step_whatever_the_split():
    lengths = np.arange(1, 33)
    one = plan_epoch(lengths, batch_size=8, accumulation=1, world_size=1, seed=7, epoch=0)
    accumulated = plan_epoch(lengths, batch_size=2, accumulation=4, world_size=1, seed=7, epoch=0)
    distributed = plan_epoch(lengths, batch_size=4, accumulation=1, world_size=2, seed=7, epoch=0)
    both = plan_epoch(lengths, batch_size=1, accumulation=4, world_size=2, seed=7, epoch=0)
    assert len(one) == len(accumulated) == len(distributed) == len(both) == 4
    for a, b, c, d in zip(one, accumulated, distributed, both):
        assert [len(s) for s in a] == [8]
        assert [len(s) for s in b] == [2] * 4
        assert [len(s) for s in c] == [4] * 2
        assert [len(s) for s in d] == [1] * 8
        assert flat(a) == flat(b) == flat(c) == flat(d)


def test_plan_partial_last_step_is_spread_over_slots():
    lengths = np.arange(1, 12)  # 11 items, 8 per step: the last step has 3
    plan = plan_epoch(lengths, batch_size=2, accumulation=2, world_size=2, seed=0, epoch=0)
    assert len(plan) == 2
    assert [len(s) for s in plan[1]] == [1, 1, 1, 0]  # spread, and the empty slot is an empty list
    assert plan[1][3] == []
    assert sorted(flat(plan[0]) + flat(plan[1])) == list(range(11))
    single = plan_epoch(lengths, batch_size=8, accumulation=1, world_size=1, seed=0, epoch=0)
    assert flat(single[1]) == flat(plan[1])


def test_plan_fewer_items_than_slots_leaves_empty_slots():
    plan = plan_epoch(np.array([5, 6]), batch_size=1, accumulation=2, world_size=2, seed=0, epoch=0)
    assert len(plan) == 1
    assert [len(s) for s in plan[0]] == [1, 1, 0, 0]
    assert sorted(flat(plan[0])) == [0, 1]


def test_plan_group_by_length_keeps_similar_lengths_together():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 200, size=64)
    plan = plan_epoch(lengths, batch_size=4, accumulation=2, world_size=1, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for step in plan for i in flat(step)) == list(range(64))
    # One mega-batch (64 < 8 x 50): sorted longest first, then cut into steps; steps come in random order.
    for step in plan:
        step_lengths = [int(lengths[i]) for i in flat(step)]
        assert step_lengths == sorted(step_lengths, reverse=True)
    assert [max(lengths[flat(s)]) for s in plan] != sorted((max(lengths[flat(s)]) for s in plan), reverse=True)


def test_plan_without_shuffle_keeps_the_data_order():
    plan = plan_epoch(np.arange(1, 12), batch_size=2, accumulation=2, world_size=1, seed=0, epoch=0, shuffle=False)
    assert plan == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10]]]
    assert plan == plan_epoch(np.arange(1, 12), batch_size=2, accumulation=2, world_size=1, seed=9, epoch=3, shuffle=False)
    # Grouping by length still sorts inside the mega-batch, and the steps stay in that order.
    grouped = plan_epoch(np.array([3, 9, 1, 7]), batch_size=2, accumulation=1, world_size=1, seed=0, epoch=0,
                         group_by_length=True, shuffle=False)
    assert grouped == [[[1, 3]], [[0, 2]]]


# --- padded and packed batches --------------------------------------------------------------------


@pytest.fixture
def examples():
    # Example 0: three tokens, all but the last supervised. Example 1: a 3-token prompt and a
    # 2-token completion (targets shifted: position 2 predicts 23). Example 2: two tokens.
    return Examples.from_lists(
        [([10, 11, 12], [11, 12, X]), ([20, 21, 22, 23, 24], [X, X, 23, 24, X]), ([30, 31], [31, X])],
        record_index=[5, 6, 7],
    )


def test_pad_batch_exact_tensors(examples):
    batch = pad_batch(examples, [1, 0], pad_id=0)
    assert batch["input_ids"].tolist() == [[20, 21, 22, 23, 24], [10, 11, 12, 0, 0]]
    assert batch["targets"].tolist() == [[X, X, 23, 24, X], [11, 12, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert "position_ids" not in batch
    assert batch["record_index"] == [6, 5]
    assert batch["real_tokens"] == 8
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "targets", "attention_mask"))


def test_pad_batch_pad_to_multiple_of(examples):
    batch = pad_batch(examples, [2, 0], pad_id=1, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[30, 31, 1, 1], [10, 11, 12, 1]]
    assert batch["targets"].tolist() == [[31, X, X, X], [11, 12, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_pad_batch_empty_slot_is_fully_masked(examples):
    batch = pad_batch(examples, [], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12]]  # example 0 runs, so every process does the same passes
    assert batch["targets"].tolist() == [[X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1]]
    assert batch["record_index"] == [] and batch["real_tokens"] == 0


def test_pack_batch_exact_tensors(examples):
    batch = pack_batch(examples, [[1, 2], [0]], pad_id=0)
    assert batch["input_ids"].tolist() == [[20, 21, 22, 23, 24, 30, 31], [10, 11, 12, 0, 0, 0, 0]]
    # The last position of each example has target -100: nothing crosses the boundary.
    assert batch["targets"].tolist() == [[X, X, 23, 24, X, 31, X], [11, 12, X, X, X, X, X]]
    # Positions restart at 0 for every example; the trailing pads form their own run.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 0, 1, 2, 3]]
    assert "attention_mask" not in batch
    assert batch["record_index"] == [6, 7, 5]
    assert batch["real_tokens"] == 10


def test_pack_batch_pad_to_multiple_of(examples):
    batch = pack_batch(examples, [[0, 2]], pad_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 30, 31, 9, 9, 9]]
    assert batch["targets"].tolist() == [[11, 12, X, 31, X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["real_tokens"] == 5


def test_pack_batch_empty_slot_is_fully_masked(examples):
    batch = pack_batch(examples, [], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12]]
    assert batch["targets"].tolist() == [[X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2]]
    assert batch["record_index"] == [] and batch["real_tokens"] == 0
