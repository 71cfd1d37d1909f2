"""sftlab's training step next to a bare PyTorch loop doing the same maths: how much the loop costs.

Run (from the repository root; needs only sftlab, works in either venv):

    /work/benchvenv/bin/python benchmarks/overhead.py                        # tiny-32k, padded and packed
    /work/benchvenv/bin/python benchmarks/overhead.py --model tiny-151k --steps 8 --repeats 1   # quicker
    # one H100: --device cuda --bf16

Both sides train the same saved weights on the same micro-batches: the bare loop builds
sftlab's StepPlan with the same seed and collates every step's batch BEFORE timing starts, then
runs, per optimizer step:

    out = SupervisedLoss(model)(**batch)           # the same sparse loss module sftlab uses
    (out["loss_sum"] / out["count"]).backward()
    clip_grad_norm_(params, max_grad_norm); optimizer.step(); scheduler.step(); optimizer.zero_grad()
                                                   # (sftlab's default settings, fused AdamW)
    float(out["loss_sum"])                         # one host sync, as any loop that logs has

sftlab side: sftlab.training() with logging_steps=1; its per-step seconds come from its metrics
(collation, token counting, all-reduces, clipping, optimizer, scheduler, logging included).
The first --warmup-steps are not timed. Each side runs in its own process, alternating, --repeats
times; the median per-step time is reported, and overhead = sftlab / bare (target: <= 1.10).
The per-step losses of both sides are compared as well: the same maths gives the same numbers.
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


def child(spec: dict) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["side"] == "sftlab":
        from sftlab import SFTConfig, train

        config = SFTConfig(model=spec["model_folder"], train_data=spec["data_path"], output_dir=spec["output_dir"],
                           cache_dir=os.path.join(spec["output_dir"], "cache"), max_length=spec["max_length"],
                           per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"], logging_steps=1,
                           packing=spec["packing"], bf16=spec["bf16"], seed=spec["seed"], loss_implementation="sparse")
        history = [r for r in train(config).history if r.get("type") == "train"]
        seconds = [r["seconds"] for r in history]
        losses = [r["loss"] for r in history]
    else:
        seconds, losses = bare_loop(spec)
    warm = spec["warmup"]
    timed = seconds[warm:]
    print("RESULT " + json.dumps({"step_seconds": seconds, "losses": losses, "step_s": sum(timed) / len(timed),
                                  "peak_rss_mb": common.peak_rss_mb()}), flush=True)


def bare_loop(spec: dict) -> tuple[list[float], list[float]]:
    import math

    import torch
    from transformers import get_scheduler

    from sftlab import SFTConfig, TargetSettings, prepare_examples
    from sftlab.data.container import IGNORE
    from sftlab.training.loss import SupervisedLoss
    from sftlab.models import load_model, load_tokenizer
    from sftlab.training.batching import StepPlan
    from sftlab.data.special_tokens import pad_token_id
    from sftlab.training.distributed import seed_everything

    seed_everything(spec["seed"])  # as sftlab's train() does, before the model exists
    device = torch.device(spec["device"])
    tokenizer = load_tokenizer(spec["model_folder"])
    examples = prepare_examples(spec["data_path"], tokenizer, TargetSettings(max_length=spec["max_length"]),
                                cache_dir=os.path.join(spec["output_dir"], "cache"))
    model = load_model(spec["model_folder"]).to(device)
    model.config.use_cache = False
    model.train()
    plan = StepPlan(examples, packing=spec["packing"], max_length=spec["max_length"], batch_size=spec["batch_size"],
                    accumulation=1, world_size=1, seed=spec["seed"], group_by_length=False)
    pad = pad_token_id(tokenizer)
    batches = []
    for step in range(spec["steps"]):
        batch = plan.collate(plan.micro_batches(step, 0)[0], pad, None)
        batches.append({k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})
    loss_module = SupervisedLoss(model, "sparse")
    params = [p for p in model.parameters() if p.requires_grad]
    # sftlab's default optimizer, schedule and clipping, read from its config so they cannot drift
    # apart; fused AdamW as sftlab uses (the unfused one rounds differently: losses ~1 ulp apart).
    d = SFTConfig(model=spec["model_folder"], train_data=spec["data_path"])
    optimizer = torch.optim.AdamW(params, lr=d.learning_rate, betas=(d.adam_beta1, d.adam_beta2), eps=d.adam_epsilon,
                                  weight_decay=d.weight_decay, fused=True)
    scheduler = get_scheduler(d.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(d.warmup_ratio * spec["steps"]),
                              num_training_steps=spec["steps"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    seconds, losses = [], []
    for batch in batches:
        started = time.perf_counter()
        with autocast:
            out = loss_module(**batch)
        count = max(int((batch["targets"] != IGNORE).sum()), 1)  # known before the forward, as in sftlab
        (out["loss_sum"] / count).backward()
        torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out["loss_sum"]) / count)
        seconds.append(time.perf_counter() - started)
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny-32k", choices=("tiny-32k", "tiny-151k", "smollm2"))
    parser.add_argument("--packing", default="both", choices=("off", "on", "both"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sftlab-bench"))
    parser.add_argument("--wait-load", type=float, default=0.0, help="wait (up to 30 min) for the load average to drop below this")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    from train_throughput import prepare_model

    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, f"data-pc-{args.records}.jsonl")
    if not os.path.isfile(data_path):
        common.write_jsonl(data_path, common.prompt_completion_records(args.records))
    folder = prepare_model(args.model, args.workdir)
    quiet = common.wait_for_quiet(args.wait_load) if args.wait_load else {"load_at_start": common.loadavg()}
    packings = {"off": [False], "on": [True], "both": [False, True]}[args.packing]
    runs = []
    for repeat in range(args.repeats):
        for packing in packings:
            sides = ["sftlab", "bare"] if repeat % 2 == 0 else ["bare", "sftlab"]
            for side in sides:
                spec = dict(side=side, name=f"{side}/packing={packing}/{repeat}", model_folder=folder, data_path=data_path,
                            packing=packing, steps=args.steps, warmup=args.warmup_steps, batch_size=args.batch_size,
                            max_length=args.max_length, device=args.device, bf16=args.bf16, seed=42, threads=args.threads,
                            output_dir=os.path.join(args.workdir, "runs", f"overhead-{side}-{packing}-{repeat}"))
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result = common.run_child(os.path.abspath(__file__), spec)
                shutil.rmtree(spec["output_dir"], ignore_errors=True)
                result.update(side=side, packing=packing, repeat=repeat)
                runs.append(result)
                print(f"{spec['name']}: {result['step_s']:.3f} s/step  load {common.loadavg():.2f}", file=sys.stderr, flush=True)

    m = common.machine()
    print(f"\n{args.model}, batch {args.batch_size}, max_length {args.max_length}, {args.steps} steps ({args.warmup_steps} not timed), "
          f"median of {args.repeats}; {m['cpus']} CPUs ({m['cpu']}), torch {m['versions']['torch']}; load at start {quiet['load_at_start']:.2f}")
    print(f"{'packing':<9}{'sftlab s/step':>15}{'bare s/step':>13}{'sftlab/bare':>13}{'max |loss diff|':>17}")
    summary = {}
    for packing in packings:
        mine = {side: [r for r in runs if r["side"] == side and r["packing"] == packing] for side in ("sftlab", "bare")}
        s = common.median([r["step_s"] for r in mine["sftlab"]])
        b = common.median([r["step_s"] for r in mine["bare"]])
        diff = max(abs(x - y) for x, y in zip(mine["sftlab"][0]["losses"], mine["bare"][0]["losses"]))
        summary[str(packing)] = {"sftlab_step_s": s, "bare_step_s": b, "ratio": s / b, "max_loss_diff": diff}
        print(f"{str(packing):<9}{s:>15.3f}{b:>13.3f}{s / b:>12.3f}x{diff:>17.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": m, "args": vars(args), "quiet": quiet, "summary": summary, "runs": runs}, handle, indent=1)


if __name__ == "__main__":
    main()
