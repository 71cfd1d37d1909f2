"""The optimizer's opt-in memory savers: the update fused into backward gives the same weights as
the ordinary step; bf16 moment estimates are rounded without bias and track fp32 AdamW."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from sftlab import train
from sftlab.errors import ConfigError
from sftlab.training.optimizer import AdamWBF16States, StepInBackward, _stochastic_bf16
from tiny import char_tokenizer, qa_records
from tiny_models import list_config, save_tiny_llama, tiny_model

RECORDS = qa_records()
BASE = dict(per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, seed=0, max_steps=3,
            max_grad_norm=None, weight_decay=0.1)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("model")), char_tokenizer(), tie=True)


def run(model_dir, out, **overrides):
    return train(list_config(model_dir, out, **{**BASE, **overrides}), train_dataset=RECORDS)


def train_records(result):
    return [r for r in result.history if r["type"] == "train"]


def test_optimizer_in_backward_gives_the_same_losses_and_weights(tied_model_dir, tmp_path):
    plain = run(tied_model_dir, tmp_path / "plain")
    fused = run(tied_model_dir, tmp_path / "fused", optimizer_in_backward=True)
    ours, theirs = train_records(fused), train_records(plain)
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-6)
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in theirs], rel=1e-5)
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], rel=1e-3)  # the weights did move
    a = load_file(os.path.join(fused.final_dir, "model.safetensors"))
    b = load_file(os.path.join(plain.final_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("overrides, field", [
    (dict(max_grad_norm=1.0), "max_grad_norm"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    (dict(skip_nonfinite_steps=True), "skip_nonfinite_steps"),
])
def test_optimizer_in_backward_refuses_what_needs_every_gradient_first(tied_model_dir, tmp_path, overrides, field):
    with pytest.raises(ConfigError) as error:
        run(tied_model_dir, tmp_path / "refused", optimizer_in_backward=True, **overrides)
    assert error.value.field == field


def test_step_in_backward_frees_each_gradient_and_keeps_one_optimizer_state():
    model = tiny_model("llama", 96, tie=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    stepper = StepInBackward(params, optimizer)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in params]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
    assert len(optimizer.state) == len(params) and all(int(s["step"]) == 1 for s in optimizer.state.values())
    assert stepper.take_grad_norm() > 0 and stepper.take_grad_norm() == 0.0
    stepper.remove()


def test_stochastic_bf16_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2.0**-9)  # a quarter of the way from 1 to the next bf16 value, 1 + 2^-7
    rounded = _stochastic_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert float((rounded > 1).double().mean()) == pytest.approx(0.25, abs=0.005)
    assert float(_stochastic_bf16(-x, torch.Generator().manual_seed(0)).float().mean()) == pytest.approx(-(1.0 + 2.0**-9), abs=2e-5)


def test_bf16_states_track_fp32_adamw():
    torch.manual_seed(0)
    target = torch.randn(300, 40)
    weights = {name: torch.nn.Parameter(torch.zeros(300, 40)) for name in ("fp32", "bf16")}
    optimizers = {"fp32": torch.optim.AdamW([weights["fp32"]], lr=1e-2, weight_decay=0.1),
                  "bf16": AdamWBF16States([weights["bf16"]], lr=1e-2, weight_decay=0.1)}
    for _ in range(50):
        noise = 0.1 * torch.randn(300, 40)  # the same gradients for both
        for name, w in weights.items():
            w.grad = (w.detach() - target) + noise
            optimizers[name].step()
    state = optimizers["bf16"].state[weights["bf16"]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and int(state["step"]) == 50
    moved = float(weights["fp32"].detach().abs().mean())  # ~0.45 after 50 steps of 1e-2
    assert moved > 0.3
    gap = (weights["bf16"] - weights["fp32"]).detach().abs()
    # Within bf16 rounding noise of the same updates (measured: max 0.007, 2% of the distance moved).
    assert float(gap.max()) < 0.04 * moved and float(gap.mean()) < 0.005 * moved


def test_bf16_optimizer_states_train_like_fp32(tied_model_dir, tmp_path):
    fp32 = train_records(run(tied_model_dir, tmp_path / "fp32"))
    bf16 = train_records(run(tied_model_dir, tmp_path / "bf16", optimizer_state_dtype="bfloat16"))
    assert bf16[0]["loss"] == fp32[0]["loss"]  # the first forward precedes any update
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], rel=2e-2)


def test_bf16_states_stay_bf16_and_exact_through_a_state_dict():
    weight = torch.nn.Parameter(torch.randn(64, 8))
    optimizer = AdamWBF16States([weight], lr=1e-2)
    weight.grad = torch.randn(64, 8)
    optimizer.step()
    saved = optimizer.state_dict()
    restored = AdamWBF16States([weight], lr=1e-2)
    restored.load_state_dict(saved)  # torch alone would cast the moments to the weight's fp32
    for key in ("exp_avg", "exp_avg_sq"):
        assert restored.state[weight][key].dtype == torch.bfloat16
        assert torch.equal(restored.state[weight][key], optimizer.state[weight][key])
    assert int(restored.state[weight]["step"]) == 1
