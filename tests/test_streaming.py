"""Streamed preparation: records read in chunks, examples appended to the cache entry as they are
made and read back memory-mapped, optionally by spawned workers. Every result must be exactly
what preparing the whole list in memory gives; errors must still name file:line and record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from sftlab import DataError, TargetSettings, load_records, prepare_examples
from sftlab.data.container import IGNORE, Examples
from sftlab.data.examples import ExampleBuilder
from sftlab.data.formats import RecordValidator
from tiny import char_tokenizer

CHATML = (
    "{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('boom is refused') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARRAYS = ("input_ids", "targets", "offsets", "record_index")
SETTINGS = TargetSettings(max_length=24)  # cuts the longer records: truncation is counted too


def pairs(n: int = 23) -> list[dict]:
    """Prompt/completion records of growing length; every 7th has an empty completion (invalid)."""
    return [
        {"prompt": "Q" * (1 + i % 9) + str(i), "completion": "" if i % 7 == 3 else "ab" * (1 + i % 11)}
        for i in range(n)
    ]


def chats(n: int = 23, invalid: bool = True) -> list[dict]:
    """One- and two-turn conversations; every 8th has an empty assistant turn (invalid)."""
    records = []
    for i in range(n):
        reply = "" if invalid and i % 8 == 5 else "a" * (1 + i % 5)
        messages = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok" * (1 + i % 4)}]
        records.append({"messages": messages})
    return records


def reference(records: list[dict], tokenizer, settings=SETTINGS):
    """The whole list in memory, in one chunk: what streaming must give exactly."""
    validator = RecordValidator(skip_invalid=True, vocab_size=len(tokenizer))
    loaded = load_records(records)
    valid = validator.validate(loaded)
    validator.finish(loaded.name)
    builder = ExampleBuilder(tokenizer, settings, skip_invalid=True)
    examples = Examples.concatenate(list(builder.build([valid])))
    built = builder.stats()
    lengths = examples.lengths
    stats = {
        "records": len(records),
        "formats": dict(validator.formats),
        "examples": len(examples),
        "skipped_invalid": dict(Counter(validator.skipped) + Counter(built["skipped_invalid"])),
        "truncated": built["truncated"],
        "dropped": built["dropped"],
        "tokens": int(lengths.sum()),
        "supervised_tokens": int((examples.targets != IGNORE).sum()),
        "length": {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (0, 50, 90, 99, 100)},
    }
    if "chat" in built:
        stats["chat"] = built["chat"]
    return examples, stats


def assert_same(streamed, expected, expected_stats):
    for name in ARRAYS:
        got, want = getattr(streamed, name), getattr(expected, name)
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), name
    for key, value in expected_stats.items():
        assert streamed.stats[key] == value, key


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def sources_of(records: list[dict], tmp_path, flat: bool) -> dict:
    """`records` in every kind of source there is (CSV and DataFrame cells only for flat records)."""
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            return records[i]

    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", records[:10])
    (tmp_path / "parts" / "b.json").write_text(json.dumps(records[10:17], indent=1), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records[17:]), tmp_path / "parts" / "c.parquet", row_group_size=2)
    (tmp_path / "wrapped.json").write_text(json.dumps({"rows": records}), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "all.parquet", row_group_size=4)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    kinds = {
        "jsonl": write_jsonl(tmp_path / "all.jsonl", records),
        "json array": str(tmp_path / "wrapped.json"),
        "parquet": str(tmp_path / "all.parquet"),
        "folder of jsonl+json+parquet": str(tmp_path / "parts"),
        "glob": str(tmp_path / "parts" / "*.j*"),
        "datasets.Dataset": datasets.Dataset.from_list(records),
        "IterableDataset": datasets.Dataset.from_list(records).to_iterable_dataset(),
        "saved Dataset": str(tmp_path / "saved"),
        "torch Dataset": Items(),
        "list": records,
    }
    if flat:
        with open(tmp_path / "all.csv", "w", newline="", encoding="utf-8") as handle:
            import csv

            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        kinds["csv"] = str(tmp_path / "all.csv")
        kinds["DataFrame"] = pd.DataFrame(records)
    return kinds


@pytest.mark.parametrize("data", ["pairs", "chats"])
def test_streaming_equals_the_in_memory_result_for_every_source_kind(tmp_path, monkeypatch, data):
    # Chunks of 3 records: every source is read in several chunks, which split files in the middle.
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 3)
    records = pairs() if data == "pairs" else chats()
    tokenizer = char_tokenizer(chat_template=CHATML)
    expected, expected_stats = reference(records, tokenizer)
    assert expected_stats["skipped_invalid"] and expected_stats["truncated"]  # the case has both
    glob_records = [json.loads(json.dumps(r)) for r in records[:17]]  # the glob leaves c.parquet out
    for kind, source in sources_of(records, tmp_path, flat=data == "pairs").items():
        want, want_stats = (expected, expected_stats) if kind != "glob" else reference(glob_records, tokenizer)
        for cached in (False, True):  # the built entry, then the same entry read back
            streamed = prepare_examples(
                source, tokenizer, SETTINGS, skip_invalid_records=True, cache_dir=str(tmp_path / "cache" / kind)
            )
            assert streamed.stats["cached"] is cached, kind
            assert_same(streamed, want, want_stats)
        assert_same(
            prepare_examples(source, tokenizer, SETTINGS, skip_invalid_records=True, use_cache=False), want, want_stats
        )


def test_the_entry_is_read_memory_mapped(tmp_path):
    examples = prepare_examples(pairs(), char_tokenizer(), SETTINGS, skip_invalid_records=True, cache_dir=str(tmp_path))
    for name in ARRAYS:
        array = getattr(examples, name)
        assert isinstance(array, np.memmap) and not array.flags.writeable, name
    (entry,) = [name for name in os.listdir(tmp_path) if not name.startswith(".")]
    files = [name + ".npy" for name in ARRAYS] + ["stats.json", "checksums.json"]
    assert sorted(os.listdir(tmp_path / entry)) == sorted(files)


def test_without_cache_nothing_is_left_on_disk(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    records = pairs()
    examples = prepare_examples(records, char_tokenizer(), SETTINGS, skip_invalid_records=True, use_cache=False)
    assert os.listdir(tmp_path) == []  # built in a temporary folder, mapped, and the folder removed
    expected, stats = reference(records, char_tokenizer())
    assert_same(examples, expected, stats)


# --- errors found in a stream ---------------------------------------------------------------------


def test_a_bad_record_far_into_a_file_is_named_by_file_line_and_record(tmp_path, monkeypatch):
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 100)
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(1000)]
    records[734]["completion"] = 7
    path = tmp_path / "data.jsonl"
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # record i on line i + 2
    with pytest.raises(DataError) as error:
        prepare_examples(str(path), char_tokenizer(), cache_dir=str(tmp_path / "cache"))
    assert str(error.value).startswith(f"{path}:736, record 734, field 'completion': must be a string; found int 7")
    assert [name for name in os.listdir(tmp_path / "cache") if not name.startswith(".")] == []


def test_a_record_the_template_refuses_is_named_by_file_line(tmp_path, monkeypatch):
    # The template fails while the record is rendered (after validation, in the builder).
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 4)
    records = chats(30)
    records[22]["messages"][0]["content"] = "boom"
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    with pytest.raises(DataError) as error:
        prepare_examples(path, char_tokenizer(chat_template=CHATML), skip_invalid_records=True, use_cache=False)
    assert str(error.value).startswith(
        f"{path}:23, record 22, field 'chat_template': the chat template failed on this record"
    )
    assert "boom is refused" in str(error.value)


# --- the cache entry: atomic, shared, waited for ---------------------------------------------------


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import sftlab.data.sources as sources
    import sftlab.data.store as store
    from sftlab import prepare_examples
    from tiny import char_tokenizer

    sources.CHUNK_RECORDS = 10
    append = store.StoreWriter.append
    def append_then_die(self, examples):
        append(self, examples)
        if self.items >= 30:  # three chunks are on disk: the process dies in the middle
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    store.StoreWriter.append = append_then_die
    prepare_examples({data!r}, char_tokenizer(), cache_dir={cache!r})
""")


