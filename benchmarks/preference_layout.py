"""Does the shared row's cost model pick the faster layout? The trunk's time for one row per pair
[P | C | R] against two rows [P | C], [P | R], next to what the model predicts.

Run (from the repository root):

    .venv/bin/python benchmarks/preference_layout.py                     # tiny-32k's trunk, the default shapes
    .venv/bin/python benchmarks/preference_layout.py --hidden 576 --layers 4 --heads 9 --kv-heads 3 --mlp 1536
    .venv/bin/python benchmarks/preference_layout.py --shapes 8x10x400x400,8x400x20x20

Every micro-batch of a preference run is collated as one row per pair or two, whichever
`shared_row_is_cheaper` says costs the trunk less: rows x L x (1 + L / span), L the padded
length, span = attention_span(config). Here, for each shape (pairs x prompt x chosen x rejected
tokens, every pair alike), both layouts are collated as training collates them (4-D mask,
position ids), and the trunk's forward and backward (hidden.sum().backward(): the LM head is the
same work in both layouts and is left out) are timed --repeats times, the two layouts interleaved,
the minimum kept (on a shared machine the minimum is the run the others disturbed least). Printed:
the predicted and measured cost of the shared row relative to two rows, and whether the rule's
choice was the faster one. A tiny Llama from a config and a seed (fp32, sdpa, one torch thread
unless --threads), nothing downloaded.
"""

from __future__ import annotations

import argparse
import os
import time

DEFAULT_SHAPES = "8x100x100x100,8x300x100x100,8x20x230x230,4x16x500x500,2x16x1000x1000,2x1000x16x16"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="pairs x P x C x R, comma-separated")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=1024, help="intermediate size")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.data.container import Pairs
    from sftlab.training.preference import attention_span, collate_pairs, shared_row_is_cheaper

    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=1000,  # the trunk's cost does not depend on it
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192,
    )
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    trunk = LlamaForCausalLM(config).float().train().model
    span = attention_span(config)
    print(
        f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), MLP {args.mlp}, "
        f"{args.attn}, {torch.get_num_threads()} thread(s); attention span {span:.0f}; min of {args.repeats}; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'shape':<18}{'one row':>16}{'two rows':>16}{'predicted':>11}{'measured':>10}  rule picks")

    def seconds(batch) -> float:
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
        started = time.perf_counter()
        trunk(**inputs).last_hidden_state.sum().backward()
        trunk.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for shape in args.shapes.split(","):
        n, p, c, r = (int(x) for x in shape.split("x"))
        pairs = Pairs.from_lists([([5] * p, [6] * c, [7] * r)] * n)
        indices = list(range(n))
        batches = {shared: collate_pairs(pairs, indices, 0, shared_prompt=shared) for shared in (True, False)}
        times = {True: [], False: []}
        seconds(batches[True])  # warm-up: the allocator's first sight of these sizes
        for repeat in range(args.repeats):
            for shared in (True, False) if repeat % 2 == 0 else (False, True):
                times[shared].append(seconds(batches[shared]))
        one, two = min(times[True]), min(times[False])
        ls, lu = p + c + r, p + max(c, r)
        predicted = (n * ls * (1 + ls / span)) / (2 * n * lu * (1 + lu / span))
        picks_shared = shared_row_is_cheaper(pairs, indices, span)
        right = (one <= two) == picks_shared
        print(
            f"{shape:<18}{f'{n}x{ls}':>9}{one:>6.2f} s{f'{2 * n}x{lu}':>9}{two:>6.2f} s{predicted:>10.2f}x{one / two:>9.2f}x  "
            f"{'one row' if picks_shared else 'two rows'}{'' if right else ' (the slower)'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
