"""The sparse loss (LM head on supervised rows only, in chunks) equals the dense reference.

Every comparison is fp32 on tiny models built from configs: loss sums, argmax hits and the
gradients of every trainable parameter. The hand-computed cases pin the cross-entropy itself,
including the logit scale and soft-cap that Cohere, Granite and Gemma 2 apply.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sftlab.data.container import IGNORE
from sftlab.training.loss import SupervisedLoss, choose_loss_mode, dense_loss, head_loss, logit_transform, split_model
from tiny_models import tiny_model

VOCAB = 96
LOSS_TOL = dict(rtol=1e-6, atol=1e-5)  # sums of ~30 CE terms of ~4.6: fp32 summation order differs
GRAD_RTOL = 1e-4  # elementwise, plus an absolute floor of 1e-5 x the tensor's largest gradient


def make_batch(vocab: int = VOCAB, seed: int = 0) -> dict:
    """Three right-padded rows (20, 13 and 7 tokens) whose first 5, 0 and 3 tokens are an unsupervised prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [20, 13, 7], [5, 0, 3]
    input_ids = torch.randint(1, vocab, (3, 20), generator=g)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, IGNORE)
    for row, (n, p) in enumerate(zip(lengths, prompts)):
        input_ids[row, n:] = 0
        attention_mask[row, :n] = 1
        targets[row, p : n - 1] = input_ids[row, p + 1 : n]  # shifted per example; the last position has none
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


def loss_and_grads(model, mode: str, batch: dict, rows: int | None = None):
    model.zero_grad(set_to_none=True)
    module = SupervisedLoss(model, mode)
    if rows is not None:
        module.rows = rows
    out = module(**batch)
    out["loss_sum"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(sparse, dense):
    (out_s, grads_s), (out_d, grads_d) = sparse, dense
    torch.testing.assert_close(out_s["loss_sum"], out_d["loss_sum"], **LOSS_TOL)
    assert int(out_s["correct"]) == int(out_d["correct"])
    assert int(out_s["count"]) == int(out_d["count"]) == 29
    assert grads_s.keys() == grads_d.keys()
    for name in grads_d:
        assert grads_s[name] is not None, name
        floor = 1e-5 * float(grads_d[name].abs().max())
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=GRAD_RTOL, atol=floor, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# --- sparse == dense on real architectures -----------------------------------------------------------


MODELS = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie=True),
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie=True),
    # Logit transforms, strong enough to matter at these logit sizes (|logits| < 0.6):
    "gemma2-softcap": dict(arch="gemma2", tie=True, final_logit_softcapping=0.2),
    "cohere-scale": dict(arch="cohere", tie=True, logit_scale=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "granite-scaling": dict(arch="granite", logits_scaling=4.0),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    spec = dict(MODELS[request.param])
    return tiny_model(spec.pop("arch"), VOCAB, **spec)


def test_sparse_equals_dense(model, batch):
    dense = loss_and_grads(model, "dense", batch)
    assert_same(loss_and_grads(model, "sparse", batch), dense)  # 29 supervised rows: one chunk
    assert_same(loss_and_grads(model, "sparse", batch, rows=7), dense)  # five chunks, the last one short


def test_tied_models_share_the_head_weight(model):
    _, trunk, head = split_model(model)
    assert (head.weight is trunk.embed_tokens.weight) == bool(model.config.tie_word_embeddings)


def test_logit_transform_is_read_from_the_config(model, batch):
    scale, softcap = logit_transform(model.config)
    expected = {"gemma2": (1.0, 0.2), "cohere": (0.25, None), "granite": (0.25, None)}.get(model.config.model_type, (1.0, None))
    assert (scale, softcap) == expected
    if expected != (1.0, None):
        # Control: without the transform the sparse loss is off by far more than the tolerance above,
        # so the comparison with dense can fail.
        module = SupervisedLoss(model, "sparse")
        module.scale, module.softcap = 1.0, None
        with torch.no_grad():
            wrong = module(**batch)["loss_sum"]
            dense, _, _ = dense_loss(model, **batch)
        assert abs(float(wrong) - float(dense)) > 0.1


def test_lora_head_takes_the_checkpointed_path_and_equals_dense(batch):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", VOCAB, seed=1)
    # init_lora_weights=False: random A and B, so the adapters change the logits, not only the gradients.
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj", "lm_head"]))
    head = split_model(model)[2]
    assert type(head) is not nn.Linear and "lora" in type(head).__module__
    for rows in (None, 7):
        sparse, dense = loss_and_grads(model, "sparse", batch, rows), loss_and_grads(model, "dense", batch)
        assert any("lm_head.lora_A" in name for name in dense[1])
        assert_same(sparse, dense)


# --- fully masked micro-batches ---------------------------------------------------------------------


def lora_llama():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny_model("llama", VOCAB), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "lm_head"]))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("build", [lambda: tiny_model("llama", VOCAB), lora_llama], ids=["linear-head", "lora-head"])
def test_all_masked_batch_is_exactly_zero(build, mode, batch):
    model = build()
    masked = {**batch, "targets": torch.full_like(batch["targets"], IGNORE)}
    out, grads = loss_and_grads(model, mode, masked)
    assert out["loss_sum"].item() == 0.0 and math.isfinite(out["loss_sum"].item())
    assert int(out["count"]) == 0 and int(out["correct"]) == 0
    # Every trainable parameter gets a gradient (DDP waits for all of them), and it is zero.
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert torch.count_nonzero(grad) == 0, name


