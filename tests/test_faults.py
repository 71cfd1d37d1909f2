"""A run killed at any point resumes from its last complete checkpoint to the same final weights;
a checkpoint that cannot be written is a clear TrainingError that leaves the earlier ones intact.

The kills are real SIGKILLs (kill -9: no handler, no cleanup) delivered to a training subprocess
by itself at a chosen point, so every run of the test lands them in the same place: half way
through writing a checkpoint, between two checkpoints, and while the final model is renamed into
place. Everything runs on CPU with one thread and a fixed seed, and "the same" means every tensor
of final/model.safetensors is bitwise equal to an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftlab.cli import main
from sftlab.training.checkpoint import list_checkpoints
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

MAX_STEPS, SAVE_STEPS = 6, 2

# Runs `sftlab.cli.main(argv)` and SIGKILLs itself at POINT when step STEP gets there.
DRIVER = r"""
import os, signal, sys
import sftlab.training.checkpoint, sftlab.training.progress
from sftlab.cli import main

point, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def kill_me():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if point == "checkpoint-write":  # checkpoint STEP's shard half written in checkpoints/.tmp-step-N
    real_fsync = os.fsync

    def fsync(fd):
        # torch.distributed.checkpoint syncs each shard file right after writing it.
        path = os.readlink(f"/proc/self/fd/{fd}")
        if f".tmp-step-{step}/shard-" in path and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
            os.ftruncate(fd, os.path.getsize(path) // 2)
            kill_me()
        return real_fsync(fd)

    os.fsync = fsync
elif point == "after-step":  # optimizer step STEP done in memory, never saved
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == step:
            kill_me()

    sftlab.training.progress.Reporter.advance = advance
elif point in ("sigusr1-self", "sigusr1-launchers", "sigterm-launcher"):  # a real signal once step STEP is done, from rank SIGNAL_RANK
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == step and os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0"):
            if point == "sigusr1-self":
                os.kill(os.getpid(), signal.SIGUSR1)
            elif point == "sigusr1-launchers":  # every torchrun of a multi-machine run (their pids in a file)
                with open(os.environ["LAUNCHER_PIDS"]) as handle:
                    for pid in handle.read().split():
                        os.kill(int(pid), signal.SIGUSR1)
            else:  # torchrun, which passes SIGTERM on to every worker as SLURM and Kubernetes make it do
                os.kill(os.getppid(), signal.SIGTERM)

    sftlab.training.progress.Reporter.advance = advance
elif point == "final-rename":  # final model fully written to .tmp-final, not yet renamed to final/
    real_rename = os.rename

    def rename(source, target, *args, **kwargs):
        if str(source).endswith(".tmp-final"):
            kill_me()
        return real_rename(source, target, *args, **kwargs)

    os.rename = rename
code = main(argv)
print(f"sftlab exit code {code} on rank {os.environ.get('RANK', '0')}", flush=True)
sys.exit(code)
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_llama(str(root / "model"), char_tokenizer())
    data = root / "train.jsonl"
    with open(data, "w") as handle:
        for i in range(16):  # 4 optimizer steps per epoch: the 6 steps cross an epoch boundary
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
                "save_steps": SAVE_STEPS,
                "logging_steps": 1,
                "seed": 7,
                "cache_dir": str(root / "cache"),
            }
        )
    )
    return {"root": root, "config": str(config)}


def train_argv(setup: dict, output_dir, *overrides: str) -> list[str]:
    return ["train", setup["config"], f"output_dir={output_dir}", *overrides]


@pytest.fixture(scope="module")
def reference(setup) -> str:
    """The uninterrupted run: its checkpoints and final weights are what every resumed run must reach."""
    output_dir = str(setup["root"] / "reference")
    assert main(train_argv(setup, output_dir)) == 0
    assert list_checkpoints(output_dir) == [2, 4]
    return output_dir


SHARD = "shard-00001-model-00001-of-00001.safetensors"  # what one process writes of a checkpoint


def assert_same_weights(folder: str, reference_folder: str, name: str = "final/model.safetensors") -> None:
    ours, theirs = load_file(os.path.join(folder, name)), load_file(os.path.join(reference_folder, name))
    assert ours.keys() == theirs.keys() and ours
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def train_losses(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}  # a re-run step: its last value


