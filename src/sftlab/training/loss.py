"""The loss: trunk -> hidden states -> supervised rows only -> LM head + cross-entropy in chunks.

Targets are already shifted per example (see data/examples.py), so position t's hidden state is
scored against targets[t] directly. Only rows whose target is not -100 reach the LM head:
masked prompt tokens still pass through the transformer (they are context) but never pay for
the vocabulary projection, and the batch x length x vocab logits tensor never exists.

For a plain nn.Linear head, `_LinearCrossEntropy` computes the loss and its gradients chunk by
chunk in one pass (logits live one chunk at a time, in forward and backward). Heads that are
not a plain Linear (a LoRA-adapted lm_head) go through checkpointed chunks instead. Heads that
scale or soft-cap logits (Cohere, Granite, Gemma 2/3) get that transform applied exactly.
`dense_loss` is the plain reference: model(...).logits over every position.

The module returns sums; the caller divides by the number of supervised tokens in the whole
optimizer step (all micro-batches, all processes), so the update does not depend on how the
step was split, and an empty micro-batch contributes exactly zero.

Loss types: 'nll' is plain cross-entropy. 'dft' (Dynamic Fine-Tuning, Wu et al. 2025) scales
each token's cross-entropy by the model's own probability of that token, detached:
loss_t = p_t * CE_t with p_t = exp(-CE_t) held constant, so the gradient is p_t times CE's.
Tokens the model finds unlikely pull less. Both paths (sparse and dense) compute it, and the
plain cross-entropy sum is returned next to it (`nll_sum`), for eval perplexity and the log.

NEFTune (Jain et al. 2023): in training only, uniform noise in [-1, 1] scaled by
alpha / sqrt(L * hidden) is added to the input embeddings, L being the length of the example a
token belongs to. In a packed row that is each example's own length, not the row's (using the
row's would give every packed example less noise than it gets unpacked).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sftlab.config import LOSS_TYPES
from sftlab.data.container import IGNORE

# Rows of logits per chunk are chosen so one chunk holds about this many fp32 values (256 MB).
CHUNK_VALUES = 64 * 1024 * 1024


def chunk_rows(vocab_size: int) -> int:
    return max(64, CHUNK_VALUES // max(1, vocab_size))


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) the model applies to lm_head outputs: logits = cap * tanh(scale * z / cap)."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _scores(z: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    y = z.float()
    if scale != 1.0:
        y = y * scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of CE(scores(h W^T + b), t) over rows, with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, scale, softcap, rows, grad_enabled, dft=False, weight_grad_in_place=False
    ):
        wants = ctx.needs_input_grad if grad_enabled else (False,) * 3
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants[2] else None
        needs_grad = any(g is not None for g in (grad_hidden, grad_weight, grad_bias))
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        # One logits buffer for every chunk: a fresh rows x vocab tensor per chunk page-faults
        # (glibc returns big blocks to the OS), which cost ~20% of the head's forward matmul on CPU.
        buffer = hidden.new_empty((min(rows, hidden.shape[0]), w.shape[0]), dtype=dtype)
        with torch.autocast(device, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows].to(dtype)
                t = targets[start : start + rows]
                z = torch.mm(h, w.T, out=buffer[: len(t)])
                if bias is not None:
                    z += bias.to(dtype)
                y = _scores(z, scale, softcap)
                picked = y.gather(1, t[:, None]).squeeze(1)
                top, guess = y.max(dim=-1)
                correct += (guess == t).sum()
                # softmax(y) = e / sum(e) with e = exp(y - max): one exp pass serves the loss and
                # the gradient (logsumexp followed by exp(y - lse) made two, ~40% of the head's time).
                # In place unless the soft-cap's derivative still needs y.
                e = torch.exp(y - top[:, None]) if softcap is not None else y.sub_(top[:, None]).exp_()
                total = e.sum(dim=-1)
                ce = top + total.log() - picked
                nll += ce.sum()
                weight_t = torch.exp(-ce) if dft else None  # p_t, a constant: no gradient flows through it
                loss += (weight_t * ce).sum() if dft else ce.sum()
                if not needs_grad:
                    continue
                # d loss / d y = softmax(y) - onehot(t) (times p_t for dft); then through the soft-cap and the scale.
                dy = e.div_(total[:, None])
                dy[torch.arange(len(t), device=t.device), t] -= 1
                if dft:
                    dy *= weight_t[:, None]
                if softcap is not None:
                    dy *= 1 - (y / softcap) ** 2
                if scale != 1.0:
                    dy *= scale
                dz = dy.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + rows] = (dz @ w).to(hidden.dtype)
                if grad_weight is not None:
                    if dz.dtype == torch.float32:
                        grad_weight.addmm_(dz.T, h)  # accumulates in place: no vocab x hidden temporary per chunk
                    else:
                        grad_weight += (dz.T @ h).float()
                if grad_bias is not None:
                    grad_bias += dz.sum(0).float()
        ctx.weight_dtype = weight.dtype
        ctx.weight = weight if weight_grad_in_place else None
        # Kept on ctx, not saved: backward scales them in place, so the vocab x hidden gradient
        # exists once, not twice (113 MB each for SmolLM2's head, 155 MB at a 151k vocabulary).
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct, nll)
        return loss, correct, nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_nll):
        if ctx.grads is None:
            raise RuntimeError("the sparse LM head's backward ran twice (retain_graph=True is not supported)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        gh = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        gb = grad_bias.mul_(grad_loss).to(ctx.weight_dtype) if grad_bias is not None else None
        if ctx.weight is not None and gw is not None:
            # A tied weight: returned to autograd, this gradient and the embedding lookup's were
            # summed out of place (head + lookup + their sum: three vocab x hidden buffers, 2 GB
            # for Gemma 3's 262k x 640). Put in .grad here, the lookup's (sparse) gradient is then
            # added into it in place by AccumulateGrad, which also fires the parameter's hooks
            # once, with the full gradient. See SupervisedLoss.forward for when this is on.
            weight = ctx.weight
            if weight.grad is None:
                weight.grad = gw
            else:
                weight.grad.add_(gw)
            gw = None
        ctx.weight = None
        return gh, gw, gb, None, None, None, None, None, None, None


def token_losses(scores: torch.Tensor, targets: torch.Tensor, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token cross-entropy) from fp32 scores; targets of IGNORE give 0."""
    ce = F.cross_entropy(scores, targets, ignore_index=IGNORE, reduction="none")
    if loss_type == "dft":
        return torch.exp(-ce).detach() * ce, ce
    return ce, ce


