"""The training loop: one readable pass from config to final model.

    setup: processes -> tokenizer -> examples -> model (+LoRA) -> step plan -> loss mode
           -> replicate (DDP) or shard (FSDP2) -> optimizer -> resume
    loop:  for each optimizer step:
             count the step's supervised tokens on every process (one all-reduce)
             for each micro-batch: loss = sum of CE / that count; backward (DDP: no sync until the last)
             sum the step's metrics (and any stop signal) over processes; clip, optimizer step,
             scheduler step; log, evaluate, checkpoint; on SIGTERM/SIGUSR1 checkpoint and return
    end:   save_pretrained to output_dir/final (safetensors + tokenizer + chat template + config),
           full tensors gathered on the main process when sharded

Features and their trade-offs:
- sparse loss (default): the LM head runs on supervised rows only, in chunks; large saving in
  time and memory when prompts are long or the vocabulary is big. `loss_implementation=dense`
  is the plain reference.
- packing: fewer, fuller rows (no padding compute); attention stays inside each example via
  position_ids, so results equal unpacked training.
- gradient accumulation / processes: the loss is normalised by the supervised tokens of the
  whole step, so 8x1, 2x4 and 2 processes x 4 give the same update.
- fsdp: weights, gradients and optimizer state sharded over the processes (FSDP2): memory per
  process falls with their number, at the cost of gathering each layer's weights in forward and
  backward. Checkpoints are sharded and reshard onto any number of processes.
- gradient checkpointing: ~30% slower, much less activation memory. bf16: autocast with fp32
  master weights (with fsdp: bf16 compute copies, fp32 reduction; slow on CPUs without native
  bf16). LoRA through PEFT.

Distributed: launch with torchrun (or `accelerate launch`, used as a launcher only); see parallelize.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from sftlab.training import batching, distributed, evaluation, export, parallelize, setup
from sftlab.training.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from sftlab.config import SFTConfig
from sftlab.data.splits import prepare_split
from sftlab.errors import ConfigError, DataError, TrainingError
from sftlab.data.examples import IGNORE
from sftlab.training.loss import SupervisedLoss, choose_loss_mode
from sftlab.training.optimizer import StepInBackward
from sftlab.models import load_tokenizer, resolve_model_path
from sftlab.training.progress import MetricsWindow, Reporter


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None
    global_step: int
    history: list[dict] = field(default_factory=list)  # every logged and eval record, as in metrics.jsonl
    stopped_by: str | None = None  # 'SIGTERM' / 'SIGUSR1' when a signal stopped the run after a checkpoint


# --- setup ------------------------------------------------------------------------------------


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
    bf16 = distributed.launcher_precision(config.bf16)
    processes = distributed.start_processes(config.fsdp)
    try:
        with distributed.Preemption() as preemption:
            return _train(config, processes, preemption, bf16, model, tokenizer, train_dataset, eval_dataset, optimizer, lr_scheduler)
    finally:
        processes.close()


def _train(config, processes, preemption, bf16, model, tokenizer, train_dataset, eval_dataset, optimizer, lr_scheduler) -> TrainResult:
    if config.fsdp and config.use_peft and config.merge_lora:
        raise ConfigError("merge_lora is not available with fsdp: true (the merge needs the whole model in one process)",
                          field="merge_lora", fix="merge final/ afterwards in one process: PeftModel.from_pretrained(base, final).merge_and_unload()")
    distributed.seed_everything(config.seed)
    export.check_output_dir(config.output_dir, processes.is_main)
    reporter = Reporter(config.output_dir, enabled=processes.is_main, append=bool(config.resume_from_checkpoint),
                        report_to=config.report_to, run_config=config.model_dump())
    rank, world = processes.rank, processes.world

    model_path = None
    if model is None or tokenizer is None:
        if not config.model:
            raise ConfigError("no model given", field="model", fix="set model: to a local folder, a .gguf file or a short name")
        with processes.local_main_first():
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
        model = setup.setup_model(model_path, attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code,
                            gradient_checkpointing=config.gradient_checkpointing, lora=setup.lora_settings(config),
                            quantization=setup.quantization_settings(config))
        if setup.converts_base(config) and processes.is_main:
            setup.save_initial_adapter(model, config.output_dir)
    model.train()

    plan = batching.StepPlan(train_examples, packing=config.packing, max_length=config.max_length,
                    batch_size=config.per_device_train_batch_size, accumulation=config.gradient_accumulation_steps,
                    world_size=world, seed=config.seed, group_by_length=config.group_by_length, shuffle=config.shuffle)
    steps = total_steps(config, plan.steps_per_epoch)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * steps)
    pad_id = pad_token_id(tokenizer)
    items_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world

    # The loss mode is chosen on the whole model, before it is sharded (the check runs no collective).
    first = plan.collate(plan.micro_batches(0, 0)[0] or [0], pad_id, None)
    mode, why = choose_loss_mode(model, first, config.loss_implementation)
    reporter.line(f"loss: {mode} ({why})" + (", dft (each token's CE scaled by its detached probability)" if config.loss_type == "dft" else ""))
    loss_module = SupervisedLoss(model, mode, config.loss_type, config.neftune_noise_alpha)
    if config.torch_compile:
        layers = setup.compile_layers(model)
        reporter.line(f"torch_compile: {layers} decoder layers compiled (the first step compiles them)")
    if config.fsdp:
        wrapper = parallelize.shard_model(loss_module, processes, reshard_after_forward=config.fsdp_reshard_after_forward,
                                       cpu_offload=config.fsdp_cpu_offload, bf16=bf16)
        reporter.line(f"fsdp: {len(parallelize.decoder_layers(model))} decoder layers and the root sharded over {world} processes")
    else:
        wrapper = parallelize.replicate_model(loss_module, processes)
    # FSDP's bf16 is its mixed-precision policy (bf16 weights in compute); otherwise autocast.
    autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=bf16 and not config.fsdp)

    # The optimizer is built on the parameters as they are now: FSDP's shards or the replicas.
    if optimizer is None:
        optimizer = setup.setup_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                    betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                    state_dtype=config.optimizer_state_dtype)
    elif isinstance(optimizer, torch.optim.Optimizer) and config.fsdp:
        raise ConfigError("fsdp: true replaces the model's parameters by their shards, so an optimizer built beforehand "
                          "would step the old ones", field="optimizer", fix="pass a function params -> optimizer instead")
    elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    if lr_scheduler is None:
        lr_scheduler = setup.setup_scheduler(optimizer, config.lr_scheduler_type, steps, warmup)
    elif callable(lr_scheduler) and not hasattr(lr_scheduler, "step"):
        lr_scheduler = lr_scheduler(optimizer)
    parameters = [p for p in model.parameters() if p.requires_grad]
    stepper = None
    if config.optimizer_in_backward:
        setup.check_optimizer_in_backward(config, world)
        stepper = StepInBackward(parameters, optimizer)

    start_step = 0
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
        if checkpoint is not None:
            written = load_checkpoint(checkpoint, model, optimizer, lr_scheduler, processes, items_per_step)
            start_step = written["step"]
            by = written.get("processes", 1)
            reporter.line(f"resumed from {checkpoint} at step {start_step}" + (f" (written by {by} processes, now {world})" if by != world else ""))
            reporter.forget_after(start_step)
        else:
            reporter.line("resume_from_checkpoint=auto: no complete checkpoint yet, starting from step 0")

    generation = None
    if config.eval_generate_samples:
        generation = evaluation.setup_generation_eval(config, tokenizer, eval_dataset, processes, reporter, start_step)

    def checkpoint_at(done: int) -> str:
        state = {"epoch": done / plan.steps_per_epoch, "items_per_step": items_per_step, "processes": world}
        path = save_checkpoint(config.output_dir, done, model, optimizer, lr_scheduler, state, processes)
        if processes.is_main:
            prune_checkpoints(config.output_dir, config.save_total_limit)
        return path

    reporter.start(total=steps, done=start_step)
    window = MetricsWindow()
    for step in range(start_step, steps):
        micro = plan.micro_batches(step, rank)
        batches = [plan.collate(items, pad_id, config.pad_to_multiple_of) for items in micro]
        # The loss of every micro-batch is divided by the supervised tokens of the whole step on
        # all processes; DDP and FSDP then average gradients over processes, hence the world factor.
        local = torch.tensor([float((b["targets"] != IGNORE).sum()) for b in batches]).sum()
        step_count = float(processes.sum(local))
        normalizer = max(step_count, 1.0) / world
        lr = lr_scheduler.get_last_lr()[0]
        parts = []  # per micro-batch: loss_sum, supervised, correct, tokens, empty, nll_sum; one device sync per step
        for j, batch in enumerate(batches):
            inputs = {k: v.to(processes.device) for k, v in batch.items() if torch.is_tensor(v)}
            with parallelize.accumulating(wrapper, last=j == len(batches) - 1):
                with autocast:
                    out = wrapper(**inputs)
                (out["loss_sum"] / normalizer).backward()
            count = out["count"].double()
            parts.append(torch.stack([out["loss_sum"].detach().double(), count, out["correct"].double(),
                                      count.new_tensor(batch["real_tokens"]), (count == 0).double(), out["nll_sum"].double()]))
        # A stop signal travels with the step's sums, so every process sees it at the same step.
        sums = processes.sum(torch.cat([torch.stack(parts).sum(0), torch.tensor([float(preemption.received)], dtype=torch.float64,
                                                                                 device=parts[0].device)]))
        sums, stop = sums[:6], bool(sums[6] > 0)
        grad_norm = stepper.take_grad_norm() if stepper else parallelize.clip_gradients(parameters, config.max_grad_norm)
        if not (math.isfinite(float(sums[0])) and math.isfinite(grad_norm)):
            records = sorted({i for b in batches for i in b["record_index"]})
            if not config.skip_nonfinite_steps:
                raise TrainingError(
                    f"non-finite loss at step {step + 1}",
                    found=f"loss sum {float(sums[0])}, grad norm {grad_norm}; records in this step on process {rank}: {records[:20]}",
                    fix="inspect those records; lower learning_rate; or set skip_nonfinite_steps=true to skip such steps",
                )
            optimizer.zero_grad(set_to_none=True)
            window.skipped += 1
            reporter.line(f"step {step + 1}: non-finite loss, optimizer step skipped (records {records[:20]})")
        elif stepper is None:  # with optimizer_in_backward the parameters were updated in backward
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        window.add(sums, grad_norm)
        done = step + 1
        reporter.advance(done)
        if done % config.logging_steps == 0 or done == steps or (stop and done < steps):
            reporter.log(window.flush(step=done, epoch=done / plan.steps_per_epoch, lr=lr, nll=config.loss_type != "nll"))
        if stop and done < steps:
            path = checkpoint_at(done)
            # A process the signal did not reach stops too: another one got it.
            signal_name = preemption.name or "a stop signal to another process"
            reporter.line(f"{signal_name} received: stopped after step {done} of {steps}, checkpoint {path}; "
                          f"resume with resume_from_checkpoint=auto")
            reporter.finish()
            return TrainResult(config.output_dir, None, done, reporter.history, stopped_by=signal_name)
        if eval_examples is not None and ((config.eval_steps and done % config.eval_steps == 0) or done == steps):
            evaluating = time.perf_counter()
            record = evaluation.evaluate(parallelize.unwrap(wrapper), eval_examples, config.per_device_eval_batch_size, pad_id, processes, autocast)
            if generation is not None:
                record.update(generation.run(model, wrapper if config.fsdp else None, processes, autocast, step=done))
            record.update(type="eval", step=done)
            reporter.log(record)
            window.started += time.perf_counter() - evaluating  # tokens/s measures training, not evaluation
        if config.save_steps and done % config.save_steps == 0 and done < steps:
            checkpoint_at(done)
    reporter.finish()

    # Gathered on the main process when sharded (a collective: every process takes part).
    state = parallelize.full_state_dict(model, processes) if config.fsdp else None
    final_dir = None
    if processes.is_main:
        final_dir = export.export_final(model, tokenizer, config, state)
        reporter.line(f"saved {final_dir}")
    processes.barrier()
    return TrainResult(config.output_dir, final_dir, steps, reporter.history)


# --- output -----------------------------------------------------------------------------------


