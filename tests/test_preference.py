"""Preference tuning's engine (training/preference.py): the losses and their gradients by hand,
log-probs from the sparse head equal to the model's own, the shared-prompt row equal to separate
sequences, the step a mean over pairs however it is split, and the stored reference log-probs."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from sftlab.data.container import Pairs
from sftlab.training.distributed import Processes
from sftlab.training.objectives import PreferenceObjective
from sftlab.training.preference import (
    PreferenceLoss,
    attention_span,
    choose_layout,
    collate_pairs,
    completion_log_probs,
    preference_losses,
    reference_log_probs,
    shared_row_is_cheaper,
    stored_reference_log_probs,
    token_log_probs,
)
from sftlab.training.step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -math.log1p(math.exp(-x))


# Two pairs: policy and reference summed log-probs, completion lengths.
PI_C, PI_R = [-4.0, -7.0], [-6.0, -5.0]
REF_C, REF_R = [-5.0, -6.5], [-5.5, -5.5]
LEN_C, LEN_R = [2.0, 4.0], [3.0, 1.0]
BETA = 0.5


def losses_of(loss_type, **options):
    tensors = [torch.tensor(v, requires_grad=True) for v in (PI_C, PI_R)]
    loss, reward_c, reward_r = preference_losses(
        loss_type,
        tensors[0],
        tensors[1],
        torch.tensor(LEN_C),
        torch.tensor(LEN_R),
        torch.tensor(REF_C),
        torch.tensor(REF_R),
        beta=BETA,
        **options,
    )
    loss.sum().backward()
    return (
        loss.detach().tolist(),
        tensors[0].grad.tolist(),
        tensors[1].grad.tolist(),
        reward_c.tolist(),
        reward_r.tolist(),
    )


def test_dpo_sigmoid_by_hand():
    # z = (pi_c - pi_r) - (ref_c - ref_r): pair 0: 2 - 0.5 = 1.5; pair 1: -2 - (-1) = -1.
    loss, grad_c, grad_r, reward_c, reward_r = losses_of("sigmoid")
    z = [1.5, -1.0]
    assert loss == pytest.approx([-logsig(BETA * v) for v in z], rel=1e-6)
    # d/dpi_c of -logsig(beta z) = -beta sig(-beta z); d/dpi_r the opposite.
    assert grad_c == pytest.approx([-BETA * sig(-BETA * v) for v in z], rel=1e-6)
    assert grad_r == pytest.approx([BETA * sig(-BETA * v) for v in z], rel=1e-6)
    assert reward_c == pytest.approx([BETA * 1.0, BETA * -0.5]) and reward_r == pytest.approx([BETA * -0.5, BETA * 0.5])


def test_conservative_and_robust_dpo_by_hand():
    ls, z = 0.1, [1.5, -1.0]
    loss, grad_c, _, _, _ = losses_of("sigmoid", label_smoothing=ls)
    assert loss == pytest.approx([-(1 - ls) * logsig(BETA * v) - ls * logsig(-BETA * v) for v in z], rel=1e-6)
    assert grad_c == pytest.approx([-(1 - ls) * BETA * sig(-BETA * v) + ls * BETA * sig(BETA * v) for v in z], rel=1e-6)
    loss, grad_c, _, _, _ = losses_of("robust", label_smoothing=ls)
    assert loss == pytest.approx(
        [(-(1 - ls) * logsig(BETA * v) + ls * logsig(-BETA * v)) / (1 - 2 * ls) for v in z], rel=1e-6
    )
    assert grad_c == pytest.approx(
        [(-(1 - ls) * BETA * sig(-BETA * v) - ls * BETA * sig(BETA * v)) / (1 - 2 * ls) for v in z], rel=1e-6
    )


def test_hinge_by_hand():
    loss, grad_c, _, _, _ = losses_of("hinge")
    # relu(1 - beta z): pair 0: 1 - 0.75 = 0.25 (gradient -beta); pair 1: 1 + 0.5 = 1.5.
    assert loss == pytest.approx([0.25, 1.5]) and grad_c == pytest.approx([-BETA, -BETA])


def test_ipo_by_hand():
    # Averages: policy c [-2, -1.75], r [-2, -5]; reference c [-2.5, -1.625], r [-1.8333, -5.5].
    zc = [(-2.0 - -2.0) - (-2.5 - -5.5 / 3), (-1.75 - -5.0) - (-1.625 - -5.5)]
    loss, grad_c, _, _, _ = losses_of("ipo")
    assert loss == pytest.approx([(v - 1 / (2 * BETA)) ** 2 for v in zc], rel=1e-6)
    # d/dpi_c = 2 (z - 1/(2 beta)) / len_c
    assert grad_c == pytest.approx([2 * (v - 1 / (2 * BETA)) / n for v, n in zip(zc, LEN_C)], rel=1e-5)


def test_simpo_by_hand():
    gamma = 0.3
    z = [BETA * (-2.0 - -2.0) - gamma, BETA * (-1.75 - -5.0) - gamma]
    loss, grad_c, grad_r, reward_c, _ = losses_of("simpo", simpo_gamma=gamma)
    assert loss == pytest.approx([-logsig(v) for v in z], rel=1e-6)
    assert grad_c == pytest.approx([-sig(-v) * BETA / n for v, n in zip(z, LEN_C)], rel=1e-6)
    assert grad_r == pytest.approx([sig(-v) * BETA / n for v, n in zip(z, LEN_R)], rel=1e-6)
    assert reward_c == pytest.approx([BETA * -2.0, BETA * -1.75])


def test_orpo_by_hand():
    avg_c, avg_r = [-2.0, -1.75], [-2.0, -5.0]

    def log_odds(a):
        return a - math.log1p(-math.exp(a))

    ratio = [log_odds(c) - log_odds(r) for c, r in zip(avg_c, avg_r)]
    loss, grad_c, _, _, _ = losses_of("orpo")
    assert loss == pytest.approx([-c - BETA * logsig(v) for c, v in zip(avg_c, ratio)], rel=1e-6)
    # d log_odds(a) / da = 1 + e^a / (1 - e^a) = 1 / (1 - e^a); da/dpi_c = 1 / len_c.
    expected = [(-1 - BETA * sig(-v) / (1 - math.exp(c))) / n for c, v, n in zip(avg_c, ratio, LEN_C)]
    assert grad_c == pytest.approx(expected, rel=1e-5)


def test_rpo_alpha_adds_the_chosen_nll_per_token():
    plain, plain_grad, _, _, _ = losses_of("sigmoid")
    loss, grad_c, _, _, _ = losses_of("sigmoid", rpo_alpha=2.0)
    assert loss == pytest.approx([p + 2.0 * (-c / n) for p, c, n in zip(plain, PI_C, LEN_C)], rel=1e-6)
    assert grad_c == pytest.approx([g - 2.0 / n for g, n in zip(plain_grad, LEN_C)], rel=1e-6)


# --- log-probs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, softcap, bias", [(1.0, None, False), (0.5, 3.0, True)])
def test_sparse_token_log_probs_equal_full_log_softmax_with_gradients(scale, softcap, bias):
    torch.manual_seed(0)
    head = nn.Linear(8, 11, bias=bias)
    hidden = torch.randn(7, 8, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 5, 1, 2])
    weights = torch.randn(7)  # each token's upstream gradient differs, as each pair's does
    ours = token_log_probs(head, hidden, targets, scale, softcap, rows=3)  # 3 chunks
    (ours * weights).sum().backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    y = head(hidden) * scale
    if softcap:
        y = softcap * torch.tanh(y / softcap)
    reference = y.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, [hidden.grad] + [p.grad for p in head.parameters()]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


SIZES = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def llama(attn="sdpa", seed=0):
    config = transformers.LlamaConfig(intermediate_size=128, **SIZES)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()


PAIRS = Pairs.from_lists(
    [
        ([5, 6, 7, 8], [9, 10, 11], [12, 13]),
        ([20, 21], [22], [23, 24, 25, 26]),
        ([30, 31, 32], [33, 34], [35, 36]),
        ([40], [41, 42, 43], [44]),
    ]
)


def tensors(batch):
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


def test_the_shared_row_by_hand():
    batch = collate_pairs(PAIRS, [0], pad_id=0)
    # [P | C | R] = 5 6 7 8 | 9 10 11 | 12 13; R's positions continue P's.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5]]
    allowed = (batch["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed[7] == [1, 1, 1, 1, 0, 0, 0, 1, 0]  # R's first token sees P and itself, never C
    assert allowed[6] == [1, 1, 1, 1, 1, 1, 1, 0, 0]  # C's last sees P and C
    # P's last position (3) predicts C[0] and R[0]; then each completion token predicts the next.
    assert batch["chosen_index"].tolist() == [3, 4, 5] and batch["chosen_targets"].tolist() == [9, 10, 11]
    assert batch["rejected_index"].tolist() == [3, 7] and batch["rejected_targets"].tolist() == [12, 13]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_prompt_equals_separate_sequences_and_sparse_equals_dense(attn):
    model = llama(attn).eval()
    indices = [0, 1, 2, 3]
    with torch.no_grad():
        shared = completion_log_probs(model, tensors(collate_pairs(PAIRS, indices, 0)))
        separate = completion_log_probs(
            model, tensors(collate_pairs(PAIRS, indices, 0, shared_prompt=False)), sparse=False
        )
        # Each completion alone, as any trainer would score it: the plain model on P + C.
        alone = []
        for i in indices:
            prompt, chosen, _ = PAIRS[i]
            ids = torch.tensor([list(prompt) + list(chosen)])
            log_probs = model(input_ids=ids).logits.log_softmax(-1)[0]
            alone.append(sum(float(log_probs[len(prompt) - 1 + k, t]) for k, t in enumerate(chosen)))
    torch.testing.assert_close(shared[0], separate[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(shared[1], separate[1], rtol=0, atol=2e-5)
    assert shared[0].tolist() == pytest.approx(alone, abs=2e-5)
    assert shared[2].tolist() == [3, 1, 2, 3] and shared[3].tolist() == [2, 4, 2, 1]


def test_a_model_whose_layers_carry_state_gets_separate_rows():
    config = transformers.Lfm2Config(intermediate_size=128, layer_types=["conv", "full_attention"], **SIZES)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    shared, sparse, why = choose_layout(model, PAIRS, 0)
    assert not shared and sparse and "rows of their own" in why
    assert choose_layout(llama(), PAIRS, 0)[:2] == (True, True)


# --- the step ----------------------------------------------------------------------------------


def run_steps(split: list[list[int]], loss_type="sigmoid", **options):
    model = llama()
    references = {"train": reference_log_probs(copy.deepcopy(model), PAIRS, 0, Processes())}
    objective = PreferenceObjective(
        model,
        loss_type,
        beta=0.5,
        label_smoothing=0.0,
        simpo_gamma=0.5,
        rpo_alpha=None,
        shared_prompt=True,
        sparse=True,
        references=references,
        **options,
    )
    collate = objective.collate("train")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    result = train_step(
        objective.module,
        objective,
        [collate(PAIRS, items, 0) for items in split],
        processes=Processes(),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        parameters=list(model.parameters()),
        max_grad_norm=None,
        autocast=contextlib.nullcontext(),
    )
    return model, result


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "orpo"])
def test_the_step_is_a_mean_over_pairs_however_it_is_split(loss_type):
    one, result = run_steps([[0, 1, 2, 3]], loss_type)
    four, _ = run_steps([[0], [1], [2], [3]], loss_type)
    uneven, _ = run_steps([[2], [], [0, 1, 3]], loss_type)  # an empty micro-batch adds nothing
    for (name, a), b, c in zip(one.named_parameters(), four.parameters(), uneven.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=name)
    assert result.sums["pairs"] == 4.0


def test_at_the_first_step_the_policy_is_the_reference():
    """Before any update the policy equals the reference: every reward is 0 and DPO's loss log 2."""
    _, result = run_steps([[0, 1, 2, 3]])
    assert result.sums["loss_sum"] / 4 == pytest.approx(math.log(2), abs=1e-5)
    assert result.sums["reward_chosen"] == pytest.approx(0.0, abs=1e-5)


