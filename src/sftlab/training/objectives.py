"""Objectives: what a training step optimises. The seam between the engine and the maths.

The engine (step.py, loop.py) does not know what it optimises. For every optimizer step it
  1. asks the objective for each micro-batch's `count` before any forward pass, and sums it over
     the step's micro-batches and all processes (one all-reduce): the number the loss is a mean over;
  2. runs the objective's loss `module` on each micro-batch (the model's forward and the loss in one
     nn.Module, so DDP's and FSDP's hooks see it), which returns {"loss_sum": ..., and one tensor per
     name in `sums`}, and back-propagates loss_sum / that count (times the processes, which DDP and
     FSDP average over), so 8x1, 2x4 and 2 processes x 4 give the same update;
  3. sums the module's `sums` over micro-batches, processes and the steps of a log window, and asks
     the objective to turn them into the logged record (`train_record`) or the eval record (`eval_record`).

Adding an objective (e.g. preference tuning) is a new loss module and a new Objective here, the config
fields it needs and its docs; step.py and loop.py stay as they are. Its tests: the loss and a gradient
by hand on a tiny head, and the split invariance (8x1 == 2x4 == 2 processes), as SFT's have.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import nn

from sftlab.data.container import IGNORE, Pairs
from sftlab.training.loss import SupervisedLoss
from sftlab.training.preference import KTOLoss, PreferenceLoss, collate_pairs, takes_shared_row


class Objective(Protocol):
    """The interface the engine calls. `sums` names what the loss module returns besides loss_sum
    (loss_sum itself is summed too, under its own name); every one is a sum, never a mean, so that
    adding over micro-batches, processes and steps stays exact."""

    name: str
    sums: tuple[str, ...]
    module: nn.Module

    def count(self, batch: dict) -> float:
        """What this micro-batch adds to the step's normaliser (known before the forward pass)."""
        ...

    def train_record(self, sums: dict[str, float], seconds: float) -> dict:
        """The objective's part of a logged training record, from the sums of a log window."""
        ...

    def eval_record(self, sums: dict[str, float]) -> dict:
        """The eval record, from the sums over the whole eval set."""
        ...


class SupervisedObjective:
    """SFT: the loss (nll, or dft's probability-weighted cross-entropy) over supervised tokens,
    normalised by the supervised tokens of the whole optimizer step. A micro-batch with nothing
    supervised adds 0 to the loss and 0 to the count: never NaN, never a hidden 0 loss."""

    name = "sft"
    sums = ("loss_sum", "nll_sum", "correct", "count")

    def __init__(
        self, model: nn.Module, mode: str = "sparse", loss_type: str = "nll", neftune_alpha: float | None = None
    ):
        self.loss_type = loss_type
        self.module = SupervisedLoss(model, mode, loss_type, neftune_alpha)
        # A mixture-of-experts model returning router logits adds its load-balancing loss
        # (loss.py), logged as aux_loss: its mean over the forwards of the window.
        self.routed = returns_router_loss(model)
        if self.routed:
            self.sums = SupervisedObjective.sums + ("aux_loss",)

    def count(self, batch: dict) -> float:
        return float((batch["targets"] != IGNORE).sum())

    def train_record(self, sums: dict[str, float], seconds: float) -> dict:
        supervised = sums["count"]
        record = {"loss": sums["loss_sum"] / supervised if supervised else 0.0}
        if self.loss_type != "nll":  # the objective's loss is not the cross-entropy: show that too
            record["nll"] = sums["nll_sum"] / supervised if supervised else 0.0
        if self.routed:
            record["aux_loss"] = sums["aux_loss"] / sums["forwards"] if sums.get("forwards") else 0.0
        record.update(
            token_accuracy=sums["correct"] / supervised if supervised else 0.0,
            supervised_tokens=int(supervised),
            supervised_tokens_per_second=supervised / seconds,
        )
        return record

    def eval_record(self, sums: dict[str, float]) -> dict:
        """Always cross-entropy, whatever the training loss_type: runs trained with nll and dft compare."""
        count = sums["count"]
        loss = sums["nll_sum"] / count if count else 0.0
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_token_accuracy": sums["correct"] / count if count else 0.0,
            "eval_supervised_tokens": int(count),
        }


