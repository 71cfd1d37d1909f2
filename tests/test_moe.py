"""Mixture-of-experts models end to end: LoRA on the fused expert weights (PEFT's
target_parameters), a checkpoint that resumes to the uninterrupted run's weights, and a final
model that transformers loads with the trained weights. The router loss itself is in
tests/test_model_probes.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sftlab.training.progress
from sftlab import SFTConfig, train
from sftlab.errors import ConfigError
from tiny import char_tokenizer, qa_records

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    """A tiny Qwen3-MoE (4 experts, 2 per token, router loss on) saved with a character tokenizer."""
    tokenizer = char_tokenizer()
    config = transformers.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                         moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    folder = str(tmp_path_factory.mktemp("moe") / "model")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def config(moe_dir, output_dir, **overrides) -> SFTConfig:
    values = dict(model=moe_dir, output_dir=str(output_dir), use_cache=False, max_length=32, per_device_train_batch_size=4,
                  max_steps=4, logging_steps=1, learning_rate=5e-3, warmup_steps=0, seed=3)
    return SFTConfig(**{**values, **overrides})


def test_lora_on_the_fused_expert_weights(moe_dir, tmp_path):
    from peft import PeftModel

    result = train(config(moe_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          lora_target_modules=["q_proj", "v_proj"], lora_target_parameters=EXPERTS),
                   train_dataset=qa_records())
    adapter = load_file(os.path.join(result.final_dir, "adapter_model.safetensors"))
    expert_adapters = [name for name in adapter if "experts" in name and "lora" in name]
    # an A and a B for each of the two fused weights, in each of the 2 layers
    assert len(expert_adapters) == 8 and all(adapter[name].abs().sum() > 0 for name in expert_adapters)
    assert all(r["aux_loss"] > 0 for r in result.history if r["type"] == "train")
    # The adapter, loaded by PEFT onto the untouched base, changes what the model computes.
    base = AutoModelForCausalLM.from_pretrained(moe_dir)
    probe = torch.tensor([[5, 9, 14, 20, 3, 7, 11, 2]])
    with torch.no_grad():
        before = base(input_ids=probe).logits
        after = PeftModel.from_pretrained(base, result.final_dir)(input_ids=probe).logits
    assert (after - before).abs().max() > 1e-4


def test_target_parameters_need_use_peft():
    with pytest.raises(ConfigError, match="lora_target_parameters configures LoRA adapters"):
        SFTConfig(model="m", lora_target_parameters=EXPERTS)


def test_full_fine_tuning_exports_a_model_transformers_loads(moe_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    result = train(config(moe_dir, tmp_path / "full"), model=model, tokenizer=char_tokenizer(), train_dataset=qa_records())
    # transformers writes the fused experts in the per-expert layout of the hub and fuses them again on load.
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    start = AutoModelForCausalLM.from_pretrained(moe_dir)
    assert loaded.config.output_router_logits and type(loaded).__name__ == "Qwen3MoeForCausalLM"
    expert = "model.layers.0.mlp.experts.gate_up_proj"
    trained, initial = loaded.state_dict()[expert], start.state_dict()[expert]
    assert trained.shape == initial.shape and not torch.equal(trained, initial)  # the experts were trained and load back
    probe = torch.tensor([[5, 9, 14, 20, 3, 7, 11, 2]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=probe).logits, model(input_ids=probe).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_a_preempted_moe_run_resumes_to_the_same_weights(moe_dir, tmp_path, monkeypatch):
    reference = train(config(moe_dir, tmp_path / "reference", save_steps=2), train_dataset=qa_records())
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM warns before a preemption

    with monkeypatch.context() as patch:
        patch.setattr(sftlab.training.progress.Reporter, "advance", advance)
        stopped = train(config(moe_dir, tmp_path / "resumed", save_steps=2), train_dataset=qa_records())
    assert stopped.stopped_by == "SIGUSR1" and stopped.global_step == 2
    resumed = train(config(moe_dir, tmp_path / "resumed", save_steps=2, resume_from_checkpoint="auto"),
                    train_dataset=qa_records())
    ours = load_file(os.path.join(resumed.final_dir, "model.safetensors"))
    theirs = load_file(os.path.join(reference.final_dir, "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    losses = lambda result: {r["step"]: (r["loss"], r["aux_loss"]) for r in result.history if r["type"] == "train"}  # noqa: E731
    assert {**losses(stopped), **losses(resumed)} == losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp=true", "fsdp=false"])
def test_two_processes_train_a_moe_model_like_one(moe_dir, tmp_path, sharding):
    """FSDP2 (each MoE decoder layer sharded, fused experts included) and DDP on 2 processes x 1
    micro-batch of 2 equal 1 process x 2 micro-batches of 2: the same forwards, so the router loss,
    a mean over the step's forwards, is the same too."""
    import json
    import subprocess
    import sys

    records = tmp_path / "records.json"
    records.write_text(json.dumps(qa_records(16)))
    common = ["max_length=32", "max_steps=3", "logging_steps=1", "learning_rate=5e-3", "warmup_steps=0", "seed=3",
              "per_device_train_batch_size=2"]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_training.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", script, moe_dir, str(records),
                          str(tmp_path / "two"), *common, sharding], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one = subprocess.run([sys.executable, script, moe_dir, str(records), str(tmp_path / "one"), *common,
                          "gradient_accumulation_steps=2"], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]

    def logged(name):
        with open(tmp_path / name / "metrics.jsonl") as handle:
            return [r for r in map(json.loads, handle) if r["type"] == "train"]

    for a, b in zip(logged("one"), logged("two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["aux_loss"] == pytest.approx(b["aux_loss"], abs=1e-6)
    ours, theirs = load_file(str(tmp_path / "two" / "final" / "model.safetensors")), load_file(
        str(tmp_path / "one" / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=key)
