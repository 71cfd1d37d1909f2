"""load_records: every source kind becomes the same list of plain dicts; bad files name file:line."""

from __future__ import annotations

import json

import pytest

from sftlab import DataError, load_records
from sftlab.data.sources import open_records

TEXTS = [{"text": "first"}, {"text": "second"}, {"text": "third"}]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- files


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    loaded = load_records(path)
    assert loaded.records == TEXTS
    assert loaded.name == str(path)
    # JSON lines carry their line number, so errors point at the line to fix.
    assert loaded.locate(2) == (f"{path}:3", 2)


def test_jsonl_skips_blank_lines_and_accepts_crlf_and_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n\r\n{"text": "second"}\r\n   \n{"text": "third"}')
    assert load_records(path).records == TEXTS


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # JSON allows U+2028, U+0085 and \x1c unescaped inside strings; they are not line breaks of JSONL.
    records = [{"text": "a\u2028b"}, {"text": "c\x85d\x1ce"}, {"text": "f"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not as an escape
    assert load_records(path).records == records


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(CHAT, indent=2), encoding="utf-8")
    assert load_records(path).records == CHAT


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": TEXTS}), encoding="utf-8")
    assert load_records(path).records == TEXTS


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "data.json", TEXTS)
    assert load_records(path).records == TEXTS


def test_json_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(DataError, match="must hold a list of records") as error:
        load_records(path)
    assert str(path) in str(error.value) and "found str" in str(error.value)


def test_parquet_with_nested_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT), path)
    loaded = load_records(path)
    assert loaded.records == CHAT
    assert type(loaded.records[0]["messages"]) is list  # plain lists, not arrow or numpy arrays


def test_parquet_token_ids_become_python_ints(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "tok.parquet"
    pq.write_table(pa.table({"input_ids": [[20, 21, 22], [23, 24]], "labels": [[-100, 21, 22], None]}), path)
    records = load_records(path).records
    assert records == [{"input_ids": [20, 21, 22], "labels": [-100, 21, 22]}, {"input_ids": [23, 24], "labels": None}]
    assert all(type(t) is int for t in records[0]["input_ids"])


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="cannot read Parquet file") as error:
        load_records(path)
    assert str(path) in str(error.value)


def test_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,completion\nQ: 1+1?,2\nQ: 2+2?,4\n", encoding="utf-8")
    assert load_records(path).records == [
        {"prompt": "Q: 1+1?", "completion": "2"},
        {"prompt": "Q: 2+2?", "completion": "4"},
    ]


