"""Prepared examples on disk: a cache entry is a folder of 1-D .npy arrays and stats.json.

    input_ids.npy  int32, every example's tokens one after another
    targets.npy    int32, aligned with input_ids
    offsets.npy    int64, example i is [offsets[i], offsets[i+1])
    record_index.npy  int64, the source record of each example
    stats.json     what preparation counted (prepare.summarize)

Chunks are appended as they are built (the arrays never exist whole in memory), and entries
are read back memory-mapped: the pages are shared by every process on the machine and only
the ones a batch touches are read. An entry is written under a temporary name and renamed
into place, so a reader (or a killed writer) never leaves or sees half an entry; processes
that need the same entry take turns on a file lock, the first builds it, the others wait
for it without a timeout (see `entry_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np

from sftlab.data.container import Examples
from sftlab.files import publish_directory, temporary_sibling

ARRAYS = {"input_ids": np.int32, "targets": np.int32, "offsets": np.int64, "record_index": np.int64}
_COPY = 8 << 20  # bytes per read when shards are merged


def _header(dtype, count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)})
    return buffer.getvalue()


class ArrayFile:
    """A 1-D .npy file written by appending; its header gets the final length on close.

    numpy pads every header with room for a 21-digit length (so that a file can grow in
    place), hence the header written first and the final one have the same size."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.handle = open(path, "wb")
        self.header_bytes = len(_header(self.dtype, 0))
        self.handle.write(_header(self.dtype, 0))
        self.count = 0

    def append(self, values: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.count += len(values)

    def append_from(self, path: str, start: int, count: int) -> None:
        """Copy elements [start, start + count) of another array file of this type (flushed by
        its writer) onto this one."""
        position = self.header_bytes + start * self.dtype.itemsize
        left = count * self.dtype.itemsize
        with open(path, "rb") as source:
            while left:
                block = os.pread(source.fileno(), min(left, _COPY), position)
                if not block:  # pragma: no cover - the writer reported more than it wrote
                    raise AssertionError(f"{path} ends before element {start + count}")
                self.handle.write(block)
                position += len(block)
                left -= len(block)
        self.count += count

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        header = _header(self.dtype, self.count)
        if len(header) != self.header_bytes:  # pragma: no cover - numpy's padding says it cannot happen
            raise AssertionError(f"{self.path}: .npy header changed size")
        self.handle.seek(0)
        self.handle.write(header)
        self.handle.close()


class StoreWriter:
    """Appends chunks of examples to the four arrays of an entry (or of a worker's shard)."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.files = {name: ArrayFile(os.path.join(folder, name + ".npy"), dtype) for name, dtype in ARRAYS.items()}
        self.files["offsets"].append(np.zeros(1, np.int64))
        self.examples = 0
        self.tokens = 0

    def append(self, examples: Examples) -> None:
        self.files["input_ids"].append(examples.input_ids)
        self.files["targets"].append(examples.targets)
        self.files["offsets"].append(examples.offsets[1:] + self.tokens)
        self.files["record_index"].append(examples.record_index)
        self.examples += len(examples)
        self.tokens += int(examples.offsets[-1])

    def append_from(self, shard: str, example_start: int, examples: int, token_start: int, tokens: int) -> None:
        """Copy a run of the examples in shard folder `shard` (what one chunk gave) onto this store."""
        offsets = self.files["offsets"]
        with open(os.path.join(shard, "offsets.npy"), "rb") as source:
            raw = os.pread(source.fileno(), examples * 8, offsets.header_bytes + (example_start + 1) * 8)
        ends = np.frombuffer(raw, dtype=np.int64)
        self.files["input_ids"].append_from(os.path.join(shard, "input_ids.npy"), token_start, tokens)
        self.files["targets"].append_from(os.path.join(shard, "targets.npy"), token_start, tokens)
        offsets.append(ends - token_start + self.tokens)
        self.files["record_index"].append_from(os.path.join(shard, "record_index.npy"), example_start, examples)
        self.examples += examples
        self.tokens += tokens

    def flush(self) -> None:
        for array in self.files.values():
            array.flush()

    def close(self) -> None:
        for array in self.files.values():
            array.close()


def read_entry(folder: str) -> Examples | None:
    """The entry's examples, memory-mapped; None when it is missing or damaged (a miss)."""
    try:
        with open(os.path.join(folder, "stats.json")) as handle:
            stats = json.load(handle)
        arrays = {name: np.load(os.path.join(folder, name + ".npy"), mmap_mode="r") for name in ARRAYS}
    except (OSError, ValueError, EOFError):  # EOFError: an empty .npy
        return None
    offsets = arrays["offsets"]
    if (any(arrays[name].ndim != 1 or arrays[name].dtype != dtype for name, dtype in ARRAYS.items())
            or len(offsets) != len(arrays["record_index"]) + 1 or len(offsets) == 0
            or int(offsets[-1]) != len(arrays["input_ids"]) or len(arrays["targets"]) != len(arrays["input_ids"])):
        return None
    return Examples(**arrays, stats=stats)


def built_entry(root: str | None, key: str, build: Callable[[str], None], waiting=None) -> tuple[Examples, str | None]:
    """Entry `key` of the cache in `root`, and its folder: read when it is there, else written by
    `build(folder)` into a temporary folder that is renamed into place, under the entry's lock
    (a process that finds the lock taken waits, then reads what the holder wrote). `stats["cached"]`
    says which. With root None, or a root that cannot be written, the examples are built in a
    temporary folder of their own and the folder returned is None."""
    if root is None:
        return _cached(read_built(None, key, build), False), None
    folder = os.path.join(root, key)
    examples = read_entry(folder)
    if examples is None:
        with entry_lock(root, key, waiting=waiting):
            examples = read_entry(folder)  # written by another process while this one waited
            if examples is None:
                try:
                    tmp = new_folder(root, key)
                except OSError:  # the cache is an optimisation: an unwritable one must not stop training
                    return _cached(read_built(None, key, build), False), None
                _write(tmp, build)
                try:
                    # An entry that failed to load (unreadable) is replaced.
                    publish_directory(tmp, folder)
                except OSError:  # another process stored the same entry first
                    pass
                examples = read_entry(folder)
                if examples is None:  # pragma: no cover - renamed into place just before
                    raise AssertionError(f"cannot read the cache entry {folder} just written")
                return _cached(examples, False), folder
    return _cached(examples, True), folder


def _cached(examples: Examples, cached: bool) -> Examples:
    examples.stats["cached"] = cached
    return examples


def _write(tmp: str, build: Callable[[str], None]) -> None:
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_built(parent: str | None, key: str, build: Callable[[str], None]) -> Examples:
    """Examples written by `build(folder)` into a temporary folder of their own, read back, and
    the folder deleted: the mappings keep the data readable (and its disk space taken) until the
    examples are dropped."""
    tmp = new_folder(parent, key)
    _write(tmp, build)
    return read_detached(tmp)


def read_detached(folder: str) -> Examples:
    """Read an entry built in a folder of its own, then delete the folder."""
    try:
        examples = read_entry(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if examples is None:  # pragma: no cover - written just before, by this process
        raise AssertionError(f"cannot read the examples written to {folder}")
    return examples


def new_folder(parent: str | None, key: str) -> str:
    """A fresh temporary folder for building entry `key` (under `parent`, or the system's)."""
    if parent is None:
        return tempfile.mkdtemp(prefix=f".tmp-{key}-")
    return temporary_sibling(os.path.join(parent, key), unique=True)


@contextlib.contextmanager
def entry_lock(root: str, key: str, waiting=None):
    """Hold the lock of entry `key` in `root`: one process builds an entry, the others block here
    until it is done and then find it. flock waits as long as it takes (no collective timeout
    as with a barrier under torchrun) and is released when its holder exits, even when killed;
    whoever holds it removes the temporary folders a killed builder of this entry left.

    `waiting(path)` is called once if another process holds the lock. Where no lock can be
    made (an unwritable cache folder), nothing is locked."""
    try:
        os.makedirs(root, exist_ok=True)
        handle = open(os.path.join(root, f".{key}.lock"), "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(os.path.join(root, key))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in glob.glob(os.path.join(glob.escape(root), f".tmp-{key}-*")):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
