"""Extreme settings: a value that cannot work is refused by the config with its key named, and
one that can work costs what the data costs (the packer at max_length 1e9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftlab.config import load_config, make_config
from sftlab.errors import ConfigError
from sftlab.training.batching import best_fit_decreasing
from test_batching import reference_best_fit_decreasing

BASE = {"model": "m", "train_data": "d.jsonl"}


def refused(values: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        make_config({**BASE, **values}, source="run.yaml")
    return caught.value


@pytest.mark.parametrize("key", ["learning_rate", "num_train_epochs", "weight_decay", "adam_epsilon", "max_grad_norm",
                                 "lora_alpha", "neftune_noise_alpha", "router_aux_loss_coef", "warmup_ratio", "beta",
                                 "simpo_gamma", "rpo_alpha"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_infinite_or_nan_floats_are_refused_naming_the_key(key, value):
    error = refused({key: value})
    assert f"invalid value for '{key}'" in str(error)
    assert "finite number" in str(error) or "greater than" in str(error)  # -inf meets the lower bound first


def test_an_infinite_mixture_weight_is_refused_naming_the_source(tmp_path):
    # It raised OverflowError from the mixture's exact fractions, as a traceback.
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ntrain_data:\n  - {path: a.jsonl, weight: 1}\n  - {path: b.jsonl, weight: .inf}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(config))
    assert str(caught.value).startswith(f"{config}, field 'train_data[1].weight': invalid value: "
                                        "Input should be a finite number; found inf")
    for key in ("weight", "epochs"):
        with pytest.raises(ConfigError, match=rf"train_data\[0\]\.{key}': invalid value: Input should be a finite"):
            make_config({**BASE, "train_data": [{"path": "a.jsonl", key: math.nan}]})


def test_pad_to_multiple_of_beyond_max_length_is_refused_naming_both():
    # At 1e9 every batch was padded to 1e9 positions and the run was killed for memory, without a word.
    error = refused({"pad_to_multiple_of": 10**9, "max_length": 512})
    assert str(error) == (
        "run.yaml, field 'pad_to_multiple_of': pad_to_multiple_of is larger than max_length: every batch would be "
        "padded past the longest row; found pad_to_multiple_of 1000000000, max_length 512; expected at most "
        "max_length; fix: e.g. pad_to_multiple_of: 8, or max_length itself for one compiled shape")
    assert make_config({**BASE, "pad_to_multiple_of": 512, "max_length": 512}).pad_to_multiple_of == 512


@pytest.mark.parametrize("values, message", [
    ({"max_grad_norm": -1.0}, "greater than or equal to 0"),  # a negative norm reverses every update
    ({"seed": -1}, "greater than or equal to 0"),  # numpy's generators refuse negative seeds
    ({"seed": 2**64}, "less than 18446744073709551616"),  # torch.manual_seed's range
])
def test_numbers_that_cannot_work_are_refused(values, message):
    (key,) = values
    assert f"invalid value for '{key}'" in str(refused(values)) and message in str(refused(values))
    assert make_config({**BASE, "max_grad_norm": 0}).max_grad_norm == 0  # off, as in transformers' Trainer


# --- the packer: its cost follows the data, not max_length ----------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_capacities_at_and_past_the_data_give_the_reference_bins(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        lengths = rng.integers(0, 60, size=int(rng.integers(1, 40)))
        total = int(lengths.sum())
        for capacity in {max(int(lengths.max()), total - 1), max(int(lengths.max()), total), total + 1, 10**9}:
            if capacity < 1:
                continue
            assert best_fit_decreasing(lengths, capacity) == reference_best_fit_decreasing(lengths, capacity), (
                capacity, lengths.tolist())


def test_a_huge_max_length_packs_as_one_row_without_a_structure_of_its_size():
    # The rooms' bit mask was `capacity` bits wide: 1e9 took 44 s and ~1 GB for one row, and 1e18
    # cannot be allocated at all (so this test fails at once on the old packer, with no clock).
    lengths = np.array([5, 3, 0, 7, 3])
    for capacity in (18, 10**9, 10**18):
        assert best_fit_decreasing(lengths, capacity) == [[3, 0, 1, 4, 2]]  # longest first, ties by index
    assert best_fit_decreasing(lengths, 17) == reference_best_fit_decreasing(lengths, 17)  # two bins: the loop
