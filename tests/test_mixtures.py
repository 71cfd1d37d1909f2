"""Mixtures of sources: counts worked out by hand from the weights, the examples drawn from the
seed, per-source statistics in the log and in inspect, the config shape and its errors, exact
resume, and `sftlab prepare` ahead of `sftlab train`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sftlab import ConfigError, SFTConfig, train
from sftlab.cli import main
from sftlab.config import load_config, make_config
from sftlab.data.container import Examples
from sftlab.data.mixture import MixturePart, drawn, mixture_counts
from sftlab.data.splits import prepare_split
from tiny import char_tokenizer


def part(n: int, **option) -> MixturePart:
    examples = Examples.from_lists([([1, 2], [2, -100])] * n)
    return MixturePart(f"source of {n}", examples, **option)


def test_counts_follow_weights_max_samples_and_epochs():
    parts = [
        part(10, weight=1),
        part(4, weight=3),
        part(6),
        part(5, epochs=1.5),
        part(8, max_samples=3),
        part(3, epochs=0.5),
    ]
    # Weighted: A (10) and B (4) share N = 14 as 1 : 3, i.e. 3.5 and 10.5: floors 3 and 10, and the one
    # example left goes to the larger remainder, a tie (0.5, 0.5) that the earlier source wins: 4 and 10.
    # C has no option: all 6. D: 1.5 x 5 = 7.5, half up: 8. E: min(3, 8) = 3. F: 0.5 x 3 = 1.5 -> 2.
    assert mixture_counts(parts) == [4, 10, 6, 8, 3, 2]
    # Shares that are not ties: 7 examples as 1 : 2 : 4 -> 1, 2, 4 exactly; 10 as 1 : 1 : 1 -> 3.33 each: 4, 3, 3.
    assert mixture_counts([part(2, weight=1), part(2, weight=2), part(3, weight=4)]) == [1, 2, 4]
    assert mixture_counts([part(4, weight=1), part(3, weight=1), part(3, weight=1)]) == [4, 3, 3]
    # Weights are relative: scaling them changes nothing.
    assert mixture_counts([part(10, weight=0.25), part(4, weight=0.75)]) == [4, 10]


def test_which_examples_are_drawn():
    # All examples q times, then the rest drawn without replacement by default_rng([seed, position]), sorted.
    assert drawn(4, 10, seed=3, position=1).tolist() == [0, 1, 2, 3, 0, 1, 2, 3] + sorted(
        np.random.default_rng([3, 1]).choice(4, size=2, replace=False).tolist()
    )
    subset = drawn(10, 4, seed=3, position=0)
    assert subset.tolist() == sorted(np.random.default_rng([3, 0]).choice(10, size=4, replace=False).tolist())
    assert len(set(subset.tolist())) == 4
    assert drawn(10, 4, seed=4, position=0).tolist() != subset.tolist()  # another seed, another subset
    assert drawn(5, 5, seed=3, position=0).tolist() == [0, 1, 2, 3, 4]  # everything once: no draw at all


# --- through the config ---------------------------------------------------------------------------


def write_pairs(path, n, prefix):
    path.write_text(
        "".join(json.dumps({"prompt": f"{prefix}{i}:", "completion": " ok" * (1 + i % 3)}) + "\n" for i in range(n))
    )
    return str(path)


@pytest.fixture
def sources(tmp_path):
    return {
        "a": write_pairs(tmp_path / "a.jsonl", 10, "a"),
        "b": write_pairs(tmp_path / "b.jsonl", 4, "b"),
        "c": write_pairs(tmp_path / "c.jsonl", 6, "c"),
    }


def mixture_config(tmp_path, sources, seed=5, **extra) -> SFTConfig:
    return make_config(
        {
            "model": "unused",
            "seed": seed,
            "cache_dir": str(tmp_path / "cache"),
            "train_data": [
                {"path": sources["a"], "weight": 1, "name": "A"},
                {"path": sources["b"], "weight": 3},
                {"path": sources["c"], "epochs": 0.5},
            ],
            **extra,
        }
    )


def test_a_mixture_holds_the_drawn_examples_of_each_source(tmp_path, sources):
    tokenizer = char_tokenizer()
    mixed = prepare_split(mixture_config(tmp_path, sources), tokenizer)
    # Counts: A, B weighted 1 : 3 over 14 -> 4, 10 (see above); C: 0.5 x 6 = 3.
    rows = mixed.stats["sources"]
    assert [(s["name"], s["examples_available"], s["examples"]) for s in rows] == [
        ("A", 10, 4),
        (sources["b"], 4, 10),
        (sources["c"], 6, 3),
    ]
    assert [s.get("weight", s.get("epochs")) for s in rows] == [1.0, 3.0, 0.5]
    expected = np.concatenate([drawn(10, 4, 5, 0), drawn(4, 10, 5, 1), drawn(6, 3, 5, 2)])
    assert mixed.record_index.tolist() == expected.tolist()  # one example per record here
    alone = {
        name: prepare_split(mixture_config(tmp_path, sources), tokenizer, source=path) for name, path in sources.items()
    }
    position = 0
    for name, row, chosen in zip("abc", rows, (drawn(10, 4, 5, 0), drawn(4, 10, 5, 1), drawn(6, 3, 5, 2))):
        for index in chosen:  # the mixture's examples are the sources' own, token for token
            assert mixed[position][0].tolist() == alone[name][int(index)][0].tolist()
            assert mixed[position][1].tolist() == alone[name][int(index)][1].tolist()
            position += 1
        assert row["tokens"] == int(alone[name].lengths[chosen].sum())
    assert mixed.stats["examples"] == len(mixed) == 17
    assert mixed.stats["tokens"] == sum(r["tokens"] for r in rows) == int(mixed.lengths.sum())
    assert mixed.stats["records"] == 20 and mixed.stats["formats"] == {"prompt_completion": 20}
    again = prepare_split(mixture_config(tmp_path, sources), tokenizer)
    assert again.stats["cached"] is True and again.record_index.tolist() == mixed.record_index.tolist()
    other_seed = prepare_split(mixture_config(tmp_path, sources, seed=6), tokenizer)
    assert other_seed.stats["cached"] is False and other_seed.record_index.tolist() != mixed.record_index.tolist()


def test_each_source_has_its_own_field_map(tmp_path, sources):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "Do.", "output": "Done"}) + "\n")
    config = make_config(
        {
            "model": "unused",
            "use_cache": False,
            "train_data": [
                sources["a"],
                {"path": str(tmp_path / "qa.jsonl"), "fields": {"prompt": "question", "completion": "answer"}},
                {"path": str(tmp_path / "alpaca.jsonl"), "alpaca_layout": "chat"},
            ],
            "chat_template": "chatml",
        }
    )
    mixed = prepare_split(config, char_tokenizer())
    assert [s["examples"] for s in mixed.stats["sources"]] == [10, 1, 1]
    assert mixed.stats["formats"] == {"prompt_completion": 11, "alpaca": 1}


@pytest.mark.parametrize(
    "value, field, message",
    [
        (
            [{"path": "a.jsonl", "wieght": 2}],
            "train_data[0].wieght",
            "unknown key 'wieght' in a data source; fix: did you mean 'weight'?",
        ),
        (
            ["a.jsonl", {"path": "b.jsonl", "weight": 0}],
            "train_data[1].weight",
            "invalid value: Input should be greater than 0",
        ),
        (
            ["a.jsonl", {"path": "b.jsonl", "weight": 1, "max_samples": 3}],
            "train_data[1].max_samples",
            "weight, max_samples and epochs are alternatives",
        ),
        ([{"weight": 1}], "train_data[0].path", "invalid value: Field required"),
        ([{"path": "a.jsonl", "fields": {"promt": "q"}}], "train_data[0].fields.promt", "unknown field 'promt'"),
        ([], "train_data", "train_data is an empty list"),
    ],
)
def test_config_errors_name_the_source_and_the_key(tmp_path, value, field, message):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"model": "m", "train_data": value}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"{path}, field '{field}': {message}")


def test_a_single_source_keeps_the_plain_form():
    assert make_config({"model": "m", "train_data": "data.jsonl"}).train_data == "data.jsonl"
    listed = make_config({"model": "m", "train_data": ["a.jsonl", "b.jsonl"]}).train_data
    assert [(s.path, s.weight) for s in listed] == [("a.jsonl", None), ("b.jsonl", None)]


# --- training on a mixture ------------------------------------------------------------------------


def train_config(model_dir, tmp_path, sources, output, cache="cache", **extra) -> SFTConfig:
    return make_config(
        {
            "model": model_dir,
            "output_dir": str(output),
            "cache_dir": str(tmp_path / cache),
            "seed": 1,
            "per_device_train_batch_size": 2,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "max_steps": 6,
            "save_steps": 3,
            "train_data": [
                {"path": sources["a"], "weight": 1},
                {"path": sources["b"], "weight": 3},
                {"path": sources["c"], "epochs": 0.5},
            ],
            **extra,
        }
    )


@pytest.mark.usefixtures("one_thread")
def test_resuming_a_mixture_trains_on_the_same_examples(model_dir, tmp_path, sources):
    whole = train(train_config(model_dir, tmp_path, sources, tmp_path / "whole"))
    data = [r for r in whole.history if r["type"] == "data"]
    assert [s["examples"] for s in data[0]["sources"]] == [4, 10, 3]  # the log holds what each source gave
    # A fresh output folder holding only the step-3 checkpoint, and an empty cache: the resumed run
    # prepares and draws the mixture again, rebuilds the step plan from the seed, and must train
    # steps 4-6 exactly as the whole run did.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    resumed = train(
        train_config(model_dir, tmp_path, sources, resumed_dir, cache="other-cache", resume_from_checkpoint="auto")
    )
    assert [r["cached"] for r in resumed.history if r["type"] == "data"] == [False]
    steps = lambda result: [(r["step"], r["loss"]) for r in result.history if r["type"] == "train"]  # noqa: E731
    assert steps(resumed) == steps(whole)[3:]
    final, expected = (
        load_file(str(resumed_dir / "final" / "model.safetensors")),
        load_file(str(tmp_path / "whole" / "final" / "model.safetensors")),
    )
    assert all(torch.equal(final[name], expected[name]) for name in expected)


@pytest.mark.usefixtures("one_thread")
def test_sftlab_prepare_then_train_starts_from_the_cache(model_dir, tmp_path, sources, capsys):
    config = tmp_path / "mix.yaml"
    config.write_text(
        json.dumps(
            {
                "model": model_dir,
                "output_dir": str(tmp_path / "run"),
                "cache_dir": str(tmp_path / "cache"),
                "max_steps": 1,
                "per_device_train_batch_size": 2,
                "train_data": [{"path": sources["a"], "weight": 1, "name": "A"}, sources["b"]],
                "eval_data": sources["c"],
            }
        )
    )
    assert main(["prepare", str(config), "--json"]) == 0
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["train"]["cached"] is False and prepared["eval"]["cached"] is False
    assert [s["examples"] for s in prepared["train"]["sources"]] == [10, 4]
    assert main(["prepare", str(config)]) == 0
    table = capsys.readouterr().out
    assert "A" in table and "10 of 10 examples, weight 1.0" in table and "4 of 4 examples;" in table
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  A: 10 of 10 examples (weight 1.0)" in out and "(cached)" in out
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        logged = [json.loads(line) for line in handle]
    assert [(r["split"], r["cached"]) for r in logged if r["type"] == "data"] == [("train", True), ("eval", True)]
    assert os.path.isdir(prepared["train"]["cache_entry"])


# --- preference mixtures --------------------------------------------------------------------------


def write_preference_pairs(path, n, prefix):
    """Pairs whose text names their source and record: prompt "a3:", chosen " y" x (1 + i % 3), rejected " n"."""
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{prefix}{i}:", "chosen": " y" * (1 + i % 3), "rejected": " n"}) + "\n"
            for i in range(n)
        )
    )
    return str(path)


def preference_config(tmp_path, train_data, seed=5, **extra) -> SFTConfig:
    return make_config(
        {
            "model": "unused",
            "objective": "dpo",
            "seed": seed,
            "cache_dir": str(tmp_path / "cache"),
            "train_data": train_data,
            **extra,
        }
    )


def test_a_preference_mixture_holds_the_drawn_pairs_of_each_source(tmp_path):
    from sftlab.data.splits import is_preference_split, prepare_preference_split
    from tiny import ids, special_id

    eos = special_id("</s>")
    a = write_preference_pairs(tmp_path / "a.jsonl", 10, "a")
    b = write_preference_pairs(tmp_path / "b.jsonl", 4, "b")
    c = write_preference_pairs(tmp_path / "c.jsonl", 6, "c")
    train_data = [
        {"path": a, "weight": 1, "name": "A"},
        {"path": b, "weight": 3},
        {"path": c, "max_samples": 2},
    ]
    config = preference_config(tmp_path, train_data)
    assert is_preference_split(config)
    mixed = prepare_preference_split(config, char_tokenizer())
    # A, B weighted 1 : 3 over 14 pairs -> 3.5, 10.5 -> 4 and 10 (the tie's extra pair to the earlier
    # source); C: max_samples 2.
    rows = mixed.stats["sources"]
    assert [(s["name"], s["pairs_available"], s["pairs"]) for s in rows] == [("A", 10, 4), (b, 4, 10), (c, 6, 2)]
    chosen = {"a": drawn(10, 4, 5, 0), "b": drawn(4, 10, 5, 1), "c": drawn(6, 2, 5, 2)}
    assert chosen["b"].tolist()[:8] == [0, 1, 2, 3, 0, 1, 2, 3]  # 10 of 4: every pair twice, then 2 drawn
    expected = [
        (ids(f"{name}{i}:"), ids(" y" * (1 + i % 3)) + [eos], ids(" n") + [eos])
        for name in "abc"
        for i in chosen[name].tolist()
    ]
    assert [tuple(p.tolist() for p in mixed[i]) for i in range(len(mixed))] == expected
    assert mixed.record_index.tolist() == np.concatenate(list(chosen.values())).tolist()
    assert mixed.stats["pairs"] == len(mixed) == 16 and mixed.stats["records"] == 20
    assert mixed.stats["chosen_tokens"] == sum(len(c) for _, c, _ in expected)
    assert [r["tokens"] for r in rows] == [
        sum(len(p) + len(c) + len(r) for p, c, r in expected[:4]),
        sum(len(p) + len(c) + len(r) for p, c, r in expected[4:14]),
        sum(len(p) + len(c) + len(r) for p, c, r in expected[14:]),
    ]
    again = prepare_preference_split(config, char_tokenizer())
    assert again.stats["cached"] is True and again.record_index.tolist() == mixed.record_index.tolist()
    other = prepare_preference_split(preference_config(tmp_path, train_data, seed=6), char_tokenizer())
    assert other.record_index.tolist() != mixed.record_index.tolist()  # deterministic from the seed


def test_a_source_of_the_wrong_kind_is_refused_naming_it_and_the_record(tmp_path, sources):
    from sftlab import DataError
    from sftlab.data.splits import prepare_preference_split

    pairs = write_preference_pairs(tmp_path / "p.jsonl", 3, "p")
    config = preference_config(tmp_path, [{"path": pairs}, {"path": sources["a"], "name": "qa", "weight": 2}])
    with pytest.raises(DataError) as error:
        prepare_preference_split(config, char_tokenizer())
    assert str(error.value).startswith(
        f"{sources['a']}:1, record 0, field 'completion,prompt': train_data[1] (qa) holds SFT records, not preference pairs"
    )
    # And the other way: pairs in an SFT run's mixture, or pairs in a KTO run's.
    sft = mixture_config(tmp_path, sources)
    sft = make_config({**sft.model_dump(exclude_unset=True), "train_data": [{"path": sources["a"]}, {"path": pairs}]})
    with pytest.raises(
        DataError, match=r"p.jsonl:1, record 0, .*train_data\[1\] holds preference pairs, not SFT records"
    ):
        prepare_split(sft, char_tokenizer())
    kto = preference_config(tmp_path, [{"path": pairs}], objective="kto")
    with pytest.raises(DataError, match=r"train_data\[0\] holds preference pairs, not unpaired \(KTO\) examples"):
        prepare_preference_split(kto, char_tokenizer())


def test_a_kto_mixture_keeps_each_examples_label(tmp_path):
    from sftlab.data.splits import prepare_preference_split

    def write(path, n, label):
        path.write_text(
            "".join(
                json.dumps({"prompt": f"q{i}", "completion": " z" * (i + 1), "label": label(i)}) + "\n"
                for i in range(n)
            )
        )
        return str(path)

    good = write(tmp_path / "good.jsonl", 3, lambda i: True)
    mixed_labels = write(tmp_path / "mixed.jsonl", 4, lambda i: i % 2 == 0)
    config = preference_config(tmp_path, [{"path": good}, {"path": mixed_labels, "epochs": 1.5}], objective="kto")
    mixed = prepare_preference_split(config, char_tokenizer())
    # good: all 3 once; mixed: 1.5 x 4 = 6 -> every example once, then 2 drawn.
    extra = drawn(4, 6, 5, 1).tolist()
    assert mixed.record_index.tolist() == [0, 1, 2] + extra
    assert mixed.desirable.tolist() == [True] * 3 + [i % 2 == 0 for i in extra]
    assert (mixed.stats["desirable"], mixed.stats["undesirable"]) == (
        3 + sum(i % 2 == 0 for i in extra),
        sum(i % 2 for i in extra),
    )
