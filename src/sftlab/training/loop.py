"""The training loop: one readable pass from config to final model, on Accelerate.

    setup: accelerator -> tokenizer -> examples -> model (+LoRA) -> step plan -> optimizer
    loop:  for each optimizer step:
             count the step's supervised tokens on every process (one all-reduce)
             for each micro-batch: loss = sum of CE / that count; backward (no DDP sync until the last)
             clip, optimizer step, scheduler step; log, evaluate, checkpoint
    end:   save_pretrained to output_dir/final (safetensors + tokenizer + chat template + config)

Features and their trade-offs:
- sparse loss (default): the LM head runs on supervised rows only, in chunks; large saving in
  time and memory when prompts are long or the vocabulary is big. `loss_implementation=dense`
  is the plain reference.
- packing: fewer, fuller rows (no padding compute); attention stays inside each example via
  position_ids, so results equal unpacked training.
- gradient accumulation / processes: the loss is normalised by the supervised tokens of the
  whole step, so 8x1, 2x4 and 2 processes x 4 give the same update.
- gradient checkpointing: ~30% slower, much less activation memory. bf16: autocast with fp32
  master weights (slow on CPUs without native bf16). LoRA through PEFT.

Distributed: launch with `accelerate launch` (DDP, FSDP, DeepSpeed from its config) or torchrun.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from sftlab.training import batching
from sftlab.training.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from sftlab.config import SFTConfig
from sftlab.data.splits import prepare_split
from sftlab.errors import ConfigError, DataError, TrainingError
from sftlab.data.examples import IGNORE, Examples
from sftlab.training.loss import SupervisedLoss, choose_loss_mode
from sftlab.models import load_model, load_tokenizer, resolve_model_path
from sftlab.training.progress import Reporter


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None
    global_step: int
    history: list[dict] = field(default_factory=list)  # every logged and eval record, as in metrics.jsonl


# --- setup ------------------------------------------------------------------------------------


def setup_accelerator(bf16: bool, report_to: list[str], output_dir: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings (mixed precision, ...) in a per-process singleton; a second
    # train() call in the same process (a notebook, a sweep) with other settings is refused
    # unless it is cleared. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    trackers = [name for name in report_to if importlib.util.find_spec(name) is not None]
    # Processes started by torchrun on a machine without a GPU: Accelerate joins them into one
    # (gloo) process group only when told to run on the CPU, as `accelerate launch --cpu` does;
    # otherwise each process trains alone on its share and writes as the main process.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_gpu()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else None, log_with=trackers or None, project_dir=output_dir)


def _has_gpu() -> bool:
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, XPU, MPS, ...
    return devices.is_available() if devices is not None else torch.cuda.is_available()


def setup_model(path: str, *, attn_implementation: str, trust_remote_code: bool, gradient_checkpointing: bool, lora: dict | None):
    model = load_model(path, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
    return model


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("use_peft=true needs the peft package", field="use_peft", fix="pip install 'sftlab[peft]'") from None
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"))


def setup_optimizer(model, *, learning_rate: float, weight_decay: float, betas: tuple[float, float], eps: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "norm" not in name.lower() else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update; on CPU 1.0-1.8 s -> 0.23 s per step for 135M weights (benchmarks/).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps, fused=fused)


def setup_scheduler(optimizer, kind: str, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class StepPlan:
    """Which items each optimizer step trains on; items are examples, or packed rows of examples."""

    def __init__(self, examples: Examples, *, packing: bool, max_length: int, batch_size: int, accumulation: int,
                 world_size: int, seed: int, group_by_length: bool, shuffle: bool = True):
        self.examples = examples
        self.packing = packing
        lengths = examples.lengths
        if packing:
            self.items = batching.best_fit_decreasing(lengths, max_length)
            self.item_lengths = np.array([int(lengths[row].sum()) for row in self.items], dtype=np.int64)
        else:
            self.items = None
            self.item_lengths = lengths
        self.accumulation = accumulation
        self.kwargs = dict(batch_size=batch_size, accumulation=accumulation, world_size=world_size, seed=seed,
                           group_by_length=group_by_length and not packing, shuffle=shuffle)
        self.steps_per_epoch = math.ceil(len(self.item_lengths) / (batch_size * accumulation * world_size))
        self._epoch, self._steps = None, None

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro-batches (item indices) for optimizer step `step`."""
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:
            self._epoch, self._steps = epoch, batching.plan_epoch(self.item_lengths, epoch=epoch, **self.kwargs)
        slots = self._steps[step % self.steps_per_epoch]
        return slots[rank * self.accumulation : (rank + 1) * self.accumulation]

    def collate(self, items: list[int], pad_id: int, pad_to_multiple_of: int | None) -> dict:
        if self.packing:
            return batching.pack_batch(self.examples, [self.items[i] for i in items], pad_id, pad_to_multiple_of)
        return batching.pad_batch(self.examples, items, pad_id, pad_to_multiple_of)


