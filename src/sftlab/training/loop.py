"""The training loop: one readable pass from config to final model.

    setup: processes -> tokenizer -> examples -> model (+LoRA) -> step plan -> objective (loss mode)
           -> replicate (DDP) or shard (FSDP2) -> optimizer -> resume        (_setup, setup.py)
    loop:  for each optimizer step: train_step (step.py: count, forward/backward per micro-batch,
           sums over processes, clip, optimizer and scheduler step); log, evaluate, checkpoint;
           on SIGTERM/SIGUSR1 checkpoint and return
    end:   save_pretrained to output_dir/final (safetensors + tokenizer + chat template + config),
           full tensors gathered on the main process when sharded              (export.py)

What is optimised is the objective's business (objectives.py): the loop never looks inside a batch.

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

Distributed: launch with torchrun (or `accelerate launch`, used as a launcher only); see distributed.py and parallelize.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sftlab.config import SFTConfig
from sftlab.data.chat_tokens import add_chat_tokens
from sftlab.data.container import Examples, Pairs
from sftlab.data.special_tokens import pad_token_id
from sftlab.data.splits import prepare_split
from sftlab.errors import ConfigError, DataError
from sftlab.files import cache_root
from sftlab.models import load_tokenizer, resolve_model_path
from sftlab.training import batching, distributed, evaluation, export, offloading, parallelize, sequence, setup
from sftlab.training.architecture import packing_isolation
from sftlab.training.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from sftlab.training.identity import CHANGEABLE, differences, run_identity
from sftlab.training.loss import choose_loss_mode
from sftlab.training.objectives import (
    KTOObjective,
    Objective,
    PreferenceObjective,
    SupervisedObjective,
    returns_router_loss,
)
from sftlab.training.optimizer import StepInBackward
from sftlab.training.preference import (
    REFERENCE_FREE,
    attention_span,
    choose_layout,
    reference_log_probs,
    stored_reference_log_probs,
)
from sftlab.training.progress import MetricsWindow, Reporter
from sftlab.training.step import train_step


@dataclass
class TrainResult:
    output_dir: str
    final_dir: str | None
    global_step: int
    history: list[dict] = field(default_factory=list)  # every logged and eval record, as in metrics.jsonl
    stopped_by: str | None = None  # 'SIGTERM' / 'SIGUSR1' when a signal stopped the run after a checkpoint


@dataclass
class Run:
    """Everything setup builds, for the loop to use."""

    reporter: Reporter
    tokenizer: object
    model: nn.Module  # the causal LM (a PEFT model with LoRA); under fsdp its parameters are shards
    plan: batching.StepPlan
    steps: int
    objective: Objective
    wrapper: nn.Module  # the objective's module as replicated (DDP) or sharded (FSDP2)
    autocast: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    parameters: list[torch.Tensor]  # the trained ones, for clipping
    stepper: StepInBackward | None
    pad_id: int
    eval_examples: Examples | None
    identity: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed (identity.py)
    generation: evaluation.GenerationEval | None = None
    start_step: int = 0
    sequence: sequence.SequenceParallel | None = None  # rows split over a group of processes
    saved_activations: object = field(default_factory=contextlib.nullcontext)  # offloading.py, around each forward


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
    processes = distributed.start_processes(config.fsdp, config.sequence_parallel_size)
    try:
        with distributed.Preemption() as preemption:
            run = _setup(
                config,
                processes,
                bf16,
                model=model,
                tokenizer=tokenizer,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
            )
            return _fit(config, run, processes, preemption)
    finally:
        processes.close()


def _fit(config: SFTConfig, run: Run, processes, preemption) -> TrainResult:
    reporter, plan = run.reporter, run.plan
    reporter.start(total=run.steps, done=run.start_step)
    window = MetricsWindow(run.objective)
    for step in range(run.start_step, run.steps):
        micro = plan.micro_batches(step, processes.data_rank)
        batches = [_collate(config, run, processes, items) for items in micro]
        result = train_step(
            run.wrapper,
            run.objective,
            batches,
            processes=processes,
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            parameters=run.parameters,
            max_grad_norm=config.max_grad_norm,
            autocast=run.autocast,
            stop_requested=lambda: preemption.received,
            stepper=run.stepper,
            skip_nonfinite=config.skip_nonfinite_steps,
            step=step,
            saved_activations=run.saved_activations,
        )
        if result.skipped:
            reporter.line(f"step {step + 1}: non-finite loss, optimizer step skipped (records {result.records[:20]})")
        window.add(result.sums, result.grad_norm, result.skipped)
        done = step + 1
        reporter.advance(done)
        stopping = result.stop and done < run.steps
        if done % config.logging_steps == 0 or done == run.steps or stopping:
            reporter.log(window.flush(step=done, epoch=done / plan.steps_per_epoch, lr=result.learning_rate))
        if stopping:
            path = _checkpoint(config, run, processes, done)
            # A process the signal did not reach stops too: another one got it.
            signal_name = preemption.name or "a stop signal to another process"
            reporter.line(
                f"{signal_name} received: stopped after step {done} of {run.steps}, checkpoint {path}; "
                f"resume with resume_from_checkpoint=auto"
            )
            reporter.finish()
            return TrainResult(config.output_dir, None, done, reporter.history, stopped_by=signal_name)
        if run.eval_examples is not None and (
            (config.eval_steps and done % config.eval_steps == 0) or done == run.steps
        ):
            evaluating = time.perf_counter()
            reporter.log(_evaluate(config, run, processes, done))
            window.pause(time.perf_counter() - evaluating)  # tokens/s measures training, not evaluation
        if config.save_steps and done % config.save_steps == 0 and done < run.steps:
            _checkpoint(config, run, processes, done)
    # Gathered on the main process when sharded (a collective: every process takes part).
    state = parallelize.full_state_dict(run.model, processes) if config.fsdp else None
    final_dir = None
    if processes.is_main:
        final_dir = export.export_final(run.model, run.tokenizer, config, state)
        reporter.line(f"saved {final_dir}")
    reporter.finish()
    processes.barrier()
    return TrainResult(config.output_dir, final_dir, run.steps, reporter.history)


def _collate(config: SFTConfig, run: Run, processes, items: list[int]) -> dict:
    """A micro-batch as this process trains it: the whole batch, or with sequence parallelism its
    1/N of every row (rows padded to a length that divides by N)."""
    if processes.sequence_size == 1:
        return run.plan.collate(items, run.pad_id, config.pad_to_multiple_of)
    multiple = math.lcm(config.pad_to_multiple_of or 1, processes.sequence_size)
    batch = run.plan.collate(items, run.pad_id, multiple)
    return sequence.shard_batch(batch, processes.sequence_rank, processes.sequence_size)


def _evaluate(config: SFTConfig, run: Run, processes, done: int) -> dict:
    collate = run.objective.collate("eval") if hasattr(run.objective, "collate") else batching.pad_batch
    if processes.sequence_size > 1:
        multiple = math.lcm(config.pad_to_multiple_of or 1, processes.sequence_size)

        def collate(examples, indices, pad_id):  # the whole batch padded to divide, then this process's shard
            batch = batching.pad_batch(examples, indices, pad_id, multiple)
            return sequence.shard_batch(batch, processes.sequence_rank, processes.sequence_size)

    record = evaluation.evaluate(
        parallelize.unwrap(run.wrapper),
        run.objective,
        run.eval_examples,
        config.per_device_eval_batch_size,
        run.pad_id,
        processes,
        run.autocast,
        collate=collate,
    )
    if run.generation is not None:  # whole sequences: the model's own attention, even under sequence parallelism
        with run.sequence.model_attention() if run.sequence else contextlib.nullcontext():
            record.update(
                run.generation.run(run.model, run.wrapper if config.fsdp else None, processes, run.autocast, step=done)
            )
    record.update(type="eval", step=done)
    return record


def _checkpoint(config: SFTConfig, run: Run, processes, done: int) -> str:
    state = {
        "epoch": done / run.plan.steps_per_epoch,
        "items_per_step": _items_per_step(config, processes),
        "processes": processes.world,
        "run": run.identity,
    }
    path = save_checkpoint(config.output_dir, done, run.model, run.optimizer, run.lr_scheduler, state, processes)
    if processes.is_main:
        prune_checkpoints(config.output_dir, config.save_total_limit)
    return path


def _items_per_step(config: SFTConfig, processes) -> int:
    # A sequence group trains one stream of micro-batches: the data-parallel width counts.
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * processes.data_world


# --- setup ------------------------------------------------------------------------------------


def _setup(
    config: SFTConfig, processes, bf16: bool, *, model, tokenizer, train_dataset, eval_dataset, optimizer, lr_scheduler
) -> Run:
    """The recipe's setup, in the order it happens; each step is a small function of its own."""
    distributed.seed_everything(config.seed)
    export.check_output_dir(config.output_dir, processes.is_main)
    replaced = []
    if not config.resume_from_checkpoint:  # before the new run's log replaces the old one's
        replaced = export.claim_output_dir(
            config.output_dir, overwrite=config.overwrite_output_dir, is_main=processes.is_main
        )
    reporter = Reporter(
        config.output_dir,
        enabled=processes.is_main,
        append=bool(config.resume_from_checkpoint),
        report_to=config.report_to,
        run_config=config.model_dump(),
    )
    if replaced:
        reporter.line(f"overwrite_output_dir: deleted the earlier run's {', '.join(replaced)}")
    model_path = None
    if model is None or tokenizer is None:
        if not config.model:
            raise ConfigError(
                "no model given", field="model", fix="set model: to a local folder, a .gguf file or a short name"
            )
        with processes.local_main_first():
            model_path = resolve_model_path(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer or model_path, config.trust_remote_code)
    added = add_chat_tokens(
        tokenizer,
        chat_template=config.chat_template,
        add_markers=config.add_chat_tokens,
        special_tokens=config.special_tokens,
    )  # before the data: it tokenizes with them
    for line in added.lines() if added else ():
        reporter.line(line)
    train_examples, eval_examples = _setup_data(config, tokenizer, train_dataset, eval_dataset, reporter)
    if model is None:
        model = setup.setup_model(
            model_path,
            attn_implementation=config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
            gradient_checkpointing=config.gradient_checkpointing,
            lora=setup.lora_settings(config),
            quantization=setup.quantization_settings(config),
            added_tokens=added,
            packing=config.packing and config.objective == "sft",  # pairs pack with masks of their own
        )
        if setup.converts_base(config) and processes.is_main:
            setup.save_initial_adapter(model, config.output_dir)
        reporter.line(f"attention: {model.config._attn_implementation}")
    elif added:
        setup.add_token_rows(model, added)
    if config.router_aux_loss_coef is not None:
        setup.set_router_aux_loss(model, config.router_aux_loss_coef)
    model.train()

    pad_id = pad_token_id(tokenizer)
    preference = None
    if config.objective != "sft":  # before the plan: the objective brings the collate function of its pairs
        preference = _setup_preference(config, model, train_examples, eval_examples, pad_id, processes, reporter)
    if preference is None:
        packing, capacity = config.packing and _packing_isolated(model, train_examples, reporter), config.max_length
    else:  # pairs pack by their mask, where the shared row is exact; P + C and P + R each fit max_length
        packing, capacity = config.packing and preference.shared_prompt, 2 * config.max_length
        if config.packing and not packing:
            reporter.line("packing: off for this model, a row per pair (see the preference line above)")
    plan = batching.StepPlan(
        train_examples,
        packing=packing,
        max_length=capacity,
        batch_size=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps,
        world_size=processes.data_world,
        seed=config.seed,
        group_by_length=config.group_by_length,
        shuffle=config.shuffle,
        collate=preference.collate("train") if preference else None,
    )
    steps = batching.total_steps(config.max_steps, config.num_train_epochs, plan.steps_per_epoch)
    objective = preference or _setup_objective(
        config, model, plan.collate(plan.micro_batches(0, 0)[0] or [0], pad_id, None), reporter
    )
    sequence_parallel = None
    if processes.sequence_size > 1:  # after the probes above, which run the model's own attention
        sequence_parallel = _setup_sequence_parallel(model, train_examples, processes, reporter)
    if config.torch_compile:
        layers = setup.compile_layers(model)
        reporter.line(f"torch_compile: {layers} decoder layers compiled (the first step compiles them)")
    if config.fsdp:
        wrapper = parallelize.shard_model(
            objective.module,
            processes,
            reshard_after_forward=config.fsdp_reshard_after_forward,
            cpu_offload=config.fsdp_cpu_offload,
            bf16=bf16,
        )
        reporter.line(
            f"fsdp: {len(parallelize.decoder_layers(model))} decoder layers and the root sharded over "
            f"{processes.world} processes"
        )
    else:
        wrapper = parallelize.replicate_model(objective.module, processes)
    # FSDP's bf16 is its mixed-precision policy (bf16 weights in compute); otherwise autocast.
    autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=bf16 and not config.fsdp)
    saved_activations, why = offloading.saved_activations(processes.device, config.activation_offloading)
    if why:
        reporter.line(why)

    # The optimizer is built on the parameters as they are now: FSDP's shards or the replicas.
    optimizer = setup.training_optimizer(
        optimizer,
        model,
        fsdp=config.fsdp,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        state_dtype=config.optimizer_state_dtype,
    )
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * steps)
    lr_scheduler = setup.training_scheduler(lr_scheduler, optimizer, config.lr_scheduler_type, steps, warmup)
    parameters = [p for p in model.parameters() if p.requires_grad]
    stepper = None
    if config.optimizer_in_backward:
        setup.check_optimizer_in_backward(processes.world)
        stepper = StepInBackward(parameters, optimizer)
    run = Run(
        reporter,
        tokenizer,
        model,
        plan,
        steps,
        objective,
        wrapper,
        autocast,
        optimizer,
        lr_scheduler,
        parameters,
        stepper,
        pad_id,
        eval_examples,
        identity=run_identity(config, model, tokenizer, train_examples),
        sequence=sequence_parallel,
    )
    run.saved_activations = saved_activations
    run.start_step = _resume(config, run, processes)
    if config.eval_generate_samples:
        run.generation = evaluation.setup_generation_eval(
            config,
            tokenizer,
            eval_dataset,
            processes,
            reporter,
            run.start_step,
            eval_pairs=eval_examples if config.objective != "sft" else None,
        )
    return run


