"""Preference tuning on the same engine: pairs in one shared row, sparse log-probabilities, the
DPO family, SimPO and ORPO.

Rows. A pair is the prompt P as served and the chosen and rejected completions C and R (data/
container.py Pairs). It becomes one row [P | C | R]: R's position ids continue P's (they restart at
len(P)), and a 4-D attention mask lets R attend to P and to itself, never to C. So the prompt is
computed once per pair, and every log-probability equals the one of the separate sequences P+C and
P+R (tests/test_preference.py checks it per token). Models whose layers carry state along the
sequence (Mamba, linear attention, convolutions) would let C leak into R: for them each pair is two
rows [P | C] and [P | R] (`shared_prompt=False`, chosen by a probe at the start of a run).

Log-probs. The position before each completion token predicts it: P's last position predicts both
C[0] and R[0]. Only those positions go through the LM head, in chunks (`token_log_probs`): the
batch x length x vocabulary logits never exist.

Losses, per pair, with pi = the policy's summed log-prob of a completion, ref = the reference's
(computed once before training and stored; or, with LoRA and precompute_ref_log_probs false, in each
step by the same model with its adapter disabled: _CompletionLoss.reference), avg = pi / its tokens, and beta, label smoothing ls:
    sigmoid  z = (pi_c - pi_r) - (ref_c - ref_r);  -(1 - ls) logsig(beta z) - ls logsig(-beta z)   (DPO; cDPO with ls)
    robust   (-(1 - ls) logsig(beta z) + ls logsig(-beta z)) / (1 - 2 ls)                            (rDPO)
    hinge    relu(1 - beta z)                                                                      (SLiC)
    ipo      (z_avg - 1 / (2 beta))^2 with z_avg from the per-token averages                        (IPO)
    simpo    -(1 - ls) logsig(beta (avg_c - avg_r) - gamma) - ls logsig(-(...))  no reference       (SimPO)
    orpo     -avg_c - beta logsig(log odds_c - log odds_r), odds = p / (1 - p), p = exp(avg)      (ORPO)
    rpo_alpha adds rpo_alpha x (-avg_c): the chosen completion's NLL per token                     (RPO)
These are TRL's definitions (DPOTrainer, CPOTrainer, ORPOTrainer); the NLL terms are per pair (a
completion's mean token NLL) so that, like every term here, the loss is a mean over pairs and the
step is the same however it is split (8x1 == 2x4 == 2 processes).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sftlab.data.container import Pairs
from sftlab.training.loss import _scores, chunk_rows, logit_transform, split_model

PREFERENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


# --- rows --------------------------------------------------------------------------------------


def collate_pairs(
    pairs: Pairs,
    indices: list[int] | list[list[int]],
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    shared_prompt: bool = True,
) -> dict:
    """The model inputs for pairs `indices` (a list of pair indices, one pair per row; or a list of
    rows, each a list of pairs packed one after another): rows [P | C | R] (or [P | C] and [P | R]
    each), their position ids and additive 4-D attention mask, and for each completion token the
    flat position (row x length + column) whose hidden state predicts it, its target and its pair
    (numbered from 0 in the batch, in order)."""
    packed = [row if isinstance(row, (list, tuple)) else [row] for row in indices]
    order = [i for row in packed for i in row]
    rows = []  # (ids, position ids, part of each token: 0 prompt, 1 chosen, 2 rejected; pair of each token)
    chosen, rejected = ([], [], []), ([], [], [])  # (row, column) predicting, target, pair, per completion token
    number = 0
    for row_pairs in packed:
        ids, positions, parts, owners = [], [], [], []
        for i in row_pairs:
            prompt, c, r = (part.tolist() for part in pairs[i])
            p, start = len(prompt), len(ids)
            if shared_prompt:
                ids += prompt + c + r
                positions += list(range(p + len(c))) + list(range(p, p + len(r)))
                parts += [0] * p + [1] * len(c) + [2] * len(r)
                owners += [number] * (p + len(c) + len(r))
                _completion(
                    chosen, len(rows), [start + p - 1] + list(range(start + p, start + p + len(c) - 1)), c, number
                )
                rejected_at = list(range(start + p + len(c), start + p + len(c) + len(r) - 1))
                _completion(rejected, len(rows), [start + p - 1] + rejected_at, r, number)
            else:  # two rows of their own, never packed (the probe found the shared row inexact)
                for completion, store in ((c, chosen), (r, rejected)):
                    rows.append(
                        (
                            prompt + completion,
                            list(range(p + len(completion))),
                            [0] * (p + len(completion)),
                            [number] * (p + len(completion)),
                        )
                    )
                    _completion(store, len(rows) - 1, list(range(p - 1, p + len(completion) - 1)), completion, number)
            number += 1
        if shared_prompt:
            rows.append((ids, positions, parts, owners))
    length = max((len(row[0]) for row in rows), default=1)
    length = _padded(length, pad_to_multiple_of)
    count = max(len(rows), 1)  # no pairs (a process out of batches): one row of padding, nothing predicted
    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((count, length), dtype=torch.long)
    part = torch.full((count, length), -1, dtype=torch.long)  # -1: padding
    owner = torch.full((count, length), -1, dtype=torch.long)
    for row, (ids, positions, parts, owners) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        position_ids[row, : len(ids)] = torch.tensor(positions)
        part[row, : len(ids)] = torch.tensor(parts)
        owner[row, : len(ids)] = torch.tensor(owners)
    # A query sees the keys at or before it of its own pair that are the prompt or its own part:
    # R never sees C, and a packed pair never sees another.
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    same_pair = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    keys, queries = part[:, None, :], part[:, :, None]
    allowed = causal & same_pair & ((keys == 0) | (keys == queries))
    allowed |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no row of -inf only
    mask = torch.zeros((count, 1, length, length))
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "chosen_index": _flatten(chosen[0], length),
        "chosen_targets": torch.tensor(chosen[1], dtype=torch.long),
        "chosen_pair": torch.tensor(chosen[2], dtype=torch.long),
        "rejected_index": _flatten(rejected[0], length),
        "rejected_targets": torch.tensor(rejected[1], dtype=torch.long),
        "rejected_pair": torch.tensor(rejected[2], dtype=torch.long),
        "pair_count": torch.tensor(len(order)),
        "pair_index": torch.tensor(order, dtype=torch.long),
        "real_tokens": sum(len(row[0]) for row in rows),
        "record_index": [int(pairs.record_index[i]) for i in order],
    }


def _flatten(positions: list[tuple[int, int]], length: int) -> torch.Tensor:
    return torch.tensor([row * length + column for row, column in positions], dtype=torch.long)


def _completion(store, row: int, predicting: list[int], completion: list[int], pair: int) -> None:
    predicting = predicting[
        : len(completion)
    ]  # an empty completion (KTO's rows have no rejected part) predicts nothing
    positions, targets, pairs = store
    positions.extend((row, column) for column in predicting)
    targets.extend(completion)
    pairs.extend([pair] * len(completion))


# --- which layout a micro-batch takes ------------------------------------------------------------


def attention_span(config) -> float:
    """The key count at which a token's attention costs its decoder layer as much as the rest of
    the layer, in multiply-adds: the q, k, v and o projections and the gated MLP (3 matrices) per
    token, against 2 x heads x head_dim per key it attends to (its score and its share of the
    values). A padded row of L tokens then costs the trunk L x (1 + L / span), up to a constant.
    Missing fields take a Llama's proportions (one key/value head per query head, MLP 4 x hidden)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    if not hidden:
        return math.inf  # nothing to estimate from: count tokens only
    heads = getattr(config, "num_attention_heads", None) or max(1, hidden // 64)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp
    return per_token / (2 * heads * head_dim)


def shared_row_is_cheaper(pairs: Pairs, indices: list[int], span: float, pad_to_multiple_of: int | None = None) -> bool:
    """Whether the pairs `indices`, padded to one length, cost the trunk less as one row [P | C | R]
    each than as two rows [P | C] and [P | R] each (ties: one row). A padded batch costs rows x L x
    (1 + L / span) (attention_span): the shared row computes the prompt once, but is as long as
    the longest P + C + R, against the longest P + C or P + R for two rows, and attention grows
    with the square of the length. Both layouts give the same log-probs; this is speed only."""
    if not indices:
        return True
    index = np.asarray(indices, dtype=np.int64)
    prompt, chosen, rejected = (
        offsets[index + 1] - offsets[index]
        for offsets in (pairs.prompt_offsets, pairs.chosen_offsets, pairs.rejected_offsets)
    )
    shared = _padded(int((prompt + chosen + rejected).max()), pad_to_multiple_of)
    separate = _padded(int(np.maximum(prompt + chosen, prompt + rejected).max()), pad_to_multiple_of)
    rows = len(index)
    return rows * shared * (1 + shared / span) <= 2 * rows * separate * (1 + separate / span)


def takes_shared_row(
    pairs: Pairs, indices: list, shared_prompt: bool, span: float | None, pad_to_multiple_of: int | None = None
) -> bool:
    """Whether the micro-batch `indices` (pairs, or packed rows of pairs) is collated as shared rows:
    never where the shared row is off (shared_prompt false, or the probe found it inexact); always
    for packed rows (pairs pack only that way) and where `span` is None; otherwise where it computes
    less (shared_row_is_cheaper)."""
    if not shared_prompt:
        return False
    if span is None or any(isinstance(i, (list, tuple)) for i in indices):
        return True
    return shared_row_is_cheaper(pairs, indices, span, pad_to_multiple_of)


def _padded(length: int, multiple: int | None) -> int:
    return math.ceil(length / multiple) * multiple if multiple else length


# --- log-probs ---------------------------------------------------------------------------------


class _TokenLogProbs(torch.autograd.Function):
    """log p(target) per row of `hidden` through a Linear head, chunk by chunk. Forward keeps each
    row's log-sum-exp; backward recomputes a chunk's logits to form its gradient (one more head
    matmul than SFT's fused loss, which can compute gradients ahead because its upstream gradient is
    one scalar; here every token's is its pair's)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, rows):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], rows):
                y = _chunk_scores(hidden[start : start + rows], weight, bias, scale, softcap)
                t = targets[start : start + rows]
                lse[start : start + rows] = torch.logsumexp(y, dim=-1)
                out[start : start + rows] = y.gather(1, t[:, None]).squeeze(1) - lse[start : start + rows]
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.scale, ctx.softcap, ctx.rows, ctx.has_bias = scale, softcap, rows, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        wants = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants[2] else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h = hidden[start : start + ctx.rows]
            t = targets[start : start + ctx.rows]
            y = _chunk_scores(h, weight, bias, ctx.scale, ctx.softcap)
            # d log p(t) / d y = onehot(t) - softmax(y); times the upstream gradient of each row.
            dy = -torch.exp(y - lse[start : start + ctx.rows, None])
            dy[torch.arange(len(t), device=t.device), t] += 1
            dy *= grad_out[start : start + ctx.rows, None]
            if ctx.softcap is not None:
                z = _chunk_scores(h, weight, bias, ctx.scale, None)
                dy *= 1 - torch.tanh(z / ctx.softcap) ** 2
            if ctx.scale != 1.0:
                dy *= ctx.scale
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.rows] = (dy.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(dy.T, h.float())
            if grad_bias is not None:
                grad_bias += dy.sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunk_scores(h, weight, bias, scale, softcap):
    z = h.to(weight.dtype) @ weight.T
    if bias is not None:
        z = z + bias
    return _scores(z, scale, softcap)


def _module_chunk_log_probs(head, h, t, scale, softcap):
    y = _scores(head(h), scale, softcap)
    return y.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(y, dim=-1)


def token_log_probs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    scale: float = 1.0,
    softcap: float | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for each row, through the LM head in chunks of `rows`."""
    rows = rows or chunk_rows(head.weight.shape[0] if hasattr(head, "weight") else 32000)
    if type(head) is nn.Linear:
        return _TokenLogProbs.apply(hidden, head.weight, head.bias, targets, scale, softcap, rows)
    parts = []  # a LoRA-adapted head: checkpointed chunks through the module itself
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_module_chunk_log_probs, head, h, t, scale, softcap, use_reentrant=False))
        else:
            parts.append(_module_chunk_log_probs(head, h, t, scale, softcap))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def completion_token_log_probs(model: nn.Module, batch: dict, sparse: bool = True) -> torch.Tensor:
    """log p of every completion token of the batch: the chosen tokens, then the rejected ones,
    pair by pair in order (the same order whichever layout collated them). `sparse`: the head on
    completion positions only; else the model's own full logits (the reference path for tests)."""
    inputs = dict(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
    )
    index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    if sparse:
        causal_lm, trunk, head = split_model(model)
        hidden = trunk(**inputs).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        scale, softcap = logit_transform(causal_lm.config)
        log_probs = token_log_probs(head, flat[index], targets, scale, softcap)
        # Keep the graph connected when nothing is predicted (a padding-only batch): DDP waits for every gradient.
        log_probs = log_probs + 0.0 * hidden.sum() if index.numel() == 0 else log_probs
    else:
        logits = model(**inputs).logits.float()
        flat = logits.reshape(-1, logits.shape[-1]).log_softmax(-1)
        log_probs = flat[index].gather(1, targets[:, None]).squeeze(1)
    return log_probs


