"""Validate and tokenize a stream of record chunks into a store: in this process, or sharded
over spawned worker processes. SFT examples (`Recipe`) and preference pairs
(data/preference.py's `PairRecipe`) go the same way: a recipe says how a chunk is validated and
built (its `chunk_pass`), how the first valid record is found (`probe`), what is counted
(`counts`) and which arrays the store holds (`layout`).

    one process:  chunks -> validate -> build (render + encode pipeline) -> append to the entry
    N workers:    this process reads the chunks and hands them out; each worker validates,
                  builds and appends to its own shard; the entry is the shards' runs copied back
                  in chunk order, so it is byte for byte what one process writes.

Workers are spawned, not forked: a forked child gets the parent's fast tokenizer with its
thread pool already used, which the tokenizers library then runs on one thread (measured
1.8x slower per worker). Errors keep their order: the first bad record in the data is the one
reported, whichever worker found it. Workers die with the process that started them, even when
it is killed with SIGKILL (see `_die_with_parent`): nothing is left holding a tokenizer's memory.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.container import IGNORE, Examples
from sftlab.data.examples import ExampleBuilder, TargetSettings
from sftlab.data.fields import FieldMap
from sftlab.data.formats import RecordValidator, require_valid
from sftlab.data.sources import Records, RecordStream
from sftlab.data.store import EXAMPLES, Layout, StoreWriter
from sftlab.errors import ConfigError, DataError, SftlabError


@dataclass(frozen=True)
class Recipe:
    """Everything that turns a chunk of records into examples: what every worker is sent once."""

    tokenizer: Any
    settings: TargetSettings
    text_field: str = "text"
    skip_invalid: bool = False
    field_map: FieldMap = field(default_factory=FieldMap)

    @property
    def layout(self) -> Layout:
        return EXAMPLES

    def chunk_pass(self) -> ChunkPass:
        return ChunkPass(self)

    def probe(self) -> RecordValidator:
        """A validator that finds the first valid record (its format fixes the pass's) without raising."""
        return RecordValidator(
            text_field=self.text_field, skip_invalid=True, vocab_size=len(self.tokenizer), normalize=self.field_map
        )

    def counts(self) -> Counts:
        return Counts()


def add_counts(into, other) -> None:
    """Add the counts of dataclass `other` to `into` (of the same class): numbers and Counters;
    a Counter that is None on one side is the other's. Zeros stay listed (Counter addition drops
    them; the statistics list every key)."""
    for name in into.__dataclass_fields__:
        mine, theirs = getattr(into, name), getattr(other, name)
        if theirs is None:
            continue
        if isinstance(theirs, Counter):
            total = (mine or Counter()) + theirs
            for key in list(theirs) + list(mine or ()):
                total.setdefault(key, 0)
            setattr(into, name, total)
        else:
            setattr(into, name, mine + theirs)


@dataclass
class Counts:
    """What a pass counted; counts of several workers add up to those of one pass."""

    records: int = 0
    examples: int = 0
    tokens: int = 0
    supervised: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    chat: Counter | None = None

    def add_chunk(self, records: int, examples: Examples) -> None:
        self.records += records
        self.examples += len(examples)
        self.tokens += len(examples.input_ids)
        self.supervised += int((examples.targets != IGNORE).sum())

    def merge(self, other: Counts) -> None:
        add_counts(self, other)


class ChunkPass:
    """Validation and building of chunks in order, with the state of one pass over them.

    `failed` is the tag of the chunk an error was found in (whatever `run` was given with it)."""

    def __init__(self, recipe: Recipe):
        self.validator = RecordValidator(
            text_field=recipe.text_field,
            skip_invalid=recipe.skip_invalid,
            vocab_size=len(recipe.tokenizer),
            normalize=recipe.field_map,
        )
        self.builder = ExampleBuilder(recipe.tokenizer, recipe.settings, skip_invalid=recipe.skip_invalid)
        self.failed: Any = None

    def expect(self, expected: str | None, expected_from: int) -> None:
        """What the pass over all chunks knows at the next chunk: the format of the first valid
        record and its index (a worker validates chunks out of order)."""
        self.validator.expected_format, self.validator.expected_from = expected, expected_from

    def finish(self, name: str) -> None:
        """At the end of the pass: a source without one valid record is an error."""
        self.validator.finish(name)

    def counts(self) -> Counts:
        """What the pass counted besides each chunk's records and examples."""
        built = self.builder.stats()
        counts = Counts(
            formats=Counter(self.validator.formats),
            skipped=self.validator.skipped + Counter(built["skipped_invalid"]),
            truncated=built["truncated"],
            dropped=Counter(built["dropped"]),
        )
        if "chat" in built:
            counts.chat = Counter(built["chat"])
            for key in built["chat"]:  # Counter() drops no keys, but addition would: listed as they are
                counts.chat.setdefault(key, 0)
        return counts

    def run(self, chunks: Iterable[tuple[Any, Records]]) -> Iterator[tuple[Any, Records, Examples]]:
        """(tag, chunk, its examples) for each (tag, chunk), in order."""
        recent: deque[tuple[Any, Records]] = deque()  # chunks given to the builder, not yet built

        def validated():
            for tag, chunk in chunks:
                recent.append((tag, chunk))
                self.failed = tag
                yield self.validator.validate(chunk)
            self.failed = None

        try:
            for examples in self.builder.build(validated()):
                tag, chunk = recent.popleft()
                yield tag, chunk, examples
        except DataError as error:
            if error.index is not None and error.source is None:  # from the builder: trace its record
                for tag, chunk in recent:
                    if chunk.start <= error.index < chunk.start + len(chunk):
                        self.failed = tag
                        raise located(error, chunk) from None
            raise


def located(error: DataError, records: Records) -> DataError:
    """The error with its record traced to the file (and line) it came from, as validation errors are."""
    if error.index is None or error.source is not None:
        return error
    source, row = records.locate(error.index - records.start)
    return type(error)(
        error.problem,
        source=source,
        index=row,
        field=error.field,
        found=error.found,
        expected=error.expected,
        fix=error.fix,
    )


def build_store(stream: RecordStream, recipe: Recipe, folder: str, workers: int = 1):
    """Validate and tokenize every chunk of `stream` into a store in `folder` (the recipe's
    layout); what was counted (the recipe's counts)."""
    if workers > 1:
        return _build_in_workers(stream, recipe, folder, workers)
    writer = StoreWriter(folder, recipe.layout)
    counts = recipe.counts()
    chunk_pass = recipe.chunk_pass()
    for _, chunk, items in chunk_pass.run((None, chunk) for chunk in stream.chunks()):
        writer.append(items)
        counts.add_chunk(len(chunk), items)
    chunk_pass.finish(stream.name)
    counts.merge(chunk_pass.counts())
    writer.close()
    return counts


# --- workers -----------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PARENT_POLL_SECONDS = 1.0


def _die_with_parent(parent: int) -> None:
    """End this worker when process `parent` ends, however it ends.

    A worker blocks on its task queue, so without this a parent killed with SIGKILL (or by the
    OOM killer) leaves its workers waiting forever, each holding a tokenizer and its buffers.
    On Linux the kernel sends SIGKILL at once (prctl PR_SET_PDEATHSIG). That signal fires when
    the *thread* that started the worker exits, not the process: safe here, since the thread
    that starts the workers is the one that joins them (`_build_in_workers`) and so outlives
    them; but it is also why a thread polling the parent id backs it up, everywhere (and alone
    where prctl does not exist). A parent that died before this ran is noticed by the first check.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc to call: the polling thread alone
            pass
    if os.getppid() != parent:  # orphaned already: re-parented to init or a subreaper
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)  # nothing to save: the shard is in the entry's temporary folder

    threading.Thread(target=watch, name="sftlab-parent-watch", daemon=True).start()


def _worker(recipe, shard: str, tasks, results, parent: int | None = None) -> None:
    """A worker's life: chunks from `tasks` (until None) into its shard, a message per chunk;
    it ends with process `parent` (see `_die_with_parent`)."""
    if parent is not None:
        _die_with_parent(parent)
    chunk_pass = None
    try:
        writer = StoreWriter(shard, recipe.layout)
        chunk_pass = recipe.chunk_pass()

        def taken():
            while True:
                task = tasks.get()
                if task is None:
                    return
                number, chunk, expected, expected_from = task
                # What the pass over all chunks knows at this chunk: the format of the first valid
                # record and its index, or nothing yet (None: no chunk before this one has one).
                chunk_pass.expect(expected, expected_from)
                yield number, chunk

        for number, chunk, items in chunk_pass.run(taken()):
            start = writer.position()
            writer.append(items)
            writer.flush()  # the parent copies this run from the file next
            counts = recipe.counts()
            counts.add_chunk(len(chunk), items)
            results.put(("chunk", number, shard, start, writer.position(), counts))
        counts = recipe.counts()
        counts.merge(chunk_pass.counts())
        writer.close()
        results.put(("done", shard, counts))
    except SftlabError as error:
        fields = {name: getattr(error, name) for name in ("source", "index", "field", "found", "expected", "fix")}
        failed = chunk_pass.failed if chunk_pass is not None and chunk_pass.failed is not None else -1
        results.put(("error", failed, type(error).__name__, error.problem, fields))
    except BaseException:  # a bug: its traceback goes to the parent, which raises it
        results.put(("crash", None, traceback.format_exc()))


def _build_in_workers(stream: RecordStream, recipe, folder: str, workers: int):
    recipe.chunk_pass()  # settings a builder refuses are refused here, before any worker starts
    context = multiprocessing.get_context("spawn")
    tasks = context.Queue(maxsize=2 * workers)  # read ahead of the workers by a little only
    results = context.Queue()
    shards = [os.path.join(folder, f"shard-{w}") for w in range(workers)]
    processes = [
        context.Process(target=_worker, args=(recipe, shard, tasks, results, os.getpid()), daemon=True)
        for shard in shards
    ]
    try:
        for process in processes:
            process.start()  # sends the recipe, tokenizer included, to the new process
    except (pickle.PicklingError, TypeError, AttributeError) as error:  # a tokenizer that cannot be sent
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
        warnings.warn(
            f"preparing in one process: the tokenizer cannot be sent to worker processes ({error})", stacklevel=3
        )
        return build_store(stream, recipe, folder, workers=1)
    merge = _Merge(StoreWriter(folder, recipe.layout), recipe.counts())
    probe = recipe.probe()
    try:
        sent = 0
        unreadable = None  # an error in the data's own syntax (a bad JSON line), met while reading ahead
        try:
            for chunk in stream.chunks():
                # The first valid record fixes the format for every worker: found here, record by record.
                for offset in range(len(chunk)) if probe.first_valid is None else ():
                    probe.validate(Records(chunk.records[offset : offset + 1], chunk.name, start=chunk.start + offset))
                    if probe.first_valid is not None:
                        break
                task = (sent, chunk, probe.expected_format, probe.expected_from if probe.first_valid is not None else 0)
                while not _put(tasks, task):
                    merge.take_available(results, processes)
                sent += 1
                merge.take_available(results, processes, block=False)
                if merge.errors:
                    break
        except DataError as error:
            unreadable = error
        for _ in processes:  # one end marker per worker (a worker that stopped at an error takes none)
            while merge.done < len(processes) and not _put(tasks, None):
                merge.take_available(results, processes)
        while merge.done < len(processes):
            merge.take_available(results, processes)
        # One process would have met a bad record in the chunks before the unreadable line first.
        merge.raise_first_error()
        if unreadable is not None:
            raise unreadable
        if merge.next_chunk != sent:  # pragma: no cover - every chunk sent is merged, or an error was raised
            raise AssertionError(f"merged {merge.next_chunk} of {sent} chunks")
        require_valid(merge.counts.formats, merge.counts.skipped, stream.name)
        merge.writer.close()
        return merge.counts
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        for shard in shards:
            shutil.rmtree(shard, ignore_errors=True)


def _put(tasks, task) -> bool:
    try:
        tasks.put(task, timeout=0.5)
        return True
    except queue.Full:
        return False


class _Merge:
    """The parent's side: workers' runs copied onto the entry in chunk order, counts summed."""

    def __init__(self, writer: StoreWriter, counts):
        self.writer = writer
        self.counts = counts
        self.pending: dict[int, tuple] = {}
        self.next_chunk = 0
        self.done = 0
        self.errors: list[tuple] = []

    def take_available(self, results, processes, block: bool = True) -> None:
        while True:
            try:
                message = results.get(timeout=0.5) if block else results.get_nowait()
            except queue.Empty:
                if block and not any(p.is_alive() for p in processes) and results.empty():
                    raise RuntimeError(
                        "preparation workers exited without finishing (killed, or out of memory?)"
                    ) from None
                return
            self._take(message)
            block = False  # then take whatever else is there without waiting

    def _take(self, message: tuple) -> None:
        kind = message[0]
        if kind == "chunk":
            self.pending[message[1]] = message
            while self.next_chunk in self.pending:
                _, _, shard, start, end, counts = self.pending.pop(self.next_chunk)
                self.writer.append_from(shard, start, end)
                self.counts.merge(counts)
                self.next_chunk += 1
        elif kind == "done":
            self.counts.merge(message[2])
            self.done += 1
        elif kind == "error":
            self.errors.append(message)
            self.done += 1
        else:
            raise RuntimeError(f"a preparation worker failed:\n{message[2]}")

    def raise_first_error(self) -> None:
        if not self.errors:
            return
        # The first in the data: every chunk before it was sent before it, so its result is in.
        _, _, kind, problem, fields = min(self.errors, key=lambda m: m[1])
        raise {"DataError": DataError, "ConfigError": ConfigError}.get(kind, SftlabError)(problem, **fields)
