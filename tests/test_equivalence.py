"""The update does not depend on how a step is split: 8x1 == 2x4 == 2 processes x 4.

Each micro-batch's loss is its CE sum divided by the supervised tokens of the whole step on all
processes, so any split of the same 8 examples sums to the same gradient. One optimizer step is
run each way and the resulting weights compared. Plain SGD (lr = 1, via `optimizer=`) is the
sharp check: the update is the gradient itself. AdamW's first step is nearly lr * sign(gradient),
blind to how the gradient is scaled, so it is checked too but proves less.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftlab import SFTConfig, train
from tiny import qa_records
from tiny_models import list_config

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

# Eight prompt/completion records of different lengths (and supervised counts), so that an
# update normalised per micro-batch instead of per step would differ.
RECORDS = qa_records(8, exclaim=lambda i: i)


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(RECORDS))
    return str(path)


def config(model_dir, output_dir, **overrides) -> SFTConfig:
    values = dict(max_steps=1, learning_rate=1.0, lr_scheduler_type="constant", warmup_ratio=0.0, max_grad_norm=None,
                  logging_steps=1, seed=5)
    return list_config(model_dir, output_dir, **{**values, **overrides})


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def run(model_dir, output_dir, records=RECORDS, optimizer="sgd", **overrides):
    """Train (SGD at the config's learning rate, or with optimizer=None the default AdamW); final weights and log."""
    settings = config(model_dir, output_dir, **overrides)
    sgd = (lambda params: torch.optim.SGD(params, lr=settings.learning_rate)) if optimizer == "sgd" else None
    result = train(settings, train_dataset=records, optimizer=sgd)
    return final_weights(output_dir), result.history


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_same_update(a: dict, b: dict, start: dict):
    """The weights agree within 1e-6 relative (to each tensor's norm), and the updates
    (a - start vs b - start) agree element by element, up to fp32 summation order."""
    assert a.keys() == b.keys() == start.keys()
    for name in start:
        assert relative_difference(a[name], b[name]) < 1e-6, name
        update_a, update_b = a[name] - start[name], b[name] - start[name]
        # Updates are differences of fp32 weights, so they carry the weights' rounding (a few ulps) too.
        floor = 1e-5 * float(update_b.abs().max()) + 4 * torch.finfo(torch.float32).eps * float(start[name].abs().max())
        torch.testing.assert_close(update_a, update_b, rtol=1e-4, atol=floor, msg=lambda m: f"update of {name}: {m}")
        assert torch.count_nonzero(update_b) > 0, f"{name} did not move: the comparison would prove nothing"


@pytest.fixture(scope="module")
def start_weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def one_by_eight(model_dir, tmp_path_factory):
    """The reference: one process, one micro-batch of 8, one SGD step."""
    return run(model_dir, tmp_path_factory.mktemp("8x1"), per_device_train_batch_size=8, gradient_accumulation_steps=1)


def test_batch_8_equals_2_x_accumulation_4(model_dir, tmp_path, one_by_eight, start_weights):
    weights, history = run(model_dir, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert_same_update(weights, one_by_eight[0], start_weights)
    train_a = [r for r in history if r["type"] == "train"][0]
    train_b = [r for r in one_by_eight[1] if r["type"] == "train"][0]
    assert train_a["supervised_tokens"] == train_b["supervised_tokens"]
    assert train_a["loss"] == pytest.approx(train_b["loss"], rel=1e-6)


def test_adamw_batch_8_equals_2_x_accumulation_4(model_dir, tmp_path):
    # AdamW's first update of an element is lr * g / (|g| + eps). Where |g| is about eps, a 1-ulp
    # change in g (summation order differs between the splits) moves it by a visible fraction of
    # lr: with the default eps = 1e-8, q_proj has such an element (|g| = 5.6e-9, 2.4e-6 of its
    # largest gradient), and the tensors then differ by 4e-6 relative. eps = 1e-6 keeps the
    # comparison about the step's normalisation, not about ulps.
    kwargs = dict(optimizer=None, learning_rate=1e-2, adam_epsilon=1e-6)
    a, _ = run(model_dir, tmp_path / "a", per_device_train_batch_size=8, **kwargs)
    b, _ = run(model_dir, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, **kwargs)
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    for name in a:
        assert relative_difference(a[name], b[name]) < 1e-6, name
    assert max(float((a[n] - start[n]).abs().max()) for n in a) == pytest.approx(1e-2, rel=1e-3)  # the step moved weights


def test_packed_batch_8_equals_2_x_accumulation_4(model_dir, tmp_path, start_weights):
    # Packed rows of at most 24 tokens: the step's items are rows, split the same way.
    kwargs = dict(packing=True, max_length=24)
    a, _ = run(model_dir, tmp_path / "a", per_device_train_batch_size=8, **kwargs)
    b, _ = run(model_dir, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, **kwargs)
    assert_same_update(b, a, start_weights)


def test_dft_batch_8_equals_2_x_accumulation_4_and_differs_from_nll(model_dir, tmp_path, one_by_eight, start_weights):
    # DFT scales each token's CE by its probability, but the step is normalised the same way: by
    # the step's supervised tokens, so any split of the step gives the same update.
    a, history_a = run(model_dir, tmp_path / "a", per_device_train_batch_size=8, loss_type="dft")
    b, history_b = run(model_dir, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, loss_type="dft")
    assert_same_update(b, a, start_weights)
    log_a, log_b = ([r for r in h if r["type"] == "train"][0] for h in (history_a, history_b))
    assert log_a["loss"] == pytest.approx(log_b["loss"], rel=1e-6)
    plain = [r for r in one_by_eight[1] if r["type"] == "train"][0]
    # The log shows the plain CE as "nll": the same number a nll run logs from the same weights.
    assert log_a["nll"] == pytest.approx(plain["loss"], rel=1e-6)
    # p < 1 on every token of an untrained model: the DFT loss is below the CE, and so is the update.
    assert log_a["loss"] < 0.1 * plain["loss"]

    def update(w):
        return sum(float((w[n] - start_weights[n]).norm()) for n in start_weights)

    assert update(a) < 0.1 * update(one_by_eight[0])


def test_empty_micro_batches_contribute_nothing(model_dir, tmp_path, start_weights):
    # Nine records: the second step holds one example, spread over four micro-batches, three of
    # which are empty and run fully masked. The result must equal the same two steps done 8x1.
    records = RECORDS + [{"prompt": "Q8: z", "completion": " ok"}]
    kwargs = dict(records=records, max_steps=2, learning_rate=0.1)
    a, history_a = run(model_dir, tmp_path / "a", per_device_train_batch_size=8, **kwargs)
    b, history_b = run(model_dir, tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=4, **kwargs)
    steps_b = [r for r in history_b if r["type"] == "train"]
    assert [r["empty_micro_batches"] for r in steps_b] == [0, 3]
    assert all(torch.isfinite(t).all() for t in b.values())
    assert steps_b[1]["supervised_tokens"] == 3  # the completion " ok" is " ", "ok" (a merge), then EOS
    steps_a = [r for r in history_a if r["type"] == "train"]
    assert [r["empty_micro_batches"] for r in steps_a] == [0, 0]
    assert steps_a[1]["loss"] == pytest.approx(steps_b[1]["loss"], rel=1e-6)
    assert_same_update(b, a, start_weights)


def test_empty_micro_batches_with_a_lora_head(model_dir, tmp_path):
    # A LoRA-adapted lm_head is not an nn.Linear: the loss goes through the generic head path,
    # which must still give a loss that backward accepts when a micro-batch has no supervised rows.
    pytest.importorskip("peft")
    records = RECORDS + [{"prompt": "Q8: z", "completion": " ok"}]
    settings = config(model_dir, tmp_path, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                      use_peft=True, lora_r=4, lora_target_modules=["q_proj", "lm_head"])
    steps = [r for r in train(settings, train_dataset=records).history if r["type"] == "train"]
    assert [r["empty_micro_batches"] for r in steps] == [0, 3]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in steps)
    assert os.path.isfile(tmp_path / "final" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_processes_x_4_equal_batch_8(model_dir, records_file, tmp_path, one_by_eight, start_weights):
    output = tmp_path / "dist"
    script = os.path.join(os.path.dirname(__file__), "run_training.py")
    pairs = ["optimizer=sgd", "per_device_train_batch_size=4", "max_steps=1", "learning_rate=1.0", "lr_scheduler_type=constant",
             "warmup_ratio=0", "max_grad_norm=null", "logging_steps=1", "seed=5"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", script, model_dir, records_file, str(output), *pairs],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_update(final_weights(output), one_by_eight[0], start_weights)
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in logged if r["type"] == "train"][0]
    reference = [r for r in one_by_eight[1] if r["type"] == "train"][0]
    # The log is summed over both processes.
    assert step["supervised_tokens"] == reference["supervised_tokens"]
    assert step["loss"] == pytest.approx(reference["loss"], rel=1e-6)