def total_steps(config: SFTConfig, steps_per_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_per_epoch))


def pad_token_id(tokenizer) -> int:
    # Pads are never attended to and never targets, so any id works when the tokenizer has no pad token.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


# --- the loop ---------------------------------------------------------------------------------


def train(
    config: SFTConfig,
    *,
    model=None,
    tokenizer=None,
    train_dataset=None,
    eval_dataset=None,
    optimizer=None,
    lr_scheduler=None,
) -> TrainResult:
    """Train as `config` says. `model`/`tokenizer` objects and any data source accepted by
    `load_records` may be passed instead of paths; `optimizer` may be an optimizer built on the
    model's parameters or a function params -> optimizer; `lr_scheduler` likewise (optimizer -> scheduler)."""
    accelerator = setup_accelerator(config.bf16, config.report_to, config.output_dir)
    from accelerate.utils import set_seed

    set_seed(config.seed)
    _check_output_dir(config.output_dir, accelerator.is_main_process)
    reporter = Reporter(config.output_dir, enabled=accelerator.is_main_process, append=bool(config.resume_from_checkpoint))
    missing = [name for name in config.report_to if importlib.util.find_spec(name) is None]
    if missing:
        reporter.line(f"report_to: {missing} not installed, metrics go to metrics.jsonl only (pip install {' '.join(missing)})")
    if len(missing) < len(config.report_to):
        accelerator.init_trackers("sftlab", config={k: v for k, v in config.model_dump().items() if isinstance(v, (int, float, str, bool))})
    rank, world = accelerator.process_index, accelerator.num_processes

    model_path = None
    if model is None or tokenizer is None:
        if not config.model:
            raise ConfigError("no model given", field="model", fix="set model: to a local folder, a .gguf file or a short name")
        with accelerator.main_process_first():
            model_path = resolve_model_path(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer or model_path, config.trust_remote_code)

    # No barrier around preparation: the process that takes a cache entry's lock builds it while
    # the others wait on the lock (no collective timeout), then every process maps the same entry.
    train_examples = prepare_split(config, tokenizer, source=train_dataset)
    eval_examples = None
    if eval_dataset is not None or config.eval_data:
        eval_examples = prepare_split(config, tokenizer, eval=True, source=eval_dataset)
    reporter.data_summary("train", train_examples.stats)
    if eval_examples is not None:
        reporter.data_summary("eval", eval_examples.stats)
    if len(train_examples) == 0:
        raise DataError("no training examples left", source=train_examples.stats.get("source"),
                        found=f"dropped: {train_examples.stats.get('dropped')}",
                        fix="raise max_length, use truncation=right, or check which tokens are supervised with `sftlab inspect`")

    if model is None:
        lora = dict(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules) if config.use_peft else None
        model = setup_model(model_path, attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code,
                            gradient_checkpointing=config.gradient_checkpointing, lora=lora)
    model.train()

    plan = StepPlan(train_examples, packing=config.packing, max_length=config.max_length,
                    batch_size=config.per_device_train_batch_size, accumulation=config.gradient_accumulation_steps,
                    world_size=world, seed=config.seed, group_by_length=config.group_by_length, shuffle=config.shuffle)
    steps = total_steps(config, plan.steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * steps)
    pad_id = pad_token_id(tokenizer)

    if optimizer is None:
        optimizer = setup_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                    betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    if lr_scheduler is None:
        lr_scheduler = setup_scheduler(optimizer, config.lr_scheduler_type, steps, warmup)
    elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(optimizer)

    first = plan.collate(plan.micro_batches(0, 0)[0] or [0], pad_id, None)
    mode, why = choose_loss_mode(model, first, config.loss_implementation)
    reporter.line(f"loss: {mode} ({why})")
    wrapper, optimizer = accelerator.prepare(SupervisedLoss(model, mode), optimizer)
    parameters = [p for p in model.parameters() if p.requires_grad]

    start_step = 0
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
        if checkpoint is not None:
            start_step = load_checkpoint(checkpoint, model, optimizer, lr_scheduler, rank)["step"]
            reporter.line(f"resumed from {checkpoint} at step {start_step}")
            reporter.forget_after(start_step)
        else:
            reporter.line("resume_from_checkpoint=auto: no complete checkpoint yet, starting from step 0")

    reporter.start(total=steps, done=start_step)
    window = _Window()
    for step in range(start_step, steps):
        micro = plan.micro_batches(step, rank)
        batches = [plan.collate(items, pad_id, config.pad_to_multiple_of) for items in micro]
        # The loss of every micro-batch is divided by the supervised tokens of the whole step on
        # all processes; DDP then averages gradients over processes, hence the world factor.
        local = torch.tensor([float((b["targets"] != IGNORE).sum()) for b in batches]).sum()
        step_count = float(accelerator.reduce(local.to(accelerator.device), reduction="sum"))
        normalizer = max(step_count, 1.0) / world
        lr = lr_scheduler.get_last_lr()[0]
        parts = []  # per micro-batch: loss_sum, supervised, correct, tokens, empty; one device sync per step
        for j, batch in enumerate(batches):
            sync = contextlib.nullcontext() if j == len(batches) - 1 else accelerator.no_sync(wrapper)
            inputs = {k: v.to(accelerator.device) for k, v in batch.items() if torch.is_tensor(v)}
            with sync:
                out = wrapper(**inputs)
                accelerator.backward(out["loss_sum"] / normalizer)
            count = out["count"].double()
            parts.append(torch.stack([out["loss_sum"].detach().double(), count, out["correct"].double(),
                                      count.new_tensor(batch["real_tokens"]), (count == 0).double()]))
        sums = accelerator.reduce(torch.stack(parts).sum(0), reduction="sum").cpu()
        grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm or float("inf"))
        if not (math.isfinite(float(sums[0])) and math.isfinite(float(grad_norm))):
            records = sorted({i for b in batches for i in b["record_index"]})
            if not config.skip_nonfinite_steps:
                raise TrainingError(
                    f"non-finite loss at step {step + 1}",
                    found=f"loss sum {float(sums[0])}, grad norm {float(grad_norm)}; records in this step on process {rank}: {records[:20]}",
                    fix="inspect those records; lower learning_rate; or set skip_nonfinite_steps=true to skip such steps",
                )
            optimizer.zero_grad(set_to_none=True)
            window.skipped += 1
            reporter.line(f"step {step + 1}: non-finite loss, optimizer step skipped (records {records[:20]})")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        window.add(sums, float(grad_norm))
        done = step + 1
        reporter.advance(done)
        if done % config.logging_steps == 0 or done == steps:
            record = window.flush(step=done, epoch=done / plan.steps_per_epoch, lr=lr)
            reporter.log(record)
            if accelerator.trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
        if eval_examples is not None and ((config.eval_steps and done % config.eval_steps == 0) or done == steps):
            record = evaluate(accelerator.unwrap_model(wrapper), eval_examples, config.per_device_eval_batch_size, pad_id, accelerator)
            record.update(type="eval", step=done)
            reporter.log(record)
        if config.save_steps and done % config.save_steps == 0 and done < steps:
            save_checkpoint(config.output_dir, done, model, optimizer, lr_scheduler, {"epoch": done / plan.steps_per_epoch},
                            rank, accelerator.is_main_process)
            if accelerator.is_main_process:
                prune_checkpoints(config.output_dir, config.save_total_limit)
    reporter.finish()

    final_dir = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_dir = export_final(accelerator.unwrap_model(wrapper).model, tokenizer, config)
        reporter.line(f"saved {final_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(config.output_dir, final_dir, steps, reporter.history)


class _Window:
    """Sums over the steps since the last log line; loss = summed CE / summed supervised tokens."""

    def __init__(self):
        self.sums = torch.zeros(5, dtype=torch.float64)
        self.grad_norm = 0.0
        self.steps = 0
        self.skipped = 0
        self.started = time.perf_counter()

    def add(self, sums: torch.Tensor, grad_norm: float) -> None:
        self.sums += sums
        self.grad_norm = grad_norm
        self.steps += 1

    def flush(self, step: int, epoch: float, lr: float) -> dict:
        loss_sum, supervised, correct, tokens, empty = (float(x) for x in self.sums)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "type": "train",
            "step": step,
            "epoch": round(epoch, 4),
            "loss": loss_sum / supervised if supervised else 0.0,
            "token_accuracy": correct / supervised if supervised else 0.0,
            "learning_rate": lr,
            "grad_norm": self.grad_norm,
            "supervised_tokens": int(supervised),
            "tokens": int(tokens),
            "tokens_per_second": tokens / seconds,
            "supervised_tokens_per_second": supervised / seconds,
            "empty_micro_batches": int(empty),
            "skipped_steps": self.skipped,
            "seconds": seconds,
        }
        self.__init__()
        return record