def stacked_sums(objective: Objective, out: dict) -> torch.Tensor:
    """The module's outputs named by `objective.sums`, detached, as one float64 vector (one device sync per step)."""
    return torch.stack([out[name].detach().double() for name in objective.sums])


def returns_router_loss(model: nn.Module) -> bool:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(causal_lm, "config", None), "output_router_logits", False))


class PreferenceObjective:
    """Preference tuning (training/preference.py): the loss is a mean over the pairs of the whole
    step; the reference log-probs (computed once, before training) travel with each batch. Each
    micro-batch is collated as one row per pair or two, whichever computes less (takes_shared_row:
    the normaliser, pairs, is the same either way)."""

    name = "preference"
    sums = (
        "loss_sum",
        "pairs",
        "correct",
        "reward_chosen",
        "reward_rejected",
        "logps_chosen",
        "logps_rejected",
        "nll_chosen",
    )

    def __init__(
        self,
        model: nn.Module,
        loss_type: str,
        *,
        beta: float,
        label_smoothing: float,
        simpo_gamma: float,
        rpo_alpha: float | None,
        shared_prompt: bool,
        sparse: bool,
        references: dict[str, np.ndarray],
        attention_span: float | None = None,
        reference_from_adapter: bool = False,
    ):
        self.module = PreferenceLoss(
            model,
            loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            rpo_alpha=rpo_alpha,
            sparse=sparse,
            reference_from_adapter=reference_from_adapter,
        )
        self.shared_prompt = shared_prompt  # the shared row is allowed (the probe, the config)
        self.attention_span = attention_span  # None: the shared row wherever allowed
        self.references = references  # split -> [pairs, 2] summed log-probs of chosen and rejected

    def count(self, batch: dict) -> float:
        return float(batch["pair_count"])

    def collate(self, split: str):
        """The collate function of `split`'s pairs, with their reference log-probs."""
        reference = self.references.get(split)

        def collate(pairs, indices, pad_id, pad_to_multiple_of=None):
            shared = takes_shared_row(pairs, indices, self.shared_prompt, self.attention_span, pad_to_multiple_of)
            batch = collate_pairs(pairs, indices, pad_id, pad_to_multiple_of, shared_prompt=shared)
            if reference is not None:
                order = batch["pair_index"].numpy()
                batch["ref_chosen"] = torch.from_numpy(reference[order, 0]).float()
                batch["ref_rejected"] = torch.from_numpy(reference[order, 1]).float()
            return batch

        return collate

    def train_record(self, sums: dict[str, float], seconds: float) -> dict:
        pairs = sums["pairs"]
        return {
            "loss": sums["loss_sum"] / pairs if pairs else 0.0,
            **_pair_means(sums, ""),
            "pairs": int(pairs),
            "pairs_per_second": pairs / seconds,
        }

    def eval_record(self, sums: dict[str, float]) -> dict:
        pairs = sums["pairs"]
        return {
            "eval_loss": sums["loss_sum"] / pairs if pairs else 0.0,
            **_pair_means(sums, "eval_"),
            "eval_pairs": int(pairs),
        }


def _pair_means(sums: dict[str, float], prefix: str) -> dict:
    pairs = sums["pairs"] or 1.0
    return {
        f"{prefix}rewards/chosen": sums["reward_chosen"] / pairs,
        f"{prefix}rewards/rejected": sums["reward_rejected"] / pairs,
        f"{prefix}rewards/accuracy": sums["correct"] / pairs,
        f"{prefix}rewards/margin": (sums["reward_chosen"] - sums["reward_rejected"]) / pairs,
        f"{prefix}logps/chosen": sums["logps_chosen"] / pairs,
        f"{prefix}logps/rejected": sums["logps_rejected"] / pairs,
        f"{prefix}nll": sums["nll_chosen"] / pairs,
    }