def test_stored_reference_equals_recomputed_and_is_reused(tmp_path):
    model = llama()
    fresh = reference_log_probs(model, PAIRS, 0, Processes())
    values, stored = stored_reference_log_probs(model, PAIRS, 0, Processes(), str(tmp_path))
    assert not stored and np.array_equal(values, fresh)
    again, stored = stored_reference_log_probs(model, PAIRS, 0, Processes(), str(tmp_path))
    assert stored and np.array_equal(again, fresh)
    other = llama(seed=1)  # other weights: another entry
    assert not stored_reference_log_probs(other, PAIRS, 0, Processes(), str(tmp_path))[1]
    with torch.no_grad():
        sums = completion_log_probs(model.eval(), tensors(collate_pairs(PAIRS, [0, 1, 2, 3], 0)))
    assert fresh[:, 0] == pytest.approx(sums[0].double().numpy(), abs=1e-6)


def test_packed_pairs_equal_pairs_in_rows_of_their_own():
    model = llama().eval()
    batch = collate_pairs(PAIRS, [[0, 1], [2, 3]], 0)  # two rows of two pairs each
    assert batch["position_ids"][0].tolist()[:9] == [0, 1, 2, 3, 4, 5, 6, 4, 5]
    assert batch["position_ids"][0].tolist()[9:16] == [0, 1, 2, 2, 3, 4, 5]  # the second pair starts again at 0
    allowed = (batch["attention_mask"][0, 0] == 0).int()
    assert allowed[9, :9].sum() == 0  # the second pair never sees the first
    with torch.no_grad():
        packed = completion_log_probs(model, tensors(batch))
        alone = completion_log_probs(model, tensors(collate_pairs(PAIRS, [0, 1, 2, 3], 0)))
    for ours, theirs in zip(packed, alone):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_packed_steps_equal_padded_steps():
    padded, _ = run_steps([[0, 1, 2, 3]])
    packed, _ = run_steps([[[0, 3], [1, 2]]])  # one micro-batch of two packed rows
    for (name, a), b in zip(padded.named_parameters(), packed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_long_completions_keep_the_shared_row():
    # An untrained model's summed log-prob of a long reply is beyond 1024 in magnitude, where one
    # float32 rounding of the sum is 1.2e-4: the probe compares tokens, so that is no "leak".
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, SIZES["vocab_size"], (n,), generator=generator).tolist()  # noqa: E731
    pairs = Pairs.from_lists([(ids(40), ids(30), ids(600)), (ids(300), ids(500), ids(20))])
    for seed in range(3):
        model = llama(seed=seed)
        batch = tensors(collate_pairs(pairs, [0, 1], 0))
        assert completion_log_probs(model, batch)[1][0].abs() > 1024  # the regime where sums round at 1.2e-4
        shared, sparse, why = choose_layout(model, pairs, 0)
        assert (shared, sparse) == (True, True), why


