"""Evaluation by generation: greedy replies to eval prompts, scored against the records' replies.

    every eval_steps (and at the end), with eval_generate_samples > 0:
      the prompts (data/prompts.py, built once)  -> batches sorted by length, dealt to the processes
      each process: model.eval(), greedy generate with the KV cache until the end-of-turn token
                    or eval_generate_max_new_tokens; score each reply with every metric
      all processes: gather the scores; the mean of each metric goes into the eval record
                    (metrics.jsonl, trackers, `sftlab plot`); a few prediction/reference pairs
                    go to output_dir/generations.jsonl

Metrics: `exact_match` (the reply equals the reference, whitespace at the ends aside),
`json_exact_match` (both parse as JSON and are the same value: key order and spacing aside, but
true is not 1 and "4" is not 4; a reply that does not parse scores 0), `contains` (the
reference appears in the reply), or `module:function` with function(prediction, reference) ->
float, imported when training starts and only when named.

Batches are dealt by position (batch j to process j mod N) after sorting by length, so a batch
holds the same prompts whatever the number of processes, and the scores gathered from N
processes are those of one. Under FSDP a forward all-gathers each layer's weights from every
process: every process runs the same number of generate calls (a process short of batches runs
a one-prompt stand-in whose replies are dropped) and, through `synced_processes`, the same number
of decoding steps in each.

Cost: one evaluation generates up to samples x max_new_tokens tokens, batch by batch; the
seconds it took are logged as eval_generate_seconds.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from sftlab.config import BUILTIN_METRIC_NAMES, SFTConfig, metric_key
from sftlab.data.container import Examples, Pairs
from sftlab.data.prompts import pair_prompts
from sftlab.data.special_tokens import pad_token_id
from sftlab.data.splits import prepare_generation_prompts, target_settings
from sftlab.errors import ConfigError, TrainingError
from sftlab.training import batching
from sftlab.training.objectives import stacked_sums
from sftlab.training.progress import keep_records_through


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def json_exact_match(prediction: str, reference: str) -> float:
    try:
        predicted = json.loads(prediction)
    except ValueError:
        return 0.0
    return float(same_json(predicted, json.loads(reference)))


def same_json(a, b) -> bool:
    """Equal as JSON values. Python's == takes True for 1 and 1 for 1.0; JSON has one number type
    (1 and 1.0 are the same number) but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def contains(prediction: str, reference: str) -> float:
    return float(reference.strip() in prediction)


# The names are declared in config.py (which checks them without importing this module); each
# names the function of the same name above.
BUILTIN_METRICS = {name: globals()[name] for name in BUILTIN_METRIC_NAMES}


def resolve_metrics(names: list[str]) -> list[tuple[str, object]]:
    """(name, function) for each metric; a user's module is imported here, and only when named."""
    resolved = []
    for position, name in enumerate(names):
        if name in BUILTIN_METRICS:
            resolved.append((name, BUILTIN_METRICS[name]))
            continue
        where = f"eval_generate_metrics[{position}]"
        module_name, function_name = name.rsplit(":", 1)
        module = _import(module_name, where)
        function = getattr(module, function_name, None)
        if function is None or not callable(function):
            raise ConfigError(
                f"module {module_name} has no function {function_name}",
                field=where,
                found=f"{os.path.basename(getattr(module, '__file__', '') or module_name)}: "
                + ("nothing by that name" if function is None else f"a {type(function).__name__}"),
                fix=f"define {function_name}(prediction: str, reference: str) -> float in it, or name another function",
            )
        resolved.append((name, function))
    return resolved


def _import(module_name: str, where: str):
    # `sftlab train` runs from an installed script, whose folder (not the working directory) is on
    # sys.path; a metrics.py next to the config should import as it would under `python -m`.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise  # the metric's module exists and itself imports something missing: its own problem, shown whole
        raise ConfigError(
            f"cannot import the metric's module {module_name}",
            field=where,
            found=str(error),
            fix=f"put {module_name.replace('.', '/')}.py in the working directory or on PYTHONPATH, "
            "or fix the name (module:function)",
        ) from None


@dataclass
class Scored:
    position: int  # in the prompt list
    prediction: str
    scores: list[float]
    stopped: bool
    new_tokens: int


