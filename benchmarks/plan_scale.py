"""How long does packing take for millions of examples? best_fit_decreasing at 100k to 10M examples.

Run (from the repository root):

    .venv/bin/python benchmarks/plan_scale.py                  # 100k, 1M, 10M examples
    .venv/bin/python benchmarks/plan_scale.py --sizes 100000 --reference

Lengths: log-normal around ~250 tokens (median e^5.5), 1 to 4096, bins of 4096 (max_length),
seeded. Each size is timed once in this process, with /proc/loadavg next to it. --reference also
times the implementation best_fit_decreasing replaced (a sorted list of rooms with insort,
kept in tests/test_batching.py as the reference it must agree with) and checks both give the
same bins; it grows faster than n log n, so keep its sizes small.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def lengths(n: int, capacity: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.5, 0.6, size=n).astype(np.int64) + 1, 1, capacity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="example counts, comma-separated")
    parser.add_argument("--capacity", type=int, default=4096, help="bin capacity (max_length)")
    parser.add_argument("--reference", action="store_true", help="also time the replaced implementation")
    args = parser.parse_args()

    from sftlab.training.batching import best_fit_decreasing

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    for n in (int(s) for s in args.sizes.split(",")):
        values = lengths(n, args.capacity)
        with open("/proc/loadavg") as handle:
            load = " ".join(handle.read().split()[:3])
        started = time.perf_counter()
        bins = best_fit_decreasing(values, args.capacity)
        seconds = time.perf_counter() - started
        line = f"{n:>11,} examples -> {len(bins):>9,} bins: {seconds:7.2f} s"
        if args.reference:
            from test_batching import reference_best_fit_decreasing

            started = time.perf_counter()
            same = reference_best_fit_decreasing(values, args.capacity) == bins
            line += f"; replaced implementation {time.perf_counter() - started:7.2f} s, same bins: {same}"
        print(f"{line}; loadavg {load}", flush=True)


if __name__ == "__main__":
    main()