def test_a_killed_preparation_leaves_no_half_entry(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)])
    cache = tmp_path / "cache"
    script = KILLED.format(tests=os.path.dirname(__file__), data=data, cache=str(cache))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr  # SIGKILL
    left = os.listdir(cache)
    # What it wrote is in a temporary folder; there is no entry, so nothing can read half of one.
    assert [name for name in left if not name.startswith(".")] == []
    (tmp,) = [name for name in left if name.startswith(".tmp-")]
    assert os.path.getsize(cache / tmp / "input_ids.npy") > 128  # the three chunks it appended
    again = prepare_examples(data, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False and again.stats["examples"] == 100
    assert not any(name.startswith(".tmp-") for name in os.listdir(cache))  # the dead builder's folder is removed
    fresh = prepare_examples(data, char_tokenizer(), use_cache=False)
    for name in ARRAYS:
        assert getattr(again, name).tolist() == getattr(fresh, name).tolist()


WAITER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    import sftlab.data.prepare as prepare
    from sftlab import prepare_examples
    from tiny import char_tokenizer

    markers = {markers!r}
    build = prepare.build_store
    def held_build(*args, **kwargs):  # holds the entry's lock until the test lets it go
        open(os.path.join(markers, "building"), "w").close()
        while not os.path.exists(os.path.join(markers, "go")):
            time.sleep(0.01)
        return build(*args, **kwargs)
    prepare.build_store = held_build
    waiting = prepare._waiting
    def noted(entry):
        open(os.path.join(markers, "waiting"), "w").close()
        waiting(entry)
    prepare._waiting = noted
    examples = prepare_examples({data!r}, char_tokenizer(), skip_invalid_records=True, cache_dir={cache!r})
    print(json.dumps({{"cached": examples.stats["cached"], "input_ids": examples.input_ids.tolist()}}))
""")


@pytest.mark.slow
def test_a_second_process_waits_for_the_entry_and_reads_it(tmp_path):
    # Two processes preparing one entry at once (ranks of one machine under torchrun): the first
    # builds it holding the entry's lock; the second waits on the lock, with no timeout, and then
    # reads what the first wrote instead of building it again.
    import time

    data = write_jsonl(tmp_path / "data.jsonl", pairs())
    script = WAITER.format(
        tests=os.path.dirname(__file__), markers=str(tmp_path), data=data, cache=str(tmp_path / "cache")
    )

    def start():
        return subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_for(name, process):
        deadline = time.monotonic() + 120
        while not (tmp_path / name).exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"no {name} marker within 120 s"
            time.sleep(0.01)

    first = start()
    try:
        wait_for("building", first)
        second = start()
        wait_for("waiting", second)  # the second found the lock taken while the first was building
        (tmp_path / "go").touch()
        (out_first, _), (out_second, err_second) = first.communicate(timeout=120), second.communicate(timeout=120)
    finally:
        first.kill()
    results = [json.loads(out.strip().splitlines()[-1]) for out in (out_first, out_second)]
    assert [r["cached"] for r in results] == [False, True]
    assert results[0]["input_ids"] == results[1]["input_ids"]
    assert "waiting for another process to finish preparing" in err_second


# --- workers --------------------------------------------------------------------------------------


def test_two_workers_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 5)  # 23 records: 5 chunks over 2 workers
    tokenizer = char_tokenizer(chat_template=CHATML)
    path = write_jsonl(tmp_path / "chats.jsonl", chats())
    prepare_examples(path, tokenizer, SETTINGS, skip_invalid_records=True, cache_dir=str(tmp_path / "one"), workers=1)
    two = prepare_examples(
        path, tokenizer, SETTINGS, skip_invalid_records=True, cache_dir=str(tmp_path / "two"), workers=2
    )
    (entry,) = [name for name in os.listdir(tmp_path / "one") if not name.startswith(".")]
    for name in [a + ".npy" for a in ARRAYS] + ["stats.json"]:
        mine, theirs = (tmp_path / "one" / entry / name).read_bytes(), (tmp_path / "two" / entry / name).read_bytes()
        if name == "stats.json":
            mine, theirs = ({k: v for k, v in json.loads(s).items() if k != "seconds"} for s in (mine, theirs))
        assert mine == theirs, name
    expected, stats = reference(chats(), tokenizer)
    assert_same(two, expected, stats)
    assert os.listdir(tmp_path / "two" / entry) == os.listdir(tmp_path / "one" / entry)  # no shard left behind


@pytest.mark.parametrize(
    "bad, first",
    [
        ({9: "boom", 30: "robot"}, 9),  # chunk 2: a template error in the builder; chunk 7: a validation error
        ({21: "boom", 14: "robot"}, 14),  # the validation error comes first
    ],
)
def test_with_workers_the_first_bad_record_is_the_one_reported(tmp_path, monkeypatch, bad, first):
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 4)
    records = chats(40, invalid=False)
    for index, kind in bad.items():
        if kind == "boom":
            records[index]["messages"][1]["content"] = "boom"
        else:
            records[index]["messages"][1]["role"] = "robot"
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    messages = []
    for workers in (1, 2):
        with pytest.raises(DataError) as error:
            prepare_examples(
                path, char_tokenizer(chat_template=CHATML), cache_dir=str(tmp_path / f"cache{workers}"), workers=workers
            )
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{path}:{first + 1}, record {first}, field ")
    assert ("boom is refused" if bad[first] == "boom" else "unknown role") in messages[0]


def test_with_workers_a_bad_record_before_an_unreadable_line_is_reported_first(tmp_path, monkeypatch):
    # The reader runs ahead of the workers: it meets the broken line 31 while record 5 is still
    # being validated in a worker. One process would have stopped at record 5; so must two.
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 4)
    lines = [json.dumps(record) for record in chats(40, invalid=False)]
    lines[30] = '{"messages": ['
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = char_tokenizer(chat_template=CHATML)
    with pytest.raises(DataError) as error:
        prepare_examples(str(path), tokenizer, use_cache=False, workers=2)
    assert str(error.value).startswith(f"{path}:31, record 30: invalid JSON line")
    bad = json.loads(lines[5])
    bad["messages"][1]["role"] = "robot"
    lines[5] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for workers in (1, 2):
        with pytest.raises(DataError) as error:
            prepare_examples(str(path), tokenizer, use_cache=False, workers=workers)
        assert str(error.value).startswith(f"{path}:6, record 5, field 'messages[1].role': unknown role"), workers


@pytest.mark.parametrize(
    "cores, size, length, expected",
    [
        (16, 80_000_000, None, 8),  # a large file on 16 cores: one worker per two cores
        (16, None, 50_000, 8),  # a list of 50k records
        (16, 10_000_000, None, 1),  # small data: starting workers costs more than it saves
        (16, None, None, 1),  # a stream of unknown size
        (2, 80_000_000, None, 1),  # 2 cores: one process keeps both busy already
    ],
)
def test_default_workers(monkeypatch, cores, size, length, expected):
    from sftlab.data.prepare import default_workers
    from sftlab.data.sources import RecordStream

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers(RecordStream("s", lambda: iter(()), size=size, length=length)) == expected


def test_a_tokenizer_that_cannot_be_sent_to_workers_prepares_in_one_process():
    from transformers import PreTrainedTokenizerFast

    class Unsendable(PreTrainedTokenizerFast):
        def __reduce_ex__(self, protocol):
            raise TypeError("this tokenizer stays in its process")

    tokenizer = char_tokenizer()
    tokenizer.__class__ = Unsendable
    with pytest.warns(UserWarning, match="preparing in one process: the tokenizer cannot be sent to worker processes"):
        examples = prepare_examples(pairs(), tokenizer, SETTINGS, skip_invalid_records=True, use_cache=False, workers=2)
    expected, stats = reference(pairs(), char_tokenizer())
    assert_same(examples, expected, stats)


ORPHANS = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import sftlab.data.workers as workers
    from sftlab import prepare_examples
    from tiny import char_tokenizer

    merge = workers._Merge.__init__
    def started_then_stuck(self, *args):  # the workers are started: the parent stops here, to be killed
        merge(self, *args)
        open({marker!r}, "w").close()
        time.sleep(600)
    workers._Merge.__init__ = started_then_stuck
    prepare_examples({data!r}, char_tokenizer(), use_cache=False, workers=2)
""")


