"""One optimizer step: the step's micro-batches in, the updated weights and the step's sums out.

start     the objective's start_step, when it has one (KTO estimates its KL reference point
          over the whole step before any loss is computed)
count     each micro-batch's normaliser (objectives.py), summed over the step on all processes
forward   the objective's loss module on each micro-batch; backward of loss_sum / count, plus
          aux_loss / micro-batches when the module returns one (a per-forward mean such as a
          MoE router's load-balancing loss: DDP's average over processes then makes it the mean
          over all the step's forwards); DDP's gradient all-reduce waits for the last micro-batch
sums      the objective's sums, the tokens and empty micro-batches, and the stop flag, summed
          over processes in one all-reduce, so every process sees a stop signal at the same step
update    gradient norm (and clipping), a non-finite check, optimizer step, scheduler step
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sftlab.errors import TrainingError
from sftlab.training import parallelize
from sftlab.training.distributed import Processes
from sftlab.training.objectives import Objective, stacked_sums

# What the engine itself counts for every micro-batch, after the objective's sums.
ENGINE_SUMS = ("tokens", "empty_micro_batches", "forwards")


@dataclass
class StepResult:
    sums: dict[str, float]  # the objective's sums and ENGINE_SUMS, over the step's micro-batches and all processes
    grad_norm: float
    learning_rate: float  # the rate this step's update used
    stop: bool  # a stop signal reached one of the processes
    skipped: bool = False  # the loss or the gradient was not finite and skip_nonfinite_steps skipped the update
    records: list[int] = field(default_factory=list)  # when skipped: the records of this process's micro-batches


def train_step(
    wrapper: nn.Module,
    objective: Objective,
    batches: list[dict],
    *,
    processes: Processes,
    optimizer,
    lr_scheduler,
    parameters: list[torch.Tensor],
    max_grad_norm: float | None,
    autocast,
    stop_requested=lambda: False,
    stepper=None,
    skip_nonfinite: bool = False,
    step: int = 0,
    saved_activations=None,
) -> StepResult:
    """Run optimizer step `step` (0-based) on this process's micro-batches. `wrapper` is the
    objective's module as replicated or sharded; `stepper`: optimizer_in_backward's hooks, which
    have already updated the weights by the end of backward. `stop_requested()`: whether a stop
    signal reached this process, asked after the backward passes, when the step's sums are reduced.
    `saved_activations`: the context each forward runs in (offloading.py's activation offloading)."""
    saved_activations = saved_activations or contextlib.nullcontext()
    start = getattr(objective, "start_step", None)
    if start is not None:  # what the objective needs from the whole step first (KTO: its KL reference point)
        start(wrapper, batches, processes, autocast)
    # The loss of every micro-batch is divided by the count of the whole step on all processes;
    # DDP and FSDP then average gradients over processes, hence the world factor.
    local = torch.tensor([sum(objective.count(batch) for batch in batches)], dtype=torch.float64)
    step_count = float(processes.sum(local)[0])
    normalizer = max(step_count, 1.0) / processes.world
    learning_rate = lr_scheduler.get_last_lr()[0]
    parts = []
    for j, batch in enumerate(batches):
        inputs = {k: v.to(processes.device) for k, v in batch.items() if torch.is_tensor(v)}
        with parallelize.accumulating(wrapper, last=j == len(batches) - 1):
            with autocast, saved_activations:
                out = wrapper(**inputs)
            loss = out["loss_sum"] / normalizer
            if "aux_loss" in out:  # a mean per forward (MoE load balancing): averaged over the step's forwards
                loss = loss + out["aux_loss"] / len(batches)
            loss.backward()
        # With sequence parallelism a micro-batch is one forward shared by its sequence group: the
        # group's first process counts it (sequence.shard_batch), every process its own tokens.
        share = batch.get("micro_batch_share", 1.0)
        empty = batch.get("empty", objective.count(batch) == 0)
        engine = torch.tensor([float(batch["real_tokens"]), share * float(empty), share], dtype=torch.float64)
        parts.append(torch.cat([stacked_sums(objective, out), engine.to(out["loss_sum"].device)]))
    flag = torch.tensor([float(stop_requested())], dtype=torch.float64, device=parts[0].device)
    summed = processes.sum(torch.cat([torch.stack(parts).sum(0), flag]))
    sums = dict(zip(objective.sums + ENGINE_SUMS, summed[:-1].tolist()))
    stop = bool(summed[-1] > 0)

    grad_norm = stepper.take_grad_norm() if stepper else parallelize.clip_gradients(parameters, max_grad_norm)
    skipped, records = False, []
    if not (math.isfinite(sums["loss_sum"]) and math.isfinite(grad_norm)):
        records = sorted({i for batch in batches for i in batch["record_index"]})
        if not skip_nonfinite:
            raise TrainingError(
                f"non-finite loss at step {step + 1}",
                found=f"loss sum {sums['loss_sum']}, grad norm {grad_norm}; records in this step on process {processes.rank}: "
                f"{records[:20]}",
                fix="inspect those records; lower learning_rate; or set skip_nonfinite_steps=true to skip such steps",
            )
        optimizer.zero_grad(set_to_none=True)
        skipped = True
    elif stepper is None:  # with optimizer_in_backward the parameters were updated in backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return StepResult(sums, grad_norm, learning_rate, stop, skipped, records)