def test_the_layout_can_be_chosen_by_the_config():
    model = llama()
    shared, sparse, why = choose_layout(model, PAIRS, 0, shared_prompt=False, loss_implementation="dense")
    assert (shared, sparse) == (False, False) and "shared_prompt: false" in why and "dense logits" in why


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"])
    return get_peft_model(model, config)


def test_the_reference_from_the_adapter_disabled_model_equals_the_stored_one():
    """precompute_ref_log_probs false: the reference is the same model with its LoRA adapter
    disabled. After the adapter has moved, it still gives the stored values of the model before
    training, pair by pair, in every layout, and leaves the adapter on and the model training."""
    model = lora(llama())
    stored = reference_log_probs(model, PAIRS, 0, Processes())  # the adapter starts at zero effect
    with torch.no_grad():  # the adapter trained away from zero
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
    plain = PreferenceLoss(model)
    module = PreferenceLoss(model, reference_from_adapter=True).train()
    for indices, shared in (([0, 1, 2, 3], True), ([0, 1, 2, 3], False), ([[0, 1], [2, 3]], True), ([3, 1], True)):
        batch = tensors(collate_pairs(PAIRS, indices, 0, shared_prompt=shared))
        chosen, rejected = module.reference(batch)
        order = batch["pair_index"].numpy()
        assert np.abs(chosen.double().numpy() - stored[order, 0]).max() <= 1e-6
        assert np.abs(rejected.double().numpy() - stored[order, 1]).max() <= 1e-6
        assert model.training
        with torch.no_grad():
            policy = completion_log_probs(model.eval(), batch)[0]
        model.train()
        assert np.abs(policy.double().numpy() - stored[order, 0]).min() > 1e-2  # the adapter is on again
    # The loss computed with it equals the loss given the stored values.
    model.eval()  # no dropout, so the two forwards compare
    batch = tensors(collate_pairs(PAIRS, [0, 1, 2, 3], 0))
    order = batch["pair_index"].numpy()
    references = {
        "ref_chosen": torch.from_numpy(stored[order, 0]).float(),
        "ref_rejected": torch.from_numpy(stored[order, 1]).float(),
    }
    given, computed = plain(**references, **batch), module(**batch)
    for name in ("loss_sum", "reward_chosen", "reward_rejected", "correct"):
        assert float(computed[name]) == pytest.approx(float(given[name]), abs=1e-6), name


