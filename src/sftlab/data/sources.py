"""Load records (plain dicts) from any source a user is likely to have. One function, one place.

Accepted: a path to a JSONL/JSON/Parquet/CSV file, a glob, or a folder of such files;
a `datasets.Dataset`, `DatasetDict` (with a split) or `IterableDataset`; a
`torch.utils.data.Dataset` whose items are dicts; a pandas DataFrame; a list of dicts.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftlab.errors import DataError, describe

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ACCEPTED = (
    "a path to a .jsonl/.json/.parquet/.csv file, a glob or a folder of them, a datasets.Dataset, "
    "DatasetDict (with a split), IterableDataset, a torch.utils.data.Dataset of dicts, "
    "a pandas DataFrame, or a list of dicts"
)


@dataclass
class Records:
    """The loaded records, and enough about where they came from to name them in errors."""

    records: list[dict]
    name: str
    # (file name, number of records) per file, in order, so record i can be traced to its line.
    parts: list[tuple[str, int]] = field(default_factory=list)
    # Identifies the content for the preparation cache; None means "hash the records".
    content_hash: str | None = None
    # Line number of each record in its file, where the file has lines (JSONL), else None.
    lines: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def locate(self, index: int) -> tuple[str, int]:
        """(file or source name, with ':line' where known; index within it) of record `index`."""
        line = self.lines[index] if self.lines is not None else None
        offset = 0
        for name, count in self.parts:
            if index < offset + count:
                return (f"{name}:{line}" if line else name), index - offset
            offset += count
        return self.name, index

    def fingerprint(self) -> str:
        if self.content_hash is None:
            digest = hashlib.sha256()
            for record in self.records:
                digest.update(json.dumps(record, sort_keys=True, default=str).encode())
                digest.update(b"\n")
            self.content_hash = digest.hexdigest()
        return self.content_hash


def load_records(source: Any, split: str | None = None) -> Records:
    """Load `source` into a list of plain dict records."""
    if isinstance(source, (str, os.PathLike)):
        return _load_paths(str(source))
    kind = type(source).__module__.split(".")[0] + "." + type(source).__name__
    if kind == "datasets.DatasetDict" or kind == "datasets.IterableDatasetDict":
        available = sorted(source.keys())
        chosen = split or ("train" if "train" in source else None)
        if chosen not in source:
            raise DataError(
                "a DatasetDict needs a split",
                found=f"split {chosen!r}" if chosen else "no split",
                expected=f"one of {available}",
                fix="set train_split (or pass split=...) to one of these",
            )
        return load_records(source[chosen])
    if kind == "datasets.Dataset":
        records = [_plain(row) for row in source]
        return Records(records, name=f"Dataset({len(records)} rows)", content_hash=_hash_text(source._fingerprint))
    if kind == "datasets.IterableDataset":
        records = [_plain(row) for row in source]
        return Records(records, name="IterableDataset")
    if kind == "pandas.DataFrame":
        records = [_plain(row) for row in source.to_dict("records")]
        return Records(records, name=f"DataFrame({len(records)} rows)")
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        records = list(source)
        _check_dicts(records, "list")
        return Records([_plain(r) for r in records], name=f"list({len(records)} records)")
    if _is_torch_dataset(source):
        try:
            length = len(source)
        except TypeError:
            raise DataError(
                "a torch.utils.data.Dataset without __len__ cannot be loaded",
                found=type(source).__name__,
                expected="a map-style Dataset with __len__ and __getitem__",
                fix="implement __len__, or pass list(your_dataset)",
            ) from None
        records = [source[i] for i in range(length)]
        _check_dicts(records, type(source).__name__)
        return Records([_plain(r) for r in records], name=type(source).__name__)
    raise DataError(
        "cannot load records from this object",
        found=type(source).__name__,
        expected=ACCEPTED,
    )


def _is_torch_dataset(source: Any) -> bool:
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(source, Dataset)


def _check_dicts(records: list, name: str) -> None:
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(
                "every item must be a dict of fields",
                source=name,
                index=index,
                found=describe(record),
                expected="a dict such as {'text': ...} or {'messages': [...]}",
                fix="turn every item into a dict of fields, e.g. {'text': item}",
            )


def _plain(value: Any) -> Any:
    """Tensors, numpy arrays and NaN cells become lists and None, so validation sees plain values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    tolist = getattr(value, "tolist", None)
    if tolist is not None and not isinstance(value, (str, bytes)):
        return _plain(tolist())
    return value


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_fingerprint(source: Any, split: str | None = None) -> str | None:
    """A hash of `source`'s content found without parsing it, or None where only the records tell.

    Files hash their bytes (the same digest `load_records` gives them) and a datasets.Dataset
    has its own fingerprint, so the preparation cache can be looked up before any record is
    parsed: parsing 20k JSON lines costs more than loading the prepared arrays."""
    if isinstance(source, (str, os.PathLike)):
        digest = hashlib.sha256()
        for path in _data_files(str(source)):
            with open(path, "rb") as handle:
                _add_file(digest, path, handle.read())
        return digest.hexdigest()
    kind = type(source).__module__.split(".")[0] + "." + type(source).__name__
    if kind == "datasets.DatasetDict":
        chosen = split or "train"
        return source_fingerprint(source[chosen]) if chosen in source else None
    if kind == "datasets.Dataset":
        return _hash_text(source._fingerprint)
    return None