def completion_log_probs(model: nn.Module, batch: dict, sparse: bool = True) -> tuple[torch.Tensor, ...]:
    """(chosen sums, rejected sums, chosen tokens, rejected tokens), each [pairs]: the summed
    log-probability of each completion (completion_token_log_probs, summed per pair)."""
    count = int(batch["pair_count"])
    log_probs = completion_token_log_probs(model, batch, sparse)
    n = len(batch["chosen_targets"])
    sums, tokens = [], []
    for part, pair in ((log_probs[:n], batch["chosen_pair"]), (log_probs[n:], batch["rejected_pair"])):
        sums.append(log_probs.new_zeros(count).index_add(0, pair.to(log_probs.device), part))
        tokens.append(torch.bincount(pair, minlength=count).to(log_probs.device, torch.float32))
    return sums[0], sums[1], tokens[0], tokens[1]


# --- losses ------------------------------------------------------------------------------------


def preference_losses(
    loss_type: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair; see the module docstring for each formula."""
    avg_chosen, avg_rejected = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    if loss_type in ("sigmoid", "robust", "hinge"):
        z = (chosen - rejected) - (ref_chosen - ref_rejected)
        if loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
        elif loss_type == "robust":
            loss = (-(1 - label_smoothing) * F.logsigmoid(beta * z) + label_smoothing * F.logsigmoid(-beta * z)) / (
                1 - 2 * label_smoothing
            )
        else:
            loss = torch.relu(1 - beta * z)
        rewards = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    elif loss_type == "ipo":
        z = (avg_chosen - avg_rejected) - (
            ref_chosen / chosen_tokens.clamp(min=1) - ref_rejected / rejected_tokens.clamp(min=1)
        )
        loss = (z - 1 / (2 * beta)) ** 2
        rewards = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    elif loss_type == "simpo":
        z = beta * (avg_chosen - avg_rejected) - simpo_gamma
        loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        rewards = beta * avg_chosen.detach(), beta * avg_rejected.detach()
    elif loss_type == "orpo":
        # log odds of p = exp(avg): avg - log(1 - exp(avg)); log1p(-exp(x)) is exact for x < 0.
        log_odds = (avg_chosen - avg_rejected) - (
            torch.log1p(-torch.exp(avg_chosen)) - torch.log1p(-torch.exp(avg_rejected))
        )
        loss = -avg_chosen - beta * F.logsigmoid(log_odds)
        rewards = beta * avg_chosen.detach(), beta * avg_rejected.detach()
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; one of {PREFERENCE_LOSSES}")
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * -avg_chosen
    return loss, rewards[0], rewards[1]


class _CompletionLoss(nn.Module):
    """What the preference losses share: the wrapped model, the sparse or dense log-probs, the
    reference computed in the step where it is not stored, and the block list FSDP reads from the
    module it is given (this wrapper)."""

    def __init__(self, model: nn.Module, sparse: bool, reference_from_adapter: bool = False):
        super().__init__()
        if reference_from_adapter and not hasattr(model, "disable_adapter"):
            raise ValueError("the reference from the adapter-disabled model needs a PEFT model")
        self.model = model
        self.sparse = sparse
        self.reference_from_adapter = reference_from_adapter
        inner = split_model(model)
        self._no_split_modules = getattr(inner[0] if inner else model, "_no_split_modules", None)

    def reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen sums, rejected sums) of the batch's pairs under the reference: the same model
        with its LoRA adapter disabled (the model before training, where the adapter starts at zero
        effect), without gradients, in eval mode as the stored pass computes it (no dropout), in the
        batch's own rows. Called inside forward, so a sharded model gathers its weights for it."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                chosen, rejected, _, _ = completion_log_probs(self.model, batch, self.sparse)
        finally:
            self.model.train(was_training)
        return chosen, rejected


class PreferenceLoss(_CompletionLoss):
    """Wraps a causal LM so the preference loss is computed inside `forward` (DDP/FSDP hooks see
    it). forward(batch tensors) -> sums over the micro-batch's pairs: loss_sum, pairs, correct
    (chosen reward > rejected reward), the rewards, the log-probs, and the chosen NLL per token."""

    def __init__(
        self,
        model: nn.Module,
        loss_type: str = "sigmoid",
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float | None = None,
        sparse: bool = True,
        reference_from_adapter: bool = False,
    ):
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, not {loss_type!r}")
        super().__init__(model, sparse, reference_from_adapter)
        self.loss_type = loss_type
        self.options = dict(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, rpo_alpha=rpo_alpha)

    def forward(self, ref_chosen=None, ref_rejected=None, pair_index=None, **batch):
        """`batch`: collate_pairs' tensors (rows, positions, mask, completion indices, pair_count);
        ref_chosen / ref_rejected: the stored reference, computed here when reference_from_adapter."""
        if self.reference_from_adapter and self.loss_type not in REFERENCE_FREE:
            ref_chosen, ref_rejected = self.reference(batch)
        chosen, rejected, chosen_tokens, rejected_tokens = completion_log_probs(self.model, batch, self.sparse)
        loss, reward_chosen, reward_rejected = preference_losses(
            self.loss_type, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected, **self.options
        )
        # Sums over the pairs (an empty micro-batch gives zeros, still connected to every weight for DDP).
        return {
            "loss_sum": loss.sum(),
            "pairs": loss.new_tensor(float(len(loss))),
            "correct": (reward_chosen > reward_rejected).float().sum(),
            "reward_chosen": reward_chosen.sum(),
            "reward_rejected": reward_rejected.sum(),
            "logps_chosen": chosen.detach().sum(),
            "logps_rejected": rejected.detach().sum(),
            "nll_chosen": (-chosen / chosen_tokens.clamp(min=1)).detach().sum(),
        }


@torch.no_grad()
def reference_log_probs(
    model: nn.Module,
    pairs: Pairs,
    pad_id: int,
    processes,
    batch_size: int = 8,
    shared_prompt: bool = True,
    span: float | None = None,
) -> np.ndarray:
    """[pairs, 2] summed log-probs of the chosen and rejected completions under `model` as it is now
    (the reference: the model before training, the adapter's initial zero effect included). Each
    process computes every world-th pair and the results are summed over processes. Each batch takes
    the layout takes_shared_row gives it (`span`: attention_span, None: the shared row where allowed)."""
    was_training = model.training
    model.eval()
    values = torch.zeros((len(pairs), 2), dtype=torch.float64)
    mine = list(range(processes.rank, len(pairs), processes.world))
    device = next(model.parameters()).device
    for start in range(0, len(mine), batch_size):
        indices = mine[start : start + batch_size]
        shared = takes_shared_row(pairs, indices, shared_prompt, span)
        batch = collate_pairs(pairs, indices, pad_id, shared_prompt=shared)
        tensors = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        chosen, rejected, _, _ = completion_log_probs(model, tensors)
        values[indices, 0] = chosen.double().cpu()
        values[indices, 1] = rejected.double().cpu()
    model.train(was_training)
    return processes.sum(values).numpy()


@torch.no_grad()
def choose_layout(
    model: nn.Module,
    pairs: Pairs,
    pad_id: int,
    tolerance: float = 1e-4,
    *,
    shared_prompt: bool = True,
    loss_implementation: str = "auto",
    span: float | None = None,
) -> tuple[bool, bool, str]:
    """(shared_prompt, sparse, why), decided on the first pairs as sftlab.training.architecture
    decides packing: the shared row [P | C | R] must give each completion the log-probs of the
    separate sequences (layers that carry state along the sequence make C leak into R), and the
    sparse head must give the model's own (heads that transform logits in an unknown way).
    `shared_prompt` false and `loss_implementation` dense/sparse decide without asking the model
    (sparse is still refused for a model without a separate trunk and head). `span`: the
    attention span each micro-batch's layout will be chosen with (takes_shared_row), for the text."""
    indices = list(range(min(2, len(pairs))))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device

        # Compared token by token, not as sums: a completion's summed log-prob is a float32 sum
        # whose last bit is already 1.2e-4 at a magnitude of 1024 (a 100-token reply of an
        # untrained model), so one rounding of the sum would pass for a leak from C into R.
        def log_probs(shared, sparse):
            batch = collate_pairs(pairs, indices, pad_id, shared_prompt=shared)
            return completion_token_log_probs(
                model, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}, sparse=sparse
            )

        separate_dense = log_probs(False, False)
        if split_model(model) is None:
            if loss_implementation == "sparse":
                raise ValueError("loss_implementation=sparse, but the model has no separate trunk and LM head")
            sparse = False
        elif loss_implementation == "auto":
            sparse = bool((log_probs(False, True) - separate_dense).abs().max() <= tolerance)
        else:
            sparse = loss_implementation == "sparse"
        shared_difference = float((log_probs(True, False) - separate_dense).abs().max()) if shared_prompt else None
    finally:
        model.train(was_training)
    shared = shared_difference is not None and shared_difference <= tolerance
    if not shared_prompt:
        why = "chosen and rejected in rows of their own (shared_prompt: false)"
    elif shared:
        why = "prompt shared by chosen and rejected in one row" + (
            f" where that costs less than two rows (chosen per micro-batch; attention span {span:.0f} tokens)"
            if span is not None
            else ""
        )
    else:
        why = (
            f"chosen and rejected in rows of their own: in one row a rejected token's log-prob moves by "
            f"{shared_difference:.1e} (the model's non-attention layers carry state from the chosen completion into it)"
        )
    return (
        shared,
        sparse,
        why
        + (
            "; sparse head"
            if sparse
            else "; dense logits"
            + ("" if loss_implementation == "dense" else " (the sparse head does not reproduce them)")
        ),
    )


def stored_reference_log_probs(
    model: nn.Module,
    pairs: Pairs,
    pad_id: int,
    processes,
    folder: str,
    shared_prompt: bool = True,
    batch_size: int = 8,
    span: float | None = None,
) -> tuple[np.ndarray, bool]:
    """(reference log-probs of `pairs`, whether they were read from `folder`), stored there keyed by
    a hash of the pairs and of the model's weights as they are before training, so a resumed run,
    a second run on the same data, or the evaluation pairs of a later run reuse them. Every process
    computes its share; the first process of each machine writes the file (atomically: written
    aside, then renamed), so that a cache folder of each machine's own holds it too."""
    from sftlab.training.identity import examples_digest, weights_digest

    key = hashlib.blake2b(f"{examples_digest(pairs)}-{weights_digest(model)}".encode(), digest_size=16).hexdigest()
    path = os.path.join(folder, f"{key}.npy")
    stored = _read_reference(path, len(pairs))
    # Computing them is a collective (the sum over processes), so every process must take the same
    # branch: with a cache on each machine one machine may hold the file and another not, and a
    # 2-machine run whose processes read it where they found it hung in that sum.
    if int(processes.sum(torch.tensor([float(stored is not None)]))[0]) == processes.world:
        return stored, True
    values = reference_log_probs(
        model, pairs, pad_id, processes, batch_size=batch_size, shared_prompt=shared_prompt, span=span
    )
    if processes.local_rank == 0:
        os.makedirs(folder, exist_ok=True)
        # A name of its own (the pid alone may repeat on another machine): on a cache shared by
        # machines, their first processes write the same file at once.
        partial = f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"
        with open(partial, "wb") as handle:
            np.save(handle, values, allow_pickle=False)
        os.replace(partial, path)
    return values, False


def _read_reference(path: str, count: int) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    values = np.load(path, allow_pickle=False)
    return values if values.shape == (count, 2) else None


# --- KTO ---------------------------------------------------------------------------------------


def kto_losses(
    log_probs: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward) per example of KTO (Ethayarajh et al. 2024, eq. 7, as TRL's KTOTrainer): with
    r = log pi(y|x) - log ref(y|x) and z0 the KL reference point (detached),
        desirable     desirable_weight   x (1 - sigmoid(beta (r - z0)))
        undesirable   undesirable_weight x (1 - sigmoid(beta (z0 - r)))"""
    ratio = log_probs - reference
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return loss, beta * ratio.detach()


class KTOLoss(_CompletionLoss):
    """Wraps a causal LM for KTO. forward(batch) -> sums over the micro-batch's examples: loss_sum,
    examples, desirable ones, the rewards of each kind, the log-probs, kl x examples (the reference
    point used). forward(..., kl_only=True) -> {"kl_sum", "kl_count"}: the policy-minus-reference
    log-prob of each example's mismatched completion (rows [P | K]), for the step's KL estimate."""

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        sparse: bool = True,
        reference_from_adapter: bool = False,
    ):
        super().__init__(model, sparse, reference_from_adapter)
        self.options = dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)

    def forward(
        self,
        ref_chosen=None,
        desirable=None,
        kl=None,
        kl_only: bool = False,
        pair_index=None,
        ref_rejected=None,
        **batch,
    ):
        if self.reference_from_adapter:  # the rows hold one completion each (the example's or the mismatched one)
            ref_chosen = self.reference(batch)[0]
        log_probs, _, _, _ = completion_log_probs(self.model, batch, self.sparse)
        if kl_only:  # the rows hold the mismatched completions, their reference values in ref_chosen
            return {"kl_sum": (log_probs - ref_chosen).sum(), "kl_count": log_probs.new_tensor(float(len(log_probs)))}
        loss, reward = kto_losses(log_probs, ref_chosen, desirable.bool(), kl, **self.options)
        wanted = desirable.bool()
        return {
            "loss_sum": loss.sum(),
            "examples": loss.new_tensor(float(len(loss))),
            "desirable": wanted.float().sum(),
            "reward_desirable": (reward * wanted).sum(),
            "reward_undesirable": (reward * ~wanted).sum(),
            "logps": log_probs.detach().sum(),
            "kl_sum": kl.detach() * len(loss),
        }