def _setup_data(
    config: SFTConfig, tokenizer, train_dataset, eval_dataset, reporter
) -> tuple[Examples, Examples | None]:
    # No barrier around preparation: the process that takes a cache entry's lock builds it while
    # the others wait on the lock (no collective timeout), then every process maps the same entry.
    if config.objective == "sft":
        prepare = prepare_split
    else:
        from sftlab.data.splits import prepare_preference_split as prepare
    train_examples = prepare(config, tokenizer, source=train_dataset)
    eval_examples = None
    if eval_dataset is not None or config.eval_data:
        eval_examples = prepare(config, tokenizer, eval=True, source=eval_dataset)
    reporter.data_summary("train", train_examples.stats)
    if eval_examples is not None:
        reporter.data_summary("eval", eval_examples.stats)
    if len(train_examples) == 0:
        raise DataError(
            "no training examples left",
            source=train_examples.stats.get("source"),
            found=f"dropped: {train_examples.stats.get('dropped')}",
            fix="raise max_length, use truncation=right, or check which tokens are supervised with `sftlab inspect`",
        )
    return train_examples, eval_examples


def _setup_objective(config: SFTConfig, model: nn.Module, first_batch: dict, reporter) -> Objective:
    # The loss mode is chosen on the whole model, before it is sharded (the check runs no collective).
    mode, why = choose_loss_mode(model, first_batch, config.loss_implementation)
    reporter.line(
        f"loss: {mode} ({why})"
        + (", dft (each token's CE scaled by its detached probability)" if config.loss_type == "dft" else "")
    )
    return SupervisedObjective(model, mode, config.loss_type, config.neftune_noise_alpha)


