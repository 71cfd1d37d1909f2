"""torch_compile on and off: does compiling the decoder layers pay on this machine?

Run (from the repository root; needs only sftlab, works in either venv):

    .venv/bin/python benchmarks/compile_speed.py                       # tiny-32k and SmolLM2-135M, fp32
    .venv/bin/python benchmarks/compile_speed.py --models tiny-32k --steps 6 --repeats 1   # quicker

Each run is `sftlab.train` in a fresh process (a new inductor cache dir per run, so every compiled
run pays the full compilation, as a first run on a new machine does) on packed rows padded to
max_length: one shape, so one compilation serves every step. Reported per model: steady-state
seconds per step (median over the steps after --warmup-steps), the first step's seconds (the
compilation shows there), the break-even step count (compilation / time saved per step), peak
RSS, and the largest difference between the two runs' per-step losses. Eager and compiled
alternate; with --repeats > 1 the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from sftlab import SFTConfig, train

    config = SFTConfig(
        model=spec["model_folder"],
        train_data=spec["data_path"],
        output_dir=spec["output_dir"],
        cache_dir=os.path.join(spec["workdir"], "cache"),
        max_length=spec["max_length"],
        packing=True,
        pad_to_multiple_of=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        logging_steps=1,
        seed=0,
        loss_implementation="sparse",
        torch_compile=spec["compiled"],
    )
    history = [r for r in train(config).history if r.get("type") == "train"]
    seconds = [r["seconds"] for r in history]
    print(
        "RESULT "
        + json.dumps(
            {"step_seconds": seconds, "losses": [r["loss"] for r in history], "peak_rss_mb": common.peak_rss_mb()}
        ),
        flush=True,
    )


def model_folder(name: str, workdir: str) -> str:
    if name == "smollm2":
        return common.smollm2_folder(os.path.join(workdir, "smollm2"))
    if name == "tiny-32k":
        return common.tiny_llama_folder(os.path.join(workdir, "tiny-32k"), common.qwen_tokenizer(32000))
    raise SystemExit(f"unknown model {name!r}: tiny-32k or smollm2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--models", default="tiny-32k,smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--workdir", default="/tmp/sftlab-bench")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, "compile-records.jsonl")
    common.write_jsonl(data_path, common.prompt_completion_records(args.batch_size * args.steps * 4, seed=0))
    report = {"machine": common.machine(), "args": vars(args), "models": {}}
    for name in args.models.split(","):
        folder = model_folder(name, args.workdir)
        runs = {False: [], True: []}
        for repeat in range(args.repeats):
            for compiled in (False, True):
                with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as inductor:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor  # a cold compile every time
                    spec = dict(
                        name=f"{name}-{'compiled' if compiled else 'eager'}",
                        model_folder=folder,
                        data_path=data_path,
                        output_dir=out,
                        workdir=args.workdir,
                        max_length=args.max_length,
                        batch_size=args.batch_size,
                        steps=args.steps,
                        compiled=compiled,
                        threads=args.threads,
                    )
                    result = common.run_child(__file__, spec)
                result["load"] = common.loadavg()
                runs[compiled].append(result)
                timed = result["step_seconds"][args.warmup_steps :]
                print(
                    f"{spec['name']} #{repeat + 1}: first step {result['step_seconds'][0]:.1f} s, steady {common.median(timed):.3f} s/step, "
                    f"peak RSS {result['peak_rss_mb']:.0f} MB, load {result['load']:.1f}",
                    flush=True,
                )

        def steady(r):
            return common.median(r["step_seconds"][args.warmup_steps :])

        eager, compiled = (common.median([steady(r) for r in runs[k]]) for k in (False, True))
        first_eager, first_compiled = (common.median([r["step_seconds"][0] for r in runs[k]]) for k in (False, True))
        compile_s = first_compiled - first_eager
        saved = eager - compiled
        summary = {
            "eager_s_per_step": eager,
            "compiled_s_per_step": compiled,
            "speedup": eager / compiled,
            "first_step_eager_s": first_eager,
            "first_step_compiled_s": first_compiled,
            "compile_s": compile_s,
            "break_even_steps": compile_s / saved if saved > 0 else None,
            "peak_rss_mb": {
                k: common.median([r["peak_rss_mb"] for r in runs[c]]) for k, c in (("eager", False), ("compiled", True))
            },
            "max_loss_difference": max(abs(a - b) for a, b in zip(runs[False][0]["losses"], runs[True][0]["losses"])),
            "runs": {"eager": runs[False], "compiled": runs[True]},
        }
        report["models"][name] = summary
        print(
            f"{name}: eager {eager:.3f} s/step, compiled {compiled:.3f} s/step (x{eager / compiled:.2f}); compilation {compile_s:.0f} s, "
            f"break-even after {summary['break_even_steps']:.0f} steps"
            if summary["break_even_steps"]
            else f"{name}: eager {eager:.3f} s/step, compiled {compiled:.3f} s/step (x{eager / compiled:.2f}): never pays; compilation {compile_s:.0f} s",
            flush=True,
        )
        print(f"  max |loss difference| {summary['max_loss_difference']:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
