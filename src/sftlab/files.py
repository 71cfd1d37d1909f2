"""Where sftlab keeps its files, and how it writes a folder that nobody ever sees half-written.

    cache_root()          $SFTLAB_CACHE, else ~/.cache/sftlab: prepared examples, converted GGUF models
    atomic_directory(t)   write into a temporary sibling of t, then rename it to t (the simple case)
    temporary_sibling(t)  the temporary sibling alone, and publish_directory(tmp, t) to rename it:
                          for writers that must do something between the two (every process of a
                          sharded checkpoint writes into the sibling, one renames it)
    remove_directory(t)   delete t so that a kill midway leaves no half-deleted t

A rename within one folder is atomic, so a folder under its final name is always complete: a run
killed while writing leaves a `.tmp-*` folder, which readers ignore and the next writer removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

TEMPORARY_PREFIX = ".tmp-"


def cache_root() -> str:
    return os.environ.get("SFTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sftlab")


def temporary_name(target: str) -> str:
    """The fixed temporary sibling of `target` (.tmp-<name>): every process can compute it."""
    parent, name = os.path.split(os.path.normpath(target))
    return os.path.join(parent, TEMPORARY_PREFIX + name)


def temporary_sibling(target: str, *, unique: bool = False) -> str:
    """A new empty folder next to `target` to write it in. `unique`: a name of its own
    (.tmp-<name>-<random>, private to its creator), for writers that may race one another
    for the same target; else the fixed name, whose leftover from a killed writer is removed."""
    if unique:
        parent, name = os.path.split(os.path.normpath(target))
        os.makedirs(parent or ".", exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{name}-", dir=parent or ".")
    tmp = temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)  # and its parents
    return tmp


def publish_directory(tmp: str, target: str, *, replace: bool = True, fsync: bool = False) -> None:
    """Rename the finished folder `tmp` to `target`. An existing `target` is replaced when `replace`
    (moved aside first, deleted after), else the rename fails and the caller decides (another
    process may have published the same thing first). `fsync`: the files and the rename reach the
    disk before this returns, so that a power cut cannot leave a complete-looking, empty target.
    On failure `tmp` is removed, a replaced `target` put back, and the OSError raised."""
    old = None
    try:
        if fsync:
            for folder, _, names in os.walk(tmp):
                for name in names:
                    with open(os.path.join(folder, name), "rb") as handle:
                        os.fsync(handle.fileno())
        if replace and os.path.exists(target):
            old = _aside_name(target)
            _rename_aside(target, old)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(target):
            with contextlib.suppress(OSError):
                os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if fsync:
        _fsync_dir(os.path.dirname(os.path.normpath(target)) or ".")


def remove_directory(target: str) -> None:
    """Delete `target`. It is renamed out of its name first: a run killed mid-delete must not leave
    a folder under that name that still looks complete (a checkpoint's state.json) but has lost files."""
    doomed = _aside_name(target)
    _rename_aside(target, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str, *, unique: bool = False, replace: bool = True, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of `target` to write into; when the block ends without an exception
    it becomes `target` (see publish_directory), else it is removed and the exception goes on."""
    tmp = temporary_sibling(target, unique=unique)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, target, replace=replace, fsync=fsync)


def _aside_name(target: str) -> str:
    parent, name = os.path.split(os.path.normpath(target))
    return os.path.join(parent, f"{TEMPORARY_PREFIX}delete-{name}")


def _rename_aside(target: str, aside: str) -> None:
    shutil.rmtree(aside, ignore_errors=True)  # left by a run killed while deleting
    os.rename(target, aside)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