def _children(pid: int) -> set[int]:
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found.update(int(child) for child in handle.read().split())
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_preparation_workers_die_when_their_parent_is_killed(tmp_path):
    # `sftlab prepare` SIGKILLed (or OOM-killed) while its workers wait for chunks: the workers
    # must not live on as orphans, each holding a tokenizer.
    import signal
    import time

    data = write_jsonl(tmp_path / "data.jsonl", pairs(200))
    marker = tmp_path / "started"
    script = ORPHANS.format(tests=os.path.dirname(__file__), data=data, marker=str(marker))
    # Output to a file, not a pipe: orphaned workers would hold a pipe open, and reading it would hang.
    log = open(tmp_path / "log", "w")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert parent.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "the workers did not start within 120 s"
            time.sleep(0.05)
        workers = _children(parent.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        time.sleep(1)  # let the workers finish starting: they are then blocked on the task queue
        assert all(_alive(pid) for pid in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        log.close()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # do not leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "workers outlived their killed parent"


WATCHED = textwrap.dedent("""
    import os, sys, time
    import sftlab.data.workers as workers

    child = os.fork()
    if child == 0:
        sys.platform = "darwin"  # no prctl: the thread that polls the parent id alone
        workers._die_with_parent(os.getppid())
        time.sleep(600)
        os._exit(0)
    print(child, flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.exists("/proc/self/stat"), reason="forks, reads /proc")
def test_where_the_kernel_cannot_the_polling_thread_ends_a_worker_with_its_parent(tmp_path):
    import signal
    import time

    log = tmp_path / "log"
    with open(log, "w") as handle:
        parent = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not log.read_text().strip():
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        child = int(log.read_text().split()[0])
        time.sleep(0.5)
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = _alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)
    assert not survived, "the worker outlived its killed parent"
