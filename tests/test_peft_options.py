"""LoRA options users reach for: DoRA, rsLoRA, modules trained in full, PiSSA/OLoRA
initialisation, and QLoRA (4-bit base through bitsandbytes, which runs on the CPU too).

The check that matters for each: the saved adapter, loaded onto the ORIGINAL base model with
PEFT, computes what the trained model computes (final/merged, written by merge_lora), and it
differs from the base model (it trained). PiSSA and OLoRA move part of every base weight into the
adapter, so without conversion their adapter would not apply to the original base at all.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftlab import ConfigError, SFTConfig, train
from sftlab.cli import main as cli_main
from sftlab.training.setup import quantization_settings
from tiny import qa_records
from tiny_models import list_config

RECORDS = qa_records()
BASE = dict(per_device_train_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1, seed=0, max_steps=3,
            use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
PROBE = torch.tensor([[5, 9, 14, 20, 3, 7, 11, 2]])


def run(model_dir, out, **overrides):
    return train(list_config(model_dir, out, **{**BASE, **overrides}), train_dataset=RECORDS)


def losses(result):
    return [r["loss"] for r in result.history if r["type"] == "train"]


@torch.no_grad()
def logits(model):
    return model(input_ids=PROBE).logits


def adapter_on_base(model_dir, final_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final_dir).eval()


def assert_adapter_reproduces_the_merged_model(model_dir, final_dir):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final_dir, "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = logits(adapter_on_base(model_dir, final_dir))
    torch.testing.assert_close(ours, logits(merged), rtol=1e-4, atol=1e-5)
    assert float((ours - logits(base)).abs().max()) > 1e-3  # the adapter does something


def adapter_config(final_dir) -> dict:
    with open(os.path.join(final_dir, "adapter_config.json")) as handle:
        return json.load(handle)


def test_dora_trains_magnitudes_and_its_adapter_reproduces_the_merged_model(model_dir, tmp_path):
    result = run(model_dir, tmp_path / "dora", use_dora=True, merge_lora=True)
    assert adapter_config(result.final_dir)["use_dora"] is True
    weights = load_file(os.path.join(result.final_dir, "adapter_model.safetensors"))
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert magnitudes and len(magnitudes) == len([k for k in weights if "lora_A" in k])  # one per adapted layer
    assert all(math.isfinite(x) for x in losses(result))
    assert_adapter_reproduces_the_merged_model(model_dir, result.final_dir)


def test_rslora_scales_by_alpha_over_sqrt_r(model_dir, tmp_path):
    result = run(model_dir, tmp_path / "rs", use_rslora=True, max_steps=1)
    assert adapter_config(result.final_dir)["use_rslora"] is True
    model = adapter_on_base(model_dir, result.final_dir)
    scalings = {float(m.scaling["default"]) for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling}
    assert scalings == {8 / math.sqrt(4)}  # 4.0; plain LoRA: 8 / 4 = 2.0


def test_modules_to_save_trains_the_head_in_full_and_saves_it(model_dir, tmp_path):
    result = run(model_dir, tmp_path / "head", lora_modules_to_save=["lm_head"], merge_lora=True)
    weights = load_file(os.path.join(result.final_dir, "adapter_model.safetensors"))
    head = [k for k in weights if "lm_head" in k]
    assert len(head) == 1
    start = load_file(os.path.join(model_dir, "model.safetensors"))["lm_head.weight"]
    assert weights[head[0]].shape == start.shape and not torch.equal(weights[head[0]], start)
    assert_adapter_reproduces_the_merged_model(model_dir, result.final_dir)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_and_olora_start_unchanged_and_save_an_adapter_for_the_original_base(model_dir, tmp_path, init):
    plain = run(model_dir, tmp_path / "plain", max_steps=1)
    result = run(model_dir, tmp_path / init, lora_init=init, merge_lora=True)
    # The base keeps W - BA and the adapter starts at BA: the model computes what it did (same first loss).
    assert losses(result)[0] == pytest.approx(losses(plain)[0], rel=1e-5)
    assert losses(result)[-1] < losses(result)[0]
    # Converted on save into a plain LoRA of rank 2r on the original weights.
    assert adapter_config(result.final_dir)["r"] == 8
    assert_adapter_reproduces_the_merged_model(model_dir, result.final_dir)


def test_lora_options_need_use_peft_and_a_known_init():
    with pytest.raises(ConfigError, match="use_peft") as error:
        SFTConfig(model="m", train_data="d", use_dora=True)
    assert error.value.field == "use_dora" and "use_peft: true" in error.value.fix
    with pytest.raises(Exception, match="pissa_niter_<n>"):
        SFTConfig(model="m", train_data="d", use_peft=True, lora_init="svd")
    with pytest.raises(ConfigError, match="fsdp") as error:
        SFTConfig(model="m", train_data="d", use_peft=True, load_in_4bit=True, fsdp=True)
    assert error.value.field == "load_in_4bit"
    with pytest.raises(ConfigError, match="4-bit") as error:
        SFTConfig(model="m", train_data="d", use_peft=True, load_in_4bit=True, merge_lora=True)
    assert "merge_and_unload" in error.value.fix


def test_load_in_4bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="bitsandbytes") as error:
        quantization_settings(SFTConfig(model="m", train_data="d", use_peft=True, load_in_4bit=True))
    assert error.value.field == "load_in_4bit" and "pip install bitsandbytes" in error.value.fix


def test_qlora_trains_adapters_on_a_4bit_base(model_dir, tmp_path):
    from peft import PeftModel  # bitsandbytes is in the test extras: no skip, a missing one fails here

    fp32 = run(model_dir, tmp_path / "fp32", max_steps=2)
    seen = {}

    def spy(model):  # an optimizer factory: sees the model's parameters as training has them
        seen["dtypes"] = {p.dtype for p in model}
        return torch.optim.AdamW(model, lr=1e-2)

    config = SFTConfig(model=model_dir, output_dir=str(tmp_path / "q"), use_cache=False, **{**BASE, "max_steps": 2},
                       load_in_4bit=True)
    result = train(config, train_dataset=RECORDS, optimizer=spy)
    assert seen["dtypes"] == {torch.float32}  # only the adapters train; the 4-bit weights are frozen
    # NF4 rounds every base weight to one of 16 levels: the first loss is close to, not equal to, fp32's.
    first_q, first_fp32 = losses(result)[0], losses(fp32)[0]
    assert first_q == pytest.approx(first_fp32, rel=2e-2) and first_q != first_fp32
    assert all(math.isfinite(x) for x in losses(result))
    assert os.path.isfile(os.path.join(result.final_dir, "adapter_model.safetensors"))
    model = adapter_on_base(model_dir, result.final_dir)
    assert isinstance(model, PeftModel) and torch.isfinite(logits(model)).all()


def test_the_new_training_options_from_the_command_line(model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"model: {model_dir}\ntrain_data: {data}\noutput_dir: {tmp_path / 'cli'}\n")
    args = ["train", str(config_file), "max_steps=2", "use_cache=false", "logging_steps=1", "loss_type=dft", "neftune_noise_alpha=5", "use_peft=true", "use_dora=true",
            "use_rslora=true", "lora_init=pissa"]
    assert cli_main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert len(train_records) == 2 and all(r["nll"] > r["loss"] > 0 for r in train_records)
    saved = adapter_config(tmp_path / "cli" / "final")
    assert saved["use_dora"] and saved["use_rslora"]