def run_and_kill(setup: dict, output_dir: str, point: str, step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTLAB_CACHE": str(setup["root"] / "cache")}
    argv = train_argv(setup, output_dir, "resume_from_checkpoint=auto")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, point, str(step), *argv], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == -9, result.stderr[-3000:]  # killed by SIGKILL, not finished or crashed
    return result


@pytest.mark.slow
def test_killed_runs_resume_from_the_last_complete_checkpoint_to_identical_weights(setup, reference):
    output_dir = str(setup["root"] / "killed")
    checkpoints = os.path.join(output_dir, "checkpoints")

    # 1. Killed while writing checkpoint 4: step-2 is complete, step 4 exists only as a partial .tmp folder.
    run_and_kill(setup, output_dir, "checkpoint-write", 4)
    assert list_checkpoints(output_dir) == [2]
    assert sorted(os.listdir(checkpoints)) == [".tmp-step-4", "step-2"]
    assert not os.path.exists(os.path.join(checkpoints, ".tmp-step-4", "state.json"))
    assert_same_weights(output_dir, reference, f"checkpoints/step-2/{SHARD}")

    # 2. Resumed from step 2, killed after step 5 had updated the weights in memory only.
    second = run_and_kill(setup, output_dir, "after-step", 5)
    assert f"resumed from {os.path.join(checkpoints, 'step-2')} at step 2" in second.stdout
    assert list_checkpoints(output_dir) == [2, 4]
    assert sorted(os.listdir(checkpoints)) == ["step-2", "step-4"]  # the stale .tmp-step-4 was replaced
    assert_same_weights(output_dir, reference, f"checkpoints/step-4/{SHARD}")

    # 3. Resumed from step 4, killed with the final model written but not yet renamed into place.
    third = run_and_kill(setup, output_dir, "final-rename", 0)
    assert f"resumed from {os.path.join(checkpoints, 'step-4')} at step 4" in third.stdout
    assert os.path.isdir(os.path.join(output_dir, ".tmp-final"))
    assert not os.path.exists(os.path.join(output_dir, "final"))

    # 4. The last resume finishes: the weights and the last losses are the uninterrupted run's.
    assert main(train_argv(setup, output_dir, "resume_from_checkpoint=auto")) == 0
    assert_same_weights(output_dir, reference)
    assert not os.path.exists(os.path.join(output_dir, ".tmp-final"))
    ours, theirs = train_losses(output_dir), train_losses(reference)
    assert ours == theirs and len(theirs) == MAX_STEPS
    # Steps a killed run logged after its last checkpoint were dropped on resume: each step once.
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        steps = [json.loads(line)["step"] for line in handle if json.loads(line)["type"] == "train"]
    assert steps == sorted(set(steps)) and len(steps) == MAX_STEPS


def test_partial_checkpoint_folders_are_ignored_on_resume(setup, reference, capsys):
    """A partial .tmp folder and a step folder without state.json (as if the filesystem lost the
    end of a write) are skipped: the run resumes from the newest complete checkpoint, step 2."""
    output_dir = str(setup["root"] / "partial")
    shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(output_dir, "checkpoints"))
    step4 = os.path.join(output_dir, "checkpoints", "step-4")
    os.remove(os.path.join(step4, "state.json"))
    with open(os.path.join(step4, SHARD), "r+b") as handle:
        handle.truncate(100)
    os.makedirs(os.path.join(output_dir, "checkpoints", ".tmp-step-5"))
    with open(os.path.join(output_dir, "checkpoints", ".tmp-step-5", SHARD), "wb") as handle:
        handle.write(b"PK\x03\x04 half a zip")

    assert main(train_argv(setup, output_dir, "resume_from_checkpoint=auto")) == 0
    assert "at step 2" in capsys.readouterr().out
    assert_same_weights(output_dir, reference)
    assert list_checkpoints(output_dir) == [2, 4]  # step-4 rewritten whole


def test_a_corrupt_complete_checkpoint_is_a_clear_error(setup, reference, capsys):
    output_dir = str(setup["root"] / "corrupt")
    shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(output_dir, "checkpoints"))
    weights = os.path.join(output_dir, "checkpoints", "step-4", SHARD)
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)

    assert main(train_argv(setup, output_dir, "resume_from_checkpoint=auto")) == 2
    error = error_line(capsys.readouterr().err)
    assert error.startswith(f"error: {weights}: cannot read the checkpoint file (missing, truncated or corrupt)")
    assert "fix: delete this checkpoint folder to resume from an earlier one" in error