def test_the_reference_from_the_adapter_needs_a_peft_model():
    with pytest.raises(ValueError, match="needs a PEFT model"):
        PreferenceLoss(llama(), reference_from_adapter=True)


# --- the layout of each micro-batch ---------------------------------------------------------------


def test_attention_span_by_hand():
    # hidden 64, 4 query heads and 2 key/value heads of 16, MLP 128. Per token and layer: q and o
    # 64 x 64 each, k and v 64 x 32 each = 12288 multiply-adds; the gated MLP 3 x 64 x 128 = 24576.
    # Per key attended: its score and its share of the values, 2 x 4 x 16 = 128. 36864 / 128 = 288.
    assert attention_span(llama().config) == 288.0
    # Only the width known: one head of 64, MLP 4 x 64: (64 x 64 x 4 + 3 x 64 x 256) / (2 x 64) = 512.
    assert attention_span(transformers.PretrainedConfig(hidden_size=64)) == 512.0
    assert attention_span(transformers.PretrainedConfig()) == math.inf


# Pair 0: a short prompt and long replies; pair 1: a long prompt and short replies (P, C, R tokens).
LAYOUT_PAIRS = Pairs.from_lists(
    [
        ([1] * 2, [2] * 40, [3] * 40),
        ([4] * 40, [5] * 2, [6] * 2),
    ]
)


