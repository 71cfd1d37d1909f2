"""The longest sequence that trains: one full fine-tuning step of SmolLM2-135M under a memory cap.

For each side and each max_length (powers of two and the halfway points between them, ascending),
a fresh process runs ONE optimizer step of full fine-tuning (fp32 weights, AdamW, batch 1,
gradient checkpointing on) on one example of exactly that many tokens, from loading the model to
the end of the run. A side stops at its first length that does not fit or does not finish in time:
the length before it is its longest trainable sequence under the cap.

    sftlab     sftlab's train() as a user runs it (sparse head, attn_implementation auto)
    trl        TRL's SFTTrainer tuned for memory: gradient checkpointing, its default 'nll' loss (which
               it computes without materialising the full logits), use_cpu (padding_free changes
               nothing for one example: either way sdpa gets no mask)

The cap is enforced by a watchdog, not a cgroup (this machine's cgroup tree belongs to the session
machinery, so nothing here writes to it) and not RLIMIT_AS (torch reserves far more address space
than it touches, so an address-space limit fails runs that fit). Every 20 ms the watchdog reads
VmHWM, the kernel's own peak resident set size, of every process of the run (the launched process
and its descendants, so a torchrun group is watched process by process) and kills the run as soon
as one process's peak passes the cap. VmHWM is exact and monotonic, so a spike between two reads is
still seen at the next one; the peak reported is that figure (per process), and a run counts only if
it ended with every process's peak under the cap. Each run also has a timeout (reported).

The attention kernel each side runs is probed once per side, in a process of its own, on a 256-token
row set up as the runs are (the same loading code, one example, no mask): the aten op that sdpa
dispatched to is recorded.

    python benchmarks/long_context.py --cap-gb 4 --timeout 1200 --sides sftlab,trl

    sftlab-sp2 sftlab with sequence_parallel_size 2 under torchrun (2 processes, each 1/2 of the row;
               the peak is the highest of one process: the cap applies per process); DDP, so each
               process also holds all weights, gradients (twice in a first step: DDP's buckets)
               and AdamW moments
    sftlab-sp2-fsdp  the same with fsdp: true (weights, gradients and moments sharded over the 2)

    python benchmarks/long_context.py --cap-gb 4 --sides sftlab-sp2-fsdp,sftlab-sp2 --lengths 6144,8192,12288,16384
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

LENGTHS = [1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072]
PYTHONS = {"sftlab": sys.executable, "trl": "/work/trlvenv/bin/python"}
POLL_S = 0.02


# --- children: one step each ----------------------------------------------------------------


def tokens(length: int, vocab: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab - 100) for _ in range(length)]


def child_sftlab(spec: dict) -> dict:
    from sftlab import SFTConfig, train

    config = SFTConfig(
        model=spec["model_folder"],
        output_dir=spec["output_dir"],
        use_cache=False,
        max_length=spec["length"],
        per_device_train_batch_size=1,
        max_steps=1,
        logging_steps=1,
        gradient_checkpointing=True,
        warmup_ratio=0.0,
        learning_rate=1e-5,
        sequence_parallel_size=spec.get("sequence_parallel", 1),
        fsdp=spec.get("fsdp", False),
    )
    result = train(config, train_dataset=[{"input_ids": tokens(spec["length"], spec["vocab"])}])
    (step,) = [r for r in result.history if r.get("type") == "train"]
    return {"step_seconds": step["seconds"], "loss": step["loss"], "tokens": step["tokens"]}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=spec["output_dir"],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=1,
        max_steps=1,
        max_length=spec["length"],
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        learning_rate=1e-5,
        gradient_checkpointing=True,
        model_init_kwargs={"dtype": "float32"},
    )

    class StepClock(TrainerCallback):
        marks: list[float] = []

        def on_step_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer = SFTTrainer(
        model=spec["model_folder"],
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": tokens(spec["length"], spec["vocab"])}]),
        processing_class=AutoTokenizer.from_pretrained(spec["model_folder"]),
        callbacks=[clock],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_seconds": clock.marks[1] - clock.marks[0],
        "loss": losses[0] if losses else None,
        "threads": torch.get_num_threads(),
    }


def child_kernel(spec: dict) -> dict:
    """The aten attention ops one forward and backward of a 256-token lone row dispatches to, with
    the model loaded as the side loads it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sharded = {}
    if spec["side"].startswith("sftlab"):
        from sftlab.models import load_model

        model = load_model(spec["model_folder"])
        if spec["side"].startswith("sftlab-sp"):  # the attention sequence parallelism runs, on one process
            from sftlab.training.sequence import SequenceParallel

            SequenceParallel(model, 1, None)
            sharded = {"row_position_ids": torch.arange(256)[None]}
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.tensor([tokens(256, spec["vocab"])])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(
            input_ids=ids, position_ids=torch.arange(256)[None], use_cache=False, **sharded
        ).logits.float().mean().backward()
    ops = sorted({e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::_")})
    return {"implementation": model.config._attn_implementation, "ops": ops}


def child(spec: dict) -> None:
    run = {"kernel": child_kernel, "sftlab": child_sftlab, "trl": child_trl}[spec["task"]]
    result = run(spec)
    result["peak_rss_mb"] = common.peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: launch, watch, report ------------------------------------------------------


def command(side: str, spec: dict) -> list[str]:
    """The command line of one run of `side`. sftlab-sp<N>: torchrun with N processes, the child's
    config given sequence_parallel_size N (each process holds 1/N of the row; the watchdog watches
    each process: the peak reported is the highest of one process)."""
    if side.startswith("sftlab-sp") and spec["task"] != "kernel":
        processes = int(side.split("-")[1][len("sp") :])
        spec = {**spec, "sequence_parallel": processes, "fsdp": side.endswith("-fsdp")}
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        return [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            str(processes),
            os.path.abspath(__file__),
            "--child",
            json.dumps(spec),
        ]
    return [PYTHONS[side.split("-")[0]], os.path.abspath(__file__), "--child", json.dumps(spec)]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (through /proc/PID/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in _listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue += [int(child) for child in handle.read().split()]
            except OSError:
                pass
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def peak_kb(pid: int) -> int:
    """VmHWM (peak resident set size, KiB) of `pid`, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def watched_run(argv: list[str], cap_mb: float, timeout_s: float, env: dict) -> dict:
    """Run `argv`, killing it when one of its processes' peak RSS passes `cap_mb` or it runs past
    `timeout_s`. Returns the status ('ok', 'over cap', 'timeout', 'failed'), the highest per-process
    peak seen (MiB), the seconds it ran and the child's RESULT (when it printed one)."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status, highest = None, 0.0
        while process.poll() is None:
            highest = max([highest] + [peak_kb(pid) / 1024 for pid in process_tree(process.pid)])
            if highest > cap_mb:
                status = "over cap"
            elif time.perf_counter() - started > timeout_s:
                status = "timeout"
            if status:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(POLL_S)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else None
    if status is None:
        if process.returncode != 0 or result is None:
            status = "failed"
            print("\n".join(text.splitlines()[-20:]), file=sys.stderr)
        else:
            highest = max(highest, result["peak_rss_mb"])  # the child's own ru_maxrss, read at its end
            status = "ok" if highest <= cap_mb else "over cap"
    return {"status": status, "peak_rss_mb": round(highest), "seconds": round(seconds, 1), "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sides", default="sftlab,trl")
    parser.add_argument("--cap-gb", type=float, default=4.0, help="memory cap per process, GiB")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "long_context.json"))
    parser.add_argument("--table", help="print the table of a JSON report written earlier, and stop")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.table:
        with open(args.table) as handle:
            print_table(json.load(handle))
        return

    model_folder = common.smollm2_folder(os.path.join(tempfile.gettempdir(), "sftlab-bench-smollm2"))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_folder).vocab_size
    env = dict(
        os.environ,
        PYTHONPATH=os.path.join(ROOT, "src"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    cap_mb = args.cap_gb * 1024
    lengths = [int(x) for x in args.lengths.split(",")]
    report = {
        "machine": common.machine(),
        "cap_mb": cap_mb,
        "timeout_s": args.timeout,
        "command": " ".join(sys.argv),
        "sides": {},
    }
    for side in args.sides.split(","):
        base = {"model_folder": model_folder, "vocab": vocab, "side": side}
        with tempfile.TemporaryDirectory() as output_dir:
            kernel = watched_run(
                command(side, {**base, "task": "kernel", "output_dir": output_dir}), cap_mb * 4, 600, env
            )
        runs = []
        for length in lengths:
            with tempfile.TemporaryDirectory() as output_dir:
                spec = {**base, "task": side.split("-")[0], "length": length, "output_dir": output_dir}
                run = watched_run(command(side, spec), cap_mb, args.timeout, env)
            run["length"] = length
            runs.append(run)
            step = (run["result"] or {}).get("step_seconds")
            print(
                f"{side:8s} {length:6d}  {run['status']:8s}  peak {run['peak_rss_mb']:6d} MiB  "
                + (f"step {step:7.1f} s" if step else f"ran {run['seconds']:.0f} s"),
                flush=True,
            )
            if run["status"] != "ok":
                break
        fits = [r["length"] for r in runs if r["status"] == "ok"]
        report["sides"][side] = {"kernel": kernel.get("result"), "runs": runs, "longest": max(fits) if fits else None}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print_table(report)


def print_table(report: dict) -> None:
    sides = report["sides"]
    print(f"\ncap {report['cap_mb'] / 1024:g} GiB per process, timeout {report['timeout_s']:g} s per run")
    for side, data in sides.items():
        kernel = data["kernel"] or {}
        print(f"{side}: longest {data['longest']}; attention {kernel.get('implementation')} -> {kernel.get('ops')}")
    lengths = sorted({r["length"] for data in sides.values() for r in data["runs"]})
    names = list(sides)
    ratio_name = f"{names[0]} / {names[1]} (peak, step)" if len(names) > 1 else "ratio"
    print("| max_length | " + " | ".join(f"{n} peak RSS | {n} step" for n in names) + f" | {ratio_name} |")
    print("|---:|" + "---:|---:|" * len(names) + "---:|")
    for length in lengths:
        cells, steps, peaks = [], [], []
        for name in names:
            run = next((r for r in sides[name]["runs"] if r["length"] == length), None)
            if run is None:
                cells += ["", ""]
                steps.append(None)
                peaks.append(None)
                continue
            step = (run["result"] or {}).get("step_seconds") if run["status"] == "ok" else None
            steps.append(step)
            peaks.append(run["peak_rss_mb"] if run["status"] == "ok" else None)
            cells += [
                f"{run['peak_rss_mb'] / 1024:.2f} GiB" + ("" if run["status"] == "ok" else f" ({run['status']})"),
                f"{step:.1f} s" if step else f"- ({run['seconds']:.0f} s)",
            ]
        ratio = (
            f"{peaks[0] / peaks[1]:.2f}x, {steps[0] / steps[1]:.2f}x"
            if len(steps) > 1 and steps[0] and steps[1] and peaks[0] and peaks[1]
            else ""
        )
        print(f"| {length} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    main()