def _add_file(digest, path: str, raw: bytes) -> None:
    """One file's part of a data fingerprint: its path and bytes (load_records and
    source_fingerprint must agree, or a cache entry written by one is missed by the other)."""
    digest.update(path.encode() + b"\0" + raw)


def _data_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(spec)
            for name in names
            if name.endswith(FILE_SUFFIXES)
        )
        if not files:
            raise DataError("folder holds no data files", source=spec, expected=f"files ending in {FILE_SUFFIXES}",
                            fix="point train_data at the data file, or put .jsonl/.json/.parquet/.csv files in the folder")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise DataError("glob matches no files", source=spec, fix="check the pattern and the working directory")
        return files
    if not os.path.exists(spec):
        raise DataError("file not found", source=spec, fix="check the path (relative paths start from the working directory)")
    return [spec]


def _load_paths(spec: str) -> Records:
    files = _data_files(spec)
    records: list[dict] = []
    lines: list[int | None] = []
    parts: list[tuple[str, int]] = []
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            raw = handle.read()
        _add_file(digest, path, raw)
        loaded, loaded_lines = _load_file(path, raw)
        parts.append((path, len(loaded)))
        records.extend(loaded)
        lines.extend(loaded_lines or [None] * len(loaded))
    if not records:
        raise DataError("no records found", source=spec, fix="the file(s) are empty: add records or point at another file")
    name = files[0] if len(files) == 1 else f"{spec} ({len(files)} files)"
    return Records(records, name=name, parts=parts, content_hash=digest.hexdigest(),
                   lines=lines if any(line is not None for line in lines) else None)


def _load_file(path: str, raw: bytes) -> tuple[list[dict], list[int] | None]:
    """The file's records, and their line numbers where the file is JSON lines."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:
            raise DataError("cannot read Parquet file", source=path, found=str(error).splitlines()[0]) from None
        records = [_plain(row) for row in table.to_pylist()]
        _check_dicts(records, path)
        return records, None
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError("unknown file type", source=path, expected=f"a file ending in {FILE_SUFFIXES}",
                        fix="convert the data to JSON lines ({\"text\": ...} per line) and name the file .jsonl")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            "file is not valid UTF-8",
            source=f"{path}:{line}",
            found=f"byte {raw[error.start:error.start + 1]!r} at offset {error.start}",
            fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None
    if not text.strip():
        raise DataError("file is empty", source=path, fix="add records, or remove the file from the data path")
    if suffix == ".csv":
        # A file-like object, not text.splitlines(): a quoted cell may hold newlines, and splitting
        # the text into lines first would drop them ("line1\nline2" -> "line1line2").
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [dict(row) for row in reader], None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise DataError(
                    "invalid JSON",
                    source=f"{path}:{error.lineno}",
                    found=error.msg,
                    fix="fix the JSON syntax at that line",
                ) from None
            return _parse_jsonl(path, text)  # a .json file holding JSON lines
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]} style
        if not isinstance(data, list):
            raise DataError(
                "a .json file must hold a list of records",
                source=path,
                found=type(data).__name__,
                expected="[{...}, {...}] or JSON lines",
                fix="wrap the records in a list, or write one JSON object per line in a .jsonl file",
            )
        _check_dicts(data, path)
        return [_plain(r) for r in data], None
    return _parse_jsonl(path, text)


def _parse_jsonl(path: str, text: str) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028, U+0085 or \x1c unescaped, and
    # splitlines() would cut a valid record in two there. A trailing "\r" is JSON whitespace.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                "invalid JSON line",
                source=f"{path}:{line_number}",
                index=len(records),
                found=f"{error.msg} at column {error.colno}",
                fix="fix or delete that line (each line must be one JSON object)",
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                "each JSON line must be an object",
                source=f"{path}:{line_number}",
                index=len(records),
                found=describe(record),
                expected="an object such as {\"text\": ...}",
                fix="make that line one JSON object, or delete it",
            )
        records.append(record)
        lines.append(line_number)
    return records, lines