# --- the cross-entropy by hand ----------------------------------------------------------------------


def tiny_head() -> nn.Linear:
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5, -0.25]))
    return head


HIDDEN = [[1.0, 2.0], [0.0, -1.0]]
TARGETS = [2, 1]
# z = h W^T + b: row 0 -> [1, 2.5, 2.75] (argmax 2 = target), row 1 -> [0, -0.5, -1.25] (argmax 0, target 1).
Z = [[1.0, 2.5, 2.75], [0.0, -0.5, -1.25]]


def hand_ce(scale: float = 1.0, softcap: float | None = None) -> float:
    total = 0.0
    for z, t in zip(Z, TARGETS):
        y = [scale * v for v in z]
        if softcap is not None:
            y = [softcap * math.tanh(v / softcap) for v in y]
        total += math.log(sum(math.exp(v) for v in y)) - y[t]
    return total


def test_hand_computed_cross_entropy():
    # Row 0: log(e^1 + e^2.5 + e^2.75) - 2.75; row 1: log(1 + e^-0.5 + e^-1.25) + 0.5.
    expected = math.log(math.e + math.exp(2.5) + math.exp(2.75)) - 2.75 + math.log(1 + math.exp(-0.5) + math.exp(-1.25)) + 0.5
    assert expected == pytest.approx(hand_ce(), rel=1e-12)
    loss, correct, _ = head_loss(tiny_head(), torch.tensor(HIDDEN), torch.tensor(TARGETS))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert int(correct) == 1


