"""Read records (plain dicts) from any source a user is likely to have, as a stream of chunks.

Accepted: a path to a JSONL/JSON/Parquet/CSV file, a glob, or a folder of such files (or a
folder written by `datasets`' save_to_disk); a `datasets.Dataset`, `DatasetDict` (with a split)
or `IterableDataset`; a `torch.utils.data.Dataset` whose items are dicts; a pandas DataFrame;
a list of dicts.

`open_records` reads nothing until its chunks are asked for, and then holds one chunk at a
time: JSONL line by line, JSON arrays element by element, Parquet by row group, CSV by row,
datasets in batches. Each chunk is a `Records` that can still name the file, line and record
of everything in it. `load_records` is the same stream gathered into one list.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.jsonstream import JsonText
from sftlab.errors import DataError, describe

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ACCEPTED = (
    "a path to a .jsonl/.json/.parquet/.csv file, a glob or a folder of them, a datasets.Dataset, "
    "DatasetDict (with a split), IterableDataset, a torch.utils.data.Dataset of dicts, "
    "a pandas DataFrame, or a list of dicts"
)
CHUNK_RECORDS = 2048  # records per chunk: what ExampleBuilder encodes in one batched call
_BLOCK = 1 << 20  # bytes read at a time from a file


@dataclass
class Records:
    """Loaded records (all of a source, or one chunk of its stream), and enough about where they
    came from to name them in errors."""

    records: list[dict]
    name: str
    # (file name, number of records) per file, in order, so record i can be traced to its line.
    parts: list[tuple[str, int]] = field(default_factory=list)
    # Identifies the content for the preparation cache; None means "hash the records".
    content_hash: str | None = None
    # Line number of each record in its file, where the file has lines (JSONL), else None.
    lines: list[int | None] | None = None
    # A chunk of a stream: the index of its first record in the whole source, and that record's
    # row within its file (only a chunk's first part can start inside a file).
    start: int = 0
    first_row: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def locate(self, index: int) -> tuple[str, int]:
        """(file or source name, with ':line' where known; index within it) of record `index` of
        these records."""
        line = self.lines[index] if self.lines is not None else None
        offset = 0
        for position, (name, count) in enumerate(self.parts):
            if index < offset + count:
                row = index - offset + (self.first_row if position == 0 else 0)
                return (f"{name}:{line}" if line else name), row
            offset += count
        return self.name, self.start + index

    def fingerprint(self) -> str:
        if self.content_hash is None:
            digest = hashlib.sha256()
            for record in self.records:
                _add_record(digest, record)
            self.content_hash = digest.hexdigest()
        return self.content_hash


# A part of a stream: (file name, or None for an in-memory source; its (record, line) pairs).
Part = tuple[str | None, Iterator[tuple[dict, int | None]]]


class RecordStream:
    """A source's records, read chunk by chunk each time `chunks` is iterated."""

    def __init__(
        self,
        name: str,
        parts: Callable[[], Iterator[Part]],
        *,
        spec: str | None = None,
        content_hash: str | None = None,
        length: int | None = None,
        size: int | None = None,
    ):
        self.name = name
        self._parts = parts
        self._spec = spec or name
        # Known without reading a record (file bytes, a Dataset's fingerprint), else None.
        self.content_hash = content_hash
        self.length = length  # records, where known without reading them
        self.size = size  # bytes of the files read, for files

    def chunks(self, size: int | None = None) -> Iterator[Records]:
        size = size or CHUNK_RECORDS
        start = 0
        records: list[dict] = []
        lines: list[int | None] = []
        parts: list[list] = []
        first_row = 0
        for name, rows in self._parts():
            row = 0
            for record, line in rows:
                if not records:
                    first_row, parts = row, []
                if name is not None:
                    if not parts or parts[-1][0] != name:
                        parts.append([name, 0])
                    parts[-1][1] += 1
                records.append(record)
                lines.append(line)
                row += 1
                if len(records) == size:
                    yield self._chunk(records, lines, parts, start, first_row)
                    start += len(records)
                    records, lines = [], []
        if records:
            yield self._chunk(records, lines, parts, start, first_row)
            start += len(records)
        if start == 0:
            raise DataError(
                "no records found", source=self._spec, fix="the file(s) are empty: add records or point at another file"
            )

    def _chunk(self, records, lines, parts, start, first_row) -> Records:
        return Records(
            records,
            name=self.name,
            parts=[(name, count) for name, count in parts],
            lines=lines if any(line is not None for line in lines) else None,
            start=start,
            first_row=first_row,
        )

    def mapped(self, converter: Callable[[], Callable[[dict], dict]]) -> RecordStream:
        """The same stream with every record passed through a function, which `converter()` makes
        afresh for each pass over the records (so it may carry state from one record to the next,
        in order). Files, lines and record indices are the original's."""
        parts = self._parts

        def converted():
            convert = converter()
            for name, rows in parts():
                yield name, ((convert(record), line) for record, line in rows)

        return RecordStream(self.name, converted, spec=self._spec, length=self.length, size=self.size)

    def fingerprint(self) -> str:
        """The content hash: known ahead for files and datasets, else one pass over the records."""
        if self.content_hash is None:
            digest = hashlib.sha256()
            for chunk in self.chunks():
                for record in chunk.records:
                    _add_record(digest, record)
            self.content_hash = digest.hexdigest()
        return self.content_hash


