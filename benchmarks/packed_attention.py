"""Which attention kernel runs, and what it costs, for a lone example and for packed rows.

The tiny Llama of the tests (hidden 64, 2 layers, 4 heads, 2 KV heads), gradient checkpointing on,
one thread: one forward and backward of the trunk on a row of L tokens, each configuration in a
fresh process (its peak RSS its own), for

    lone           one example of L tokens, sdpa: no mask, sdpa's flash path with is_causal
    packed sdpa    four examples of L/4 packed in the row: transformers builds an L x L block mask
    packed sdpa_packed   the same row, sdpa once per example (training/attention.py): no mask

The aten ops sdpa dispatched to are recorded with the profiler (which costs time: the seconds here
compare configurations with one another, not with training runs).

    python benchmarks/packed_attention.py --lengths 8192,16384,32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGURATIONS = (("lone", "sdpa"), ("packed", "sdpa"), ("packed", "sdpa_packed"))


def child(length: int, layout: str, attention: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from sftlab.training.attention import register
    from tiny_models import tiny_model

    register()
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=128, attn=attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(1, 128, (1, length))
    positions = torch.arange(length)[None] if layout == "lone" else torch.arange(length // 4).repeat(4)[None]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        hidden.pow(2).mean().backward()
    seconds = time.perf_counter() - started
    ops = sorted({e.name for e in prof.events() if "attention" in e.name and e.name.startswith("aten::_")})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "before_mb": before, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*json.loads(args.child))), flush=True)
        return
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    print("| L | layout | attn_implementation | peak RSS | of which the pass | seconds | sdpa kernel |")
    print("|---:|---|---|---:|---:|---:|---|")
    for length in map(int, args.lengths.split(",")):
        for layout, attention in CONFIGURATIONS:
            spec = json.dumps([length, layout, attention])
            done = subprocess.run(
                [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, check=True
            )
            result = json.loads([x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
            print(
                f"| {length} | {layout} | {attention} | {result['peak_rss_mb']:.0f} MB | "
                f"{result['peak_rss_mb'] - result['before_mb']:.0f} MB | {result['seconds']:.1f} | "
                f"{', '.join(op.removeprefix('aten::') for op in result['ops'])} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
