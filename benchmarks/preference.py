"""Preference tuning (DPO) speed and peak memory: sftlab next to TRL's DPOTrainer, in the same run.

Run (from the repository root, in the benchmark venv, see benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/preference.py                        # tiny-32k, every configuration, 3 repeats
    /work/benchvenv/bin/python benchmarks/preference.py --repeats 1 --steps 3 --warmup-steps 1   # smoke test
    /work/benchvenv/bin/python benchmarks/preference.py --threads 1 --wait-load 2 --json pref.json   # as measured
    /work/benchvenv/bin/python benchmarks/preference.py --from-runs pref.json.runs.jsonl   # the table of saved runs

What runs. Each configuration in its OWN fresh Python process (so the peak RSS is that run's own),
sftlab and TRL interleaved, the order reversed every repeat, every configuration --repeats times;
the median of the repeats is reported:

  trl-default      DPOTrainer with its defaults: a reference model (a second copy of the weights)
                   run on every batch, gradient checkpointing ON (DPOConfig's default), each pair
                   two padded rows [P + C] and [P + R]. (TRL 1.16 already projects only the
                   completion positions through the LM head, in tiles: its `add_fused_lm_head`,
                   which also computes entropy, mean logit and top-1 per token for its metrics.)
  trl-tuned        precompute_ref_log_probs=True (one reference pass over the train pairs before
                   training, no reference model kept), gradient_checkpointing=False. Not set:
                   padding_free. TRL 1.16's DPOConfig has the field, but DPOTrainer warns and falls
                   back to padding ("temporarily unavailable after a refactor"), and it needs
                   FlashAttention anyway, so it would change nothing on a CPU.
  sftlab-default   objective=dpo with every default: one shared row [P | C | R] per pair (the
                   prompt computed once) in each micro-batch where that costs the trunk less than
                   two rows (on this data: every batch; preference_layout.py checks the rule), the
                   sparse head (completion positions only, in chunks, recomputed in backward),
                   reference log-probs computed once before training, padded batches, no
                   gradient checkpointing
  sftlab-dense     the same with loss_implementation=dense: the model's full logits (rows x length
                   x vocabulary), log-softmax over them                     -> what the sparse head buys
  sftlab-unshared  the same with shared_prompt=false: two rows per pair     -> what the shared row buys
  sftlab-packed    the same with packing=true: pairs packed into rows of up to 2 x max_length
                   (best-fit decreasing), batch = --batch-size rows, shuffled -> what packing buys
  sftlab-lean      the default with gradient_checkpointing and optimizer_in_backward (each gradient
                   applied by AdamW and freed as soon as backward completes it, so the model's whole
                   gradient never exists; needs max_grad_norm null: no clipping) -> the least memory
                   at the same pairs per step
  sftlab-leanest   sftlab-lean with optimizer_state_dtype=bfloat16 (AdamW's moments in bf16, stochastically
                   rounded: 12 instead of 16 bytes per trained parameter)

Kept equal: the weights (one seeded init saved to a folder both load), the tokenizer, the data,
the number of pairs per step (--batch-size; packed runs take --batch-size rows of several pairs,
so compare them by pairs/s), max_length, the number of optimizer steps, fp32, the loss (sigmoid,
beta 0.1), and for padded runs the order of the data: both read the pairs in file order (sftlab
shuffle=false, TRL train_sampling_strategy="sequential"), so they train on the same batches: the
step-1 logps/chosen of sftlab-default and trl-default (the same weights, the same pairs) are
printed and must agree. Each side keeps its default learning rate and schedule (the work per step
does not depend on them). On the CPU, TRL gets use_cpu=True and bf16=False (DPOConfig defaults to
bf16, and this CPU has no native bf16).

Data: --records pairs in the standard (text) format {"prompt", "chosen", "rejected"}, generated
from a seed by common.words_text (the generator of train_throughput.py's prompt/completion
records): prompt, chosen and rejected lengths drawn independently and log-uniformly between 3 and
--max-words words (default max_length / 3, ~1.25 tokens per word). Pairs whose P + C or P + R
(with the EOS both sides append) would exceed max_length are left out of the file (their number is
printed), so neither side truncates (the two truncate differently: TRL keeps the start of P + C,
sftlab shortens P first).

Measured per run: the wall time of every optimizer step (sftlab: its per-step metrics with
logging_steps=1, `seconds`; TRL: a TrainerCallback, from on_train_begin and each on_step_end),
skipping --warmup-steps; the pairs of each step (TRL: counted in its data collator's output);
the reference pass before training (sftlab: its log line "reference log-probs of N train pairs:
computed in X s"; trl-tuned: DPOTrainer._precompute_ref_logps timed), reported apart from the
steps; the peak RSS of the process (ru_maxrss) after training and saving the final model.
  s/step  = median of the timed steps' seconds
  pairs/s = pairs of the timed steps / their seconds

Models: tiny-32k is a 4-layer Llama of width 256 with Qwen's BPE cut to its first 32,000 ranks
(common.py); smollm2 is SmolLM2-135M-Instruct (49,152 ids), with a smaller batch.
--threads N sets torch's threads in every run (on a shared machine use 1, see benchmarks/README.md),
and every run gets OMP_WAIT_POLICY=PASSIVE (as sftlab's CLI sets it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CONFIGS = (
    "sftlab-default",
    "trl-default",
    "sftlab-dense",
    "trl-tuned",
    "sftlab-unshared",
    "sftlab-packed",
    "sftlab-lean",
    "sftlab-leanest",
)
MODELS = ("tiny-32k", "smollm2")
# (batch size in pairs, max_length, steps, warmup steps)
MODEL_SETTINGS = {"tiny-32k": (8, 512, 8, 2), "smollm2": (4, 512, 5, 2)}
REFERENCE_LINE = re.compile(r"reference log-probs of (\d+) train pairs: computed in ([0-9.]+) s")


# --- data --------------------------------------------------------------------------------------


def preference_records(n: int, max_words: int, seed: int = 0) -> list[dict]:
    """n prompt/chosen/rejected records, the same for the same seed: lengths log-uniform between 3
    and max_words words each, drawn independently (as common.prompt_completion_records draws them)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = common.words_text(rng, common.log_uniform(rng, 3, max_words))
        chosen = " " + common.words_text(rng, common.log_uniform(rng, 3, max_words))
        rejected = " " + common.words_text(rng, common.log_uniform(rng, 3, max_words))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def fitting_records(records: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """(the records whose P + C and P + R, EOS included, fit max_length, how many were left out)."""
    kept = []
    for record in records:
        longest = max(
            len(tokenizer(record["prompt"] + record[side], add_special_tokens=False)["input_ids"])
            for side in ("chosen", "rejected")
        )
        if longest + 1 <= max_length:
            kept.append(record)
    return kept, len(records) - len(kept)


# --- children: one training run each ----------------------------------------------------------


class Tee(io.TextIOBase):
    """Writes through to `stream` and keeps a copy (sftlab's log lines go to stdout)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def child_sftlab(spec: dict) -> dict:
    import torch

    from sftlab import SFTConfig, train

    variant = spec["variant"]
    packed = variant == "packed"
    options = dict(objective="dpo", packing=packed, shuffle=packed)
    if variant in (
        "lean",
        "leanest",
    ):  # memory, at the default's pairs per step: checkpointing, each gradient applied and freed
        options.update(gradient_checkpointing=True, optimizer_in_backward=True, max_grad_norm=None)
    if variant == "leanest":  # and AdamW's moments in bf16 (stochastically rounded)
        options["optimizer_state_dtype"] = "bfloat16"
    if variant == "dense":
        options["loss_implementation"] = "dense"
    if variant == "unshared":
        options["shared_prompt"] = False
    config = SFTConfig(
        model=spec["model_folder"],
        train_data=spec["data_path"],
        output_dir=spec["output_dir"],
        cache_dir=os.path.join(spec["output_dir"], "cache"),  # a fresh cache: the reference pass runs in every run
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        logging_steps=1,
        bf16=False,
        seed=spec["seed"],
        attn_implementation=spec["attn"],
        **options,
    )
    tee = Tee(sys.stdout)
    sys.stdout = tee
    started = time.perf_counter()
    try:
        result = train(config)
    finally:
        sys.stdout = tee.stream
    total = time.perf_counter() - started
    log = "".join(tee.parts)
    found = REFERENCE_LINE.search(log)
    layout = next((line for line in log.splitlines() if line.startswith("preference:")), None)
    steps = [r for r in result.history if r.get("type") == "train"]
    data = next((r for r in result.history if r.get("type") == "data" and r.get("split") == "train"), {})
    return {
        "step_seconds": [r["seconds"] for r in steps],
        "step_pairs": [r["pairs"] for r in steps],
        "step_tokens": [r["tokens"] for r in steps],
        "step_losses": [r["loss"] for r in steps],
        "logps_chosen_first": steps[0].get("logps/chosen"),
        "logps_rejected_first": steps[0].get("logps/rejected"),
        "reference_pairs": int(found.group(1)) if found else None,
        "reference_s": float(found.group(2)) if found else None,
        "layout": layout,
        "truncated": {k: v for k, v in data.items() if "truncated" in k or k == "dropped"},
        "call_seconds": total,
        "threads": torch.get_num_threads(),
    }


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = common.read_jsonl(spec["data_path"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    kwargs = dict(
        output_dir=spec["output_dir"],
        use_cpu=spec["device"] == "cpu",
        bf16=False,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        max_length=spec["max_length"],
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        disable_tqdm=True,
        logging_steps=1,  # as sftlab's
        train_sampling_strategy="sequential",
        model_init_kwargs={"attn_implementation": spec["attn"], "dtype": "float32"},
    )
    if spec["variant"] == "tuned":
        kwargs.update(precompute_ref_log_probs=True, gradient_checkpointing=False)
    args = DPOConfig(**kwargs)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def _mark(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

        def on_train_begin(self, *a, **k):
            self._mark()

        def on_step_end(self, *a, **k):
            self._mark()

    reference_seconds = {}
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, dataset, name, batch_size):
        started = time.perf_counter()
        out = precompute(self, dataset, name, batch_size)
        reference_seconds[name] = time.perf_counter() - started
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute  # runs inside DPOTrainer.__init__
    clock = StepClock()
    trainer = DPOTrainer(
        model=spec["model_folder"],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    collate = trainer.data_collator
    counts = []  # (pairs, tokens) of every batch the collator builds for training, in order

    def counting_collator(features):
        batch = collate(features)
        counts.append(
            (int(batch["input_ids"].shape[0]) // 2, int(batch["attention_mask"].sum()))
        )  # rows [chosen; rejected]
        return batch

    trainer.data_collator = counting_collator
    started = time.perf_counter()
    trainer.train()
    trainer.save_model(os.path.join(spec["output_dir"], "final"))  # sftlab saves its final model too
    total = time.perf_counter() - started
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    n = len(seconds)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    train_reference = next((v for k, v in reference_seconds.items() if "train" in k), None)
    return {
        "step_seconds": seconds,
        "step_pairs": [c[0] for c in counts[:n]],
        "step_tokens": [c[1] for c in counts[:n]],
        "step_losses": [h["loss"] for h in logs],
        "logps_chosen_first": logs[0].get("logps/chosen") if logs else None,
        "logps_rejected_first": logs[0].get("logps/rejected") if logs else None,
        "reference_pairs": len(records) if train_reference is not None else None,
        "reference_s": train_reference,
        "layout": f"gradient_checkpointing={args.gradient_checkpointing}, precompute_ref_log_probs="
        f"{args.precompute_ref_log_probs}, padding_free={trainer.padding_free}, ref_model={trainer.ref_model is not None}",
        "call_seconds": total,
        "threads": torch.get_num_threads(),
    }


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    run = child_sftlab if spec["framework"] == "sftlab" else child_trl
    result = run(spec)
    warm = spec["warmup"]
    timed = result["step_seconds"][warm:]
    result.update(
        timed_steps=len(timed),
        step_s=common.median(timed),
        pairs_per_s=sum(result["step_pairs"][warm:]) / sum(timed),
        pairs_per_step=sum(result["step_pairs"][warm:]) / max(1, len(timed)),
        tokens_per_step=sum(result["step_tokens"][warm:]) / max(1, len(timed)),
        peak_rss_mb=common.peak_rss_mb(),
    )
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: model, data, interleaved runs, report ----------------------------------------------


def prepare_model(name: str, workdir: str) -> str:
    folder = os.path.join(workdir, "models", name)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    if name == "smollm2":
        return common.smollm2_folder(folder)
    return common.tiny_llama_folder(folder, common.qwen_tokenizer({"tiny-32k": 32000}[name]))


def prepare_data(
    folder: str, workdir: str, records: int, max_words: int, max_length: int, name: str
) -> tuple[str, int, int]:
    """(path of the JSONL file of pairs that fit, pairs in it, pairs left out), written once per settings."""
    from transformers import AutoTokenizer

    path = os.path.join(workdir, f"pref-{name}-{records}-w{max_words}-l{max_length}.jsonl")
    if os.path.isfile(path):
        with open(path + ".left_out") as handle:
            left_out = int(handle.read())
        return path, len(common.read_jsonl(path)), left_out
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kept, left_out = fitting_records(preference_records(records, max_words), tokenizer, max_length)
    common.write_jsonl(path + ".tmp", kept)
    with open(path + ".left_out", "w") as handle:
        handle.write(str(left_out))
    os.rename(path + ".tmp", path)
    return path, len(kept), left_out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="tiny-32k", help=f"comma-separated, from {MODELS}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration; the median is reported")
    parser.add_argument(
        "--records", type=int, default=160, help="pairs generated (those that do not fit max_length are left out)"
    )
    parser.add_argument(
        "--max-words", type=int, help="longest prompt, chosen, rejected in words (default max_length // 3)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: per model, see MODEL_SETTINGS)")
    parser.add_argument("--warmup-steps", type=int, help="first steps not timed (default: per model)")
    parser.add_argument("--batch-size", type=int, help="pairs per step (packed: rows per step) (default: per model)")
    parser.add_argument("--max-length", type=int, help="max_length, bounding P + C and P + R (default: per model)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run (0: torch's default)")
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "sftlab-bench"),
        help="models, data and run outputs (kept between invocations)",
    )
    parser.add_argument(
        "--wait-load",
        type=float,
        default=0.0,
        help="before measuring, wait (up to 30 min) until the 1-minute load average is below this",
    )
    parser.add_argument("--json", help="also write the full report (every run) to this file")
    parser.add_argument(
        "--from-runs",
        metavar="RUNS_JSONL",
        help="measure nothing: report the runs saved in JSON.runs.jsonl by an earlier (perhaps interrupted) call",
    )
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS] + [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    settings = {}
    for m in models:
        bs, max_length, steps, warm = MODEL_SETTINGS[m]
        settings[m] = (
            args.batch_size or bs,
            args.max_length or max_length,
            args.steps or steps,
            args.warmup_steps if args.warmup_steps is not None else warm,
        )
    if args.from_runs:
        with open(args.from_runs) as handle:
            runs = [json.loads(line) for line in handle if line.strip()]
        models = [m for m in models if any(r["model"] == m for r in runs)]
        configs = [c for c in configs if any(r["config"] == c for r in runs)]
        data = {m: next(r["data"] for r in runs if r["model"] == m) for m in models}
        return report(
            runs,
            models,
            configs,
            settings,
            data,
            args,
            1 + max(r["repeat"] for r in runs),
            {"load_at_start": runs[0]["load_before"], "waited_s": 0, "quiet": None},
        )

    os.makedirs(args.workdir, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by every run, as sftlab's CLI sets it
    folders = {m: prepare_model(m, args.workdir) for m in models}
    data = {}
    for m in models:
        max_length = settings[m][1]
        path, kept, left_out = prepare_data(
            folders[m], args.workdir, args.records, args.max_words or max_length // 3, max_length, m
        )
        data[m] = {"path": path, "pairs": kept, "left_out": left_out, "max_words": args.max_words or max_length // 3}
        print(
            f"{m}: {kept} pairs in {path} ({left_out} of {args.records} left out: longer than max_length {max_length})",
            file=sys.stderr,
            flush=True,
        )
    quiet = (
        common.wait_for_quiet(args.wait_load)
        if args.wait_load
        else {"load_at_start": common.loadavg(), "waited_s": 0, "quiet": None}
    )
    runs = []
    for repeat in range(args.repeats):
        for m in models:
            bs, max_length, steps, warm = settings[m]
            order = configs if repeat % 2 == 0 else configs[::-1]  # the order flips every repeat
            for config in order:
                framework, variant = config.split("-")
                spec = dict(
                    name=f"{m}/{config}/{repeat}",
                    framework=framework,
                    variant=variant,
                    model_folder=folders[m],
                    data_path=data[m]["path"],
                    steps=steps,
                    warmup=warm,
                    batch_size=bs,
                    max_length=max_length,
                    device="cpu",
                    seed=42,
                    threads=args.threads,
                    attn="sdpa",
                    output_dir=os.path.join(args.workdir, "runs", f"pref-{m}-{config}-{repeat}"),
                )
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                load_before = common.loadavg()
                result = common.run_child(os.path.abspath(__file__), spec)
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result.update(
                    model=m,
                    config=config,
                    repeat=repeat,
                    load_before=load_before,
                    load_after=common.loadavg(),
                    data=data[m],
                )
                runs.append(result)
                if args.json:  # every run as it finishes, so an interrupted session keeps what it measured
                    with open(args.json + ".runs.jsonl", "a") as handle:
                        handle.write(json.dumps(result) + "\n")
                reference = (
                    f", reference pass {result['reference_s']:.1f} s" if result.get("reference_s") is not None else ""
                )
                print(
                    f"{spec['name']}: {result['step_s']:.2f} s/step, {result['pairs_per_s']:.2f} pairs/s, "
                    f"{result['pairs_per_step']:.1f} pairs/step, peak {result['peak_rss_mb']:.0f} MB{reference}, "
                    f"losses {[round(x, 4) for x in result['step_losses'][:3]]}..., load {load_before:.2f} -> "
                    f"{result['load_after']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    report(runs, models, configs, settings, data, args, args.repeats, quiet)


KEYS = ("step_s", "pairs_per_s", "pairs_per_step", "tokens_per_step", "peak_rss_mb", "reference_s")


def report(
    runs: list[dict], models: list[str], configs: list[str], settings: dict, data: dict, args, repeats: int, quiet: dict
) -> None:
    """Medians of each configuration's runs, ratios, the printed table and the --json file."""
    table = {}
    for m in models:
        table[m] = {}
        for config in configs:
            mine = [r for r in runs if r["model"] == m and r["config"] == config]
            if mine:
                table[m][config] = {
                    key: common.median([r[key] for r in mine if r.get(key) is not None]) for key in KEYS
                }
                table[m][config]["layout"] = mine[0].get("layout")
                table[m][config]["runs"] = len(mine)
    loads = [r[k] for r in runs for k in ("load_before", "load_after")]
    result = {
        "machine": common.machine(),
        "repeats": repeats,
        "quiet": quiet,
        "settings": settings,
        "data": data,
        "load_during": [min(loads), max(loads)] if loads else None,
        "table": table,
        "first_step": {
            m: {
                r["config"]: (r["logps_chosen_first"], r["logps_rejected_first"])
                for r in runs
                if r["model"] == m and r["config"] in ("sftlab-default", "trl-default") and r["repeat"] == 0
            }
            for m in models
        },
        "runs": runs,
    }
    print_report(result, configs)
    if args.json and not args.from_runs:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


def ratio(table: dict, a: str, b: str, key: str) -> str:
    """table[a][key] / table[b][key], or "-" where either is missing."""
    if a not in table or b not in table or not table[a][key] or not table[b][key]:
        return "-"
    return f"{table[a][key] / table[b][key]:.2f}x"


def print_report(report: dict, configs: list[str]) -> None:
    m = report["machine"]
    v = m["versions"]
    load = report["load_during"]
    print(
        f"\n{m['cpus']} CPUs ({m['cpu']}), torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}; "
        f"fp32, DPO (sigmoid, beta 0.1); median of {report['repeats']}; load average at start "
        f"{report['quiet']['load_at_start']:.2f}"
        + (f", {load[0]:.2f} to {load[1]:.2f} around the runs" if load else "")
    )
    for model, rows in report["table"].items():
        bs, max_length, steps, warm = report["settings"][model]
        d = report["data"][model]
        print(
            f"\n{model}: {bs} pairs per step (packed: {bs} rows), max_length {max_length}, {steps} steps ({warm} warmup "
            f"not timed); {d['pairs']} pairs of 3-{d['max_words']} words per part ({d['left_out']} longer left out)"
        )
        print(
            f"{'config':<17}{'s/step':>8}{'pairs/s':>9}{'pairs/step':>11}{'tok/step':>9}{'peak MB':>9}{'ref pass s':>11}"
            f"{'pairs/s vs TRL def':>20}{'vs TRL tuned':>14}{'RSS vs TRL def':>16}{'vs TRL tuned':>14}"
        )
        for config in configs:
            if config not in rows:
                continue
            r = rows[config]
            reference = f"{r['reference_s']:.1f}" if r["reference_s"] == r["reference_s"] else "-"
            print(
                f"{config:<17}{r['step_s']:>8.2f}{r['pairs_per_s']:>9.2f}{r['pairs_per_step']:>11.1f}{r['tokens_per_step']:>9.0f}"
                f"{r['peak_rss_mb']:>9.0f}{reference:>11}"
                f"{ratio(rows, config, 'trl-default', 'pairs_per_s'):>20}{ratio(rows, config, 'trl-tuned', 'pairs_per_s'):>14}"
                f"{ratio(rows, config, 'trl-default', 'peak_rss_mb'):>16}{ratio(rows, config, 'trl-tuned', 'peak_rss_mb'):>14}"
            )
        for config in configs:
            if config in rows:
                print(f"  {config}: {rows[config]['layout']}")
        first = report["first_step"].get(model, {})
        if "sftlab-default" in first and "trl-default" in first:
            (sc, sr), (tc, tr) = first["sftlab-default"], first["trl-default"]
            if None not in (sc, sr, tc, tr):
                print(
                    f"  step-1 logps chosen / rejected, same weights and pairs: sftlab-default {sc:.4f} / {sr:.4f}, "
                    f"trl-default {tc:.4f} / {tr:.4f}"
                )
        print("  what each technique buys (sftlab-default against the configuration without it):")
        for label, other in (("sparse head", "sftlab-dense"), ("shared prompt row", "sftlab-unshared")):
            print(
                f"    {label:<18} pairs/s {ratio(rows, 'sftlab-default', other, 'pairs_per_s')}, "
                f"peak RSS {ratio(rows, 'sftlab-default', other, 'peak_rss_mb')}"
            )
        print(
            f"    {'packing':<18} pairs/s {ratio(rows, 'sftlab-packed', 'sftlab-default', 'pairs_per_s')}, "
            f"peak RSS {ratio(rows, 'sftlab-packed', 'sftlab-default', 'peak_rss_mb')} (packed against padded)"
        )
        print(
            f"    {'lean (checkpointing + optimizer in backward)':<18} "
            f"pairs/s {ratio(rows, 'sftlab-lean', 'sftlab-default', 'pairs_per_s')}, "
            f"peak RSS {ratio(rows, 'sftlab-lean', 'sftlab-default', 'peak_rss_mb')}"
        )


if __name__ == "__main__":
    main()
