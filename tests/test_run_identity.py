"""Runs never lose or mix up work: a checkpoint is resumed only by the run that wrote it, a new run
never silently replaces an earlier run's final model or checkpoints, and a log torn by a kill
(its last line half written) does not stop the resume.

Preemption is real: SIGUSR1 sent to this process after a chosen step (the handler sftlab installs
finishes the step, checkpoints and returns exit 75); "the same" means every tensor of
final/model.safetensors bitwise equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sftlab.training.progress
from sftlab.cli import EXIT_PREEMPTED, main
from sftlab.errors import TrainingError
from sftlab.training.checkpoint import list_checkpoints
from sftlab.training.progress import keep_records_through, read_records
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

MAX_STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("identity")
    model = save_tiny_llama(str(root / "model"), char_tokenizer())
    data = root / "train.jsonl"
    with open(data, "w") as handle:
        for i in range(16):
            handle.write(json.dumps({"prompt": f"add {i} and 1", "completion": f" {i + 1}"}) + "\n")
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": model,
                "train_data": str(data),
                "max_length": 32,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "learning_rate": 1e-3,
                "warmup_steps": 2,
                "max_steps": MAX_STEPS,
                "save_steps": 2,
                "logging_steps": 1,
                "seed": 7,
                "cache_dir": str(root / "cache"),
            }
        )
    )
    return {"root": root, "config": str(config)}


def argv(setup, output_dir, *overrides: str) -> list[str]:
    return ["train", setup["config"], f"output_dir={output_dir}", *overrides]


def weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def assert_same_weights(a, b):
    ours, theirs = weights(a), weights(b)
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def stop_after(monkeypatch, step: int):
    """SIGUSR1 to this process once `step` is done, as SLURM sends it before a preemption: the
    run finishes the step under way (step + 1), checkpoints it and returns."""
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(sftlab.training.progress.Reporter, "advance", advance)


@pytest.fixture(scope="module")
def earlier(setup) -> str:
    """A finished run (learning rate 1e-3): checkpoints at steps 2 and 4 and a final model."""
    output_dir = str(setup["root"] / "earlier")
    assert main(argv(setup, output_dir)) == 0
    return output_dir


@pytest.fixture(scope="module")
def clean_other(setup) -> str:
    """An uninterrupted run with learning rate 2e-3, in a folder of its own: what the new run must reach."""
    output_dir = str(setup["root"] / "clean-other")
    assert main(argv(setup, output_dir, "learning_rate=2e-3")) == 0
    return output_dir


def copy_run(source: str, target: str) -> str:
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_finished_run_prints_where_it_saved(setup, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert main(argv(setup, output_dir, "max_steps=1", "save_steps=null")) == 0
    assert f"saved {output_dir / 'final'}" in capsys.readouterr().out


def test_a_new_run_is_refused_in_a_finished_runs_folder(setup, earlier, tmp_path, capsys):
    folder = copy_run(earlier, str(tmp_path / "reused"))
    before = weights(folder)
    assert main(argv(setup, folder, "learning_rate=2e-3")) != 0
    error = capsys.readouterr().err
    assert "output_dir holds an earlier run" in error and "final/, checkpoints/step-2, checkpoints/step-4" in error
    assert "overwrite_output_dir: true" in error
    after = weights(folder)
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing touched
    assert list_checkpoints(folder) == [2, 4]


def test_auto_resume_refuses_another_runs_checkpoint_naming_the_setting(setup, earlier, tmp_path, capsys):
    """The reported bug: a new run (another learning rate) started with resume_from_checkpoint=auto in
    a folder holding an earlier run's checkpoints resumed from the earlier run's newest one."""
    folder = copy_run(earlier, str(tmp_path / "reused"))
    assert main(argv(setup, folder, "learning_rate=2e-3", "resume_from_checkpoint=auto")) != 0
    error = capsys.readouterr().err
    assert "output_dir holds a checkpoint of another run" in error
    assert "learning_rate was 0.001, is 0.002 now" in error and "step-4" in error


def test_an_explicit_checkpoint_of_another_run_is_refused(setup, earlier, tmp_path, capsys):
    checkpoint = os.path.join(earlier, "checkpoints", "step-4")
    assert main(argv(setup, tmp_path / "out", "seed=8", f"resume_from_checkpoint={checkpoint}")) != 0
    error = capsys.readouterr().err
    assert "the checkpoint was written by another run" in error and "seed was 7, is 8 now" in error


def test_other_data_is_another_run(setup, earlier, tmp_path, capsys):
    data = tmp_path / "other.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"add {i} and 2", "completion": f" {i + 2}"}) + "\n" for i in range(16))
    )
    folder = copy_run(earlier, str(tmp_path / "reused"))
    assert main(argv(setup, folder, f"train_data={data}", "resume_from_checkpoint=auto")) != 0
    assert "data differs" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_then_preempted_then_resumed_equals_a_clean_run(
    setup, earlier, clean_other, tmp_path, monkeypatch, capsys
):
    """overwrite_output_dir deletes the earlier run's work; the new run, stopped after step 3 and
    resumed with auto, continues from its own step 3 (not the earlier run's step 4) to the clean run's weights."""
    folder = copy_run(earlier, str(tmp_path / "reused"))
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        code = main(argv(setup, folder, "learning_rate=2e-3", "overwrite_output_dir=true"))
    assert code == EXIT_PREEMPTED
    out = capsys.readouterr().out
    assert "overwrite_output_dir: deleted the earlier run's final/, checkpoints/step-2, checkpoints/step-4" in out
    assert list_checkpoints(folder) == [2, 3] and not os.path.exists(os.path.join(folder, "final"))
    assert main(argv(setup, folder, "learning_rate=2e-3", "resume_from_checkpoint=auto")) == 0
    assert f"resumed from {os.path.join(folder, 'checkpoints', 'step-3')} at step 3" in capsys.readouterr().out
    assert_same_weights(folder, clean_other)


@pytest.mark.slow
def test_a_torn_last_log_line_is_dropped_on_resume(setup, earlier, tmp_path, monkeypatch, capsys):
    """SIGKILL or a full disk leaves half a line at the end of metrics.jsonl: the resume drops it,
    says so, and ends with the uninterrupted run's weights and a log that parses."""
    folder = str(tmp_path / "torn")
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        assert main(argv(setup, folder)) == EXIT_PREEMPTED
    with open(os.path.join(folder, "metrics.jsonl"), "a") as handle:
        handle.write('{"type": "train", "step": 4, "lo')  # the kill came mid-write
    capsys.readouterr()
    assert main(argv(setup, folder, "resume_from_checkpoint=auto")) == 0
    assert "dropped an incomplete last line" in capsys.readouterr().out
    records, torn = read_records(os.path.join(folder, "metrics.jsonl"))
    assert torn == 0 and [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(folder, earlier)


@pytest.mark.slow
def test_more_steps_on_resume_is_allowed_and_said(setup, tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "longer")
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        assert main(argv(setup, folder)) == EXIT_PREEMPTED
    capsys.readouterr()
    assert main(argv(setup, folder, "max_steps=8", "resume_from_checkpoint=auto")) == 0
    out = capsys.readouterr().out
    assert (
        "max_steps was 6 when" in out and "is 8 now: the learning-rate schedule follows the new total of 8 steps" in out
    )


def test_log_readers_skip_and_count_only_a_torn_last_line(tmp_path):
    log = tmp_path / "generations.jsonl"
    log.write_text('{"step": 2, "prediction": "é"}\n{"step": 4, "prediction": "b"}\n{"step": 6, "predi')
    records, torn = read_records(str(log))
    assert [r["step"] for r in records] == [2, 4] and torn == 1
    assert keep_records_through(str(log), 2) == 1
    assert log.read_text(encoding="utf-8") == '{"step": 2, "prediction": "é"}\n'  # kept lines as written
    log.write_text('{"step": 2}\n12\n')  # a torn '{"step": 12...' can leave a bare number
    assert read_records(str(log)) == ([{"step": 2}], 1)
    log.write_text('{"step": 2}\n{"step": 4, "pre\n{"step": 6}\n')
    with pytest.raises(TrainingError) as error:
        read_records(str(log))
    assert f"{log}:2" in str(error.value) and "a log line cannot be read" in str(error.value)