def _add_record(digest, record: dict) -> None:
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    digest.update(b"\n")


def load_records(source: Any, split: str | None = None) -> Records:
    """Load `source` into one list of plain dict records (the stream of `open_records`, gathered)."""
    stream = open_records(source, split)
    records: list[dict] = []
    lines: list[int | None] = []
    parts: list[tuple[str, int]] = []
    for chunk in stream.chunks():
        records.extend(chunk.records)
        lines.extend(chunk.lines or [None] * len(chunk))
        for name, count in chunk.parts:
            if parts and parts[-1][0] == name:
                parts[-1] = (name, parts[-1][1] + count)
            else:
                parts.append((name, count))
    return Records(
        records,
        name=stream.name,
        parts=parts,
        content_hash=stream.content_hash,
        lines=lines if any(line is not None for line in lines) else None,
    )


def open_records(source: Any, split: str | None = None) -> RecordStream:
    """A stream over `source`'s records; nothing is read until its chunks are asked for."""
    if isinstance(source, RecordStream):
        return source
    if isinstance(source, Records):
        return _records_stream(source)
    if isinstance(source, (str, os.PathLike)):
        return _path_stream(str(source), split)
    kind = _kind(source)
    if kind in ("datasets.DatasetDict", "datasets.IterableDatasetDict"):
        return open_records(_split_of(source, split))
    if kind == "datasets.Dataset":
        return RecordStream(
            f"Dataset({len(source)} rows)",
            lambda: iter([(None, _dataset_rows(source))]),
            content_hash=_hash_text(source._fingerprint),
            length=len(source),
        )
    if kind == "datasets.IterableDataset":
        return RecordStream("IterableDataset", lambda: iter([(None, ((_plain(row), None) for row in source))]))
    if kind == "pandas.DataFrame":
        return RecordStream(
            f"DataFrame({len(source)} rows)", lambda: iter([(None, _frame_rows(source))]), length=len(source)
        )
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return RecordStream(
            f"list({len(source)} records)", lambda: iter([(None, _dict_rows(source, "list"))]), length=len(source)
        )
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
        name = type(source).__name__
        return RecordStream(
            name, lambda: iter([(None, _dict_rows((source[i] for i in range(length)), name))]), length=length
        )
    raise DataError(
        "cannot load records from this object",
        found=type(source).__name__,
        expected=ACCEPTED,
    )


def _kind(source: Any) -> str:
    return type(source).__module__.split(".")[0] + "." + type(source).__name__


def _split_of(source: Any, split: str | None) -> Any:
    available = sorted(source.keys())
    chosen = split or ("train" if "train" in source else None)
    if chosen not in source:
        raise DataError(
            "a DatasetDict needs a split",
            found=f"split {chosen!r}" if chosen else "no split",
            expected=f"one of {available}",
            fix="set train_split (or pass split=...) to one of these",
        )
    return source[chosen]


def _records_stream(records: Records) -> RecordStream:
    def parts() -> Iterator[Part]:
        lines = records.lines or [None] * len(records)
        if not records.parts:
            yield None, zip(records.records, lines)
            return
        offset = 0
        for name, count in records.parts:
            yield name, zip(records.records[offset : offset + count], lines[offset : offset + count])
            offset += count

    return RecordStream(records.name, parts, content_hash=records.content_hash, length=len(records))