@torch.no_grad()
def evaluate(loss_module: SupervisedLoss, examples: Examples, batch_size: int, pad_id: int, accelerator) -> dict:
    """Eval loss (summed CE / supervised tokens over the whole set), perplexity, token accuracy."""
    was_training = loss_module.training
    loss_module.eval()
    order = sorted(range(len(examples)), key=lambda i: -int(examples.lengths[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    sums = torch.zeros(3, dtype=torch.float64)
    for items in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = batching.pad_batch(examples, items, pad_id)
        inputs = {k: v.to(accelerator.device) for k, v in batch.items() if torch.is_tensor(v)}
        with accelerator.autocast():
            out = loss_module(**inputs)
        sums += torch.tensor([float(out["loss_sum"]), float(out["count"]), float(out["correct"])], dtype=torch.float64)
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    loss_module.train(was_training)
    loss_sum, count, correct = (float(x) for x in sums)
    loss = loss_sum / count if count else 0.0
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_token_accuracy": correct / count if count else 0.0,
            "eval_supervised_tokens": int(count)}


# --- output -----------------------------------------------------------------------------------


def _check_output_dir(path: str, is_main: bool) -> None:
    if not is_main:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".sftlab-write-test")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError("output_dir is not writable", source=path, field="output_dir",
                          found=error.strerror or str(error), fix="choose a folder you can write to") from None


def export_final(model, tokenizer, config: SFTConfig) -> str:
    """output_dir/final: save_pretrained (safetensors), tokenizer + chat template, the config used;
    with LoRA the adapter, and on request the merged model in final/merged. Written under a
    temporary name and renamed, so `final/` is always complete."""
    final = os.path.join(config.output_dir, "final")
    tmp = os.path.join(config.output_dir, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "sftlab_config.yaml"), "w") as handle:
            yaml.safe_dump(config.model_dump(), handle, sort_keys=False)
        if config.use_peft and config.merge_lora and hasattr(model, "merge_and_unload"):
            merged = os.path.join(tmp, "merged")
            model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
            tokenizer.save_pretrained(merged)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError("cannot write the final model", source=final, found=error.strerror or str(error),
                            fix="free disk space or make output_dir writable") from None
    return final
