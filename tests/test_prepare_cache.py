"""prepare_examples' cache: the same inputs load the stored arrays; any change to data, tokenizer
or settings prepares again. Every test keeps its cache under tmp_path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sftlab import TargetSettings, prepare_examples
from tiny import char_id, char_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PAIRS = [{"prompt": "Q: 1+1=", "completion": "2"}, {"prompt": "Q: 2+2=", "completion": "4"}]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                  {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
ARRAYS = ("input_ids", "targets", "offsets", "record_index")


def entries(cache_dir) -> list[str]:
    return sorted(name for name in os.listdir(cache_dir) if not name.startswith("."))


def assert_same_examples(a, b):
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_second_call_hits_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = prepare_examples(PAIRS, char_tokenizer(), TargetSettings(), cache_dir=str(cache))
    second = prepare_examples(PAIRS, char_tokenizer(), TargetSettings(), cache_dir=str(cache))
    assert first.stats["cached"] is False
    assert second.stats["cached"] is True
    assert_same_examples(first, second)
    assert len(entries(cache)) == 1
    # The statistics come back too, not only the arrays.
    for key in ("records", "examples", "tokens", "supervised_tokens", "truncated", "dropped", "formats", "source"):
        assert second.stats[key] == first.stats[key]


def test_cache_hit_from_a_file_source(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    first = prepare_examples(str(path), char_tokenizer(), cache_dir=str(tmp_path / "cache"))
    second = prepare_examples(str(path), char_tokenizer(), cache_dir=str(tmp_path / "cache"))
    assert (first.stats["cached"], second.stats["cached"]) == (False, True)
    assert_same_examples(first, second)


@pytest.mark.parametrize("source", ["file", "dataset"])
def test_a_hit_does_not_load_the_records(tmp_path, monkeypatch, source):
    # Files and datasets are found in the cache by their bytes / fingerprint: a hit must not
    # parse a single record (that is most of the time a cached run would take otherwise).
    if source == "file":
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
        data = str(data)
    else:
        data = pytest.importorskip("datasets").Dataset.from_list(PAIRS)
    cache = str(tmp_path / "cache")
    first = prepare_examples(data, char_tokenizer(), cache_dir=cache)

    def refuse(*args, **kwargs):
        raise AssertionError("records were read on a cache hit")

    monkeypatch.setattr("sftlab.data.sources.RecordStream.chunks", refuse)
    second = prepare_examples(data, char_tokenizer(), cache_dir=cache)
    assert second.stats["cached"] is True and second.stats["source"] == first.stats["source"]
    assert_same_examples(first, second)


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 5},
        {"truncation": "drop", "max_length": 8},
        {"completion_only_loss": False},
        {"assistant_only_loss": False},
        {"last_assistant_only": True},
        {"chat_template": "chatml"},
    ],
    ids=lambda change: ",".join(change),
)
def test_changing_a_setting_misses(tmp_path, change):
    cache = str(tmp_path / "cache")
    records = CHATS if set(change) & {"assistant_only_loss", "last_assistant_only", "chat_template"} else PAIRS
    tokenizer = char_tokenizer(chat_template=CHATML)
    base = prepare_examples(records, tokenizer, TargetSettings(), cache_dir=cache)
    changed = prepare_examples(records, tokenizer, TargetSettings(**change), cache_dir=cache)
    assert changed.stats["cached"] is False
    assert len(entries(cache)) == 2
    # and the unchanged settings still find their own entry
    assert prepare_examples(records, tokenizer, TargetSettings(), cache_dir=cache).stats["cached"] is True
    assert base.stats["cached"] is False


def test_changing_text_field_or_skip_invalid_misses(tmp_path):
    cache = str(tmp_path / "cache")
    records = [{"text": "abc", "body": "xyz"}, {"text": "def", "body": None}]
    by_text = prepare_examples(records, char_tokenizer(), cache_dir=cache)
    by_body = prepare_examples(records, char_tokenizer(), text_field="body", skip_invalid_records=True, cache_dir=cache)
    assert by_body.stats["cached"] is False
    assert len(by_body) == 1 and len(by_text) == 2
    again = prepare_examples(records, char_tokenizer(), text_field="body", skip_invalid_records=True, cache_dir=cache)
    assert again.stats["cached"] is True
    assert again.stats["skipped_invalid"] == {"invalid body: must be a string": 1}


def test_changing_the_data_misses(tmp_path):
    cache = str(tmp_path / "cache")
    prepare_examples(PAIRS, char_tokenizer(), cache_dir=cache)
    edited = [dict(PAIRS[0]), {"prompt": "Q: 2+2=", "completion": "5"}]
    result = prepare_examples(edited, char_tokenizer(), cache_dir=cache)
    assert result.stats["cached"] is False
    assert result[1][0][-2] == char_id("5")  # the new completion, then EOS
    assert prepare_examples(PAIRS, char_tokenizer(), cache_dir=cache)[1][0][-2] == char_id("4")


def test_editing_a_file_in_place_misses(tmp_path):
    cache = str(tmp_path / "cache")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n")
    first = prepare_examples(str(path), char_tokenizer(), cache_dir=cache)
    path.write_text(json.dumps({"text": "abcd"}) + "\n")
    second = prepare_examples(str(path), char_tokenizer(), cache_dir=cache)
    assert second.stats["cached"] is False
    assert second.lengths.tolist() == [first.lengths[0] + 1]


def test_a_new_file_matching_the_glob_misses(tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    prepare_examples(str(tmp_path / "*.jsonl"), char_tokenizer(), cache_dir=cache)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "def"}) + "\n")
    result = prepare_examples(str(tmp_path / "*.jsonl"), char_tokenizer(), cache_dir=cache)
    assert result.stats["cached"] is False
    assert len(result) == 2


def test_changing_the_tokenizer_misses(tmp_path):
    cache = str(tmp_path / "cache")
    prepare_examples(PAIRS, char_tokenizer(), cache_dir=cache)
    with_bos = prepare_examples(PAIRS, char_tokenizer(bos=True), cache_dir=cache)
    assert with_bos.stats["cached"] is False
    assert with_bos[0][0][0] == 1  # <s>


def test_changing_the_tokenizer_chat_template_misses(tmp_path):
    cache = str(tmp_path / "cache")
    prepare_examples(CHATS, char_tokenizer(chat_template=CHATML), cache_dir=cache)
    other = CHATML.replace("<|im_end|>\n", "<|im_end|>")
    assert prepare_examples(CHATS, char_tokenizer(chat_template=other), cache_dir=cache).stats["cached"] is False


def test_editing_a_chat_template_file_misses(tmp_path):
    cache = str(tmp_path / "cache")
    template = tmp_path / "template.jinja"
    template.write_text(CHATML)
    settings = TargetSettings(chat_template=str(template))
    first = prepare_examples(CHATS, char_tokenizer(), settings, cache_dir=cache)
    assert prepare_examples(CHATS, char_tokenizer(), settings, cache_dir=cache).stats["cached"] is True
    template.write_text(CHATML.replace("<|im_end|>\n", "<|im_end|>"))  # same path, new text
    second = prepare_examples(CHATS, char_tokenizer(), settings, cache_dir=cache)
    assert second.stats["cached"] is False
    assert second.lengths[0] == first.lengths[0] - 4  # one "\n" fewer after each of the four messages


def test_dataset_source_uses_its_fingerprint(tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "cache")
    dataset = datasets.Dataset.from_list(PAIRS)
    prepare_examples(dataset, char_tokenizer(), cache_dir=cache)
    assert prepare_examples(dataset, char_tokenizer(), cache_dir=cache).stats["cached"] is True
    changed = dataset.map(lambda r: {"completion": r["completion"] + "!"})
    assert prepare_examples(changed, char_tokenizer(), cache_dir=cache).stats["cached"] is False


def test_use_cache_false_reads_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache))
    result = prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache), use_cache=False)
    assert result.stats["cached"] is False
    assert len(entries(cache)) == 1
    prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(tmp_path / "unused"), use_cache=False)
    assert not (tmp_path / "unused").exists()


def test_default_cache_dir_follows_sftlab_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "home"))
    prepare_examples(PAIRS, char_tokenizer())
    assert len(entries(tmp_path / "home" / "prepared")) == 1
    assert prepare_examples(PAIRS, char_tokenizer()).stats["cached"] is True


def test_damaged_cache_entry_is_a_miss(tmp_path):
    cache = tmp_path / "cache"
    first = prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache))
    (entry,) = entries(cache)
    # e.g. a crash before the data reached the disk. A new file, not the old one cut in place:
    # `first` maps the old one, and a mapped file cut short faults its reader (SIGBUS).
    (cache / entry / "targets.npy").unlink()
    (cache / entry / "targets.npy").write_bytes(b"")
    again = prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False
    assert_same_examples(first, again)


def test_unwritable_cache_dir_does_not_stop_preparation(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(blocker / "cache"))
    assert result.stats["cached"] is False
    assert len(result) == 2


def test_file_fingerprint_is_the_loaded_records_fingerprint(tmp_path):
    # A cache entry keyed before parsing (the file stream's hash) must be found again by a caller that
    # passes the loaded Records, and the other way round.
    from sftlab.data.sources import load_records, open_records

    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    for spec in (str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path)):
        assert open_records(spec).content_hash == load_records(spec).fingerprint()
    cache = str(tmp_path / "cache")
    prepare_examples(str(tmp_path / "a.jsonl"), char_tokenizer(), cache_dir=cache)
    assert prepare_examples(load_records(str(tmp_path / "a.jsonl")), char_tokenizer(), cache_dir=cache).stats["cached"] is True


# --- damaged entries: structure checked on every load, content against checksums.json -----------

MANY_PAIRS = [{"prompt": f"Q{i}: " + "x" * (i % 7), "completion": "y" * (1 + i % 5)} for i in range(40)]


def flip_bit(path, position: int, bit: int = 0) -> None:
    """Flip one bit of a file into a new file under its name: readers still mapping the old one keep
    it whole (rewriting a mapped file in place is what docs/data.md says not to do)."""
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.unlink()
    path.write_bytes(bytes(data))


def npy_data_start(path) -> int:
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        return handle.tell()


@pytest.mark.parametrize("name, element", [
    ("input_ids.npy", 17), ("targets.npy", 23), ("record_index.npy", 5),
    ("offsets.npy", 12),  # a middle offset +1: still increasing, still ends at the token count
    ("stats.json", None),
])
def test_a_flipped_bit_in_any_file_of_an_entry_rebuilds_it(tmp_path, capsys, name, element):
    cache = tmp_path / "cache"
    first = prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    clean = prepare_examples(MANY_PAIRS, char_tokenizer(), use_cache=False)
    (entry,) = entries(cache)
    path = cache / entry / name
    if element is None:
        position = path.read_bytes().index(b'"records": 40') + len('"records": 4')  # 40 -> 41
    else:
        itemsize = 8 if name in ("offsets.npy", "record_index.npy") else 4
        position = npy_data_start(path) + element * itemsize
    flip_bit(path, position)
    if name == "offsets.npy":  # what the old check let through: the last offset is still right
        offsets = np.load(path)
        assert offsets[-1] == len(first.input_ids) and (np.diff(offsets) >= 0).all()
    capsys.readouterr()
    again = prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False
    assert f"the cache entry {cache / entry} is damaged: {name} does not match its checksum" in capsys.readouterr().err
    assert_same_examples(again, clean)
    assert again.stats["records"] == 40
    third = prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    assert third.stats["cached"] is True and "damaged" not in capsys.readouterr().err
    assert_same_examples(third, clean)


@pytest.mark.parametrize("index, value, problem", [
    (4, lambda offsets: offsets[3] + 100, "offsets.npy decreases: example 4 ends before it starts"),
    (0, lambda offsets: 5, "offsets.npy runs from 5 to"),
    (-1, lambda offsets: offsets[-1] + 64, "offsets.npy runs from 0 to"),
])
def test_damaged_offsets_are_caught_on_every_load_even_after_verification(tmp_path, capsys, index, value, problem):
    # A bit flipped by the disk after the entry was verified changes no size, mtime or inode, so
    # the checksums are not read again: the structure check still refuses offsets that cannot be.
    cache = tmp_path / "cache"
    prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    (entry,) = entries(cache)
    path = cache / entry / "offsets.npy"
    offsets = np.load(path)
    before = os.stat(path)
    with open(path, "r+b") as handle:  # in place, as the disk would, and the mtime put back
        handle.seek(npy_data_start(path) + (index % len(offsets)) * 8)
        handle.write(np.int64(value(offsets)).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    again = prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False
    assert problem in capsys.readouterr().err
    assert_same_examples(again, prepare_examples(MANY_PAIRS, char_tokenizer(), use_cache=False))


def test_an_example_longer_than_max_length_is_a_damaged_entry(tmp_path):
    from sftlab.data.store import structure_problem

    arrays = {"input_ids": np.zeros(10, np.int32), "targets": np.zeros(10, np.int32),
              "offsets": np.array([0, 3, 10]), "record_index": np.array([0, 1])}
    assert structure_problem(arrays, max_length=7) is None
    assert structure_problem(arrays, max_length=6) == "example 1 has 7 tokens, more than max_length=6"


def test_an_entry_is_checksummed_once_per_machine(tmp_path, monkeypatch):
    from sftlab.data import store

    read = []
    checksum = store._file_checksum
    monkeypatch.setattr(store, "_file_checksum", lambda path: read.append(os.path.basename(path)) or checksum(path))
    cache = tmp_path / "cache"
    prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache))
    assert sorted(read) == sorted([name + ".npy" for name in ARRAYS] + ["stats.json"])  # sealed when built
    read.clear()
    assert prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache)).stats["cached"] is True
    assert read == []  # verified when built: the marker says so
    (entry,) = entries(cache)
    (cache / f".{entry}.verified").unlink()  # e.g. the cache copied from another machine
    assert prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache)).stats["cached"] is True
    assert len(read) == 5  # read once, then remembered
    read.clear()
    assert prepare_examples(PAIRS, char_tokenizer(), cache_dir=str(cache)).stats["cached"] is True
    assert read == []


def test_every_flipped_bit_of_an_array_header_is_a_damaged_entry_not_a_crash(tmp_path):
    # numpy parses the header with Python's tokenizer: a flipped byte there raised SyntaxError or
    # tokenize.TokenError out of the load, where any damage must mean "prepare it again".
    from sftlab.data import store

    cache = tmp_path / "cache"
    prepare_examples(MANY_PAIRS, char_tokenizer(), cache_dir=str(cache))
    (entry,) = entries(cache)
    folder = str(cache / entry)
    for name in ARRAYS:
        path = cache / entry / f"{name}.npy"
        original = path.read_bytes()
        for position in range(npy_data_start(path)):
            for bit in range(8):
                flip_bit(path, position, bit)
                examples, problem = store._open_entry(folder, None)
                if examples is not None:
                    problem = store.content_problem(folder)
                assert problem is not None, (name, position, bit)
                path.unlink()
                path.write_bytes(original)


PAIR_RECORDS = [{"prompt": f"Q{i}: " + "x" * (i % 5), "chosen": "y" * (1 + i % 4), "rejected": "n" * (1 + i % 3)}
                for i in range(12)]
PAIR_ARRAYS = ("prompt_ids", "prompt_offsets", "chosen_ids", "chosen_offsets", "rejected_ids", "rejected_offsets",
               "record_index")


@pytest.mark.parametrize("name", [f"{array}.npy" for array in PAIR_ARRAYS] + ["stats.json"])
def test_a_flipped_bit_in_a_preference_pairs_entry_rebuilds_it(tmp_path, capsys, name):
    # The pairs' entry is a cache entry too: the same checks, the same rebuild.
    from sftlab.data.preference import prepare_pairs

    cache = tmp_path / "cache"
    prepare_pairs(PAIR_RECORDS, char_tokenizer(), cache_dir=str(cache))
    clean = prepare_pairs(PAIR_RECORDS, char_tokenizer(), use_cache=False)
    (entry,) = entries(cache)
    path = cache / entry / name
    if name == "stats.json":
        position = path.read_bytes().index(b'"pairs": 12') + len('"pairs": 1')  # 12 -> 13
    else:
        position = npy_data_start(path) + 3 * (8 if "offsets" in name or name == "record_index.npy" else 4)
    flip_bit(path, position)
    capsys.readouterr()
    again = prepare_pairs(PAIR_RECORDS, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False
    assert f"the cache entry {cache / entry} is damaged: {name} does not match its checksum" in capsys.readouterr().err
    for array in PAIR_ARRAYS:
        np.testing.assert_array_equal(getattr(again, array), getattr(clean, array))
    assert prepare_pairs(PAIR_RECORDS, char_tokenizer(), cache_dir=str(cache)).stats["cached"] is True


def test_preference_offsets_that_cannot_be_are_caught_even_after_verification(tmp_path, capsys):
    from sftlab.data.preference import prepare_pairs

    cache = tmp_path / "cache"
    prepare_pairs(PAIR_RECORDS, char_tokenizer(), cache_dir=str(cache))
    (entry,) = entries(cache)
    path = cache / entry / "chosen_offsets.npy"
    before = os.stat(path)
    with open(path, "r+b") as handle:  # in place, mtime put back: the marker still says verified
        handle.seek(npy_data_start(path) + 5 * 8)
        handle.write(np.int64(10**6).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    again = prepare_pairs(PAIR_RECORDS, char_tokenizer(), cache_dir=str(cache))
    assert again.stats["cached"] is False
    assert "chosen_offsets.npy decreases: pair 5 ends before it starts" in capsys.readouterr().err