def test_each_micro_batch_takes_the_layout_that_computes_less():
    # A padded batch costs rows x L x (1 + L / 288) on the tiny Llama (attention span 288).
    # Pair 0: one row of 82 costs 82 x 370/288 = 105.35; two rows of 42 cost 84 x 330/288 = 96.25: two rows.
    # Pair 1: one row of 44 costs 44 x 332/288 = 50.72; two rows of 42 cost 96.25: one row.
    # Both: two rows of 82 cost 210.69, four rows of 42 cost 192.5: two rows per pair.
    # The token count alone would never prefer two rows: P + C + R <= 2 max(P + C, P + R).
    assert not shared_row_is_cheaper(LAYOUT_PAIRS, [0], 288.0)
    assert shared_row_is_cheaper(LAYOUT_PAIRS, [1], 288.0)
    assert not shared_row_is_cheaper(LAYOUT_PAIRS, [0, 1], 288.0)
    assert shared_row_is_cheaper(LAYOUT_PAIRS, [0, 1], math.inf)  # 164 tokens against 168
    # Padded to multiples of 64, pair 1 is one row of 64 (64 x 352/288 = 78.2) against two of 64 (156.4).
    assert shared_row_is_cheaper(LAYOUT_PAIRS, [1], 288.0, pad_to_multiple_of=64)

    def shape(indices, **options):
        objective = PreferenceObjective(
            llama(),
            "sigmoid",
            beta=0.1,
            label_smoothing=0.0,
            simpo_gamma=0.5,
            rpo_alpha=None,
            sparse=True,
            references={},
            **{"shared_prompt": True, "attention_span": 288.0, **options},
        )
        return tuple(objective.collate("train")(LAYOUT_PAIRS, indices, 0)["input_ids"].shape)

    assert shape([0]) == (2, 42) and shape([1]) == (1, 44) and shape([0, 1]) == (4, 42)
    assert shape([[0, 1]]) == (1, 82 + 44)  # packed rows are always shared rows
    assert shape([0], attention_span=None) == (1, 82)  # no span: the shared row wherever allowed
    assert shape([1], shared_prompt=False) == (2, 42)  # the probe or the config said two rows


