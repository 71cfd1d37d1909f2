"""Preference tuning end to end through `sftlab train` and `sftlab.train`: the logs, the evaluation,
the split invariance (8x1 == 2x4 == 2 processes x 4, DDP and FSDP2), the stored reference reused,
and a preempted run resumed to the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sftlab.training.progress
from sftlab import SFTConfig, train
from sftlab.cli import EXIT_PREEMPTED, main
from sftlab.errors import ConfigError
from sftlab.training.checkpoint import list_checkpoints
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

PAIRS = [
    {"prompt": f"add {i} and 1:", "chosen": f" {i + 1}", "rejected": f" {i + 2} or so" * (1 + i % 2)} for i in range(16)
]
KTO = [
    {"prompt": f"add {i} and 1:", "completion": f" {i + 1}" if i % 3 else f" {i + 2} or so", "label": bool(i % 3)}
    for i in range(16)
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("pref") / "model"), char_tokenizer())


BASE = dict(
    objective="dpo",
    max_length=48,
    per_device_train_batch_size=8,
    shuffle=False,
    max_steps=2,
    logging_steps=1,
    learning_rate=1e-2,
    warmup_steps=0,
    seed=3,
    lr_scheduler_type="constant",
    max_grad_norm=None,
)


def config(model_dir, output_dir, **overrides) -> SFTConfig:
    values = dict(model=model_dir, output_dir=str(output_dir), cache_dir=str(output_dir) + "-cache", **BASE)
    return SFTConfig(**{**values, **overrides})


def weights(output_dir) -> dict[str, torch.Tensor]:
    """The final model's weights, or its adapter's after LoRA."""
    final = os.path.join(output_dir, "final")
    adapter = os.path.join(final, "adapter_model.safetensors")
    return load_file(adapter if os.path.isfile(adapter) else os.path.join(final, "model.safetensors"))


def assert_close_weights(a, b, atol=0.0):
    ours, theirs = weights(a), weights(b)
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("objective, loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("simpo", None), ("orpo", None)])
def test_each_objective_trains_and_logs(model_dir, tmp_path, objective, loss_type):
    overrides = {"objective": objective, **({"loss_type": loss_type} if loss_type else {})}
    result = train(config(model_dir, tmp_path / "out", **overrides), train_dataset=PAIRS, eval_dataset=PAIRS[:4])
    logged = [r for r in result.history if r["type"] == "train"]
    assert len(logged) == 2 and all(r["pairs"] == 8 for r in logged)
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "logps/chosen",
        "logps/rejected",
        "nll",
    ):
        assert all(isinstance(r[key], float) for r in logged), key
    evals = [r for r in result.history if r["type"] == "eval"]
    assert evals[-1]["eval_pairs"] == 4 and "eval_rewards/accuracy" in evals[-1]
    if objective == "dpo":
        assert logged[0]["loss"] == pytest.approx(0.6931472 if loss_type == "sigmoid" else logged[0]["loss"], abs=1e-5)
        assert logged[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 1
        assert "eval_reference_accuracy" in evals[0] and evals[0]["step"] == 0
    assert os.path.isfile(os.path.join(result.final_dir, "model.safetensors"))


def test_the_reference_is_stored_and_reused(model_dir, tmp_path, capsys):
    train(config(model_dir, tmp_path / "a", max_steps=1, cache_dir=str(tmp_path / "cache")), train_dataset=PAIRS)
    out = capsys.readouterr().out
    assert "reference log-probs of 16 train pairs: computed in" in out
    # The tests' Llama (hidden 64, 4 heads of 16, 2 key/value heads, MLP 128): span 288 (test_preference.py).
    assert "in one row where that costs less than two rows (chosen per micro-batch; attention span 288 tokens)" in out
    train(config(model_dir, tmp_path / "b", max_steps=1, cache_dir=str(tmp_path / "cache")), train_dataset=PAIRS)
    assert "reference log-probs of 16 train pairs: read from the store" in capsys.readouterr().out


def sgd(params):
    # Plain SGD: the update is the gradient itself, so the comparison is of gradients (AdamW would
    # divide fp32 summation-order noise in near-zero gradients by their own tiny scale).
    return torch.optim.SGD(params, lr=1e-2)


def test_a_step_is_the_same_however_it_is_split(model_dir, tmp_path):
    one = train(config(model_dir, tmp_path / "8x1"), train_dataset=PAIRS, optimizer=sgd)
    four = train(
        config(model_dir, tmp_path / "2x4", per_device_train_batch_size=2, gradient_accumulation_steps=4),
        train_dataset=PAIRS,
        optimizer=sgd,
    )
    losses = [[r["loss"] for r in result.history if r["type"] == "train"] for result in (one, four)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert_close_weights(tmp_path / "8x1", tmp_path / "2x4", atol=1e-6)


def test_packed_pairs_train_like_padded_ones(model_dir, tmp_path):
    train(
        config(
            model_dir, tmp_path / "packed", packing=True, shuffle=False, per_device_train_batch_size=16, max_steps=1
        ),
        train_dataset=PAIRS,
        optimizer=sgd,
    )
    train(
        config(model_dir, tmp_path / "padded16", shuffle=False, per_device_train_batch_size=16, max_steps=1),
        train_dataset=PAIRS,
        optimizer=sgd,
    )
    assert_close_weights(tmp_path / "packed", tmp_path / "padded16", atol=1e-6)


# LoRA with the reference computed at every step by the adapter-disabled model (no store).
REFERENCE_FROM_ADAPTER = {"use_peft": True, "lora_r": 4, "lora_dropout": 0.0, "precompute_ref_log_probs": False}


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding, objective, extra",
    [
        ("fsdp=false", "dpo", {}),
        ("fsdp=true", "dpo", {}),
        ("fsdp=false", "kto", {}),
        ("fsdp=false", "dpo", REFERENCE_FROM_ADAPTER),
        ("fsdp=true", "dpo", REFERENCE_FROM_ADAPTER),
    ],
    ids=[
        "ddp-dpo",
        "fsdp-dpo",
        "ddp-kto",
        "ddp-dpo-lora-reference-from-adapter",
        "fsdp-dpo-lora-reference-from-adapter",
    ],
)
def test_two_processes_equal_one(model_dir, tmp_path, sharding, objective, extra):
    data = PAIRS if objective == "dpo" else KTO
    records = tmp_path / "pairs.json"
    records.write_text(json.dumps(data))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_training.py")
    common = [
        f"objective={objective}",
        "shuffle=false",
        "max_length=48",
        "max_steps=2",
        "logging_steps=1",
        "learning_rate=1e-2",
        "warmup_steps=0",
        "seed=3",
        "lr_scheduler_type=constant",
        "max_grad_norm=null",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            script,
            model_dir,
            str(records),
            str(tmp_path / "two"),
            *common,
            "per_device_train_batch_size=4",
            "optimizer=sgd",
            sharding,
            *(f"{key}={str(value).lower()}" for key, value in extra.items()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    train(
        config(model_dir, tmp_path / "one", cache_dir=str(tmp_path / "cache"), objective=objective, **extra),
        train_dataset=data,
        optimizer=sgd,
    )
    assert_close_weights(tmp_path / "two", tmp_path / "one", atol=1e-5)
    if extra:
        assert "computed at every step by the model with its LoRA adapter disabled" in two.stdout


def stop_after(monkeypatch, step: int):
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(sftlab.training.progress.Reporter, "advance", advance)


@pytest.mark.slow
def test_a_preempted_run_resumes_to_the_same_weights(model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    settings = tmp_path / "config.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "model": model_dir,
                "train_data": str(data),
                "objective": "dpo",
                "max_length": 48,
                "per_device_train_batch_size": 4,
                "max_steps": 6,
                "save_steps": 2,
                "logging_steps": 1,
                "learning_rate": 1e-2,
                "warmup_steps": 1,
                "seed": 3,
                "cache_dir": str(tmp_path / "cache"),
            }
        )
    )
    assert main(["train", str(settings), f"output_dir={tmp_path / 'reference'}"]) == 0
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        assert main(["train", str(settings), f"output_dir={tmp_path / 'resumed'}"]) == EXIT_PREEMPTED
    capsys.readouterr()
    assert main(["train", str(settings), f"output_dir={tmp_path / 'resumed'}", "resume_from_checkpoint=auto"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "read from the store" in out
    assert_close_weights(tmp_path / "resumed", tmp_path / "reference")


@pytest.mark.parametrize("objective, data", [("dpo", PAIRS), ("kto", KTO)])
def test_the_reference_from_the_adapter_disabled_model_trains_like_the_stored_one(
    model_dir, tmp_path, capsys, objective, data
):
    """precompute_ref_log_probs false with LoRA: the reference computed at every step by the model
    with its adapter disabled (lora_dropout on: the reference is computed without it, as stored)
    gives the losses, evaluations and adapter of the run whose reference was computed once."""
    runs = {}
    for name, precompute in (("stored", True), ("on the fly", False)):
        runs[name] = train(
            config(
                model_dir,
                tmp_path / name,
                objective=objective,
                max_steps=3,
                use_peft=True,
                lora_r=4,
                lora_dropout=0.1,
                precompute_ref_log_probs=precompute,
                eval_steps=2,
            ),
            train_dataset=data,
            eval_dataset=data[:4],
            optimizer=sgd,
        )
        runs[name + " log"] = capsys.readouterr().out
    assert "reference log-probs of 16 train pairs: computed in" in runs["stored log"]
    assert "computed at every step by the model with its LoRA adapter disabled" in runs["on the fly log"]
    assert "train pairs" not in runs["on the fly log"]  # no pass over the training pairs, nothing stored
    records = [[r for r in runs[name].history if r["type"] in ("train", "eval")] for name in ("stored", "on the fly")]
    assert [sorted(r) for r in records[0]] == [sorted(r) for r in records[1]] and len(records[0]) >= 5
    for ours, theirs in zip(*records):
        for key, value in ours.items():
            if key not in ("seconds", "tokens_per_second", "pairs_per_second", "examples_per_second"):
                assert theirs[key] == pytest.approx(value, abs=1e-6), key
    adapters = [
        load_file(os.path.join(tmp_path / name, "final", "adapter_model.safetensors"))
        for name in runs
        if "log" not in name
    ]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=0, atol=1e-6, msg=key)
    assert any(float(adapters[0][key].abs().max()) > 1e-3 for key in adapters[0] if "lora_B" in key)  # it trained


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "without LoRA there is no adapter to disable"),
        (
            {"use_peft": True, "lora_init": "pissa"},
            "the model with the adapter disabled is not the model before training",
        ),
        ({"use_peft": True, "objective": "simpo"}, "simpo has none"),
    ],
)
def test_the_reference_from_the_adapter_is_refused_where_there_is_none(model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config(model_dir, tmp_path / "out", precompute_ref_log_probs=False, **overrides)
    assert error.value.field == "precompute_ref_log_probs"


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_to_the_same_weights(model_dir, tmp_path, capsys):
    """SIGKILL (no handler runs, nothing is saved on the way out) once a checkpoint is written;
    resume_from_checkpoint=auto reads the reference log-probs the killed run stored and ends with
    the uninterrupted run's weights and losses, bit for bit: the same process count and thread
    count, the same batches from the seed, and the stored float64 values are the ones computed."""
    steps, save = 60, 2  # a second or more of training after the first checkpoint: time enough to kill it
    settings = dict(max_steps=steps, save_steps=save, per_device_train_batch_size=2, warmup_steps=1)
    settings.update(lr_scheduler_type="cosine", learning_rate=1e-3)
    uninterrupted = train(config(model_dir, tmp_path / "uninterrupted", **settings), train_dataset=PAIRS)
    capsys.readouterr()

    # The same run in a process of its own, with its own reference store, killed with SIGKILL.
    records = tmp_path / "pairs.json"
    records.write_text(json.dumps(PAIRS))
    output = tmp_path / "killed"
    cache = tmp_path / "killed-cache"
    values = {**BASE, **settings, "cache_dir": cache, "max_grad_norm": "null"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_training.py")
    pairs = [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in values.items()]
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, script, model_dir, str(records), str(output), *pairs],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    try:
        while not list_checkpoints(str(output)):
            assert process.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output / "final").exists(), "the run finished before it was killed: raise `steps`"
    assert "reference log-probs of 16 train pairs: computed in" in log.read_text()
    saved = list_checkpoints(str(output))
    assert saved and max(saved) < steps

    resumed = train(
        config(model_dir, output, resume_from_checkpoint="auto", cache_dir=str(cache), **settings),
        train_dataset=PAIRS,
    )
    out = capsys.readouterr().out
    newest = max(saved)
    assert f"resumed from {output / 'checkpoints' / f'step-{newest}'} at step {newest}" in out
    assert "reference log-probs of 16 train pairs: read from the store" in out and "computed in" not in out
    trained = [r for r in resumed.history if r["type"] == "train"]
    assert [r["step"] for r in trained] == list(range(newest + 1, steps + 1))
    expected = [r["loss"] for r in uninterrupted.history if r["type"] == "train"][newest:]
    assert [r["loss"] for r in trained] == expected
    assert_close_weights(output, tmp_path / "uninterrupted", atol=0.0)


def test_kto_trains_and_logs(model_dir, tmp_path):
    result = train(
        config(model_dir, tmp_path / "kto", objective="kto", desirable_weight=1.0, undesirable_weight=2.0),
        train_dataset=KTO,
        eval_dataset=KTO[:6],
    )
    logged = [r for r in result.history if r["type"] == "train"]
    assert len(logged) == 2 and all(r["examples"] == 8 for r in logged)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference, so the KL is 0
    assert logged[0]["rewards/desirable"] == pytest.approx(0.0, abs=1e-6)
    # step 1's loss by hand: every ratio 0 and z0 0, so each example's loss is weight x (1 - sigmoid(0)) = weight / 2
    desirable = sum(1 for i in range(8) if i % 3)  # the first step's 8 examples are the first 8 (shuffle off)
    assert logged[0]["loss"] == pytest.approx((desirable * 0.5 + (8 - desirable) * 1.0) / 8, abs=1e-6)
    evals = [r for r in result.history if r["type"] == "eval"]
    assert evals[-1]["eval_examples"] == 6 and "eval_kl" in evals[-1]


def test_kto_step_is_the_same_however_it_is_split(model_dir, tmp_path):
    one = train(config(model_dir, tmp_path / "kto8", objective="kto"), train_dataset=KTO, optimizer=sgd)
    four = train(
        config(
            model_dir,
            tmp_path / "kto2x4",
            objective="kto",
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
        ),
        train_dataset=KTO,
        optimizer=sgd,
    )
    assert [r["loss"] for r in one.history if r["type"] == "train"] == pytest.approx(
        [r["loss"] for r in four.history if r["type"] == "train"], abs=1e-6
    )
    assert_close_weights(tmp_path / "kto8", tmp_path / "kto2x4", atol=1e-6)
