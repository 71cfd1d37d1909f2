"""Training throughput and peak memory, sftlab next to TRL's SFTTrainer, in the same run.

Run (from the repository root, in the benchmark venv, see benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/train_throughput.py                 # prompt/completion, all models
    /work/benchvenv/bin/python benchmarks/train_throughput.py --chat          # multi-turn chats, assistant-only loss
    /work/benchvenv/bin/python benchmarks/train_throughput.py --models tiny-32k --repeats 1 --steps 4   # smoke test
    # one H100: --device cuda --bf16 (flash attention 2 is used by both when flash_attn is installed)

What runs. Four configurations per model, each in its OWN fresh Python process (so the peak
RSS is that run's own), sftlab and TRL alternating, every configuration --repeats times; the
median of the repeats is reported:

  trl-default     SFTTrainer with its defaults: padded batches, gradient checkpointing ON
                  (TRL's default), completion_only_loss (default for prompt/completion data)
  trl-best        packing=True (best-fit decreasing, which turns on padding_free),
                  gradient_checkpointing=False, completion_only_loss=True
  sftlab-default  sftlab.training with its defaults: padded batches, sparse loss, no checkpointing
  sftlab-best     the same with packing=True (best-fit decreasing rows of max_length)
  sftlab-ckpt     (only when named in --configs) sftlab's defaults + gradient_checkpointing=True,
                  the memory setting that matches TRL's default

With --chat every configuration trains on assistant turns only (TRL: assistant_only_loss=True),
both with the same ChatML template with {% generation %} tags (sftlab.data.chat.CHATML).

Kept equal: the weights (one seeded init saved to a folder that both load; SmolLM2 from the same
converted folder), the tokenizer and template, the data (generated from a seed), batch size,
max_length, number of optimizer steps, fp32 weights, and, for padded batches, the order of the
data: both read the records in file order (sftlab shuffle=false, TRL
train_sampling_strategy="sequential"; the records are generated in random order), so padded runs
train on the same batches. (With each side's own shuffling, a few timed steps of padded batches
drew different examples: supervised fractions of 0.41 against 0.63 skewed supervised tok/s by
~1.5x.) Packed runs keep each side's shuffling: the two pack differently, and the first rows of a
best-fit-decreasing packing in order hold the longest examples, which is no fair sample either. On this CPU: TRL gets use_cpu=True and
bf16=False (TRL defaults to bf16, and this CPU has no native bf16: autocast would emulate it).

Measured per run: wall time of every optimizer step (sftlab: its per-step metrics with
logging_steps=1; TRL: a TrainerCallback at each step end), skipping --warmup-steps; the tokens
of each step (TRL: counted in its data collator's output, supervised = labels[:, 1:] != -100);
peak RSS of the process (ru_maxrss) after training and saving the final model.
  supervised tok/s = supervised target tokens of the timed steps / their seconds
  all tok/s        = non-padding tokens of the timed steps / their seconds

Models: tiny-32k and tiny-151k are a 4-layer Llama of width 256 with Qwen's BPE cut to its first
32,000 ranks (+3 ChatML specials) and with the full 151,851-id Qwen vocabulary; smollm2 is
SmolLM2-135M-Instruct (49,152 ids; fp32 full fine-tuning is slow on 2 cores, so it runs with a
smaller batch, shorter rows and fewer steps, printed in the table).
Data: prompt/completion records with prompt and completion lengths log-uniform between 3 and 400
words (~4 to ~500 tokens each), or prepare_speed's multi-turn conversations with --chat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CONFIGS = ("sftlab-default", "trl-default", "sftlab-best", "trl-best")
EXTRA_CONFIGS = ("sftlab-ckpt",)
MODELS = ("tiny-32k", "tiny-151k", "smollm2")
# Per-model settings: (batch size, max_length, steps, warmup steps). fp32 SmolLM2 on 2 cores
# manages a few hundred tokens/s, so it gets short runs.
MODEL_SETTINGS = {"tiny-32k": (8, 1024, 12, 2), "tiny-151k": (8, 1024, 12, 2), "smollm2": (2, 512, 6, 2)}


# --- children: one training run each ---------------------------------------------------------


def child_sftlab(spec: dict) -> dict:
    import torch

    from sftlab import SFTConfig, train

    config = SFTConfig(
        model=spec["model_folder"],
        train_data=spec["data_path"],
        output_dir=spec["output_dir"],
        cache_dir=os.path.join(spec["output_dir"], "cache"),
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        logging_steps=1,
        packing=spec["variant"] == "best",
        bf16=spec["bf16"],
        seed=spec["seed"],
        attn_implementation=spec["attn"],
        gradient_checkpointing=spec["variant"] == "ckpt",
        shuffle=spec["variant"] == "best",
    )
    started = time.perf_counter()
    result = train(config)
    total = time.perf_counter() - started
    steps = [r for r in result.history if r.get("type") == "train"]
    return {
        "step_seconds": [r["seconds"] for r in steps],
        "step_supervised": [r["supervised_tokens"] for r in steps],
        "step_tokens": [r["tokens"] for r in steps],
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "step_losses": [r["loss"] for r in steps],
        "call_seconds": total,
        "threads": torch.get_num_threads(),
    }


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    records = common.read_jsonl(spec["data_path"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    kwargs = dict(
        output_dir=spec["output_dir"],
        use_cpu=spec["device"] == "cpu",
        bf16=spec["bf16"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        max_length=spec["max_length"],
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        disable_tqdm=True,
        logging_steps=1,  # as sftlab's
        train_sampling_strategy="random" if spec["variant"] == "best" else "sequential",
        model_init_kwargs={"attn_implementation": spec["attn"], "dtype": "float32"},
    )
    if spec["chat"]:
        kwargs["assistant_only_loss"] = True  # TRL's default trains on every token of a conversation
    else:
        kwargs["completion_only_loss"] = True  # TRL's default (None) means True for prompt/completion data
    if spec["variant"] == "best":
        kwargs.update(packing=True, gradient_checkpointing=False)  # bfd packing implies padding_free
    args = SFTConfig(**kwargs)

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

    clock = StepClock()
    trainer = SFTTrainer(
        model=spec["model_folder"],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    collate = trainer.data_collator
    counts = []  # (supervised, tokens) of every batch the collator builds, in order

    def counting_collator(features):
        batch = collate(features)
        supervised = int((batch["labels"][:, 1:] != -100).sum())  # TRL shifts labels inside its loss
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["position_ids"].numel())
        counts.append((supervised, tokens))
        return batch

    trainer.data_collator = counting_collator
    started = time.perf_counter()
    output = trainer.train()
    trainer.save_model(os.path.join(spec["output_dir"], "final"))  # sftlab saves its final model too
    total = time.perf_counter() - started
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    n = len(seconds)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": seconds,
        "step_supervised": [c[0] for c in counts[:n]],
        "step_tokens": [c[1] for c in counts[:n]],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else output.training_loss,
        "step_losses": losses,
        "call_seconds": total,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "padding_free": trainer.padding_free,
    }


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    run = child_sftlab if spec["framework"] == "sftlab" else child_trl
    result = run(spec)
    warm = spec["warmup"]
    seconds = sum(result["step_seconds"][warm:])
    result.update(
        timed_steps=len(result["step_seconds"][warm:]),
        supervised_per_s=sum(result["step_supervised"][warm:]) / seconds,
        tokens_per_s=sum(result["step_tokens"][warm:]) / seconds,
        step_s=seconds / max(1, len(result["step_seconds"][warm:])),
        supervised_fraction=sum(result["step_supervised"][warm:]) / max(1, sum(result["step_tokens"][warm:])),
        peak_rss_mb=common.peak_rss_mb(),
    )
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: build models and data, alternate runs, report ------------------------------------


def prepare_model(name: str, workdir: str) -> str:
    folder = os.path.join(workdir, "models", name)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    if name == "smollm2":
        return common.smollm2_folder(folder)
    limit = {"tiny-32k": 32000, "tiny-151k": None}[name]
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        common.tiny_llama_folder(folder, common.qwen_tokenizer(limit))
    return folder


def attn_implementation(device: str) -> str:
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def ratios(table: dict, model: str) -> dict:
    get = lambda config, key: table[model][config][key]  # noqa: E731
    out = {}
    for key in ("supervised_per_s", "tokens_per_s"):
        out[f"{key}: sftlab-best / trl-best"] = get("sftlab-best", key) / get("trl-best", key)
        out[f"{key}: sftlab-default / trl-default"] = get("sftlab-default", key) / get("trl-default", key)
        out[f"{key}: sftlab-best / trl-default"] = get("sftlab-best", key) / get("trl-default", key)
    out["peak_rss: sftlab-default / trl-default"] = get("sftlab-default", "peak_rss_mb") / get(
        "trl-default", "peak_rss_mb"
    )
    out["peak_rss: sftlab-best / trl-default"] = get("sftlab-best", "peak_rss_mb") / get("trl-default", "peak_rss_mb")
    out["peak_rss: sftlab-best / trl-best"] = get("sftlab-best", "peak_rss_mb") / get("trl-best", "peak_rss_mb")
    if "sftlab-ckpt" in table[model]:
        out["supervised_per_s: sftlab-ckpt / trl-default"] = get("sftlab-ckpt", "supervised_per_s") / get(
            "trl-default", "supervised_per_s"
        )
        out["peak_rss: sftlab-ckpt / trl-default"] = get("sftlab-ckpt", "peak_rss_mb") / get(
            "trl-default", "peak_rss_mb"
        )
    return out


def print_report(report: dict) -> None:
    m = report["machine"]
    print(
        f"\n{m['cpus']} CPUs ({m['cpu']}), torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"trl {m['versions']['trl']}; device {report['device']}, {'bf16' if report['bf16'] else 'fp32'}, "
        f"{'chat, assistant-only loss' if report['chat'] else 'prompt/completion, completion-only loss'}; "
        f"median of {report['repeats']}; load average at start {report['quiet']['load_at_start']:.2f}"
    )
    header = f"{'model':<10}{'config':<16}{'sup tok/s':>11}{'all tok/s':>11}{'s/step':>9}{'peak MB':>9}{'sup frac':>9}"
    for model, configs in report["table"].items():
        bs, max_length, steps, warm = report["settings"][model]
        print(f"\n{model}: batch {bs}, max_length {max_length}, {steps} steps ({warm} warmup not timed)")
        print(header)
        for config in CONFIGS + EXTRA_CONFIGS:
            if config not in configs:
                continue
            r = configs[config]
            print(
                f"{model:<10}{config:<16}{r['supervised_per_s']:>11.0f}{r['tokens_per_s']:>11.0f}{r['step_s']:>9.2f}"
                f"{r['peak_rss_mb']:>9.0f}{r['supervised_fraction']:>9.2f}"
            )
        losses = report.get("first_loss", {}).get(model, {})
        if all(v is not None for v in losses.values()) and losses:
            print(
                f"  step-1 loss, same weights and batch: sftlab-default {losses['sftlab-default']:.6f}, "
                f"trl-default {losses['trl-default']:.6f}"
            )
        if all(c in configs for c in CONFIGS):
            for key, value in report["ratios"][model].items():
                print(f"  {key:<45}{value:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS + EXTRA_CONFIGS}")
    parser.add_argument("--chat", action="store_true", help="multi-turn conversations, assistant-only loss")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration; the median is reported")
    parser.add_argument("--records", type=int, default=2000, help="records in the generated dataset")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: per model, see MODEL_SETTINGS)")
    parser.add_argument("--warmup-steps", type=int, help="first steps not timed (default: per model)")
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: per model)")
    parser.add_argument("--max-length", type=int, help="max_length (default: per model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both (GPU; this CPU has no native bf16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
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
        help="measure nothing: report the runs saved in JSON.runs.jsonl by an earlier (perhaps interrupted) call with the same flags",
    )
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    os.makedirs(args.workdir, exist_ok=True)
    kind = "chat" if args.chat else "pc"
    data_path = os.path.join(args.workdir, f"data-{kind}-{args.records}.jsonl")
    if not os.path.isfile(data_path):
        records = common.chat_records(args.records) if args.chat else common.prompt_completion_records(args.records)
        common.write_jsonl(data_path, records)
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
        repeats = 1 + max(r["repeat"] for r in runs)
        models = [m for m in models if any(r["model"] == m for r in runs)]
        configs = [c for c in configs if any(r["config"] == c for r in runs)]
        return report(
            runs,
            models,
            configs,
            settings,
            args,
            repeats,
            {"load_at_start": runs[0]["load_after"], "waited_s": 0, "quiet": None},
        )
    folders = {m: prepare_model(m, args.workdir) for m in models}
    quiet = (
        common.wait_for_quiet(args.wait_load)
        if args.wait_load
        else {"load_at_start": common.loadavg(), "waited_s": 0, "quiet": None}
    )
    runs = []
    for repeat in range(args.repeats):
        for m in models:
            bs, max_length, steps, warm = settings[m]
            order = list(configs)
            if repeat % 2:  # alternate which framework goes first in each pair
                order = [order[i ^ 1] if (i ^ 1) < len(order) else order[i] for i in range(len(order))]
            for config in order:
                framework, variant = config.split("-")
                spec = dict(
                    name=f"{m}/{config}/{repeat}",
                    framework=framework,
                    variant=variant,
                    model_folder=folders[m],
                    data_path=data_path,
                    chat=args.chat,
                    steps=steps,
                    warmup=warm,
                    batch_size=bs,
                    max_length=max_length,
                    device=args.device,
                    bf16=args.bf16,
                    seed=42,
                    threads=args.threads,
                    attn=attn_implementation(args.device),
                    output_dir=os.path.join(args.workdir, "runs", f"{kind}-{m}-{config}-{repeat}"),
                )
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result = common.run_child(os.path.abspath(__file__), spec)
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result.update(model=m, config=config, repeat=repeat, load_after=common.loadavg())
                runs.append(result)
                if args.json:  # every run as it finishes, so an interrupted session keeps what it measured
                    with open(args.json + ".runs.jsonl", "a") as handle:
                        handle.write(json.dumps(result) + "\n")
                print(
                    f"{spec['name']}: {result['supervised_per_s']:.0f} sup tok/s, {result['tokens_per_s']:.0f} tok/s, "
                    f"{result['step_s']:.2f} s/step, peak {result['peak_rss_mb']:.0f} MB, final loss {result['loss_last']:.3f}, "
                    f"load {result['load_after']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )

    report(runs, models, configs, settings, args, args.repeats, quiet)


def report(
    runs: list[dict], models: list[str], configs: list[str], settings: dict, args, repeats: int, quiet: dict
) -> None:
    """Median of each configuration's runs, ratios, the printed table and the --json file."""
    table = {}
    for m in models:
        table[m] = {}
        for config in configs:
            mine = [r for r in runs if r["model"] == m and r["config"] == config]
            if not mine:
                continue
            table[m][config] = {
                key: common.median([r[key] for r in mine])
                for key in ("supervised_per_s", "tokens_per_s", "step_s", "peak_rss_mb", "supervised_fraction")
            }
    # Padded runs train on the same batches from the same weights: their first losses must agree.
    first_loss = {
        m: {
            c: next(
                (
                    r["loss_first"]
                    for r in runs
                    if r["model"] == m and r["config"] == c and r.get("loss_first") is not None
                ),
                None,
            )
            for c in ("sftlab-default", "trl-default")
        }
        for m in models
    }
    result = {
        "machine": common.machine(),
        "device": args.device,
        "bf16": args.bf16,
        "chat": args.chat,
        "repeats": repeats,
        "records": args.records,
        "quiet": quiet,
        "settings": settings,
        "table": table,
        "first_loss": first_loss,
        "ratios": {m: ratios(table, m) for m in models if all(c in table[m] for c in CONFIGS)},
        "runs": runs,
    }
    print_report(result)
    if args.json and not args.from_runs:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
