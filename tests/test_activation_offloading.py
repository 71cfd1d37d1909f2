"""activation_offloading: the tensors autograd saves go to host memory in forward and come back in
backward, bit for bit, fetched one ahead (training/offloading.py).

On the CPU the run is accepted, logs one line and trains exactly as without it. The hooks' own
bookkeeping (what is moved, what stays, the order backward brings tensors back, the prefetch) is
tested here with the CPU standing in for the device (its streams and events are no-ops, host memory
unpinned); the CUDA tests run where a GPU is.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sftlab import SFTConfig, train
from sftlab.training.offloading import OffloadActivations, saved_activations
from tiny import qa_records
from tiny_models import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cpu_offloader(**kwargs) -> OffloadActivations:
    """The CPU standing in for the device: every saved tensor on it is a candidate."""
    return OffloadActivations("cpu", pin_memory=False, **kwargs)


def test_a_saved_tensor_is_copied_out_and_comes_back_bit_for_bit():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256, 256))
    x = torch.randn(512, 256, requires_grad=True)
    offload = cpu_offloader(min_bytes=1024)
    with offload:
        hidden = torch.tanh(x @ weight)  # saves x, the weight (a parameter) and tanh's output
        y = (hidden * hidden).sum()
    y.backward()
    offloaded = (x.grad.clone(), weight.grad.clone())
    x.grad = weight.grad = None
    ((torch.tanh(x @ weight) ** 2).sum()).backward()
    assert torch.equal(offloaded[0], x.grad) and torch.equal(offloaded[1], weight.grad)
    # moved: tanh's output, which tanh and the product (as both operands) save, copied once; x and
    # the weight are leaves that require gradients, which stay
    assert offload.moved == 1
    assert offload.moved_bytes == 512 * 256 * 4
    assert offload.unpack_order == [0, 0, 0]


def test_small_tensors_views_and_weights_stay_where_they_are():
    torch.manual_seed(0)
    base = torch.randn(1024, 64, requires_grad=True)
    offload = cpu_offloader(min_bytes=64 * 64 * 4)
    with offload:
        wide = base * 2
        view = wide[:512]  # a view into a larger buffer: copying it would not free that buffer
        small = base[:8] * 3  # 2 KB, below min_bytes
        (view.exp().sum() + small.exp().sum()).backward()
    assert offload.moved == 1  # view.exp()'s output: its own storage, large enough
    assert offload.moved_bytes == 512 * 64 * 4


def test_a_checkpointed_model_brings_its_layer_inputs_back_in_reverse_one_ahead():
    model = tiny_model("llama", vocab_size=128, attn="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(1, 128, (1, 2048))

    def grads(context):
        model.zero_grad()
        with context:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        (hidden * torch.linspace(-1, 1, 64)).sum().backward()  # saves nothing of the hidden states
        return [p.grad.clone() for p in model.model.parameters()]

    offload = cpu_offloader(min_bytes=2048 * 64 * 4)  # tensors of one layer's hidden states and more
    plain, moved = grads(contextlib.nullcontext()), grads(offload)
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))
    # Outside the checkpointed layers autograd keeps each layer's input (2 layers), the final norm's
    # input (saved by two of its ops, copied once) and its normalised states (for its weight's
    # gradient); backward asks for them last first (the norm's input twice), and each was already
    # on its way when asked for, but the first.
    assert offload.moved == 4
    assert offload.unpack_order == [3, 2, 2, 1, 0]
    assert offload.prefetched == 3


def test_on_the_cpu_training_accepts_it_logs_it_and_trains_the_same(model_dir, tmp_path, capsys, one_thread):
    settings = dict(
        per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, max_steps=2, seed=0
    )
    records = qa_records()

    def losses(name, **extra):
        config = SFTConfig(model=model_dir, output_dir=str(tmp_path / name), use_cache=False, **settings, **extra)
        return [r["loss"] for r in train(config, train_dataset=records).history if r["type"] == "train"]

    plain = losses("plain", gradient_checkpointing=True)
    capsys.readouterr()
    offloaded = losses("offloaded", gradient_checkpointing=True, activation_offloading=True)
    out = capsys.readouterr().out
    assert offloaded == plain
    assert (
        "activation_offloading: the model runs on the CPU, whose activations are already in host memory: "
        "nothing to move" in out.splitlines()
    )


def test_off_or_on_the_cpu_the_forward_runs_without_hooks():
    context, why = saved_activations(torch.device("cpu"), True)
    assert isinstance(context, contextlib.nullcontext) and "nothing to move" in why
    context, why = saved_activations(torch.device("cpu"), False)
    assert isinstance(context, contextlib.nullcontext) and why is None


@cuda
def test_on_a_gpu_the_same_gradients_with_less_device_memory():
    model = tiny_model("llama", vocab_size=128, attn="sdpa", hidden_size=256, intermediate_size=512).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(1, 128, (1, 32768), device="cuda")

    def run(context):
        model.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with context:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        after_forward = torch.cuda.memory_allocated()
        hidden.pow(2).mean().backward()
        torch.cuda.synchronize()
        return [p.grad.clone() for p in model.model.parameters()], after_forward

    plain, kept = run(contextlib.nullcontext())
    offload = OffloadActivations("cuda")
    moved, left = run(offload)
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))
    assert offload.moved >= 2 and offload.prefetched == offload.moved - 1
    # the layer inputs (32768 x 256 fp32, 32 MB each) left the device after forward
    assert kept - left >= offload.moved_bytes * 0.9


@cuda
def test_on_a_gpu_training_offloads_and_trains_the_same(model_dir, tmp_path, capsys):
    settings = dict(per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, max_steps=2)
    records = qa_records()

    def losses(name, **extra):
        config = SFTConfig(model=model_dir, output_dir=str(tmp_path / name), use_cache=False, **settings, **extra)
        return [r["loss"] for r in train(config, train_dataset=records).history if r["type"] == "train"]

    plain = losses("plain", gradient_checkpointing=True)
    offloaded = losses("offloaded", gradient_checkpointing=True, activation_offloading=True)
    assert offloaded == pytest.approx(plain, rel=1e-6)
    assert "activations saved for backward move to pinned host memory" in capsys.readouterr().out