class WrappedHead(nn.Module):
    """Not an nn.Linear: takes the generic (checkpointed) path, like a LoRA-adapted lm_head."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.5, None), (1.0, 1.5), (0.5, 1.0)])
@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "generic"])
def test_head_loss_scale_and_softcap_by_hand(scale, softcap, wrapped):
    head = tiny_head()
    module = WrappedHead(head) if wrapped else head
    hidden = torch.tensor(HIDDEN, requires_grad=True)
    loss, correct, _ = head_loss(module, hidden, torch.tensor(TARGETS), scale, softcap, rows=1)  # one row per chunk
    assert loss.item() == pytest.approx(hand_ce(scale, softcap), rel=1e-6)
    loss.backward()
    got = [hidden.grad, head.weight.grad, head.bias.grad]

    # Reference gradients: autograd through the plain formula.
    reference = tiny_head()
    h = torch.tensor(HIDDEN, requires_grad=True)
    y = reference(h) * scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    torch.nn.functional.cross_entropy(y, torch.tensor(TARGETS), reduction="sum").backward()
    for a, b in zip(got, [h.grad, reference.weight.grad, reference.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_head_loss_without_grad_and_empty_rows():
    head = tiny_head()
    with torch.no_grad():
        loss, correct, _ = head_loss(head, torch.tensor(HIDDEN), torch.tensor(TARGETS))
    assert loss.item() == pytest.approx(hand_ce(), rel=1e-6)
    loss, correct, _ = head_loss(head, torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and int(correct) == 0
    loss.backward()
    assert torch.count_nonzero(head.weight.grad) == 0


# --- choosing the path ------------------------------------------------------------------------------


def test_auto_picks_sparse_when_it_reproduces_the_logits(batch):
    mode, why = choose_loss_mode(tiny_model("llama", VOCAB), batch, "auto")
    assert mode == "sparse", why


def test_auto_falls_back_to_dense_for_an_unknown_logit_transform(batch):
    model = tiny_model("llama", VOCAB)
    # Llama's forward ignores this field, so the sparse path (which applies it) disagrees with the model.
    model.config.final_logit_softcapping = 0.05
    mode, why = choose_loss_mode(model, batch, "auto")
    assert mode == "dense" and "does not reproduce" in why
    assert choose_loss_mode(model, batch, "sparse")[0] == "sparse"
    assert choose_loss_mode(model, batch, "dense")[0] == "dense"


def test_head_loss_gradient_scales_with_the_upstream_gradient_and_runs_once():
    # The step divides the loss sum by the supervised count: backward gets 0.25 here, and the
    # gradients must be exactly a quarter of those of the plain formula.
    head = tiny_head()
    hidden = torch.tensor(HIDDEN, requires_grad=True)
    loss, _, _ = head_loss(head, hidden, torch.tensor(TARGETS), rows=1)
    (loss * 0.25).backward()
    reference = tiny_head()
    h = torch.tensor(HIDDEN, requires_grad=True)
    (torch.nn.functional.cross_entropy(reference(h), torch.tensor(TARGETS), reduction="sum") * 0.25).backward()
    for a, b in zip([hidden.grad, head.weight.grad, head.bias.grad], [h.grad, reference.weight.grad, reference.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Gradients are scaled in place in backward, so a second backward must refuse, not double-scale.
    loss, _, _ = head_loss(head, torch.tensor(HIDDEN, requires_grad=True), torch.tensor(TARGETS))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_correct_counts_the_first_maximum_like_argmax():
    # A zero head scores every token alike: argmax is token 0, so only targets equal to 0 count.
    head = nn.Linear(2, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        _, correct, _ = head_loss(head, torch.ones(4, 2), torch.tensor([0, 1, 2, 0]))
    assert int(correct) == 2


# --- DFT: each token's cross-entropy scaled by its detached probability --------------------------------


def hand_dft() -> tuple[float, float, list[float]]:
    """(DFT loss, plain CE, gradient of the DFT loss with respect to the head's bias), from Z."""
    loss = ce_total = 0.0
    grad_bias = [0.0, 0.0, 0.0]
    for z, t in zip(Z, TARGETS):
        total = sum(math.exp(v) for v in z)
        ce = math.log(total) - z[t]
        p = math.exp(-ce)  # = softmax(z)[t]
        loss += p * ce
        ce_total += ce
        # p is a constant: d(p * ce)/dz_j = p * (softmax_j - [j == t]); dz/db = 1.
        for j, v in enumerate(z):
            grad_bias[j] += p * (math.exp(v) / total - (j == t))
    return loss, ce_total, grad_bias


@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "generic"])
def test_dft_loss_and_gradient_by_hand(wrapped):
    expected_loss, expected_ce, expected_grad = hand_dft()
    # Row 0: p = e^2.75 / (e + e^2.5 + e^2.75) = 0.51214, CE = 0.66915; row 1: p = e^-.5 / (1 + e^-.5 + e^-1.25) = 0.32040, CE = 1.13818.
    assert expected_loss == pytest.approx(0.51214 * 0.66915 + 0.32040 * 1.13818, rel=1e-4)
    head = tiny_head()
    loss, correct, nll = head_loss(WrappedHead(head) if wrapped else head, torch.tensor(HIDDEN), torch.tensor(TARGETS),
                                   rows=1, loss_type="dft")
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert nll.item() == pytest.approx(expected_ce, rel=1e-6)  # the plain CE is reported next to it
    assert int(correct) == 1
    loss.backward()
    torch.testing.assert_close(head.bias.grad, torch.tensor(expected_grad), rtol=1e-6, atol=1e-7)


