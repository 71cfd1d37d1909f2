"""End-to-end training on a tiny Llama: pinned loss values, exact resume after a kill, the
`sftlab train` command, and what happens on a non-finite loss.

The model is built from a config with a fixed seed and saved next to char_tokenizer(), so every
number here comes from the same weights and the same token ids on every run.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftlab import SFTConfig, TrainingError, train
from sftlab.training.batching import plan_epoch
from sftlab.training.checkpoint import find_checkpoint, list_checkpoints
from sftlab.cli import main as cli_main
from tiny import char_id, char_tokenizer, qa_records
from tiny_models import list_config

SCRIPT = os.path.join(os.path.dirname(__file__), "run_training.py")

# Sixteen prompt/completion records of different lengths: 4 steps per epoch at batch 4.
RECORDS = qa_records(16, exclaim=lambda i: i % 5)


BASE = dict(per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, seed=0)


def config(model_dir, output_dir, **overrides) -> SFTConfig:
    return list_config(model_dir, output_dir, **{**BASE, **overrides})


def logged(history, kind="train"):
    return [r for r in history if r["type"] == kind]


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


# --- pinned loss values -------------------------------------------------------------------------------

# Obtained once by running the two tests below with a print of the logged records (torch 2.13 CPU,
# transformers 5.24; identical with 1 and 2 threads): seed-0 tiny Llama (tiny_models.save_tiny_llama),
# char_tokenizer, RECORDS, AdamW lr 3e-3, cosine, no warmup, logged every step.
# Any change in targets, batching, loss normalisation or the optimizer step moves them by far
# more than the tolerance.
PINNED_PADDED = {  # batch 4, 6 steps (1.5 epochs of 4 steps), eval on the first 6 records at the end
    "loss": [4.759079256924716, 4.268753967285156, 3.950993177625868, 3.6904093424479165, 3.522065507604721, 3.450376643690952],
    "supervised_tokens": [55, 50, 45, 51, 47, 43],  # steps 1-4 are one epoch: 201 supervised tokens in all
    "eval_loss": 3.4081979048879525,
    "eval_supervised_tokens": 76,
}
PINNED_PACKED = {  # packed rows of at most 64 tokens, one row per step, 4 steps
    "loss": [4.767535041360294, 4.278492589150706, 3.953625714337384, 3.7859855858055322],
    "supervised_tokens": [34, 31, 27, 37],
    "tokens": [62, 56, 54, 57],
}


def test_pinned_losses_padded(model_dir, tmp_path):
    result = train(config(model_dir, tmp_path, max_steps=6), train_dataset=RECORDS, eval_dataset=RECORDS[:6])
    steps = logged(result.history)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in steps] == pytest.approx(PINNED_PADDED["loss"], rel=1e-6)
    assert [r["supervised_tokens"] for r in steps] == PINNED_PADDED["supervised_tokens"]
    (evaluation,) = logged(result.history, "eval")
    assert evaluation["step"] == 6
    assert evaluation["eval_loss"] == pytest.approx(PINNED_PADDED["eval_loss"], rel=1e-6)
    assert evaluation["eval_supervised_tokens"] == PINNED_PADDED["eval_supervised_tokens"]
    assert evaluation["eval_perplexity"] == pytest.approx(math.exp(evaluation["eval_loss"]), rel=1e-12)
    assert read_metrics(tmp_path) == result.history  # metrics.jsonl holds exactly what was logged


def test_pinned_losses_packed(model_dir, tmp_path):
    result = train(config(model_dir, tmp_path, max_steps=4, packing=True, max_length=64, per_device_train_batch_size=1),
                   train_dataset=RECORDS)
    steps = logged(result.history)
    assert [r["loss"] for r in steps] == pytest.approx(PINNED_PACKED["loss"], rel=1e-6)
    assert [r["supervised_tokens"] for r in steps] == PINNED_PACKED["supervised_tokens"]
    assert [r["tokens"] for r in steps] == PINNED_PACKED["tokens"]


# --- checkpoints and exact resume -----------------------------------------------------------------------


def test_auto_ignores_half_written_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-2", True), ("step-4", True), ("step-6", False), (".tmp-step-8", True), ("notes", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "state.json").write_text("{}")
    # step-6 has no state.json (not a finished checkpoint), .tmp-step-8 was never renamed into place.
    assert list_checkpoints(str(tmp_path)) == [2, 4]
    # (state.json without a run identity: written before checkpoints recorded one, so not checked)
    assert find_checkpoint(str(tmp_path), "auto", {"seed": 1}) == (str(root / "step-4"), None)
    assert find_checkpoint(str(tmp_path / "nothing-here"), "auto", {"seed": 1}) == (None, None)
    with pytest.raises(TrainingError, match="not a complete sftlab checkpoint"):
        find_checkpoint(str(root / "step-6"), str(root / "step-6"), {"seed": 1})


@pytest.mark.slow
def test_killed_run_resumes_exactly(model_dir, tmp_path, capsys):
    steps, save = 60, 2  # ~1 s of training after the first checkpoint: time enough to kill it
    settings = dict(max_steps=steps, save_steps=save, per_device_train_batch_size=2, learning_rate=1e-3)
    reference = train(config(model_dir, tmp_path / "reference", **settings), train_dataset=RECORDS)

    # The same run in a process of its own, killed with SIGKILL once a checkpoint is complete.
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    output = tmp_path / "killed"
    pairs = [f"{key}={value}" for key, value in {**BASE, **settings}.items()]
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, SCRIPT, model_dir, str(records), str(output), *pairs],
                                   stdout=handle, stderr=subprocess.STDOUT)
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
    saved = list_checkpoints(str(output))
    assert saved and max(saved) < steps
    # A checkpoint that was being written when the process died (or one faked here) is never picked.
    half = output / "checkpoints" / f".tmp-step-{steps - save}"
    half.mkdir(exist_ok=True)
    (half / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"truncated")

    resumed = train(config(model_dir, output, resume_from_checkpoint="auto", **settings), train_dataset=RECORDS)
    newest = max(saved)
    assert f"resumed from {output / 'checkpoints' / f'step-{newest}'} at step {newest}" in capsys.readouterr().out
    assert [r["step"] for r in logged(resumed.history)] == list(range(newest + 1, steps + 1))

    final = load_file(str(output / "final" / "model.safetensors"))
    expected = load_file(os.path.join(reference.final_dir, "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), f"{name} differs after resume"
    # The logged losses after the resume point are those of the uninterrupted run, bit for bit.
    assert [r["loss"] for r in logged(resumed.history)] == [r["loss"] for r in logged(reference.history)][newest:]


# --- the command ------------------------------------------------------------------------------------------


def test_sftlab_train_command(model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": model_dir, "train_data": str(data), "eval_data": str(data), "output_dir": str(tmp_path / "run"),
        "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2, "eval_steps": 2,
        "use_cache": False,
    }))
    assert cli_main(["train", str(config_file), "learning_rate=3e-3", "packing=true", "max_length=64"]) == 0
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [r["step"] for r in metrics if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics if r["type"] == "eval"] == [2, 4]
    assert {r["split"] for r in metrics if r["type"] == "data"} == {"train", "eval"}
    assert all(math.isfinite(r["loss"]) and r["learning_rate"] <= 3e-3 for r in metrics if r["type"] == "train")
    assert list_checkpoints(str(run)) == [2]  # the last step is the final model, not a checkpoint
    assert sorted(os.listdir(run / "checkpoints" / "step-2")) == [
        "optimizer.json", "rng-0.pt", "scheduler.pt", "shard-00001-model-00001-of-00001.safetensors", "state.json"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer("hello")["input_ids"] == char_tokenizer()("hello")["input_ids"]
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    trained = dict(model.named_parameters())
    assert not torch.equal(trained["lm_head.weight"].detach(), start["lm_head.weight"])  # it trained
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tokenizer("Q1: x")["input_ids"]])).logits).all()
    saved_config = yaml.safe_load((final / "sftlab_config.yaml").read_text())
    assert saved_config["packing"] is True and saved_config["learning_rate"] == 3e-3


# --- non-finite loss ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(model_dir):
    """Records where one record, trained in step 2, holds the only "Z"; a model whose "Z" embedding is NaN."""
    plan = plan_epoch(np.zeros(len(RECORDS)), batch_size=4, accumulation=1, world_size=1, seed=0, epoch=0)
    victim = plan[1][0][0]
    records = [dict(r) for r in RECORDS]
    records[victim]["completion"] += " Z"

    def model():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.get_input_embeddings().weight[char_id("Z")] = float("nan")
        return model

    return records, victim, model


def test_nonfinite_loss_stops_naming_the_step(model_dir, tmp_path, poisoned):
    records, victim, model = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss at step 2") as error:
        train(config(model_dir, tmp_path, max_steps=4), model=model(), train_dataset=records)
    named = re.search(r"records in this step on process 0: \[([\d, ]*)\]", error.value.found)
    assert named and victim in [int(i) for i in named.group(1).split(",")]
    assert "skip_nonfinite_steps" in error.value.fix
    assert not (tmp_path / "final").exists()


def test_skip_nonfinite_steps_skips_and_logs(model_dir, tmp_path, poisoned):
    records, victim, model = poisoned
    trained = model()
    result = train(config(model_dir, tmp_path, max_steps=4, skip_nonfinite_steps=True), model=trained, train_dataset=records)
    steps = logged(result.history)
    assert [r["skipped_steps"] for r in steps] == [0, 1, 0, 0]
    assert math.isnan(steps[1]["loss"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(steps) if i != 1)
    # The skipped step changed nothing: every weight but the poisoned row is finite and training went on.
    for name, p in trained.named_parameters():
        finite = torch.isfinite(p)
        if name == "model.embed_tokens.weight":
            assert not finite[char_id("Z")].any() and finite[: char_id("Z")].all() and finite[char_id("Z") + 1 :].all()
        else:
            assert finite.all(), name
    assert read_metrics(tmp_path)[-1]["step"] == 4