def _dataset_rows(dataset) -> Iterator[tuple[dict, None]]:
    # In batches: a row at a time costs ~10x more per record in datasets' formatting.
    for batch in dataset.iter(batch_size=CHUNK_RECORDS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield _plain(dict(zip(names, values))), None


def _frame_rows(frame) -> Iterator[tuple[dict, None]]:
    for start in range(0, len(frame), CHUNK_RECORDS):
        for row in frame.iloc[start : start + CHUNK_RECORDS].to_dict("records"):
            yield _plain(row), None


def _dict_rows(items, name: str) -> Iterator[tuple[dict, None]]:
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(
                "every item must be a dict of fields",
                source=name,
                index=index,
                found=describe(item),
                expected="a dict such as {'text': ...} or {'messages': [...]}",
                fix="turn every item into a dict of fields, e.g. {'text': item}",
            )
        yield _plain(item), None


def _is_torch_dataset(source: Any) -> bool:
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(source, Dataset)


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


def _files_fingerprint(files: list[str]) -> str:
    # Each file's part is its path and its bytes (read in blocks), known before any record is
    # parsed: the preparation cache is looked up without parsing (20k JSON lines cost more than
    # loading the prepared arrays), and the records loaded from the files hash the same.
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def _saved_dataset(spec: str) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isdir(spec) and (
        os.path.isfile(os.path.join(spec, "dataset_dict.json"))
        or os.path.isfile(os.path.join(spec, "state.json"))
        and os.path.isfile(os.path.join(spec, "dataset_info.json"))
    )


def _data_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(spec)
            for name in names
            if name.endswith(FILE_SUFFIXES)
        )
        if not files:
            raise DataError(
                "folder holds no data files",
                source=spec,
                expected=f"files ending in {FILE_SUFFIXES}",
                fix="point train_data at the data file, or put .jsonl/.json/.parquet/.csv files in the folder",
            )
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise DataError("glob matches no files", source=spec, fix="check the pattern and the working directory")
        return files
    if not os.path.exists(spec):
        raise DataError(
            "file not found", source=spec, fix="check the path (relative paths start from the working directory)"
        )
    return [spec]


def _path_stream(spec: str, split: str | None) -> RecordStream:
    if _saved_dataset(spec):
        import datasets

        return open_records(datasets.load_from_disk(spec), split)
    files = _data_files(spec)
    name = files[0] if len(files) == 1 else f"{spec} ({len(files)} files)"

    def parts() -> Iterator[Part]:
        for path in files:
            yield path, _file_rows(path)

    return RecordStream(
        name,
        parts,
        spec=spec,
        content_hash=_files_fingerprint(files),
        size=sum(os.path.getsize(path) for path in files),
    )


