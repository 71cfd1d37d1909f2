"""Packed == unpacked: a packed row trains exactly as its examples would one by one.

pack_batch passes position_ids that restart at 0 for each example and no attention mask;
transformers derives a block-diagonal causal mask from the position resets. These tests hold
the logits, the loss and the gradients of a packed batch to those of the same examples run
alone (fp32), for the eager and sdpa kernels, and show with a negative control that without the
position resets attention does leak across examples, so the equality is not vacuous.
"""

from __future__ import annotations

import pytest
import torch

from sftlab.training.batching import pack_batch
from sftlab.data.container import IGNORE, Examples
from sftlab.training.loss import SupervisedLoss
from tiny_models import tiny_model

VOCAB = 96
ROWS = [[0, 1, 2], [3, 4]]  # two packed rows; the second is shorter and ends in padding


def make_examples() -> Examples:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for length, prompt in [(9, 3), (6, 0), (11, 5), (7, 2), (5, 1)]:
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        targets = [IGNORE] * prompt + ids[prompt + 1 :] + [IGNORE]  # shifted, last position never supervised
        pairs.append((ids, targets))
    return Examples.from_lists(pairs)


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_model("llama", VOCAB, attn=request.param)


def spans(examples, row):
    """(example index, start, end) of each example inside a packed row."""
    cursor = 0
    for index in row:
        n = len(examples[index][0])
        yield index, cursor, cursor + n
        cursor += n


def alone(examples, index):
    ids, targets = examples[index]
    return torch.tensor(ids, dtype=torch.long)[None], torch.tensor(targets, dtype=torch.long)[None]


@torch.no_grad()
def test_packed_logits_equal_unpacked(model, examples):
    batch = pack_batch(examples, ROWS, pad_id=0)
    assert batch["position_ids"][0].tolist() == [*range(9), *range(6), *range(11)]
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None).logits
    for r, row in enumerate(ROWS):
        for index, start, end in spans(examples, row):
            reference = model(input_ids=alone(examples, index)[0]).logits[0]
            torch.testing.assert_close(logits[r, start:end], reference, rtol=1e-5, atol=1e-6)


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_loss_and_gradients_equal_unpacked(model, examples):
    loss = SupervisedLoss(model, "sparse")
    model.zero_grad(set_to_none=True)
    batch = pack_batch(examples, ROWS, pad_id=0)
    packed = loss(input_ids=batch["input_ids"], targets=batch["targets"], position_ids=batch["position_ids"])
    packed["loss_sum"].backward()
    packed_grads = grads_of(model)

    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for index in range(len(examples)):
        ids, targets = alone(examples, index)
        out = loss(input_ids=ids, targets=targets)
        out["loss_sum"].backward()  # gradients accumulate over the examples, as over a packed row
        total += float(out["loss_sum"].detach())
        count += int(out["count"])
    unpacked_grads = grads_of(model)
    model.zero_grad(set_to_none=True)

    assert int(packed["count"]) == count == 38 - 11 - 5  # 38 tokens less 11 prompt tokens and 5 last positions
    assert packed["loss_sum"].item() == pytest.approx(total, rel=1e-6)
    for name, grad in unpacked_grads.items():
        floor = 1e-5 * float(grad.abs().max())
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=floor, msg=lambda m: f"{name}: {m}")


@torch.no_grad()
@pytest.mark.parametrize("mask, positions", [(None, False), ("ones", True)], ids=["no-position-ids", "all-ones-mask"])
def test_negative_control_attention_leaks_without_position_resets(model, examples, mask, positions):
    # The same packed row, but without what keeps attention inside each example: either no
    # position_ids (one long sequence) or an explicit all-ones mask (which switches off the
    # detection of packed sequences). The second and third examples then see the ones before them.
    batch = pack_batch(examples, ROWS[:1], pad_id=0)
    kwargs = {"input_ids": batch["input_ids"]}
    if positions:
        kwargs["position_ids"] = batch["position_ids"]
    kwargs["attention_mask"] = torch.ones_like(batch["input_ids"]) if mask == "ones" else None
    logits = model(**kwargs).logits
    (first, s0, e0), (second, s1, e1) = list(spans(examples, ROWS[0]))[:2]
    # The first example sees nothing before it either way...
    torch.testing.assert_close(logits[0, s0:e0], model(input_ids=alone(examples, first)[0]).logits[0], rtol=1e-5, atol=1e-6)
    # ...the second one now attends to the first: far outside the tolerance used above.
    difference = (logits[0, s1:e1] - model(input_ids=alone(examples, second)[0]).logits[0]).abs().max()
    assert difference > 1e-2

    loss = SupervisedLoss(model, "sparse")
    leaky = loss(targets=batch["targets"], **kwargs)["loss_sum"]
    separate = sum(float(loss(*alone(examples, i))["loss_sum"]) for i in ROWS[0])
    assert abs(float(leaky) - separate) > 1e-3