class KTOObjective:
    """KTO on unpaired examples (training/preference.py): a mean over the examples of the whole
    step. Before the step's forward passes, `start_step` estimates the KL reference point over the
    step's examples on all processes (a no-gradient forward of each prompt with its mismatched
    completion), so the step does not depend on how it is split; the examples then train on rows
    [prompt | completion]."""

    name = "kto"
    sums = ("loss_sum", "examples", "desirable", "reward_desirable", "reward_undesirable", "logps", "kl_sum")

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float,
        desirable_weight: float,
        undesirable_weight: float,
        sparse: bool,
        references: dict[str, np.ndarray],
        reference_from_adapter: bool = False,
    ):
        self.module = KTOLoss(
            model,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            sparse=sparse,
            reference_from_adapter=reference_from_adapter,
        )
        # split -> [examples, 2]: the completion's and the mismatched completion's; none when the
        # module computes them in each step (reference_from_adapter)
        self.references = references
        self._views: dict[int, tuple[Pairs, Pairs]] = {}

    def count(self, batch: dict) -> float:
        return float(batch["pair_count"])

    def _split(self, pairs: Pairs) -> tuple[Pairs, Pairs]:
        """(prompt + completion, prompt + mismatched completion) views of the examples, made once."""
        if id(pairs) not in self._views:
            empty = np.zeros(len(pairs) + 1, dtype=np.int64)
            nothing = np.zeros(0, dtype=pairs.rejected_ids.dtype)
            main = Pairs(
                pairs.prompt_ids,
                pairs.prompt_offsets,
                pairs.chosen_ids,
                pairs.chosen_offsets,
                nothing,
                empty,
                pairs.record_index,
            )
            kl = Pairs(
                pairs.prompt_ids,
                pairs.prompt_offsets,
                pairs.rejected_ids,
                pairs.rejected_offsets,
                nothing,
                empty,
                pairs.record_index,
            )
            self._views[id(pairs)] = (main, kl)
        return self._views[id(pairs)]

    def collate(self, split: str):
        reference = self.references.get(split)

        def collate(pairs, indices, pad_id, pad_to_multiple_of=None):
            main, kl = self._split(pairs)
            batch = collate_pairs(main, indices, pad_id, pad_to_multiple_of)
            order = batch["pair_index"].numpy()
            batch["desirable"] = torch.from_numpy(pairs.desirable[order])
            mismatched = collate_pairs(kl, indices, pad_id, pad_to_multiple_of)
            if reference is not None:
                batch["ref_chosen"] = torch.from_numpy(reference[order, 0]).float()
                mismatched["ref_chosen"] = torch.from_numpy(reference[order, 1]).float()
            # Not a tensor: the engine does not pass it to the forward; start_step does.
            batch["kl_inputs"] = {k: v for k, v in mismatched.items() if torch.is_tensor(v)}
            return batch

        return collate

    @torch.no_grad()
    def start_step(self, module: nn.Module, batches: list[dict], processes, autocast) -> None:
        """The step's KL reference point z0 = max(0, mean over its examples on every process of
        log pi(mismatched) - log ref(mismatched)), detached, given to each micro-batch as `kl`."""
        device = processes.device
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch["kl_inputs"].items()}
            with autocast:
                out = module(**inputs, kl_only=True)
            sums += torch.stack([out["kl_sum"].double(), out["kl_count"].double()]).cpu()
        total = processes.sum(sums)
        kl = max(float(total[0]) / max(float(total[1]), 1.0), 0.0)
        for batch in batches:
            batch["kl"] = torch.tensor(kl, dtype=torch.float32)

    def train_record(self, sums: dict[str, float], seconds: float) -> dict:
        return {
            "loss": sums["loss_sum"] / sums["examples"] if sums["examples"] else 0.0,
            **_kto_means(sums, ""),
            "examples": int(sums["examples"]),
            "examples_per_second": sums["examples"] / seconds,
        }

    def eval_record(self, sums: dict[str, float]) -> dict:
        return {
            "eval_loss": sums["loss_sum"] / sums["examples"] if sums["examples"] else 0.0,
            **_kto_means(sums, "eval_"),
            "eval_examples": int(sums["examples"]),
        }


def _kto_means(sums: dict[str, float], prefix: str) -> dict:
    examples, desirable = sums["examples"] or 1.0, sums["desirable"]
    undesirable = sums["examples"] - desirable
    return {
        f"{prefix}kl": sums["kl_sum"] / examples,
        f"{prefix}rewards/desirable": sums["reward_desirable"] / desirable if desirable else 0.0,
        f"{prefix}rewards/undesirable": sums["reward_undesirable"] / undesirable if undesirable else 0.0,
        f"{prefix}logps": sums["logps"] / examples,
    }
