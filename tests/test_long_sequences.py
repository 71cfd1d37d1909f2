"""Long sequences on one process: rows of 32k-131k tokens prepared, planned, attended and trained.

- sdpa_packed (training/attention.py): sdpa once per packed example, equal to the model's own
  attention (the masked sdpa and eager) on packed rows, the same as sdpa on padded batches and
  in generation, and with no length x length tensor anywhere in forward or backward;
- 'auto' picks it for packed runs of models without sliding windows; a window shorter than an example is
  computed within the example (a band mask of that example's length);
- examples of 32k+ tokens through preparation and the store (truncated and dropped ones counted),
  the planner at max_length 131072, the sparse head bounded by the hidden states;
- a 64k-token packed row trained on the tiny model, its loss the one each example gives alone.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sftlab import SFTConfig, TargetSettings, prepare_examples, train
from sftlab.data.container import IGNORE, Examples
from sftlab.models import choose_attention
from sftlab.training.attention import NAME, example_bounds, register
from sftlab.training.batching import StepPlan, pack_batch
from sftlab.training.loss import head_loss
from tiny import char_id, char_tokenizer
from tiny_models import tiny_model

register()


class LargestAllocation(TorchDispatchMode):
    """The bytes of the largest storage any aten op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.bytes = max(self.bytes, leaf.untyped_storage().nbytes())
        return out


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def logits_and_grads(model, ids, positions):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_example_bounds_split_rows_at_every_position_reset():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 5, 6, 0, 1, 2, 3]])
    assert example_bounds(positions) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 4), (4, 8)]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_sdpa_packed_equals_the_models_own_attention_on_packed_rows(arch, reference):
    # Two rows as pack_batch builds them: examples of several lengths, the second ending in a run
    # of pads (positions from 0 again); the model's own kernel gets transformers' block mask.
    model = tiny_model(arch, vocab_size=128, attn=reference, seed=1)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 48))
    positions = torch.cat([packed_positions([5, 20, 23]), packed_positions([1, 30, 9, 8])])
    expected, expected_grads = logits_and_grads(model, ids, positions)
    model.set_attn_implementation(NAME)
    logits, grads = logits_and_grads(model, ids, positions)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for name, grad in grads.items():  # within 1e-5 of each tensor's largest entry (sdpa and eager differ as much)
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_sdpa_packed_is_sdpa_on_padded_batches_and_in_generation():
    model = tiny_model("llama", vocab_size=128, attn="sdpa", seed=2)
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    left = torch.ones_like(ids)
    left[0, :3] = 0  # left padding, as batched generation pads
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=left, max_new_tokens=6, do_sample=False)
        model.set_attn_implementation(NAME)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, padded)
        assert torch.equal(model.generate(ids, attention_mask=left, max_new_tokens=6, do_sample=False), generated)


def test_a_packed_row_builds_no_length_by_length_tensor():
    # sdpa's block mask is length^2 bytes (bool); sdpa_packed's largest tensor is a few
    # length x hidden ones. The probe sees every aten op's output in forward and backward.
    model = tiny_model("llama", vocab_size=128, attn="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    length = 2048
    ids = torch.randint(1, 128, (1, length))
    positions = packed_positions([512] * 4)
    with LargestAllocation() as masked:
        logits_and_grads(model, ids, positions)
    assert masked.bytes >= length * length  # the probe sees the mask: this test can fail
    model.set_attn_implementation(NAME)
    long_ids = torch.randint(1, 128, (1, 32768))
    with LargestAllocation() as split:
        model.model(input_ids=long_ids, position_ids=packed_positions([512] * 64), use_cache=False)
    assert split.bytes <= 32768 * 128 * 4 * 2  # at most twice the MLP's activations (length x 128 fp32)


def test_a_sliding_window_shorter_than_an_example_is_computed_within_the_example():
    # Examples of 10, 12 and 2 tokens under a window of 8: the first two need the window, a band
    # mask of their own length; the model's own sdpa gets transformers' sliding block mask.
    model = tiny_model(
        "qwen2", vocab_size=128, attn="sdpa", use_sliding_window=True, sliding_window=8, max_window_layers=0
    )
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    positions = packed_positions([10, 12, 2])
    expected, expected_grads = logits_and_grads(model, ids, positions)
    model.set_attn_implementation(NAME)
    logits, grads = logits_and_grads(model, ids, positions)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for name, grad in grads.items():
        scale = float(expected_grads[name].abs().max())
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=1e-5 * scale, msg=name)
    # Not vacuous: the same weights with a window longer than every example give other logits.
    wide = tiny_model(
        "qwen2", vocab_size=128, attn=NAME, use_sliding_window=True, sliding_window=64, max_window_layers=0
    )
    unwindowed, _ = logits_and_grads(wide, ids, positions)
    assert float((unwindowed - expected).abs().max()) > 1e-4


def test_auto_picks_sdpa_packed_for_packed_runs_of_models_without_sliding_windows(tmp_path):
    llama = tiny_model("llama", vocab_size=128)
    llama.save_pretrained(tmp_path / "llama")
    windowed = tiny_model("qwen2", vocab_size=128, use_sliding_window=True, sliding_window=64, max_window_layers=0)
    windowed.save_pretrained(tmp_path / "windowed")
    assert choose_attention(str(tmp_path / "llama"), packing=True)[0] == NAME
    assert choose_attention(str(tmp_path / "llama"), packing=False)[0] == "sdpa"
    assert choose_attention(str(tmp_path / "windowed"), packing=True)[0] == "sdpa"
    assert choose_attention(str(tmp_path / "llama"), NAME)[0] == NAME


# --- long examples: preparation, store, plan, head ------------------------------------------------


