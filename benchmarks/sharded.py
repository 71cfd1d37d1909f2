"""FSDP2 next to DDP on 2 processes (torchrun): step time and peak memory per process.

    python benchmarks/sharded.py                       # CPU, gloo: a 66M-parameter Llama, 2 processes
    python benchmarks/sharded.py --hidden 256 --layers 4 --steps 6 --repeats 1   # quicker
    # on GPUs: --nproc 8 --bf16 (nccl; the same code)

Both sides run `sftlab.train` under `torchrun --standalone --nproc_per_node N` on the same
saved weights (a Llama of --hidden x --layers, 32k Qwen vocabulary, untied head) and the same
prompt/completion records, padded batches of --batch-size per process, AdamW, sftlab's
defaults otherwise; `fsdp: true` is the only difference. Each process reports its own peak RSS
(`ru_maxrss`: the whole model is loaded once per process before sharding, so that is in the peak
too) and, on GPUs, `torch.cuda.max_memory_allocated`; step seconds are rank 0's metrics, the first
--warmup-steps not timed. FSDP keeps 1/N of the weights, gradients and AdamW moments per process
and pays an all-gather of each layer's weights in forward and in backward plus a reduce-scatter of
its gradients, where DDP pays one all-reduce of the gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def child(spec: dict) -> None:
    import torch

    from sftlab import SFTConfig, train

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = SFTConfig(
        model=spec["model_folder"],
        train_data=spec["data_path"],
        output_dir=spec["output_dir"],
        cache_dir=os.path.join(spec["output_dir"], "..", "cache"),
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        logging_steps=1,
        fsdp=spec["fsdp"],
        bf16=spec["bf16"],
        seed=0,
        shuffle=False,
    )
    history = [r for r in train(config).history if r.get("type") == "train"]
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "peak_rss_mb": common.peak_rss_mb(),
        "step_seconds": [r["seconds"] for r in history],
        "losses": [r["loss"] for r in history],
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def launch(spec: dict, nproc: int) -> list[dict]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS=str(spec.get("threads") or 1),
    )
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            os.path.abspath(__file__),
            "--child",
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    results = [json.loads(line[len("RESULT ") :]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or len(results) != nproc:
        sys.exit(
            f"{spec['name']} failed (exit {done.returncode}):\n"
            + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        )
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sftlab-bench-sharded"))
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, "data.jsonl")
    common.write_jsonl(data_path, common.prompt_completion_records(400))
    folder = common.tiny_llama_folder(
        os.path.join(args.workdir, f"llama-{args.hidden}x{args.layers}"),
        common.qwen_tokenizer(32000),
        hidden=args.hidden,
        layers=args.layers,
    )
    runs = []
    load = common.loadavg()
    for repeat in range(args.repeats):
        for fsdp in (False, True) if repeat % 2 == 0 else (True, False):
            name = f"{'fsdp' if fsdp else 'ddp'}/{repeat}"
            spec = dict(
                name=name,
                model_folder=folder,
                data_path=data_path,
                fsdp=fsdp,
                bf16=args.bf16,
                steps=args.steps,
                batch_size=args.batch_size,
                max_length=args.max_length,
                threads=args.threads,
                output_dir=os.path.join(args.workdir, "runs", name.replace("/", "-")),
            )
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
            ranks = launch(spec, args.nproc)
            shutil.rmtree(spec["output_dir"], ignore_errors=True)
            timed = ranks[0]["step_seconds"][args.warmup_steps :]
            runs.append(
                {
                    "fsdp": fsdp,
                    "repeat": repeat,
                    "step_s": sum(timed) / len(timed),
                    "ranks": ranks,
                    "load_after": common.loadavg(),
                }
            )
            print(
                f"{name}: {runs[-1]['step_s']:.3f} s/step, peak RSS {[round(r['peak_rss_mb']) for r in ranks]} MB, "
                f"load {common.loadavg():.2f}",
                file=sys.stderr,
                flush=True,
            )

    import torch

    params = sum(
        t.numel()
        for t in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(os.path.join(folder, "model.safetensors"))
        .values()
    )
    print(
        f"\nLlama {args.hidden} x {args.layers} layers, 32k vocab, {params / 1e6:.1f}M parameters; {args.nproc} processes, "
        f"batch {args.batch_size} x max_length {args.max_length} per process, {args.steps} steps ({args.warmup_steps} not timed), "
        f"median of {args.repeats}; torch {torch.__version__}; load at start {load:.2f}"
    )
    print(f"{'engine':<8}{'s/step':>9}{'peak RSS MB per process':>26}{'peak GPU MB':>13}{'last loss':>12}")
    summary = {}
    for fsdp in (False, True):
        mine = [r for r in runs if r["fsdp"] == fsdp]
        step = common.median([r["step_s"] for r in mine])
        rss = [round(common.median([r["ranks"][k]["peak_rss_mb"] for r in mine])) for k in range(args.nproc)]
        gpu = mine[0]["ranks"][0].get("peak_gpu_mb")
        name = "fsdp" if fsdp else "ddp"
        summary[name] = {
            "step_s": step,
            "peak_rss_mb": rss,
            "peak_gpu_mb": gpu,
            "last_loss": mine[0]["ranks"][0]["losses"][-1],
        }
        print(
            f"{name:<8}{step:>9.3f}{str(rss):>26}{(f'{gpu:.0f}' if gpu else '-'):>13}{summary[name]['last_loss']:>12.6f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"machine": common.machine(), "args": vars(args), "summary": summary, "runs": runs}, handle, indent=1
            )


if __name__ == "__main__":
    main()