def test_csv_quoted_cells_keep_commas_quotes_and_newlines(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,completion\n"Say ""x"", then y","line one\nline two"\nQ,A\n', encoding="utf-8")
    assert load_records(path).records == [
        {"prompt": 'Say "x", then y', "completion": "line one\nline two"},
        {"prompt": "Q", "completion": "A"},
    ]


def test_glob_in_sorted_order_with_parts(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", TEXTS[2:])
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    (tmp_path / "notes.txt").write_text("not data")
    loaded = load_records(str(tmp_path / "*.jsonl"))
    assert loaded.records == TEXTS
    assert loaded.parts == [(str(tmp_path / "a.jsonl"), 2), (str(tmp_path / "b.jsonl"), 1)]
    # Record 2 overall is record 0 of the second file.
    assert loaded.locate(2) == (f"{tmp_path / 'b.jsonl'}:1", 0)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="glob matches no files"):
        load_records(str(tmp_path / "*.jsonl"))


def test_glob_matching_an_unknown_file_type(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type") as error:
        load_records(str(tmp_path / "*"))
    assert "notes.txt" in str(error.value)


def test_folder_walks_subfolders_and_mixes_file_types(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", TEXTS[:1])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(json.dumps(TEXTS[1:2]), encoding="utf-8")
    (tmp_path / "sub" / "c.csv").write_text("text\nthird\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("# not data")
    loaded = load_records(tmp_path)
    assert loaded.records == TEXTS
    assert [count for _, count in loaded.parts] == [1, 1, 1]


def test_folder_without_data_files(tmp_path):
    (tmp_path / "README.md").write_text("# not data")
    with pytest.raises(DataError, match="folder holds no data files"):
        load_records(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as error:
        load_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error.value)


# ---------------------------------------------------------------- broken files


def test_invalid_json_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON line") as error:
        load_records(path)
    message = str(error.value)
    assert f"{path}:3" in message
    assert "record 2" in message  # two good records came before it


def test_invalid_json_line_in_a_json_lines_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{text: three}\n', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON line") as error:
        load_records(path)
    assert f"{path}:3" in str(error.value)


def test_invalid_json_document_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as error:
        load_records(path)
    assert f"{path}:3" in str(error.value)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n["text", "two"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="each JSON line must be an object") as error:
        load_records(path)
    assert f"{path}:2" in str(error.value)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "plain"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not valid UTF-8") as error:
        load_records(path)
    message = str(error.value)
    assert f"{path}:2" in message
    assert "b'\\xe9'" in message and "offset 31" in message  # len('{"text": "plain"}\n{"text": "caf') == 31


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="file is empty") as error:
        load_records(path)
    assert str(path) in str(error.value)


def test_empty_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="no records found"):
        load_records(path)


# ---------------------------------------------------------------- in-memory sources


def test_list_and_tuple_of_dicts():
    assert load_records(TEXTS).records == TEXTS
    assert load_records(tuple(TEXTS)).records == TEXTS


def test_list_with_a_non_dict_item_names_it():
    with pytest.raises(DataError, match="every item must be a dict") as error:
        load_records([{"text": "ok"}, "not a dict"])
    message = str(error.value)
    assert "record 1" in message and "found str 'not a dict'" in message


def test_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    loaded = load_records(datasets.Dataset.from_list(TEXTS))
    assert loaded.records == TEXTS
    assert loaded.name == "Dataset(3 rows)"


def test_datasets_dataset_of_conversations():
    datasets = pytest.importorskip("datasets")
    assert load_records(datasets.Dataset.from_list(CHAT)).records == CHAT


def test_dataset_dict_uses_train_by_default_or_the_named_split():
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict(
        train=datasets.Dataset.from_list(TEXTS[:2]), validation=datasets.Dataset.from_list(TEXTS[2:])
    )
    assert load_records(both).records == TEXTS[:2]
    assert load_records(both, split="validation").records == TEXTS[2:]


def test_dataset_dict_with_a_missing_split_lists_the_splits():
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict(test=datasets.Dataset.from_list(TEXTS), train=datasets.Dataset.from_list(TEXTS))
    with pytest.raises(DataError, match="a DatasetDict needs a split") as error:
        load_records(both, split="valid")
    message = str(error.value)
    assert "found split 'valid'" in message
    assert "one of ['test', 'train']" in message


def test_dataset_dict_without_train_and_without_a_split():
    datasets = pytest.importorskip("datasets")
    only_test = datasets.DatasetDict(test=datasets.Dataset.from_list(TEXTS))
    with pytest.raises(DataError, match="a DatasetDict needs a split") as error:
        load_records(only_test)
    assert "found no split" in str(error.value) and "one of ['test']" in str(error.value)


def test_iterable_dataset():
    datasets = pytest.importorskip("datasets")
    stream = datasets.Dataset.from_list(CHAT).to_iterable_dataset()
    assert type(stream).__name__ == "IterableDataset"
    loaded = load_records(stream)
    assert loaded.records == CHAT
    assert loaded.name == "IterableDataset"


def test_torch_dataset_of_dicts_with_tensors():
    torch = pytest.importorskip("torch")

    class Tokenized(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([20 + i, 21, 22]), "labels": torch.tensor([-100, 21, 22])}

    loaded = load_records(Tokenized())
    assert loaded.records == [
        {"input_ids": [20, 21, 22], "labels": [-100, 21, 22]},
        {"input_ids": [21, 21, 22], "labels": [-100, 21, 22]},
    ]
    assert all(type(t) is int for t in loaded.records[0]["input_ids"])
    assert loaded.name == "Tokenized"


def test_torch_dataset_of_non_dicts():
    torch = pytest.importorskip("torch")

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return ("prompt", "completion")

    with pytest.raises(DataError, match="every item must be a dict") as error:
        load_records(Pairs())
    assert "Pairs, record 0" in str(error.value)


def test_torch_iterable_dataset_without_len():
    torch = pytest.importorskip("torch")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(TEXTS)

    with pytest.raises(DataError, match="without __len__ cannot be loaded") as error:
        load_records(Stream())
    assert "pass list(your_dataset)" in str(error.value)


def test_pandas_dataframe_nan_becomes_none():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"prompt": ["Q1", "Q2"], "completion": ["A1", float("nan")]})
    loaded = load_records(frame)
    assert loaded.records == [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": None}]
    assert loaded.name == "DataFrame(2 rows)"


@pytest.mark.parametrize(
    "source, found",
    [
        ({"text": ["first", "second"]}, "found dict"),  # columns, not records
        ((r for r in TEXTS), "found generator"),
        (42, "found int"),
    ],
)
def test_unsupported_container(source, found):
    with pytest.raises(DataError, match="cannot load records from this object") as error:
        load_records(source)
    message = str(error.value)
    assert found in message
    assert "expected a path to a .jsonl/.json/.parquet/.csv file" in message
    assert "a list of dicts" in message


# ---------------------------------------------------------------- content hash (for the cache)


def test_file_content_hash_follows_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", TEXTS)
    first = load_records(path).fingerprint()
    assert load_records(path).fingerprint() == first
    write_jsonl(path, TEXTS[:2])
    assert load_records(path).fingerprint() != first


def test_list_content_hash_follows_the_records():
    assert load_records(TEXTS).fingerprint() == load_records([dict(r) for r in TEXTS]).fingerprint()
    assert load_records(TEXTS).fingerprint() != load_records(TEXTS[::-1]).fingerprint()


# ---------------------------------------------------------------- streams of chunks


def chunked(source, size, **kwargs):
    return list(open_records(source, **kwargs).chunks(size))


def test_chunks_of_a_glob_name_file_line_and_row_of_every_record(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    (tmp_path / "b.jsonl").write_text('\n{"text": "b0"}\n\n{"text": "b1"}\n', encoding="utf-8")
    chunks = chunked(str(tmp_path / "*.jsonl"), 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [c.start for c in chunks] == [0, 3, 6]
    # The second chunk starts inside a.jsonl (its row 3) and runs into b.jsonl (blank lines skipped).
    middle = chunks[1]
    assert middle.parts == [(str(tmp_path / "a.jsonl"), 2), (str(tmp_path / "b.jsonl"), 1)]
    assert [middle.locate(i) for i in range(3)] == [
        (f"{tmp_path / 'a.jsonl'}:4", 3), (f"{tmp_path / 'a.jsonl'}:5", 4), (f"{tmp_path / 'b.jsonl'}:2", 0)]
    assert chunks[2].locate(0) == (f"{tmp_path / 'b.jsonl'}:4", 1)
    assert [r for c in chunks for r in c.records] == load_records(str(tmp_path / "*.jsonl")).records


def test_chunks_of_an_in_memory_source_give_indices_in_the_whole_source():
    records = [{"text": str(i)} for i in range(7)]
    chunks = chunked(records, 3)
    assert [c.records for c in chunks] == [records[:3], records[3:6], records[6:]]
    assert chunks[2].locate(0) == ("list(7 records)", 6)


def test_a_bad_line_far_into_a_file_is_named_by_the_stream(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": str(i)}) for i in range(5000)]
    lines[4321] = '{"text": "cut'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen = 0
    with pytest.raises(DataError, match="invalid JSON line") as error:
        for chunk in open_records(str(path)).chunks(1000):
            seen += len(chunk)
    assert f"{path}:4322" in str(error.value) and "record 4321" in str(error.value)
    assert seen == 4000  # the chunks before it were handed on: nothing waited for the whole file


def test_json_array_read_element_by_element_through_a_small_window(tmp_path, monkeypatch):
    # A window of 7 characters: every value, string and number crosses a window edge somewhere.
    monkeypatch.setattr("sftlab.data.jsonstream._BLOCK", 7)
    records = [{"text": "x" * (i % 13), "n": 12345678 * i, "nested": {"k": [i, i + 0.5, None]}} for i in range(40)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    loaded = load_records(path)
    assert loaded.records == records
    # Each record is named by the line its element starts on.
    text = path.read_text().split("\n")
    assert [text[line - 1].strip() for line in loaded.lines] == ["{"] * 40
    assert loaded.locate(39) == (f"{path}:{loaded.lines[39]}", 39)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"rows": records}, indent=1), encoding="utf-8")
    assert load_records(wrapped).records == records


@pytest.mark.parametrize("text, line, found", [
    ('[\n  {"text": "one"},\n  {"text": "two"}\n  {"text": "three"}\n]\n', 4, "Expecting ',' delimiter"),
    ('[\n  {"text": "one"},\n]\n', 3, "Expecting value"),
    ('[\n  {"text": "one"}\n]\n]\n', 4, "Extra data"),
    ('{"rows": [{"text": "one"}], "more": 1}', None, None),
])
def test_json_array_syntax_errors_name_the_line(tmp_path, monkeypatch, text, line, found):
    monkeypatch.setattr("sftlab.data.jsonstream._BLOCK", 5)
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_records(path)
    message = str(error.value)
    if line is None:  # a list and more keys: an object, not a list of records
        assert message.startswith(f"{path}: a .json file must hold a list of records; found dict")
    else:
        assert message.startswith(f"{path}:{line}: invalid JSON; found {found}")
    assert json_loads_fails(text)


def json_loads_fails(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return True
    return not (isinstance(value, list) or len(value) == 1)


def test_parquet_read_by_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    chunks = chunked(str(path), 4)
    assert [c.records for c in chunks] == [records[:4], records[4:8], records[8:]]
    assert chunks[1].locate(1) == (str(path), 5)


def test_every_source_kind_streams_the_records_it_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(CHAT)

        def __getitem__(self, i):
            return CHAT[i]

    (tmp_path / "chat.json").write_text(json.dumps(CHAT), encoding="utf-8")
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_list(CHAT)).save_to_disk(str(saved))
    sources = {
        "jsonl": write_jsonl(tmp_path / "chat.jsonl", CHAT),
        "json": tmp_path / "chat.json",
        "dataset": datasets.Dataset.from_list(CHAT),
        "iterable": datasets.Dataset.from_list(CHAT).to_iterable_dataset(),
        "saved DatasetDict": str(saved),
        "torch": Items(),
        "frame": pd.DataFrame(CHAT),
        "list": CHAT,
    }
    for kind, source in sources.items():
        chunks = chunked(source, 1)
        assert [c.records[0] for c in chunks] == CHAT, kind
        assert load_records(source).records == CHAT, kind
        # Streaming twice reads the source again (a fingerprint pass, then the preparation).
        assert [c.records[0] for c in chunked(source, 1)] == CHAT, kind
