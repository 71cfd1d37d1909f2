"""Where one training step of a real model goes: a timed breakdown of sftlab's step, phase by phase.

Run (from the repository root; either venv; Gemma needs the packages of benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/profile_step.py --model gemma3-270m            # ~2 min
    /work/benchvenv/bin/python benchmarks/profile_step.py --model smollm2 --steps 3
    /work/benchvenv/bin/python benchmarks/profile_step.py --model gemma3-270m --trace /tmp/gemma.json   # + a chrome trace

It runs the maths of sftlab's step by hand, in the order sftlab's loop runs it, on the batches
sftlab's StepPlan gives (same data as real_models.py, in file order), with the same modules
(SupervisedLoss's trunk and sparse head, fused AdamW from setup_optimizer, clipping 1.0), and
times each phase with a wall clock:

  data          collating the step's batch (StepPlan.collate)
  trunk fwd     the transformer (embedding lookup and decoder layers) up to the last hidden states
  head          the chunked LM head + cross-entropy, whose gradients are computed in this same pass
  backward      loss.backward(): the trunk's backward, the embedding lookup's gradient, the
                accumulation of the tied weight's two gradients (split below with torch.profiler);
                --tied-grad summed times the tied weight's gradient as sftlab made it before
  clip          clip_grad_norm_ over every gradient
  optimizer     fused AdamW step
  zero_grad     set_to_none

Each phase is timed on the wall clock and on the process's CPU clock (with --threads 1, the CPU
seconds are what the phase costs on a core of its own; on a shared machine they are the steadier figure).

Inside backward, torch.profiler (one step) separates the embedding's gradient
(embedding_dense_backward / embedding_backward) and the gradient accumulation of the tied weight
(add / add_ on vocab x hidden tensors, AccumulateGrad) from the rest. Python overhead of sftlab's
loop is what benchmarks/overhead.py measures (sftlab's step against this bare sequence).
The first --warmup-steps are not timed; the median over the timed steps is reported, with the
share of the step, the peak RSS and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

PHASES = ("data", "trunk fwd", "head", "backward", "clip", "optimizer", "zero_grad")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", choices=("gemma3-270m", "smollm2"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--records", type=int, default=160)
    parser.add_argument("--tied-grad", default="in-place", choices=("in-place", "summed"),
                        help="a tied weight's gradient as sftlab makes it (head's into .grad, sparse lookup gradient added "
                             "in place) or as before (both returned to autograd and summed)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sftlab-bench"))
    parser.add_argument("--trace", help="also write a chrome trace of the last step here")
    parser.add_argument("--json", help="also write the breakdown to this file")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from real_models import prepare_model
    from sftlab import TargetSettings, prepare_examples
    from sftlab.models import load_model, load_tokenizer
    from sftlab.training.batching import StepPlan
    from sftlab.data.special_tokens import pad_token_id
    from sftlab.training.setup import setup_optimizer
    from sftlab.training.loss import SupervisedLoss, head_loss, split_model
    from sftlab.data.container import IGNORE

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    data_path = os.path.join(args.workdir, f"data-pc-{args.records}.jsonl")
    if not os.path.isfile(data_path):
        common.write_jsonl(data_path, common.prompt_completion_records(args.records))
    folder = prepare_model(args.model, args.workdir)
    tokenizer = load_tokenizer(folder)
    examples = prepare_examples(data_path, tokenizer, TargetSettings(max_length=args.max_length),
                                cache_dir=os.path.join(args.workdir, "profile-cache"))
    torch.manual_seed(42)
    model = load_model(folder)
    model.config.use_cache = False
    model.train()
    plan = StepPlan(examples, packing=False, max_length=args.max_length, batch_size=args.batch_size, accumulation=1,
                    world_size=1, seed=42, group_by_length=False, shuffle=False)
    pad = pad_token_id(tokenizer)
    loss_module = SupervisedLoss(model, "sparse")
    _, trunk, head = split_model(model)
    embedding = model.get_input_embeddings()
    # SupervisedLoss.forward's handling of a tied weight, by hand, so that the trunk and the head can be timed apart.
    in_place = args.tied_grad == "in-place" and head.weight is embedding.weight
    optimizer = setup_optimizer(model, learning_rate=2e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]

    rows, cpu_rows, backward_ops = [], [], None
    for step in range(args.steps):
        clock, cpu = [], []

        def tick():
            clock.append(time.perf_counter())
            cpu.append(time.process_time())

        tick()
        batch = plan.collate(plan.micro_batches(step, 0)[0], pad, None)
        tick()
        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True) if step == args.steps - 1 else None
        embedding.sparse = in_place
        hidden = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        embedding.sparse = False
        tick()
        keep = batch["targets"] != IGNORE
        loss_sum, _, _ = head_loss(head, hidden[keep], batch["targets"][keep], loss_module.scale, loss_module.softcap, loss_module.rows,
                                weight_grad_in_place=in_place)
        tick()
        count = max(int(keep.sum()), 1)
        if profiler is not None:
            profiler.__enter__()
        (loss_sum / count).backward()
        if profiler is not None:
            profiler.__exit__(None, None, None)
        tick()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        tick()
        optimizer.step()
        tick()
        optimizer.zero_grad(set_to_none=True)
        tick()
        rows.append(dict(zip(PHASES, (b - a for a, b in zip(clock, clock[1:])))) | {"supervised": count, "loss": float(loss_sum.detach()) / count})
        cpu_rows.append(dict(zip(PHASES, (b - a for a, b in zip(cpu, cpu[1:])))))
        print(f"step {step + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if k in PHASES), file=sys.stderr, flush=True)
        if profiler is not None:
            backward_ops = profiler
    timed = rows[args.warmup_steps:]
    median = {k: common.median([r[k] for r in timed]) for k in PHASES}
    median_cpu = {k: common.median([r[k] for r in cpu_rows[args.warmup_steps:]]) for k in PHASES}
    total, total_cpu = sum(median.values()), sum(median_cpu.values())

    # The backward's ops, from the profiler: the embedding gradient and the tied weight's accumulation apart.
    vocab_hidden = tuple(model.get_input_embeddings().weight.shape)
    split = {"embedding gradient": 0.0, "tied-weight accumulation (vocab x hidden add)": 0.0}
    events = backward_ops.key_averages(group_by_input_shape=True)
    for event in events:
        seconds = event.self_cpu_time_total / 1e6
        if event.key in ("aten::embedding_backward", "aten::embedding_dense_backward", "aten::embedding_sparse_backward"):
            # Inclusive time (its zero-fill and index_add are child ops), counted once, at the outermost op.
            if event.key == "aten::embedding_backward" or not any(e.key == "aten::embedding_backward" for e in events):
                split["embedding gradient"] += event.cpu_time_total / 1e6
        elif event.key in ("aten::add", "aten::add_") and any(tuple(s) == vocab_hidden for s in (event.input_shapes or []) if s):
            split["tied-weight accumulation (vocab x hidden add)"] += seconds
    backward_total = rows[-1]["backward"]
    split["trunk backward (the rest)"] = max(0.0, backward_total - sum(split.values()))
    if args.trace:
        backward_ops.export_chrome_trace(args.trace)

    print(f"\n{args.model} (tied gradient: {args.tied_grad}): batch {args.batch_size}, max_length {args.max_length}, median of {len(timed)} steps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; peak RSS {common.peak_rss_mb():.0f} MB; "
          f"load {common.loadavg():.2f}")
    print(f"{'phase':<48}{'wall s':>7}{'%':>7}{'CPU s':>8}{'%':>7}")
    for k in PHASES:
        print(f"{k:<48}{median[k]:>7.2f}{100 * median[k] / total:>6.1f}%{median_cpu[k]:>8.2f}{100 * median_cpu[k] / total_cpu:>6.1f}%")
        if k == "backward":
            for name, seconds in split.items():
                print(f"  {name:<46}{seconds:>7.2f}{100 * seconds / backward_total * median[k] / total:>6.1f}%  (last step)")
    print(f"{'step':<48}{total:>7.2f}{'':>7}{total_cpu:>8.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "args": vars(args), "median": median, "median_cpu": median_cpu, "cpu_steps": cpu_rows, "backward_split_last_step": split,
                       "steps": rows, "peak_rss_mb": common.peak_rss_mb(), "load": common.loadavg(),
                       "threads": torch.get_num_threads(), "machine": common.machine()}, handle, indent=1)


if __name__ == "__main__":
    main()
