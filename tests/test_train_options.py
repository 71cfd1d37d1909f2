"""Training options beyond the defaults: gradient checkpointing, bf16, LoRA export (adapter and
merged), length grouping, data order, and the Python API's own optimizer and scheduler."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from sftlab import SFTConfig, train
from tiny import char_tokenizer, qa_records
from tiny_models import list_config

RECORDS = qa_records()
BASE = dict(per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, seed=0, max_steps=3)


def run(model_dir, out, **overrides):
    return train(list_config(model_dir, out, **{**BASE, **overrides}), train_dataset=RECORDS)


def losses(result):
    return [r["loss"] for r in result.history if r["type"] == "train"]


def test_gradient_checkpointing_gives_the_same_losses_and_weights(model_dir, tmp_path):
    plain = run(model_dir, tmp_path / "plain")
    checkpointed = run(model_dir, tmp_path / "ckpt", gradient_checkpointing=True)
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    ours = load_file(os.path.join(checkpointed.final_dir, "model.safetensors"))
    theirs = load_file(os.path.join(plain.final_dir, "model.safetensors"))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_with_finite_losses_close_to_fp32(model_dir, tmp_path):
    fp32 = losses(run(model_dir, tmp_path / "fp32", max_steps=1))
    bf16 = losses(run(model_dir, tmp_path / "bf16", max_steps=1, bf16=True))
    assert all(math.isfinite(x) for x in bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # bf16 has ~3 significant digits


def test_lora_saves_the_adapter_and_the_merged_model(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run(model_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, merge_lora=True)
    assert os.path.isfile(os.path.join(result.final_dir, "adapter_model.safetensors"))
    with open(os.path.join(result.final_dir, "adapter_config.json")) as handle:
        assert json.load(handle)["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(result.final_dir, "merged"))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [name for name, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert changed and all("proj" in name for name in changed)  # the adapted linear layers, nothing else


def test_group_by_length_keeps_similar_lengths_together(model_dir, tmp_path):
    result = run(model_dir, tmp_path / "grouped", group_by_length=True, max_steps=4)
    # Same data either way; every example is still seen exactly once per epoch (4 steps x 4).
    assert sum(r["supervised_tokens"] for r in result.history if r["type"] == "train") == \
        sum(r["supervised_tokens"] for r in run(model_dir, tmp_path / "plain", max_steps=4).history if r["type"] == "train")


def test_shuffle_false_trains_on_the_records_in_order(model_dir, tmp_path):
    from sftlab import TargetSettings, prepare_examples

    result = run(model_dir, tmp_path / "ordered", shuffle=False, max_steps=4)
    steps = [r["supervised_tokens"] for r in result.history if r["type"] == "train"]
    # Step k holds records 4k..4k+3, whatever the seed.
    expected = [prepare_examples(RECORDS[k * 4 : k * 4 + 4], char_tokenizer(), TargetSettings(), use_cache=False).stats["supervised_tokens"]
                for k in range(4)]
    assert steps == expected and len(set(expected)) > 1  # the steps differ, so the order is what is checked
    assert steps == [r["supervised_tokens"] for r in run(model_dir, tmp_path / "seed", shuffle=False, max_steps=4, seed=9).history
                     if r["type"] == "train"]


def test_the_python_api_takes_an_optimizer_factory_and_a_scheduler_factory(model_dir, tmp_path):
    seen = {}

    def make_optimizer(params):
        seen["optimizer"] = torch.optim.SGD(params, lr=0.5)
        return seen["optimizer"]

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))

    result = train(
        SFTConfig(model=model_dir, output_dir=str(tmp_path / "sgd"), use_cache=False, **BASE),
        train_dataset=RECORDS, optimizer=make_optimizer, lr_scheduler=make_scheduler)
    assert isinstance(seen["optimizer"], torch.optim.SGD)
    assert [r["learning_rate"] for r in result.history if r["type"] == "train"] == pytest.approx([0.5, 0.25, 0.5 / 3])


# --- fsdp in one process, launcher settings --------------------------------------------------------


def test_fsdp_in_one_process_trains_like_plain_training_and_leaves_no_process_group(model_dir, tmp_path):
    import torch.distributed as dist

    plain = run(model_dir, tmp_path / "plain")
    variants = {"fsdp": dict(fsdp=True), "offload": dict(fsdp=True, fsdp_cpu_offload=True),
                "no-reshard": dict(fsdp=True, fsdp_reshard_after_forward=False)}
    expected = load_file(os.path.join(plain.final_dir, "model.safetensors"))
    for name, options in variants.items():
        sharded = run(model_dir, tmp_path / name, **options)
        assert not dist.is_initialized(), f"{name}: the group of one that FSDP needed was left behind"
        assert losses(sharded) == pytest.approx(losses(plain), rel=1e-6), name
        weights = load_file(os.path.join(sharded.final_dir, "model.safetensors"))
        assert weights.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(weights[key], expected[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")


def test_fsdp_bf16_policy_trains_close_to_fp32(model_dir, tmp_path):
    fp32 = losses(run(model_dir, tmp_path / "fp32", max_steps=1))
    bf16 = losses(run(model_dir, tmp_path / "bf16", max_steps=1, fsdp=True, bf16=True))
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=2e-2)  # bf16 weights in compute: ~3 digits


@pytest.mark.parametrize("variable, value, message", [
    ("ACCELERATE_USE_DEEPSPEED", "true", "accelerate launch asks for DeepSpeed, which sftlab does not run"),
    ("ACCELERATE_USE_FSDP", "true", "accelerate launch asks for Accelerate's FSDP"),
    ("ACCELERATE_MIXED_PRECISION", "fp16", "accelerate launch asks for mixed precision 'fp16'"),
])
def test_accelerate_engines_that_sftlab_does_not_run_are_refused(model_dir, tmp_path, monkeypatch, variable, value, message):
    from sftlab import ConfigError

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        run(model_dir, tmp_path)


def test_accelerate_launch_mixed_precision_bf16_turns_bf16_on(model_dir, tmp_path, monkeypatch):
    bf16 = losses(run(model_dir, tmp_path / "config", max_steps=1, bf16=True))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert losses(run(model_dir, tmp_path / "launcher", max_steps=1)) == bf16


def test_fsdp_refuses_what_it_cannot_honour(model_dir, tmp_path):
    from sftlab import ConfigError

    params = torch.nn.Linear(2, 2).parameters()
    with pytest.raises(ConfigError, match="pass a function params -> optimizer instead"):
        train(SFTConfig(model=model_dir, output_dir=str(tmp_path / "a"), use_cache=False, fsdp=True, **BASE),
              train_dataset=RECORDS, optimizer=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ConfigError, match="merge_lora is not available with fsdp"):
        run(model_dir, tmp_path / "b", fsdp=True, use_peft=True, merge_lora=True)


def test_resuming_with_another_global_batch_is_refused(model_dir, tmp_path):
    from sftlab import TrainingError

    run(model_dir, tmp_path, max_steps=4, save_steps=2)
    with pytest.raises(TrainingError, match=r"found 4 per step then \(1 processes\), 2 now; fix: make per_device_train_batch_size"):
        run(model_dir, tmp_path, max_steps=4, resume_from_checkpoint="auto", per_device_train_batch_size=2)


def test_report_to_sends_every_logged_number_to_tensorboard_and_wandb(model_dir, tmp_path, monkeypatch):
    """Neither package is installed here: stand-ins record what sftlab calls (the sinks' public API)."""
    import importlib.machinery
    import sys
    import types

    calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tensorboard", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("tensorboard closed",))

    class Run:
        def log(self, values, step):
            calls.append(("wandb log", step, values))

        def finish(self):
            calls.append(("wandb finished",))

    def module(name, **attributes):
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stub.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, stub)

    module("tensorboard")
    module("torch.utils.tensorboard", SummaryWriter=SummaryWriter)
    module("wandb", init=lambda project, dir, config: calls.append(("wandb", project, config["learning_rate"])) or Run())
    result = run(model_dir, tmp_path, max_steps=2, report_to=["tensorboard", "wandb"])
    steps = [r for r in result.history if r["type"] == "train"]
    assert ("tensorboard", os.path.join(str(tmp_path), "tensorboard")) in calls and ("wandb", "sftlab", 3e-3) in calls
    assert [c[1:] for c in calls if c[0] == "scalar" and c[1] == "train/loss"] == [("train/loss", r["loss"], r["step"]) for r in steps]
    logged = [c for c in calls if c[0] == "wandb log"]
    assert [c[1] for c in logged] == [1, 2] and logged[0][2]["train/loss"] == steps[0]["loss"]
    assert calls[-2:] == [("tensorboard closed",), ("wandb finished",)]


def test_lora_with_fsdp_saves_the_same_adapter_and_resumes(model_dir, tmp_path):
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=4)
    plain = run(model_dir, tmp_path / "plain", **lora)
    sharded = run(model_dir, tmp_path / "fsdp", fsdp=True, save_steps=2, **lora)
    ours = load_file(os.path.join(sharded.final_dir, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(plain.final_dir, "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any("lora_A" in key for key in theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    # The checkpoint holds the adapters only (frozen base weights come from the model folder) and resumes.
    shard = load_file(os.path.join(tmp_path, "fsdp", "checkpoints", "step-2", "shard-00001-model-00001-of-00001.safetensors"))
    weights = [key for key in shard if key.startswith("model.")]
    assert weights and all("lora_" in key for key in weights)
    resumed = run(model_dir, tmp_path / "fsdp", fsdp=True, resume_from_checkpoint="auto", **lora)
    assert [r["step"] for r in resumed.history if r["type"] == "train"] == [3, 4]
    again = load_file(os.path.join(resumed.final_dir, "adapter_model.safetensors"))
    assert all(torch.equal(again[key], ours[key]) for key in ours)