class GenerationEval:
    """The prompts, metrics and settings of one run's evaluation by generation."""

    def __init__(
        self,
        prompts,
        tokenizer,
        metrics: list[tuple[str, object]],
        *,
        max_new_tokens: int,
        batch_size: int,
        log_samples: int,
        output_dir: str,
        sharded: bool,
        append: bool = False,
        resumed_at: int = 0,
        write: bool = True,
    ):
        self.prompts = prompts.prompts
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.stop_ids = prompts.stop_token_ids
        self.pad_id = pad_token_id(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.sharded = sharded
        self.log_samples = log_samples
        for name, _ in metrics:
            if name == "json_exact_match":
                self._check_json_references()
        order = sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i].input_ids), i))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.samples_path = os.path.join(output_dir, "generations.jsonl")
        if write:
            _start_samples(self.samples_path, append, resumed_at)
        self.write = write

    def _check_json_references(self) -> None:
        for prompt in self.prompts:
            try:
                json.loads(prompt.reference)
            except ValueError as error:
                raise ConfigError(
                    "json_exact_match needs references that are JSON",
                    source=prompt.source,
                    index=prompt.record_index,
                    field="eval_generate_metrics",
                    found=f"{error} in {prompt.reference[:60]!r}",
                    fix="use exact_match for replies that are not JSON, or fix the record",
                ) from None

    def run(self, model, root, processes, autocast, step: int) -> dict:
        """The eval record's generation part; every process calls it (a collective under FSDP).
        `root`: the FSDP root module (its weights are gathered around generation), or None."""
        import torch

        started = time.perf_counter()
        was_training = model.training
        # eval(): dropout (and anything else that acts only in training, such as NEFTune's noise) is off.
        model.eval()
        mine = [self.batches[j] for j in range(processes.rank, len(self.batches), processes.world)]
        if self.sharded:
            rounds = math.ceil(len(self.batches) / processes.world)
            mine += [None] * (rounds - len(mine))
        local: list[Scored] = []
        try:
            if root is not None:
                # Generation calls the causal LM, below the FSDP root (the loss module), so the root's
                # pre-forward hook would not gather its weights (embeddings, final norm, tied head).
                root.unshard()
            with torch.no_grad(), autocast:
                for batch in mine:
                    local += self._generate(model, batch, processes)
        finally:
            if root is not None:
                root.reshard()
            model.train(was_training)
        scored = sorted(_gathered(local, processes), key=lambda s: s.position)
        seconds = time.perf_counter() - started
        record = {}
        for column, (name, _) in enumerate(self.metrics):
            record[metric_key(name)] = sum(s.scores[column] for s in scored) / len(scored) if scored else 0.0
        record.update(
            {
                "eval_generate_samples": len(scored),
                "eval_generate_unfinished": sum(not s.stopped for s in scored),
                "eval_generate_new_tokens": sum(s.new_tokens for s in scored),
                "eval_generate_seconds": seconds,
            }
        )
        if self.write and processes.is_main:
            self._write_samples(scored[: self.log_samples], step)
        return record

    def _generate(self, model, batch: list[int] | None, processes) -> list[Scored]:
        from sftlab.generate import generate_batch

        positions = batch if batch is not None else [0]  # a stand-in batch: same collectives, replies dropped
        replies = generate_batch(
            model,
            [self.prompts[i].input_ids for i in positions],
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            max_new_tokens=self.max_new_tokens,
            synced_processes=self.sharded and processes.world > 1,
        )
        if batch is None:
            return []
        scored = []
        for position, reply in zip(positions, replies):
            prediction = self.tokenizer.decode(reply.token_ids, skip_special_tokens=True).strip()
            scored.append(
                Scored(
                    position,
                    prediction,
                    self._scores(prediction, self.prompts[position]),
                    reply.stopped,
                    len(reply.token_ids),
                )
            )
        return scored

    def _scores(self, prediction: str, prompt) -> list[float]:
        scores = []
        for name, function in self.metrics:
            try:
                value = function(prediction, prompt.reference)
            except Exception as error:
                raise TrainingError(
                    f"generation metric {name} failed",
                    source=prompt.source,
                    index=prompt.record_index,
                    found=f"{type(error).__name__}: {error} on prediction {prediction[:60]!r}",
                    fix="make the metric return a number for any text the model may write",
                ) from error
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(
                    f"generation metric {name} did not return a finite number",
                    source=prompt.source,
                    index=prompt.record_index,
                    found=repr(value)[:60],
                    fix="return a float, e.g. 1.0 or 0.0",
                )
            scores.append(float(value))
        return scores

    def _write_samples(self, scored: list[Scored], step: int) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as handle:
            for s in scored:
                prompt = self.prompts[s.position]
                handle.write(
                    json.dumps(
                        {
                            "step": step,
                            "record": prompt.record_index,
                            **({"source": prompt.source} if prompt.source else {}),
                            "prompt": self.tokenizer.decode(prompt.input_ids, skip_special_tokens=False),
                            "prediction": s.prediction,
                            "reference": prompt.reference,
                            **{
                                metric_key(name)[len("eval_generate_") :]: score
                                for (name, _), score in zip(self.metrics, s.scores)
                            },
                            "stopped": s.stopped,
                            "new_tokens": s.new_tokens,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )


def _start_samples(path: str, append: bool, resumed_at: int) -> None:
    """A fresh run starts a fresh file; a resumed one keeps the pairs of the steps it continues from
    (a killed run may have written some after its last checkpoint, which the resumed run writes again)."""
    if not append or not os.path.isfile(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "w").close()
        return
    keep_records_through(path, resumed_at)  # a torn last line (a killed run's) is dropped with the rest


def _gathered(local: list[Scored], processes) -> list[Scored]:
    if processes.world == 1 or not processes.distributed:
        return local
    import torch.distributed as dist

    everyone: list[list[Scored] | None] = [None] * processes.world
    dist.all_gather_object(everyone, local)
    return [s for part in everyone for s in part]


def setup_generation_eval(
    config: SFTConfig, tokenizer, eval_dataset, processes, reporter, start_step: int, eval_pairs: Pairs | None = None
):
    """Evaluation by generation: the user's metric functions imported now, so a wrong name stops
    the run before its first step, and the prompts built once: from the eval records (SFT), or
    from `eval_pairs` (a preference run: each pair's P, scored against its chosen completion)."""
    metrics = resolve_metrics(config.eval_generate_metrics)
    if eval_pairs is None:
        prompts = prepare_generation_prompts(config, tokenizer, source=eval_dataset)
    else:
        prompts = pair_prompts(eval_pairs, tokenizer, target_settings(config), limit=config.eval_generate_samples)
        if not prompts.prompts:
            raise ConfigError(
                "eval_generate_samples is set but no eval pair has a chosen completion to compare with",
                field="eval_generate_samples",
                found=f"{prompts.records_read} pairs: {dict(prompts.unusable)}",
                fix="raise max_length so that chosen completions are whole, or set eval_generate_samples: 0",
            )
    unusable = sum(prompts.unusable.values())
    what = (
        "eval pairs (prompt as served, scored against the chosen completion)"
        if eval_pairs is not None
        else "eval records"
    )
    reporter.line(
        f"eval generation: {len(prompts.prompts)} prompts, the first of {prompts.usable} usable in the first "
        f"{prompts.records_read} {what}, "
        f"scored by {', '.join(name for name, _ in metrics)}, up to {config.eval_generate_max_new_tokens} new tokens; "
        + (
            f"{unusable} records without a prompt/reply pair {dict(prompts.unusable)}"
            if unusable
            else "every record usable"
        )
    )
    reporter.log(
        {
            "type": "eval_generate_prompts",
            "prompts": len(prompts.prompts),
            "records_read": prompts.records_read,
            "usable": prompts.usable,
            "unusable": dict(prompts.unusable),
        }
    )
    return GenerationEval(
        prompts,
        tokenizer,
        metrics,
        max_new_tokens=config.eval_generate_max_new_tokens,
        batch_size=config.per_device_eval_batch_size,
        log_samples=config.eval_generate_log_samples,
        output_dir=config.output_dir,
        sharded=config.fsdp,
        append=bool(config.resume_from_checkpoint),
        resumed_at=start_step,
        write=processes.is_main,
    )


@torch.no_grad()
def evaluate(
    loss_module,
    objective,
    examples: Examples,
    batch_size: int,
    pad_id: int,
    processes,
    autocast,
    collate=batching.pad_batch,
) -> dict:
    """The objective's sums over the whole eval set, as its eval record (SFT: eval loss, perplexity,
    token accuracy). Padded batches (`collate`: the objective's, for items other than examples), longest first."""
    was_training = loss_module.training
    loss_module.eval()
    order = sorted(range(len(examples)), key=lambda i: -int(examples.lengths[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    sums = torch.zeros(len(objective.sums), dtype=torch.float64)
    # Every process runs the same number of forwards (a sharded model gathers weights in each);
    # a process out of batches runs a fully masked one, which adds nothing.
    # With sequence parallelism a batch is dealt to a sequence group (its data rank), which shares it.
    for round_start in range(0, len(batches), processes.data_world):
        index = round_start + processes.data_rank
        batch = collate(examples, batches[index] if index < len(batches) else [], pad_id)
        if hasattr(
            objective, "start_step"
        ):  # KTO: the KL reference point of this eval batch (every process, every round)
            objective.start_step(loss_module, [batch], processes, autocast)
        inputs = {k: v.to(processes.device) for k, v in batch.items() if torch.is_tensor(v)}
        with autocast:
            out = loss_module(**inputs)
        sums += stacked_sums(objective, out).cpu()
    sums = processes.sum(sums)
    loss_module.train(was_training)
    return objective.eval_record(dict(zip(objective.sums, sums.tolist())))