def _file_rows(path: str) -> Iterator[tuple[dict, int | None]]:
    """The file's records, each with its line number where the file has lines."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    raise DataError(
        "unknown file type",
        source=path,
        expected=f"a file ending in {FILE_SUFFIXES}",
        fix='convert the data to JSON lines ({"text": ...} per line) and name the file .jsonl',
    )


def _parquet_rows(path: str) -> Iterator[tuple[dict, None]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=CHUNK_RECORDS):  # a row group at most at a time
            for row in batch.to_pylist():
                yield _plain(row), None
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError("cannot read Parquet file", source=path, found=str(error).splitlines()[0]) from None


def _empty_file(path: str) -> DataError:
    return DataError("file is empty", source=path, fix="add records, or remove the file from the data path")


def _utf8_error(path: str) -> DataError:
    """The error for the first byte of `path` that is not UTF-8, naming its line and offset."""
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return DataError(
                    "file is not valid UTF-8",
                    source=f"{path}:{line_number}",
                    found=f"byte {raw[error.start : error.start + 1]!r} at offset {offset + error.start}",
                    fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
                )
            offset += len(raw)
    raise AssertionError(f"{path} decodes as UTF-8")  # only called after a decoding error


def _jsonl_rows(path: str) -> Iterator[tuple[dict, int]]:
    count = 0
    with open(path, "rb") as handle:
        # Lines split at b"\n" only, as text.split("\n") did: JSON strings may hold U+2028, U+0085
        # or \x1c unescaped, and splitlines() would cut a valid record in two there. A trailing
        # "\r" is JSON whitespace. UTF-8 never has the byte 0x0A inside a character.
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _utf8_error(path) from None
            if line_number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # a byte order mark
            if not line.strip():
                continue
            yield _json_line(path, line, line_number, count), line_number
            count += 1
    if count == 0:
        raise _empty_file(path)


def _json_line(path: str, line: str, line_number: int, index: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(
            "invalid JSON line",
            source=f"{path}:{line_number}",
            index=index,
            found=f"{error.msg} at column {error.colno}",
            fix="fix or delete that line (each line must be one JSON object)",
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            "each JSON line must be an object",
            source=f"{path}:{line_number}",
            index=index,
            found=describe(record),
            expected='an object such as {"text": ...}',
            fix="make that line one JSON object, or delete it",
        )
    return record


def _csv_rows(path: str) -> Iterator[tuple[dict, None]]:
    try:
        if _blank(path):
            raise _empty_file(path)
        with open(path, "rb") as binary:
            # newline="": a quoted cell may hold newlines, which the csv reader keeps only when
            # it sees the line endings ("line1\nline2" would become "line1line2").
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
            for row in csv.DictReader(text):
                yield dict(row), None
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _blank(path: str) -> bool:
    with open(path, "rb") as binary:
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        for block in iter(lambda: text.read(_BLOCK), ""):
            if block.strip():
                return False
    return True


def _json_rows(path: str) -> Iterator[tuple[dict, int | None]]:
    try:
        if _blank(path):
            raise _empty_file(path)
        with open(path, "rb") as binary:
            document = JsonText(path, io.TextIOWrapper(binary, encoding="utf-8-sig", newline=""))
            yield from _json_document(path, document)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _json_document(path: str, document: JsonText) -> Iterator[tuple[dict, int | None]]:
    """Records of a .json file: a list of records, {"name": [records]}, or JSON lines.

    A list, also inside {"name": [...]}, is read element by element. A file whose first line is a
    whole object with more after it is JSON lines. Anything else is read whole, as json.loads would."""
    document.skip_space()
    first = document.peek()
    if first == "{" and document.first_line_is_a_value_with_more_after():
        yield from _jsonl_rows(path)
        return
    if first == "[":
        document.advance()
        yield from _json_array(path, document)
        document.expect_end()
        return
    if first == "{" and document.opens_a_named_list():
        yield from _json_array(path, document)
        document.skip_space()
        if document.peek() != "}":  # more keys after the list: an object, not a list of records
            raise _not_a_list(path, "dict")
        document.advance()
        document.expect_end()
        return
    value, extra = document.whole()
    if extra:
        yield from _jsonl_rows(path)  # a .json file holding JSON lines
        return
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} style
    if not isinstance(value, list):
        raise _not_a_list(path, type(value).__name__)
    for index, item in enumerate(value):
        yield _json_item(path, item, index), None


def _json_array(path: str, document: JsonText) -> Iterator[tuple[dict, int]]:
    """The elements of a list whose "[" was just read, through its "]"."""
    document.skip_space()
    if document.peek() == "]":
        document.advance()
        return
    index = 0
    while True:
        document.skip_space()
        line = document.line()
        yield _json_item(path, document.value(), index), line
        index += 1
        document.skip_space()
        separator = document.peek()
        if separator == "]":
            document.advance()
            return
        if separator != ",":
            document.fail("Expecting ',' delimiter")
        document.advance()


def _json_item(path: str, item: Any, index: int) -> dict:
    if not isinstance(item, Mapping):
        raise DataError(
            "every item must be a dict of fields",
            source=path,
            index=index,
            found=describe(item),
            expected="a dict such as {'text': ...} or {'messages': [...]}",
            fix="turn every item into a dict of fields, e.g. {'text': item}",
        )
    return _plain(item)


def _not_a_list(path: str, found: str) -> DataError:
    return DataError(
        "a .json file must hold a list of records",
        source=path,
        found=found,
        expected="[{...}, {...}] or JSON lines",
        fix="wrap the records in a list, or write one JSON object per line in a .jsonl file",
    )
