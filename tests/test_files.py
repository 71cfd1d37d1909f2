"""sftlab/files.py: the cache root, and folders written under a temporary name and renamed into place."""

from __future__ import annotations

import os

import pytest

from sftlab.files import atomic_directory, cache_root, publish_directory, remove_directory, temporary_sibling


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_cache_root_follows_sftlab_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "c"))
    assert cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("SFTLAB_CACHE")
    assert cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "sftlab")


def test_the_folder_appears_whole_under_its_name(tmp_path):
    target = tmp_path / "out" / "final"
    with atomic_directory(str(target)) as tmp:
        assert tmp == str(tmp_path / "out" / ".tmp-final")
        (tmp_path / "out" / ".tmp-final" / "a.txt").write_text("a")
        assert not target.exists()  # nothing under the final name while it is written
    assert listing(tmp_path / "out") == ["final"]
    assert (target / "a.txt").read_text() == "a"


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(str(target)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").close()
            raise OSError("disk full")
    assert listing(tmp_path) == ["final"]
    assert listing(target) == ["old.txt"]


def test_an_old_folder_is_replaced_and_a_killed_writer_s_leftover_removed(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (tmp_path / ".tmp-final").mkdir()  # left by a writer killed mid-write
    (tmp_path / ".tmp-final" / "stale.txt").write_text("stale")
    with atomic_directory(str(target), fsync=True) as tmp:
        assert listing(tmp) == []
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert listing(tmp_path) == ["final"]
    assert listing(target) == ["new.txt"]


def test_a_failed_rename_puts_the_replaced_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "step-2"
    target.mkdir()
    (target / "state.json").write_text("{}")
    tmp = temporary_sibling(str(target))
    rename = os.rename

    def rename_fails_for_tmp(source, destination):
        if source == tmp:
            raise OSError(28, "No space left on device")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", rename_fails_for_tmp)
    with pytest.raises(OSError, match="No space left"):
        publish_directory(tmp, str(target))
    assert listing(tmp_path) == ["step-2"]
    assert listing(target) == ["state.json"]


def test_without_replace_the_first_published_folder_wins(tmp_path):
    # Two writers of the same target (two processes converting one GGUF): each has its own sibling,
    # and the second rename fails instead of deleting what the first published.
    target = str(tmp_path / "model")
    first, second = temporary_sibling(target, unique=True), temporary_sibling(target, unique=True)
    assert first != second and os.path.basename(first).startswith(".tmp-model-")
    open(os.path.join(first, "first"), "w").close()
    open(os.path.join(second, "second"), "w").close()
    publish_directory(first, target, replace=False)
    with pytest.raises(OSError):
        publish_directory(second, target, replace=False)
    assert listing(tmp_path) == ["model"]
    assert listing(target) == ["first"]


def test_remove_directory_leaves_nothing(tmp_path):
    target = tmp_path / "step-3"
    target.mkdir()
    (target / "state.json").write_text("{}")
    (tmp_path / ".tmp-delete-step-3").mkdir()  # left by a run killed while deleting
    remove_directory(str(target))
    assert listing(tmp_path) == []


def test_gguf_conversion_publishes_a_whole_folder_once(tmp_path, monkeypatch):
    # The GGUF loader is replaced by a tiny model from a config: what is checked is the writing.
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab import models
    from tiny import char_tokenizer

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    loads = []

    def load_model(folder, gguf_file, dtype):
        loads.append(gguf_file)
        config = LlamaConfig(vocab_size=130, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return LlamaForCausalLM(config)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: char_tokenizer())
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", _failing(LlamaForCausalLM.save_pretrained))
    with pytest.raises(models.ConfigError, match="cannot write the converted model"):
        models.resolve_model_path(str(gguf))
    assert listing(tmp_path / "cache" / "models") == []  # the failed try left nothing behind
    monkeypatch.undo()
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: char_tokenizer())
    target = models.resolve_model_path(str(gguf))
    assert listing(tmp_path / "cache" / "models") == [os.path.basename(target)]
    assert os.path.basename(target).startswith("tiny-")
    assert {"config.json", "model.safetensors", "sftlab_source.json"} <= set(os.listdir(target))
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o755)  # shared like any model folder
    assert models.resolve_model_path(str(gguf)) == target and len(loads) == 2  # converted once, then found


def _failing(save):
    def save_then_fail(self, folder, **kwargs):
        save(self, folder, **kwargs)
        raise OSError(28, "No space left on device")

    return save_then_fail
