"""NEFTune: noise on the input embeddings in training, bounded by alpha / sqrt(L * hidden) with L
the length of each token's own example, packed or not; none in evaluation.

The noise actually added is read back with a forward pre-hook on the trunk (its inputs_embeds
minus the clean embeddings), so the tests see what the model sees.
"""

from __future__ import annotations

import math

import pytest
import torch

from sftlab import SFTConfig, train
from sftlab.data.container import IGNORE, Examples
from sftlab.training.batching import pack_batch, pad_batch
from sftlab.training.loss import SupervisedLoss, example_lengths, neftune_scale, split_model
from tiny import char_tokenizer, qa_records
from tiny_models import save_tiny_llama, tiny_model

VOCAB = 96
LENGTHS = [9, 6, 11, 7, 5]
ROWS = [[0, 1, 2], [3, 4]]  # packed: rows of 26 and 12 tokens (the second padded to 26)


def make_examples() -> Examples:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for length in LENGTHS:
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        pairs.append((ids, ids[1:] + [IGNORE]))
    return Examples.from_lists(pairs)


def test_example_lengths_by_hand():
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    assert example_lengths((1, 10), position_ids=packed).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4, 1]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert example_lengths((2, 4), attention_mask=mask).tolist() == [[3, 3, 3, 3], [2, 2, 2, 2]]
    assert example_lengths((1, 5)).tolist() == [[5] * 5]
    # alpha / sqrt(L * hidden): 5 / sqrt(3 * 64) and 5 / sqrt(2 * 64)
    scale = neftune_scale(5.0, 64, (1, 10), position_ids=packed)[0, :, 0]
    assert scale[0].item() == pytest.approx(5 / math.sqrt(192), rel=1e-6)
    assert scale[3].item() == pytest.approx(5 / math.sqrt(128), rel=1e-6)


def test_packed_and_padded_examples_get_the_same_noise_scale():
    examples = make_examples()
    packed = pack_batch(examples, ROWS, pad_id=0)
    padded = pad_batch(examples, list(range(len(LENGTHS))), pad_id=0)
    packed_scale = neftune_scale(5.0, 64, tuple(packed["input_ids"].shape), None, packed["position_ids"])
    padded_scale = neftune_scale(5.0, 64, tuple(padded["input_ids"].shape), padded["attention_mask"], None)
    for r, row in enumerate(ROWS):
        cursor = 0
        for index in row:
            n = LENGTHS[index]
            expected = 5.0 / math.sqrt(n * 64)
            assert packed_scale[r, cursor : cursor + n].flatten().tolist() == pytest.approx([expected] * n, rel=1e-6)
            assert padded_scale[index, :n].flatten().tolist() == pytest.approx([expected] * n, rel=1e-6)
            cursor += n
    # The row-length rule other tools use would give the first packed example 5 / sqrt(26 * 64): less than half.
    assert packed_scale[0, 0].item() > 1.6 * 5.0 / math.sqrt(26 * 64)


