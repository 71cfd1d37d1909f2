"""The sparse LM head's chunk size at a large vocabulary: CPU seconds and peak memory per rows-per-chunk.

Run (from the repository root; either venv; ~2 min on one core):

    .venv/bin/python benchmarks/head_chunks.py                                  # Gemma 3's head: 262,144 x 640
    .venv/bin/python benchmarks/head_chunks.py --vocab 49152 --hidden 576 --rows-list 512,1165,2048   # SmolLM2's

head_loss (forward, with its gradients computed in the same pass, then backward) on --tokens
random supervised rows, in one torch thread, for each rows-per-chunk value; the default is
sftlab.training.loss.chunk_rows(vocab) (64M logits per chunk: 256 rows at 262k). Reported: the CPU
seconds of one call (median of --repeats, after one warm-up), the logits buffer of one chunk, and
the largest difference of the loss and gradients to those of the first chunking (rounding only).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument(
        "--tokens", type=int, default=512, help="supervised rows per call (batch 4 x 256 gives ~400-660 here)"
    )
    parser.add_argument("--rows-list", default="128,256,512,1024")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch import nn

    from sftlab.training.loss import chunk_rows, head_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    reference = None
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.tokens} rows; default chunk {chunk_rows(args.vocab)} rows; torch {torch.__version__}"
    )
    print(f"{'rows/chunk':>10}{'chunks':>8}{'buffer MB':>11}{'CPU s':>8}{'max rel. difference to the first':>34}")
    for rows in [int(r) for r in args.rows_list.split(",")]:
        seconds = []
        for _ in range(args.repeats + 1):
            head.weight.grad, hidden.grad = None, None
            started = time.process_time()
            loss, _, _ = head_loss(head, hidden, targets, rows=rows)
            loss.backward()
            seconds.append(time.process_time() - started)
        result = (loss.detach(), head.weight.grad.clone(), hidden.grad.clone())
        reference = result if reference is None else reference
        # Relative to each tensor's largest value: other chunkings sum in another order.
        difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(result, reference))
        median = sorted(seconds[1:])[len(seconds[1:]) // 2]
        print(
            f"{rows:>10}{-(-args.tokens // rows):>8}{min(rows, args.tokens) * args.vocab * 4 / 2**20:>11.0f}{median:>8.2f}{difference:>34.1e}"
        )


if __name__ == "__main__":
    main()