def _setup_preference(
    config: SFTConfig, model: nn.Module, train_pairs: Pairs, eval_pairs: Pairs | None, pad_id: int, processes, reporter
) -> PreferenceObjective | KTOObjective:
    """The layout the model allows (shared prompt, sparse head), then the reference log-probs of the
    train and eval pairs under the model before training (computed once, stored, reused): training
    holds no reference model. With precompute_ref_log_probs false (LoRA), the loss module computes
    them at every step with the adapter disabled instead. Before the model is sharded or compiled
    (no collective but the sum)."""
    # KTO's rows hold one completion each: no layout to choose.
    span = attention_span(model.config) if config.objective != "kto" else None
    shared, sparse, why = choose_layout(
        model,
        train_pairs,
        pad_id,
        shared_prompt=config.shared_prompt,
        loss_implementation=config.loss_implementation,
        span=span,
    )
    span = span if shared else None
    reporter.line(
        f"preference: {config.objective}"
        + (f" ({config.loss_type})" if config.objective == "dpo" else "")
        + f", beta {config.beta}; {why}"
    )
    references = {}
    on_the_fly = not config.precompute_ref_log_probs  # the config allows it with LoRA only
    if on_the_fly:
        reporter.line(
            "reference log-probs: computed at every step by the model with its LoRA adapter disabled "
            "(precompute_ref_log_probs: false; nothing stored)"
        )
    if config.objective not in REFERENCE_FREE:
        folder = os.path.join(config.cache_dir or os.path.join(cache_root(), "prepared"), "reference")
        for split, pairs in (("train", train_pairs), ("eval", eval_pairs)):
            if pairs is None or (on_the_fly and (split == "train" or config.objective == "kto")):
                continue
            started = time.perf_counter()
            if on_the_fly:  # the eval pairs' reference, for its accuracy at step 0 only (not kept)
                values = reference_log_probs(model, pairs, pad_id, processes, shared_prompt=shared, span=span)
                how = f"computed in {time.perf_counter() - started:.1f} s for the step-0 accuracy, not kept"
            else:
                values, stored = stored_reference_log_probs(model, pairs, pad_id, processes, folder, shared, span=span)
                references[split] = values
                how = (
                    "read from the store" if stored else f"computed in {time.perf_counter() - started:.1f} s and stored"
                ) + f" ({folder})"
            accuracy = float(np.mean(values[:, 0] > values[:, 1])) if len(pairs) else 0.0
            reporter.line(
                f"reference log-probs of {len(pairs)} {split} pairs: {how}"
                + (
                    ""
                    if config.objective == "kto"
                    else f"; the reference prefers the chosen completion in {accuracy:.1%}"
                )
            )
            if split == "eval" and config.objective != "kto":
                reporter.log({"type": "eval", "step": 0, "eval_reference_accuracy": accuracy})
    if config.objective == "kto":
        return KTOObjective(
            model,
            beta=config.beta,
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
            sparse=sparse,
            references=references,
            reference_from_adapter=on_the_fly,
        )
    return PreferenceObjective(
        model,
        config.loss_type if config.objective == "dpo" else config.objective,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        simpo_gamma=config.simpo_gamma,
        rpo_alpha=config.rpo_alpha,
        shared_prompt=shared,
        sparse=sparse,
        references=references,
        attention_span=span,
        reference_from_adapter=on_the_fly,
    )