def test_nll_reports_the_same_sum_twice():
    loss, _, nll = head_loss(tiny_head(), torch.tensor(HIDDEN), torch.tensor(TARGETS))
    assert loss.item() == nll.item() == pytest.approx(hand_ce(), rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gemma2-softcap"])
def test_sparse_dft_equals_dense_dft(arch, batch):
    model = tiny_model(vocab_size=VOCAB, **MODELS[arch])
    sparse = loss_and_grads_typed(model, "sparse", batch, "dft")
    dense = loss_and_grads_typed(model, "dense", batch, "dft")
    assert_same(sparse, dense)
    torch.testing.assert_close(sparse[0]["nll_sum"], dense[0]["nll_sum"], **LOSS_TOL)
    # DFT weights every token by a probability < 1: the loss is below the plain CE.
    assert float(sparse[0]["loss_sum"]) < float(sparse[0]["nll_sum"])
    plain = loss_and_grads_typed(model, "sparse", batch, "nll")
    torch.testing.assert_close(plain[0]["loss_sum"], sparse[0]["nll_sum"], **LOSS_TOL)


def loss_and_grads_typed(model, mode: str, batch: dict, loss_type: str):
    model.zero_grad(set_to_none=True)
    out = SupervisedLoss(model, mode, loss_type)(**batch)
    out["loss_sum"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


def test_an_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        head_loss(tiny_head(), torch.tensor(HIDDEN), torch.tensor(TARGETS), loss_type="focal")
# --- a tied head's gradient: one buffer, added in place -------------------------------------------


def reference_tied_grad(model, batches):
    """The tied weight's gradient the way autograd summed it before: the head's gradient returned
    to autograd, a dense embedding gradient, added out of place."""
    causal_lm, trunk, head = split_model(model)
    module = SupervisedLoss(model, "sparse")
    model.zero_grad(set_to_none=True)
    for b in batches:
        hidden = trunk(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).last_hidden_state
        keep = b["targets"] != IGNORE
        loss, _, _ = head_loss(head, hidden[keep], b["targets"][keep], module.scale, module.softcap, module.rows)
        (loss / 7.0).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


class BigAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that produce a tensor of at least `numel` elements, and whether in place."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and not o.is_sparse and o.numel() >= self.numel:
                self.ops.append((str(func.overloadpacket), any(o is a for a in args)))
        return out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tied_head_gradient_lands_in_place_and_equals_the_summed_one(arch):
    vocab = 2048  # vocab x hidden (131k values) is larger than any activation of this batch
    model = tiny_model(arch, vocab, tie=True, **({"final_logit_softcapping": 0.2} if arch == "gemma2" else {}))
    batches = [make_batch(vocab, seed=0), make_batch(vocab, seed=1)]
    expected = reference_tied_grad(model, batches)

    module = SupervisedLoss(model, "sparse")
    embedding = model.get_input_embeddings()
    log = BigAllocations(vocab * 64)
    for b in batches:  # two micro-batches: the second adds into the .grad the first left
        out = module(**b)
        assert embedding.sparse is False  # sparse only while the trunk runs
        with log:
            (out["loss_sum"] / 7.0).backward()
    weight = embedding.weight
    assert weight.grad.layout == torch.strided
    # Backward makes no new vocab x hidden tensor: no dense embedding gradient, no out-of-place sum.
    assert [op for op, in_place in log.ops if not in_place] == []
    assert ("aten.embedding_dense_backward", False) not in log.ops
    # Equal up to fp32 summation order (the lookup's rows are added one by one, not pre-summed).
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_untied_head_and_no_grad_keep_the_plain_path(batch):
    model = tiny_model("llama", VOCAB, tie=False)
    out = SupervisedLoss(model, "sparse")(**batch)
    out["loss_sum"].backward()
    assert model.get_input_embeddings().weight.grad.layout == torch.strided  # the lookup's own dense gradient
    assert model.lm_head.weight.grad is not None
    with torch.no_grad():
        tied = tiny_model("llama", VOCAB, tie=True)
        SupervisedLoss(tied, "sparse")(**batch)
        assert tied.get_input_embeddings().weight.grad is None
