"""What the user sees during training: a progress bar on a terminal (plain lines otherwise),
metrics.jsonl in the output folder with one JSON object per logged step and evaluation, and the
same numbers in TensorBoard (output_dir/tensorboard) or Weights & Biases when report_to names them."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time

from sftlab.errors import TrainingError


class Reporter:
    def __init__(
        self,
        output_dir: str,
        enabled: bool = True,
        append: bool = False,
        report_to: list[str] = (),
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.history: list[dict] = []
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.progress = None
        self.task = None
        self.last = {}
        self.started = time.perf_counter()
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            # A fresh run starts a fresh log; a resumed run appends to the one it continues.
            self.handle = open(self.path, "a" if append else "w", encoding="utf-8")
        self.trackers = _open_trackers(report_to, output_dir, run_config or {}, self.line) if enabled else []

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def data_summary(self, split: str, stats: dict) -> None:
        self._write({"type": "data", "split": split, **{k: v for k, v in stats.items() if k != "seconds"}})
        dropped = sum(stats.get("dropped", {}).values())
        skipped = sum(stats.get("skipped_invalid", {}).values())
        made = (
            f"{stats.get('pairs')} pairs, {stats.get('tokens')} tokens"
            if "pairs" in stats
            else f"{stats.get('examples')} examples, {stats.get('supervised_tokens')} supervised of {stats.get('tokens')} tokens"
        )
        self.line(
            f"{split} data: {stats.get('records')} records -> {made}; "
            f"truncated {stats.get('truncated', 0)}, dropped {dropped}"
            + (f" {stats.get('dropped')}" if dropped else "")
            + (f", skipped invalid {skipped} {stats.get('skipped_invalid')}" if skipped else "")
            + _chat_summary(stats.get("chat"))
            + (" (cached)" if stats.get("cached") else "")
        )
        for source in stats.get("sources", ()):  # a mixture: what each source gave
            if "pairs" in source:
                self.line(
                    f"  {source['name']}: {source['pairs']} of {source['pairs_available']} pairs"
                    + _share(source)
                    + f", {source['tokens']} tokens"
                    + (f", {source['desirable']} desirable" if "desirable" in source else "")
                )
                continue
            self.line(
                f"  {source['name']}: {source['examples']} of {source['examples_available']} examples"
                + _share(source)
                + f", {source['supervised_tokens']} supervised of {source['tokens']} tokens"
            )

    def start(self, total: int, done: int) -> None:
        self.total = total
        self.started = time.perf_counter()
        self.first_step = done
        if not self.enabled or not sys.stderr.isatty():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, info=self._info())

    def _info(self) -> str:
        if not self.last:
            return ""
        return (
            f"loss {self.last['loss']:.4f}  lr {self.last['learning_rate']:.2e}  "
            f"{self.last['tokens_per_second']:.0f} tok/s"
        )

    def log(self, record: dict) -> None:
        self._write(record)
        numbers = {
            k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        for tracker in self.trackers:
            tracker.log(f"{record.get('type', 'train')}/", numbers, record.get("step", 0))
        if record.get("type") == "train":
            self.last = record
            if self.progress is None and self.enabled:
                elapsed = time.perf_counter() - self.started
                rate = (record["step"] - self.first_step) / elapsed if elapsed > 0 else 0
                eta = (self.total - record["step"]) / rate if rate > 0 else 0
                # Accuracy: of the next token (SFT), or of the preferred completion's reward (preference objectives).
                accuracy = record.get("token_accuracy", record.get("rewards/accuracy", 0.0))
                print(
                    f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  acc {accuracy:.3f}  "
                    f"lr {record['learning_rate']:.2e}  grad {record['grad_norm']:.3f}  "
                    f"{record['tokens_per_second']:.0f} tok/s  eta {eta:.0f}s",
                    flush=True,
                )
        elif record.get("type") == "eval" and "eval_perplexity" in record:
            self.line(
                f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                f"ppl {record['eval_perplexity']:.2f}  acc {record['eval_token_accuracy']:.3f}"
                + _generation_summary(record)
            )
        elif record.get("type") == "eval":  # another objective's record: its numbers as they are
            shown = "  ".join(
                f"{key[len('eval_') :]} {value:.4g}" for key, value in numbers.items() if key.startswith("eval_")
            )
            self.line(f"eval at step {record['step']}: {shown}" + _generation_summary(record))

    def forget_after(self, step: int) -> None:
        """Drop logged steps after `step` from metrics.jsonl: a killed run logged them after its last
        checkpoint, and the resumed run logs them again. A torn last line (what SIGKILL, an OOM kill
        or a full disk leaves) is dropped too, and said."""
        if not self.enabled:
            return
        self.handle.close()
        torn = keep_records_through(self.path, step)
        if torn:
            self.line(f"{self.path}: dropped an incomplete last line (the interrupted run was killed while writing it)")
        self.handle = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self.history.append(record)
        if self.enabled:
            # NaN/inf are not JSON (jq and most parsers reject them): written as null, and a skipped
            # step is counted in skipped_steps.
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self.handle.write(json.dumps(clean) + "\n")
            self.handle.flush()

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.enabled:
            self.handle.close()
            self.enabled = False
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class _TensorBoard:
    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: str, run_config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="sftlab",
            dir=output_dir,
            config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))},
        )

    def log(self, prefix: str, values: dict, step: int) -> None:
        self.run.log({prefix + key: value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_trackers(report_to, output_dir: str, run_config: dict, say) -> list:
    trackers, missing = [], []
    for name in report_to:
        # torch.utils.tensorboard needs the tensorboard package itself.
        if importlib.util.find_spec(name) is None:
            missing.append(name)
        else:
            trackers.append(_TensorBoard(output_dir) if name == "tensorboard" else _WandB(output_dir, run_config))
    if missing:
        say(f"report_to: {missing} not installed, metrics go to metrics.jsonl only (pip install {' '.join(missing)})")
    return trackers


def _generation_summary(record: dict) -> str:
    """The scores of an evaluation by generation (training/evaluation.py), and what it cost."""
    if "eval_generate_samples" not in record:
        return ""
    from sftlab.config import COUNT_KEYS

    scores = "  ".join(
        f"{key[len('eval_generate_') :]} {value:.3f}"
        for key, value in record.items()
        if key.startswith("eval_generate_") and key not in COUNT_KEYS
    )
    return (
        f"  |  generated {record['eval_generate_samples']}: {scores}  ({record['eval_generate_unfinished']} hit max_new_tokens, "
        f"{record['eval_generate_seconds']:.1f} s)"
    )


def _share(source: dict) -> str:
    for key in ("weight", "max_samples", "epochs"):
        if key in source:
            return f" ({key} {source[key]})"
    return ""


def _chat_summary(chat: dict | None) -> str:
    if not chat:
        return ""
    text = f"; {chat.get('turns_trained', 0)} conversation turns trained"
    if chat.get("records_split"):
        text += (
            f", {chat['records_split']} records split as served into {chat['extra_examples']} extra examples "
            f"(+{chat['extra_tokens']} tokens)"
        )
    if chat.get("turns_not_served"):
        text += f", {chat['turns_not_served']} turns left untrained (chat_examples=final_render)"
    if chat.get("turns_empty_reasoning"):
        text += f", {chat['turns_empty_reasoning']} turns closing an opened thinking at once"
    if chat.get("turns_reasoning_dropped"):
        text += f", {chat['turns_reasoning_dropped']} turns without the reasoning the template drops"
    if chat.get("turns_reasoning_context"):
        text += (
            f", the reasoning of {chat['turns_reasoning_context']} turns as context "
            f"({chat.get('reasoning_tokens_context', 0)} tokens)"
        )
    return text


class MetricsWindow:
    """Sums over the steps since the last log line; the objective turns them into its metrics
    (SFT: loss = summed loss / summed supervised tokens), the engine adds rates and counts."""

    def __init__(self, objective):
        self.objective = objective
        self.sums: dict[str, float] = {}
        self.grad_norm = 0.0
        self.steps = 0
        self.skipped = 0
        self.started = time.perf_counter()

    def add(self, sums: dict[str, float], grad_norm: float, skipped: bool = False) -> None:
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.grad_norm = grad_norm
        self.steps += 1
        self.skipped += int(skipped)

    def pause(self, seconds: float) -> None:
        """Leave out time spent on something else (evaluation): tokens/s measures training."""
        self.started += seconds

    def flush(self, step: int, epoch: float, lr: float) -> dict:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        tokens = self.sums.get("tokens", 0.0)
        record = {
            "type": "train",
            "step": step,
            "epoch": round(epoch, 4),
            **self.objective.train_record(self.sums, seconds),
            "learning_rate": lr,
            "grad_norm": self.grad_norm,
            "tokens": int(tokens),
            "tokens_per_second": tokens / seconds,
            "empty_micro_batches": int(self.sums.get("empty_micro_batches", 0)),
            "skipped_steps": self.skipped,
            "seconds": seconds,
        }
        self.__init__(self.objective)
        return record


def read_records(path: str) -> tuple[list[dict], int]:
    """(records, torn) of a JSON-lines log. Writers append whole lines and flush, so only the
    last line can be incomplete: it is skipped and counted (torn = 1). A broken line anywhere
    else is damage that no kill explains, and is an error naming the file and the line."""
    lines, torn = _parsed_lines(path)
    return [record for _, record in lines], torn


def keep_records_through(path: str, step: int) -> int:
    """Rewrite a JSON-lines log keeping the lines of steps <= `step`, as they were written (a
    resumed run writes the later ones again); returns how many torn last lines were dropped (0 or 1)."""
    lines, torn = _parsed_lines(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(
            line if line.endswith("\n") else line + "\n" for line, record in lines if record.get("step", 0) <= step
        )
    return torn


def _parsed_lines(path: str) -> tuple[list[tuple[str, dict]], int]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = list(handle)
    parsed, torn = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):  # a torn '{"step": 12' cannot parse, but a torn '12' can
                raise json.JSONDecodeError("not a record", line, 0)
            parsed.append((line, record))
        except json.JSONDecodeError:
            if number == len(lines):
                torn = 1
                continue
            raise TrainingError(
                "a log line cannot be read",
                source=f"{path}:{number}",
                found=line[:120].rstrip(),
                fix="remove or repair that line (it is not the last, so no interrupted write made it)",
            ) from None
    return parsed, torn