def error_line(stderr: str) -> str:
    """The CLI's one-line message (transformers' progress bars share stderr)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["shards", "torch.save"])
def test_disk_full_during_a_checkpoint_is_a_clear_error_and_keeps_the_earlier_one(
    setup, reference, writer, monkeypatch, capsys
):
    output_dir = str(setup["root"] / f"disk-full-{writer}")
    if writer == "shards":  # the weight and optimizer shards, written by torch.distributed.checkpoint
        from torch.distributed.checkpoint.filesystem import FileSystem

        real = FileSystem.create_stream
        monkeypatch.setattr(
            FileSystem,
            "create_stream",
            lambda self, path, mode: _no_space() if ".tmp-step-4" in str(path) else real(self, path, mode),
        )
    else:
        real = torch.save
        monkeypatch.setattr(
            torch,
            "save",
            lambda obj, path, *a, **k: _no_space() if ".tmp-step-4" in str(path) else real(obj, path, *a, **k),
        )

    assert main(train_argv(setup, output_dir)) == 2
    error = error_line(capsys.readouterr().err)
    assert error == (
        f"error: {os.path.join(output_dir, 'checkpoints', 'step-4')}: cannot write the checkpoint for step 4; "
        "found OSError: No space left on device; fix: free disk space or make output_dir writable; earlier checkpoints are intact"
    )
    assert sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) == ["step-2"]  # no partial folder left
    assert_same_weights(output_dir, reference, f"checkpoints/step-2/{SHARD}")


def test_unwritable_checkpoint_folder_is_a_clear_error(setup, capsys):
    # Permissions do not stop root, so the folder is made impossible: `checkpoints` is a file.
    output_dir = setup["root"] / "unwritable"
    output_dir.mkdir()
    (output_dir / "checkpoints").write_text("not a folder")
    assert main(train_argv(setup, output_dir)) == 2
    error = error_line(capsys.readouterr().err)
    assert error.startswith(
        f"error: {output_dir / 'checkpoints' / 'step-2'}: cannot write the checkpoint for step 2; found "
    )
    assert error.endswith(
        "NotADirectoryError: Not a directory; fix: free disk space or make output_dir writable; earlier checkpoints are intact"
    )


def test_disk_full_during_the_final_export_is_a_clear_error(setup, reference, monkeypatch, capsys):
    output_dir = str(setup["root"] / "final-full")
    monkeypatch.setattr(yaml, "safe_dump", _no_space)  # writing final/sftlab_config.yaml
    assert main(train_argv(setup, output_dir)) == 2
    error = error_line(capsys.readouterr().err)
    assert error == (
        f"error: {os.path.join(output_dir, 'final')}: cannot write the final model; found No space left on device; "
        "fix: free disk space or make output_dir writable"
    )
    assert not os.path.exists(os.path.join(output_dir, "final")) and not os.path.exists(
        os.path.join(output_dir, ".tmp-final")
    )
    assert list_checkpoints(output_dir) == [2, 4]  # a resume can still finish the run


@pytest.mark.slow
def test_a_stop_signal_checkpoints_after_the_step_and_resumes_to_identical_weights(setup, reference):
    """SIGUSR1 (SLURM's warning signal) after step 2: step 3 is finished, checkpointed, and
    `sftlab train` exits 75; resuming from it reaches the uninterrupted run's weights and losses."""
    from sftlab.cli import EXIT_PREEMPTED

    output_dir = str(setup["root"] / "signalled")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTLAB_CACHE": str(setup["root"] / "cache")}
    argv = train_argv(setup, output_dir, "resume_from_checkpoint=auto")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, "sigusr1-self", "2", *argv], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == EXIT_PREEMPTED == 75, result.stderr[-3000:]
    checkpoint = os.path.join(output_dir, "checkpoints", "step-3")
    assert f"SIGUSR1 received: stopped after step 3 of {MAX_STEPS}, checkpoint {checkpoint}" in result.stdout
    assert list_checkpoints(output_dir) == [2, 3] and not os.path.exists(os.path.join(output_dir, "final"))

    assert main(argv) == 0
    assert_same_weights(output_dir, reference)
    assert train_losses(output_dir) == train_losses(reference)
