"""Every malformed input in tests/bad_inputs/cases.yaml gets a clear one-line error or a counted skip.

Each case runs through `sftlab.cli.main(argv)` in the test process (a subprocess costs ~8 s of
imports); a non-sftlab exception escaping `main` is a crash and fails the case with its traceback.
Two subprocess runs check the real `sftlab` command: exit code 2 and no traceback for a user
mistake, and the traceback with `--debug`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from sftlab.cli import main
from sftlab.data.chat import CHATML
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

HERE = os.path.join(os.path.dirname(__file__), "bad_inputs")
with open(os.path.join(HERE, "cases.yaml"), encoding="utf-8") as handle:
    CASES = yaml.safe_load(handle)["cases"]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The placeholders of cases.yaml: the corpus folders, a tiny model and damaged copies of it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_tiny_llama(str(root / "model"), char_tokenizer(CHATML))
    damaged = {}
    for name in (
        "model_no_weights",
        "model_truncated_weights",
        "model_empty_weights",
        "model_no_config",
        "model_bad_config",
    ):
        damaged[name] = shutil.copytree(model, str(root / name))
    os.remove(os.path.join(damaged["model_no_weights"], "model.safetensors"))
    weights = os.path.join(damaged["model_truncated_weights"], "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)  # a copy cut off half way
    open(os.path.join(damaged["model_empty_weights"], "model.safetensors"), "wb").close()
    os.remove(os.path.join(damaged["model_no_config"], "config.json"))
    with open(os.path.join(damaged["model_bad_config"], "config.json"), "w") as handle:
        handle.write('{"model_type": "llama", "hidden_size": 64,')
    no_template = str(root / "tokenizer_no_template")
    char_tokenizer().save_pretrained(no_template)
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    return {
        "data": os.path.join(HERE, "data"),
        "configs": os.path.join(HERE, "configs"),
        "model": model,
        "tokenizer_no_template": no_template,
        "unwritable": str(blocker / "run"),
        **damaged,
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))


def fill(argv: list[str], places: dict[str, str], out: str) -> list[str]:
    # Only {name} with a known name is replaced: the Jinja templates in some cases keep their braces.
    values = {**places, "out": out}
    return [re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def counts(stats: dict) -> dict:
    """The statistics a case can pin: skipped_invalid and dropped summed over their reasons."""
    return {
        "skipped_invalid": sum(stats.get("skipped_invalid", {}).values()),
        "dropped": sum(stats.get("dropped", {}).values()),
        "truncated": stats.get("truncated", 0),
        "examples": stats.get("examples", 0),
    }


def check_training_ran(out: str, steps: int) -> dict:
    """metrics.jsonl of a finished run: `steps` steps, every loss finite, every step supervised."""
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    trained = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    for record in trained:
        assert math.isfinite(record["loss"]) and record["loss"] > 0, record
        assert record["supervised_tokens"] > 0, record
    assert os.path.isfile(os.path.join(out, "final", "model.safetensors"))
    (data,) = [r for r in records if r["type"] == "data" and r["split"] == "train"]
    return data


def test_the_corpus_is_large_and_every_file_exists():
    outcomes = Counter(case["expect"] for case in CASES)
    assert len(CASES) >= 40 and outcomes["error"] >= 40 and outcomes["counted"] >= 3, outcomes
    assert len({case["id"] for case in CASES}) == len(CASES)
    for case in CASES:
        assert case["expect"] in ("error", "counted", "ok"), case["id"]
        for name in case["files"]:
            assert os.path.isfile(os.path.join(HERE, name)), (case["id"], name)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input(case, places, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = fill(case["argv"], places, out)
    code = main(argv)  # anything but an SftlabError escapes here: a crash, and the test fails
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stderr and "Traceback" not in stdout

    if case["expect"] == "error":
        assert code == 2, (stdout, stderr)
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, stderr
        for text in case["message"]:
            assert text in lines[0], f"{text!r} not in {lines[0]!r}"
        return

    assert code == 0, stderr
    for text in case.get("message", []):
        assert text in stdout, f"{text!r} not in stdout:\n{stdout}"
    if argv[0] == "train":
        stats = check_training_ran(out, case["steps"])
    else:
        stats = json.loads(stdout)["stats"]
    if case["expect"] == "counted":
        found = counts(stats)
        assert {key: found[key] for key in case["counted"]} == case["counted"]
        assert any(found[key] for key in ("skipped_invalid", "dropped", "truncated"))


def test_counted_skip_names_the_reasons(places, tmp_path, capsys):
    """A skip is counted per reason, so a user can see which problem to fix first."""
    argv = fill(
        [
            "inspect",
            "{configs}/base.yaml",
            "model={model}",
            "train_data={data}/some_invalid.jsonl",
            "skip_invalid_records=true",
            "--json",
        ],
        places,
        str(tmp_path),
    )
    assert main(argv) == 0
    skipped = json.loads(capsys.readouterr().out)["stats"]["skipped_invalid"]
    assert skipped == {
        "invalid prompt: must be a string": 1,
        "invalid completion: is empty": 1,
        "invalid prompt: record fits no known format (a 'prompt' without a 'completion')": 1,
    }


def test_debug_raises_the_error_itself(places, tmp_path):
    from sftlab.errors import DataError

    argv = fill(
        ["--debug", "inspect", "{configs}/base.yaml", "model={model}", "train_data={data}/text_none.jsonl"],
        places,
        str(tmp_path),
    )
    with pytest.raises(DataError, match="record 1, field 'text'"):
        main(argv)


def _sftlab(*args: str) -> subprocess.CompletedProcess:
    command = os.path.join(os.path.dirname(sys.executable), "sftlab")
    if not os.path.exists(command):
        command = shutil.which("sftlab")
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_real_command_prints_one_line_and_exits_2_and_debug_shows_the_traceback():
    config = os.path.join(HERE, "configs", "unknown_key.yaml")
    result = _sftlab("train", config, "model=unused", "train_data=unused.jsonl")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {config}: unknown config key 'learning_rte'; fix: did you mean 'learning_rate'?"
    ]
    debug = _sftlab("--debug", "train", config, "model=unused", "train_data=unused.jsonl")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr and "learning_rte" in debug.stderr