def _packing_isolated(model: nn.Module, examples: Examples, reporter) -> bool:
    """Packing stays on only where the model keeps packed examples apart (architecture.py's probe);
    elsewhere (Mamba2, linear attention, convolutions on this device) padded rows, said once."""
    check = packing_isolation(model, examples[0][0].tolist())
    if check.isolated:
        reporter.line(f"packing: checked, {check.why} (max difference {check.max_difference:.1e})")
        return True
    reporter.line(f"packing: off for this model, padded rows instead: {check.why}")
    return False


def _setup_sequence_parallel(model: nn.Module, examples: Examples, processes, reporter) -> sequence.SequenceParallel:
    """Attention through sequence.attention on this process's sequence group. Only where attention
    is the model's one way of mixing tokens: a layer that mixes them otherwise (Mamba, linear
    attention, convolutions) would see only its shard. The packing probe finds such layers (they
    let packed examples see each other), and the refusal names what it found."""
    if returns_router_loss(model):
        raise ConfigError(
            "sequence parallelism cannot compute a mixture-of-experts router's load-balancing loss (it needs "
            "every token's routing)",
            field="sequence_parallel_size",
            found=f"{type(model).__name__} returns router logits (output_router_logits)",
            fix="set output_router_logits false in the model's config, or sequence_parallel_size: 1",
        )
    check = packing_isolation(model, examples[0][0].tolist())
    if not check.isolated:
        raise ConfigError(
            "sequence parallelism shards attention only, and this model mixes tokens elsewhere too",
            field="sequence_parallel_size",
            found=check.why,
            fix="train this model with sequence_parallel_size: 1",
        )
    sequence_parallel = sequence.SequenceParallel(model, processes.sequence_size, processes.sequence_group)
    reporter.line(
        f"sequence parallel: each row split over {processes.sequence_size} processes "
        f"({processes.data_world} x {processes.sequence_size} mesh, data x sequence), attention by all-to-all"
    )
    return sequence_parallel


