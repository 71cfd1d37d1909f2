"""Plot a run's curves from its metrics.jsonl: training and eval loss against the step (top),
the scores of the evaluation by generation when the run has one (exact match, ...: middle), the
learning rate against the step (bottom, all sharing the step axis).

    sftlab plot outputs/run            -> outputs/run/loss.png

Reads only metrics.jsonl (records with "type": "train" or "eval", see progress.py), so a run
can be plotted while it trains or long after. matplotlib is an optional dependency
(`pip install 'sftlab[plot]'`) and runs on the Agg backend: no display needed.
"""

from __future__ import annotations

import os

from sftlab.errors import SftlabError
from sftlab.training.progress import read_records


class PlotError(SftlabError):
    """The curves cannot be drawn: no metrics log, nothing in it to plot, or matplotlib missing."""


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, in file order. A resumed run appends to
    the log, so a step logged twice keeps its last record."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    records, _ = read_records(path)  # the last line of a log being written (or of a killed run) may be incomplete
    for record in records:
        if record.get("type") == "train" and "loss" in record and "step" in record:
            train[int(record["step"])] = record
        elif record.get("type") == "eval" and "eval_loss" in record and "step" in record:
            evals[int(record["step"])] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def generation_scores(evals: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """eval_generate_<metric> -> [(step, score)] from the eval records (training/evaluation.py)."""
    from sftlab.config import COUNT_KEYS

    scores: dict[str, list[tuple[int, float]]] = {}
    for record in evals:
        for key, value in record.items():
            if key.startswith("eval_generate_") and key not in COUNT_KEYS and isinstance(value, (int, float)):
                scores.setdefault(key, []).append((int(record["step"]), float(value)))
    return scores


def plot_metrics(output_dir: str, out: str | None = None) -> str:
    """Draw loss and learning rate from output_dir/metrics.jsonl into a PNG; returns its path
    (default output_dir/loss.png)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError("no metrics.jsonl to plot", source=output_dir,
                        fix="point at the output_dir of a run (it holds metrics.jsonl once training has logged)")
    train, evals = read_metrics(path)
    if not train and not evals:
        raise PlotError("metrics.jsonl has no train or eval records yet", source=path,
                        fix="wait for the first logged step (logging_steps) and plot again")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed", fix="pip install 'sftlab[plot]'") from None

    out = out or os.path.join(output_dir, "loss.png")
    scores = generation_scores(evals)
    if scores:
        figure, (loss_axis, score_axis, lr_axis) = plt.subplots(
            3, 1, sharex=True, figsize=(8, 8), gridspec_kw={"height_ratios": [3, 2, 1]}, constrained_layout=True
        )
        for key, points in scores.items():
            score_axis.plot([s for s, _ in points], [v for _, v in points], marker="o", label=key[len("eval_generate_"):])
        samples = max(r.get("eval_generate_samples", 0) for r in evals)
        score_axis.set_ylabel(f"generated replies\n(score, {samples} prompts)")
        if all(0 <= v <= 1 for points in scores.values() for _, v in points):  # rates: the whole 0-1 range, curves comparable
            score_axis.set_ylim(-0.05, 1.05)
        score_axis.grid(alpha=0.3)
        score_axis.legend()
    else:
        figure, (loss_axis, lr_axis) = plt.subplots(
            2, 1, sharex=True, figsize=(8, 6), gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
        )
    if train:
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss",
                       color="tab:blue", marker="." if len(train) <= 50 else None)
    if evals:
        loss_axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], label="eval loss",
                       color="tab:orange", marker="o")
    losses = [r["loss"] for r in train] + [r["eval_loss"] for r in evals]
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        # Fine-tuning losses often fall by orders of magnitude; on a linear axis everything after
        # the first steps would be a flat line at the bottom.
        loss_axis.set_yscale("log")
    loss_axis.set_ylabel("loss (per supervised token)")
    loss_axis.set_title(f"sftlab: {os.path.basename(os.path.abspath(output_dir))}")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    with_lr = [r for r in train if "learning_rate" in r]
    if with_lr:
        lr_axis.plot([r["step"] for r in with_lr], [r["learning_rate"] for r in with_lr], color="tab:green")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axis.grid(alpha=0.3)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