def test_a_step_is_the_same_whichever_layout_its_micro_batches_take():
    """Pair 0 alone takes two rows, pair 1 alone one: the step equals the one in shared rows."""
    steps = {}
    for name, span in (("chosen per micro-batch", 288.0), ("all shared", None)):
        model = llama()
        references = {"train": reference_log_probs(copy.deepcopy(model), LAYOUT_PAIRS, 0, Processes())}
        objective = PreferenceObjective(
            model,
            "sigmoid",
            beta=0.5,
            label_smoothing=0.0,
            simpo_gamma=0.5,
            rpo_alpha=None,
            shared_prompt=True,
            sparse=True,
            references=references,
            attention_span=span,
        )
        collate = objective.collate("train")
        batches = [collate(LAYOUT_PAIRS, [i], 0) for i in (0, 1)]
        steps[name] = (model, [tuple(b["input_ids"].shape) for b in batches])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        # A policy away from the reference, so that the gradients are not those of z = 0 alone.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        train_step(
            objective.module,
            objective,
            batches,
            processes=Processes(),
            optimizer=optimizer,
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            parameters=list(model.parameters()),
            max_grad_norm=None,
            autocast=contextlib.nullcontext(),
        )
    assert steps["chosen per micro-batch"][1] == [(2, 42), (1, 44)] and steps["all shared"][1] == [(1, 82), (1, 44)]
    for (name, a), b in zip(steps["chosen per micro-batch"][0].named_parameters(), steps["all shared"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# --- KTO ---------------------------------------------------------------------------------------


def test_kto_losses_by_hand():
    from sftlab.training.preference import kto_losses

    log_probs = torch.tensor([-4.0, -7.0, -3.0], requires_grad=True)
    reference = torch.tensor([-5.0, -6.0, -3.5])
    desirable = torch.tensor([True, False, False])
    kl = torch.tensor(0.2)
    loss, reward = kto_losses(
        log_probs, reference, desirable, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5
    )
    # r = 1, -1, 0.5; desirable: 2 (1 - sig(0.5 (1 - 0.2))); undesirable: 0.5 (1 - sig(0.5 (0.2 - r)))
    expected = [2 * (1 - sig(0.4)), 0.5 * (1 - sig(0.5 * 1.2)), 0.5 * (1 - sig(0.5 * -0.3))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6) and reward.tolist() == pytest.approx([0.5, -0.5, 0.25])
    loss.sum().backward()
    # d/dr of 2 (1 - sig(b (r - z))) = -2 b sig' ; of 0.5 (1 - sig(b (z - r))) = +0.5 b sig'
    grads = [
        -2 * 0.5 * sig(0.4) * (1 - sig(0.4)),
        0.5 * 0.5 * sig(0.6) * (1 - sig(0.6)),
        0.5 * 0.5 * sig(-0.15) * (1 - sig(-0.15)),
    ]
    assert log_probs.grad.tolist() == pytest.approx(grads, rel=1e-5)


EXAMPLES = Pairs.from_lists(
    [
        ([5, 6, 7, 8], [9, 10, 11], [20]),
        ([20, 21], [22], [9, 10, 11]),
        ([30, 31, 32], [33, 34], [22]),
        ([40], [41, 42, 43], [33, 34]),
    ]
)
EXAMPLES.desirable = np.array([True, False, True, False])


def run_kto(split, references=None):
    from sftlab.training.objectives import KTOObjective

    model = llama()
    if references is None:
        references = {"train": reference_log_probs(copy.deepcopy(model), EXAMPLES, 0, Processes())}
    objective = KTOObjective(
        model, beta=0.5, desirable_weight=1.0, undesirable_weight=1.0, sparse=True, references=references
    )
    collate = objective.collate("train")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [collate(EXAMPLES, items, 0) for items in split]
    result = train_step(
        objective.module,
        objective,
        batches,
        processes=Processes(),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        parameters=list(model.parameters()),
        max_grad_norm=None,
        autocast=contextlib.nullcontext(),
    )
    return model, result, batches


def test_kto_estimates_its_reference_point_over_the_whole_step():
    # Shifted references make the policy-minus-reference ratios of the mismatched completions
    # +1, +2, +3, -1: z0 = mean = 1.25 for the step, whatever its split.
    model = llama()
    fresh = reference_log_probs(copy.deepcopy(model), EXAMPLES, 0, Processes())
    shifted = fresh.copy()
    shifted[:, 1] -= np.array([1.0, 2.0, 3.0, -1.0])
    _, result, batches = run_kto([[0, 1, 2, 3]], {"train": shifted})
    assert float(batches[0]["kl"]) == pytest.approx(1.25, abs=1e-5)
    _, _, split_batches = run_kto([[0], [1, 2], [3]], {"train": shifted})
    assert all(float(b["kl"]) == pytest.approx(1.25, abs=1e-5) for b in split_batches)
    assert result.sums["kl_sum"] / result.sums["examples"] == pytest.approx(1.25, abs=1e-5)
    shifted[:, 1] = fresh[:, 1] + 5.0  # all ratios -5: the mean is clamped at 0
    _, _, batches = run_kto([[0, 1, 2, 3]], {"train": shifted})
    assert float(batches[0]["kl"]) == 0.0


def test_kto_steps_are_the_same_however_they_are_split():
    one, _, _ = run_kto([[0, 1, 2, 3]])
    three, _, _ = run_kto([[2], [0, 3], [1], []])
    for (name, a), b in zip(one.named_parameters(), three.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