def _resume(config: SFTConfig, run: Run, processes) -> int:
    """The step to start from: 0, or the step of the checkpoint resume_from_checkpoint names. Only
    a checkpoint of this run (its identity, identity.py) is resumed; another run's is refused."""
    if not config.resume_from_checkpoint:
        return 0
    checkpoint, written = find_checkpoint(config.output_dir, config.resume_from_checkpoint, run.identity)
    if checkpoint is None:
        # Nothing of this run to continue: a fresh start, which must not replace a finished run's model.
        replaced = export.claim_output_dir(
            config.output_dir, overwrite=config.overwrite_output_dir, is_main=processes.is_main
        )
        run.reporter.line(
            "resume_from_checkpoint=auto: no complete checkpoint yet, starting from step 0"
            + (f"; overwrite_output_dir: deleted the earlier run's {', '.join(replaced)}" if replaced else "")
        )
        return 0
    if written is None:
        run.reporter.line(
            f"{checkpoint} was written before checkpoints recorded their run: its settings are not checked"
        )
    for name, then, now in differences(written or {}, run.identity, CHANGEABLE):
        run.reporter.line(
            f"{name} was {then} when {checkpoint} was written, is {now} now: "
            f"the learning-rate schedule follows the new total of {run.steps} steps"
        )
    state = load_checkpoint(
        checkpoint, run.model, run.optimizer, run.lr_scheduler, processes, _items_per_step(config, processes)
    )
    start_step = state["step"]
    by = state.get("processes", 1)
    run.reporter.line(
        f"resumed from {checkpoint} at step {start_step}"
        + (f" (written by {by} processes, now {processes.world})" if by != processes.world else "")
    )
    run.reporter.forget_after(start_step)
    return start_step