def long_records() -> list[dict]:
    # One character is one token of the char tokenizer (no merges among these letters).
    return [
        {"prompt": "q", "completion": "bcdfg" * 8000},  # 40,000 characters
        {"prompt": "q", "completion": "x" * 140_000},
        {"prompt": "q", "completion": "yz"},
    ]


@pytest.mark.parametrize(
    "max_length, truncation, lengths, truncated, dropped",
    [
        (32768, "right", [32768, 32768, 4], 2, {}),
        (32768, "drop", [4], 0, {"longer than max_length=32768": 2}),
        (131072, "right", [40002, 131072, 4], 1, {}),
    ],
)
def test_examples_of_32k_and_more_are_prepared_stored_and_counted(
    tmp_path, max_length, truncation, lengths, truncated, dropped
):
    settings = TargetSettings(max_length=max_length, truncation=truncation)
    built = prepare_examples(long_records(), char_tokenizer(), settings, cache_dir=str(tmp_path))
    read = prepare_examples(long_records(), char_tokenizer(), settings, cache_dir=str(tmp_path))
    assert (built.stats["cached"], read.stats["cached"]) == (False, True)
    # prompt "q" + completion + EOS; the targets are shifted by one, the prompt's own unsupervised
    assert read.lengths.tolist() == lengths
    assert (read.stats["truncated"], read.stats["dropped"]) == (truncated, dropped)
    for name in ("input_ids", "targets", "offsets"):
        np.testing.assert_array_equal(getattr(read, name), getattr(built, name))
    ids, targets = read[0]
    first = "bcdfg" if len(lengths) == 3 else "yz"
    assert ids[:3].tolist() == [char_id("q"), char_id(first[0]), char_id(first[1])]
    # the prompt's token predicts the completion's first; the last position (EOS, or the cut) predicts nothing
    assert targets[:2].tolist() == ids[1:3].tolist() and targets[-1] == IGNORE


def test_max_length_131072_packs_and_batches_by_best_fit():
    lengths = [131072, 65536, 40000, 30000, 5]
    flat = np.concatenate([np.full(n, 7, np.int32) for n in lengths])
    examples = Examples(flat, flat.copy(), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), np.arange(5))
    plan = StepPlan(
        examples,
        packing=True,
        max_length=131072,
        batch_size=1,
        accumulation=1,
        world_size=1,
        seed=0,
        group_by_length=False,
    )
    # Longest first; 5 tokens go to the tightest row with room: 131072-65536-40000 = 25536 left.
    assert plan.items == [[0], [1, 2, 4], [3]]
    assert plan.item_lengths.tolist() == [131072, 105541, 30000]
    batch = pack_batch(examples, [plan.items[1]], pad_id=0)
    assert batch["input_ids"].shape == (1, 105541)
    assert example_bounds(batch["position_ids"]) == [[(0, 65536), (65536, 105536), (105536, 105541)]]


def test_the_sparse_head_holds_no_more_than_the_hidden_states_and_one_chunk_at_any_length():
    torch.manual_seed(0)
    vocab, hidden, rows = 1024, 16, 256
    head = torch.nn.Linear(hidden, vocab, bias=False)
    for length in (32768, 65536):
        states = torch.randn(length, hidden, requires_grad=True)
        targets = torch.randint(0, vocab, (length,))
        with LargestAllocation() as probe:
            loss, _, _ = head_loss(head, states, targets, rows=rows)
            loss.backward()
        assert probe.bytes <= max(length * hidden * 4, rows * vocab * 4, vocab * hidden * 4)
    # and the sum is cross-entropy's, chunk by chunk in float64 here
    expected = sum(
        torch.nn.functional.cross_entropy(
            (states[i : i + 4096].double() @ head.weight.double().T), targets[i : i + 4096], reduction="sum"
        )
        for i in range(0, length, 4096)
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --- a 64k-token row, trained ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(str(tmp_path_factory.mktemp("model")), char_tokenizer())


def test_a_64k_token_packed_row_trains_with_the_loss_each_example_gives_alone(
    tiny_folder, tmp_path, one_thread, capsys
):
    from transformers import AutoModelForCausalLM

    letters = "abcdefgijkmnpqrstuvwxyz"
    records = [
        {"prompt": f"{i}:", "completion": "".join(letters[(i * 7 + j * 3) % len(letters)] for j in range(1000 + i))}
        for i in range(60)
    ]  # one packed row of max_length 65536
    config = SFTConfig(
        model=tiny_folder,
        output_dir=str(tmp_path / "run"),
        use_cache=False,
        max_length=65536,
        packing=True,
        per_device_train_batch_size=1,
        max_steps=1,
        gradient_checkpointing=True,
        warmup_ratio=0.0,
    )
    result = train(config, train_dataset=records)
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (step,) = [r for r in map(json.loads, log) if r.get("type") == "train"]
    # every example in the step's one row: "i:" + 1000 + i letters + EOS, one token per character
    assert step["tokens"] == sum(len(f"{i}:") + 1000 + i + 1 for i in range(60)) == 62000
    assert f"attention: {NAME}" in capsys.readouterr().out

    # the loss of that step: sum of every supervised token's cross-entropy / their count, each
    # example run alone through the initial model (no packing, no sftlab loss code)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    tokenizer = char_tokenizer()
    examples = prepare_examples(records, tokenizer, TargetSettings(max_length=65536))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(examples)):
            ids, targets = (torch.from_numpy(a.astype(np.int64))[None] for a in examples[i])
            logits = model(input_ids=ids).logits.double()
            keep = targets != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    assert step["supervised_tokens"] == count
    assert step["loss"] == pytest.approx(total / count, rel=1e-5)
    assert os.path.isdir(result.final_dir)