def noise_seen(module: SupervisedLoss, batch: dict) -> torch.Tensor | None:
    """The noise the trunk received with its inputs (None: it got ids, no embeddings)."""
    _, trunk, _ = split_model(module.model)
    seen = {}

    def hook(_module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")

    handle = trunk.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        module(**{k: v for k, v in batch.items() if torch.is_tensor(v)})
    finally:
        handle.remove()
    if seen["embeds"] is None:
        return None
    return (seen["embeds"] - module.model.get_input_embeddings()(batch["input_ids"])).detach()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_noise_added_is_bounded_by_each_examples_own_scale(layout):
    model = tiny_model("llama", VOCAB)
    hidden = model.config.hidden_size
    examples = make_examples()
    module = SupervisedLoss(model, "sparse", neftune_alpha=5.0).train()
    torch.manual_seed(0)
    if layout == "packed":
        batch = pack_batch(examples, ROWS, pad_id=0)
        places = [(r, start, LENGTHS[i]) for r, row in enumerate(ROWS)
                  for i, start in zip(row, [sum(LENGTHS[j] for j in row[:k]) for k in range(len(row))])]
    else:
        batch = pad_batch(examples, list(range(len(LENGTHS))), pad_id=0)
        places = [(i, 0, n) for i, n in enumerate(LENGTHS)]
    noise = noise_seen(module, batch)
    for r, start, n in places:
        bound = 5.0 / math.sqrt(n * hidden)
        part = noise[r, start : start + n].abs()
        assert float(part.max()) <= bound * (1 + 1e-5)
        # n x hidden uniform draws: the largest reaches near the bound, so the scale is not smaller either.
        assert float(part.max()) > 0.95 * bound


def test_no_noise_in_evaluation_and_without_alpha():
    model = tiny_model("llama", VOCAB)
    batch = pad_batch(make_examples(), [0, 1, 2], pad_id=0)
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    plain = SupervisedLoss(model, "sparse").train()
    noisy = SupervisedLoss(model, "sparse", neftune_alpha=5.0)
    assert noise_seen(noisy.eval(), batch) is None  # the trunk embeds the ids itself: nothing added
    with torch.no_grad():
        assert noisy.eval()(**inputs)["loss_sum"].item() == plain(**inputs)["loss_sum"].item()
        torch.manual_seed(1)
        trained = noisy.train()(**inputs)["loss_sum"].item()
    assert trained != plain(**inputs)["loss_sum"].item()


def test_the_dense_path_gets_the_same_noise():
    # Same seed, same draws: the sparse and the dense path see identical noisy embeddings.
    model = tiny_model("llama", VOCAB)
    batch = pad_batch(make_examples(), [0, 1, 2], pad_id=0)
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    results = {}
    for m in ("sparse", "dense"):
        torch.manual_seed(3)
        results[m] = SupervisedLoss(model, m, neftune_alpha=5.0).train()(**inputs)["loss_sum"].item()
    assert results["sparse"] == pytest.approx(results["dense"], rel=1e-6)


RECORDS = qa_records()


def test_training_with_neftune_end_to_end(tmp_path):
    model_dir = save_tiny_llama(str(tmp_path / "model"), char_tokenizer())

    def run(name, **overrides):
        config = SFTConfig(model=model_dir, output_dir=str(tmp_path / name), use_cache=False,
                           per_device_train_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0, logging_steps=1, max_steps=2,
                           seed=0, **overrides)
        history = train(config, train_dataset=RECORDS, eval_dataset=RECORDS[:4]).history
        return [r["loss"] for r in history if r["type"] == "train"], [r["eval_loss"] for r in history if r["type"] == "eval"]

    plain, _ = run("plain")
    noisy, noisy_eval = run("noisy", neftune_noise_alpha=5.0)
    again, again_eval = run("again", neftune_noise_alpha=5.0, packing=True, max_length=64)
    assert noisy[0] != plain[0]  # the first step's loss is computed on noisy embeddings
    assert all(math.isfinite(x) for x in noisy + noisy_eval + again + again_eval)
    assert noisy == run("noisy-again", neftune_noise_alpha=5.0)[0]  # seeded: the same noise every run


def test_a_tied_model_with_neftune_gets_the_dense_paths_gradients():
    # The tied head's gradient goes into .grad in place and the lookup's is sparse (loss.py); the
    # NEFTune lookup happens inside that window: gradients must still equal the dense path's.
    model = tiny_model("llama", VOCAB, tie=True)
    batch = pad_batch(make_examples(), [0, 1, 2], pad_id=0)
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    grads = {}
    for mode in ("sparse", "dense"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        SupervisedLoss(model, mode, neftune_alpha=5.0).train()(**inputs)["loss_sum"].backward()
        grads[mode] = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}
    for name, dense in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name], dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()), msg=lambda m: f"{name}: {m}")