def _module_chunk(head, h, t, scale, softcap, loss_type):
    y = _scores(head(h), scale, softcap)
    loss, ce = token_losses(y, t, loss_type)
    return loss.sum(), (y.argmax(dim=-1) == t).sum(), ce.detach().sum()


def head_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
    rows: int | None = None,
    loss_type: str = "nll",
    weight_grad_in_place: bool = False,
):
    """(sum of the loss, number of correct argmax predictions, sum of cross-entropy) over rows of
    `hidden`; the first and the last are the same number for loss_type 'nll'.
    weight_grad_in_place: put the head weight's gradient straight into its .grad (for a tied
    leaf weight whose AccumulateGrad runs later in the same backward, see SupervisedLoss)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    rows = rows or chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 32000)
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(
            hidden,
            head.weight,
            head.bias,
            targets,
            scale,
            softcap,
            rows,
            torch.is_grad_enabled(),
            loss_type == "dft",
            weight_grad_in_place,
        )
    loss = hidden.new_zeros((), dtype=torch.float32)
    nll = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    # At least one chunk, even with no rows: an all-masked micro-batch then still gives a loss
    # connected to the graph (backward works) and zero gradients for every head parameter (DDP waits for them).
    for start in range(0, max(hidden.shape[0], 1), rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            part, hit, ce = checkpoint(_module_chunk, head, h, t, scale, softcap, loss_type, use_reentrant=False)
        else:
            part, hit, ce = _module_chunk(head, h, t, scale, softcap, loss_type)
        loss = loss + part
        correct = correct + hit
        nll = nll + ce
    return loss, correct, nll


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """(causal LM, trunk, head) of a transformers causal LM, a PEFT wrapper around one, or None."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(causal_lm, "base_model_prefix", None)
    trunk = getattr(causal_lm, prefix, None) if prefix else None
    if trunk is None:  # Llama 4's prefix ("language_model") names no attribute of its causal LM: the usual one
        trunk = getattr(causal_lm, "model", None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if trunk is None or head is None or trunk is causal_lm:
        return None
    return causal_lm, trunk, head


def router_aux(causal_lm: nn.Module):
    """(load_balancing_loss_func, experts, experts per token, coefficient) for a mixture-of-experts
    model configured to return router logits (config.output_router_logits), else None. The
    function is the model's own module's, called with the model's own attributes, as its forward
    does: `loss += router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts,
    num_experts_per_tok, attention_mask)`. Raises ValueError for a model whose router loss sftlab
    cannot compute that way (the dense path then computes the model's own)."""
    config = getattr(causal_lm, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    module = sys.modules.get(type(causal_lm).__module__)
    function = getattr(module, "load_balancing_loss_func", None)
    names = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    if function is None or not all(hasattr(causal_lm, name) for name in names):
        raise ValueError(
            f"{type(causal_lm).__name__} returns router logits, but not through load_balancing_loss_func "
            "and num_experts / num_experts_per_tok / router_aux_loss_coef"
        )
    return function, causal_lm.num_experts, causal_lm.num_experts_per_tok, float(causal_lm.router_aux_loss_coef)


class SupervisedLoss(nn.Module):
    """Wraps a causal LM so the loss is computed inside `forward` (DDP/FSDP hooks see it).

    forward(...) -> {"loss_sum": sum of the loss over supervised tokens, "nll_sum": sum of their
                     cross-entropy (the same number for loss_type 'nll'), "correct": argmax hits,
                     "count": supervised tokens, and for a mixture-of-experts model configured to
                     return router logits "aux_loss": router_aux_loss_coef x its load-balancing
                     loss, a mean over this forward's tokens, exactly as the model's own loss adds it}.
    Training divides loss_sum by the step's global supervised-token count and averages aux_loss
    over the step's forward passes (step.py).
    """

    def __init__(
        self, model: nn.Module, mode: str = "sparse", loss_type: str = "nll", neftune_alpha: float | None = None
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
        self.model = model
        self.loss_type = loss_type
        self.neftune_alpha = neftune_alpha
        # FSDP auto-wrapping reads this from the module it is given, which is this wrapper.
        inner = split_model(model)
        self._no_split_modules = getattr(inner[0] if inner else model, "_no_split_modules", None)
        parts = inner
        if mode == "sparse" and parts is None:
            raise ValueError("the sparse loss needs a model with a trunk and an output embedding")
        self.mode = mode
        self.router = router_aux(inner[0] if inner else model) if mode == "sparse" else None
        if parts is not None:
            causal_lm, _, head = parts
            self.scale, self.softcap = logit_transform(causal_lm.config)
            self.rows = chunk_rows(
                causal_lm.config.get_text_config().vocab_size
                if hasattr(causal_lm.config, "get_text_config")
                else head.weight.shape[0]
            )

    def forward(self, input_ids, targets, attention_mask=None, position_ids=None, row_position_ids=None):
        """row_position_ids: with sequence parallelism, the whole row's positions (this process holds
        a shard of the row); passed through the model's layers to its attention (sequence.py)."""
        count = (targets != IGNORE).sum()
        sharded = {"row_position_ids": row_position_ids} if row_position_ids is not None else {}
        if self.mode == "dense":
            inputs = {**self._inputs(input_ids, attention_mask, position_ids), **sharded}
            loss_sum, correct, nll_sum, aux = dense_loss(
                self.model,
                targets=targets,
                attention_mask=attention_mask,
                position_ids=position_ids,
                loss_type=self.loss_type,
                with_aux=True,
                **inputs,
            )
            return {
                "loss_sum": loss_sum,
                "nll_sum": nll_sum,
                "correct": correct,
                "count": count,
                **({"aux_loss": aux} if aux is not None else {}),
            }
        causal_lm, trunk, head = split_model(self.model)
        embedding = causal_lm.get_input_embeddings()
        # A tied head's gradient goes straight into .grad (see _LinearCrossEntropy.backward) and
        # the lookup's gradient is made sparse (tokens x hidden rows instead of a zero-filled
        # vocab x hidden tensor), so the tied weight's gradient exists once. Only in one plain
        # process: DDP and FSDP own .grad themselves.
        in_place = (
            torch.is_grad_enabled()
            and type(head) is nn.Linear
            and isinstance(embedding, nn.Embedding)
            and head.weight is embedding.weight
            and head.weight.is_leaf
            and head.weight.requires_grad
            and not torch.distributed.is_initialized()
            and not torch.compiler.is_compiling()
        )
        was_sparse = embedding.sparse if in_place else None
        if in_place:
            embedding.sparse = True
        try:
            inputs = self._inputs(input_ids, attention_mask, position_ids)
            routed = {"output_router_logits": True} if self.router else {}
            out = trunk(
                **inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **routed, **sharded
            )
            hidden = out.last_hidden_state
        finally:
            if in_place:
                embedding.sparse = was_sparse
        keep = targets != IGNORE
        rows = hidden[keep]  # [supervised tokens, hidden]; empty when nothing is supervised
        loss_sum, correct, nll_sum = head_loss(
            head,
            rows,
            targets[keep],
            self.scale,
            self.softcap,
            self.rows,
            self.loss_type,
            weight_grad_in_place=in_place,
        )
        result = {"loss_sum": loss_sum, "nll_sum": nll_sum, "correct": correct, "count": count}
        if self.router:
            function, experts, top_k, coefficient = self.router
            result["aux_loss"] = coefficient * function(out.router_logits, experts, top_k, attention_mask)
        return result

    def _inputs(self, input_ids, attention_mask, position_ids) -> dict:
        """The model embeds the ids itself, unless NEFTune has to add noise to the embeddings first."""
        if not (self.training and self.neftune_alpha):
            return {"input_ids": input_ids}
        embeds = self.model.get_input_embeddings()(input_ids)
        scale = neftune_scale(
            self.neftune_alpha, embeds.shape[-1], tuple(input_ids.shape), attention_mask, position_ids
        )
        return {"inputs_embeds": embeds + neftune_noise(embeds, scale)}


def example_lengths(shape: tuple[int, int], attention_mask=None, position_ids=None) -> torch.Tensor:
    """[batch, length]: for each token, the length of the example it belongs to. Padded rows
    (attention_mask given): the row's real tokens. Packed rows (position_ids restarting at 0 for
    each example, no mask): the length of the token's run of positions."""
    batch, length = shape
    if attention_mask is not None:
        return attention_mask.sum(dim=1, keepdim=True).expand(batch, length)
    if position_ids is None:
        return torch.full(shape, length, dtype=torch.long)
    position_ids = position_ids.expand(batch, length)
    run = (position_ids == 0).long().cumsum(dim=1) - 1  # which example of the row each token is in
    run = run.clamp_(min=0)  # a row whose positions do not start at 0 counts its head as the first run
    sizes = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
    return sizes.gather(1, run)


def neftune_scale(
    alpha: float, hidden_size: int, shape: tuple[int, int], attention_mask=None, position_ids=None
) -> torch.Tensor:
    """[batch, length, 1]: NEFTune's noise bound alpha / sqrt(L * hidden) for every token."""
    lengths = example_lengths(shape, attention_mask, position_ids).clamp(min=1)
    return (alpha / torch.sqrt(lengths.double() * hidden_size)).float()[..., None]


def neftune_noise(embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(embeds).uniform_(-1, 1) * scale.to(device=embeds.device, dtype=embeds.dtype)


def dense_loss(
    model,
    input_ids=None,
    targets=None,
    attention_mask=None,
    position_ids=None,
    loss_type: str = "nll",
    inputs_embeds=None,
    with_aux: bool = False,
    **model_kwargs,
):
    """Reference path: full logits over every position, the way transformers computes them.
    (sum of the loss, argmax hits, sum of cross-entropy), and with `with_aux` the model's own
    router loss term (router_aux_loss_coef x aux_loss, None for a model that returns none)."""
    out = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **model_kwargs,  # row_position_ids under sequence parallelism
    )
    logits = out.logits
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    losses, ce = token_losses(flat_logits, flat_targets, loss_type)
    keep = flat_targets != IGNORE
    correct = (flat_logits[keep].argmax(-1) == flat_targets[keep]).sum()
    if not with_aux:
        return losses.sum(), correct, ce.detach().sum()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        aux = float(getattr(causal_lm, "router_aux_loss_coef", 1.0)) * aux
    return losses.sum(), correct, ce.detach().sum(), aux


def choose_loss_mode(model: nn.Module, batch: dict, requested: str = "auto") -> tuple[str, str]:
    """('sparse' | 'dense', why). 'auto' checks once, on a real batch, that the sparse path
    reproduces the model's own logits; an architecture that transforms logits in a way
    sftlab does not know gets the dense path instead."""
    if requested == "dense":
        return "dense", "loss_implementation=dense"
    if split_model(model) is None:
        if requested == "sparse":
            raise ValueError("loss_implementation=sparse, but the model has no separate trunk and LM head")
        return "dense", "the model has no separate trunk and LM head"
    try:
        router_aux(split_model(model)[0])
    except ValueError as error:
        if requested == "sparse":
            raise
        return "dense", str(error)
    if requested == "sparse":
        return "sparse", "loss_implementation=sparse"
    inputs = {
        k: v[:1, :64] if torch.is_tensor(v) else v
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "position_ids")
    }
    probe = batch["input_ids"][:1, :64]
    targets = torch.roll(probe, -1, dims=1)
    targets[:, -1] = IGNORE
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sparse = SupervisedLoss(model, "sparse")(targets=targets, **inputs)["loss_sum"]
        dense, _, _ = dense_loss(model, probe, targets, inputs.get("attention_mask"), inputs.get("position_ids"))
    model.train(was_training)
    if not math.isclose(float(sparse), float(dense), rel_tol=1e-3, abs_tol=1e-3):
        return (
            "dense",
            f"the sparse loss ({float(sparse):.5f}) does not reproduce this model's logits ({float(dense):.5f})",
        )
    return "sparse", "sparse head checked against the model's logits"
