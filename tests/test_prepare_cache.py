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
