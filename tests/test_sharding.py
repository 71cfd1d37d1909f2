"""FSDP2 on 2 CPU processes (torchrun, gloo) trains like one process, and its checkpoints
reshard: 2 -> 2, 2 -> 1, 1 -> 2 and DDP -> FSDP resume to the uninterrupted run's weights; a
rank killed with SIGKILL while writing its shard leaves the previous checkpoint usable; SIGTERM
to torchrun stops the run with a checkpoint and exit code 75, and it resumes exactly.

Every run is the real `sftlab train` command (`torchrun -m sftlab.cli train ...`) on a tiny Llama
whose lm_head is TIED to its embeddings (as SmolLM2's is), 6 AdamW steps of 4 examples each.
"Within 1e-5" compares runs that split the steps differently (fp32 sums in another order);
"equal" means bitwise, between runs on the same number of processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from sftlab.cli import EXIT_PREEMPTED, main
from sftlab.training.checkpoint import list_checkpoints
from test_faults import DRIVER
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_checks.py")
MAX_STEPS = 6
ONE_PROCESS = ["per_device_train_batch_size=4"]
FSDP = ["fsdp=true", "per_device_train_batch_size=2"]
DDP = ["fsdp=false", "per_device_train_batch_size=2"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def addition_run(root, examples: int, **fields) -> dict:
    """A tiny tied Llama, `examples` addition records and a config.yaml of `sftlab train` over them
    (`fields` added to it), in `root`: what the torchrun tests launch."""
    model = save_tiny_llama(str(root / "model"), char_tokenizer(), tie=True)
    data = root / "train.jsonl"
    with open(data, "w") as handle:
        for i in range(examples):
            handle.write(
                json.dumps({"prompt": f"add {i} and {i % 7}", "completion": f" {i + i % 7} ok" * (1 + i % 3)}) + "\n"
            )
    config = root / "config.yaml"
    settings = {
        "model": model,
        "train_data": str(data),
        "max_length": 48,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "save_steps": 2,
        "logging_steps": 1,
        "seed": 3,
        "cache_dir": str(root / "cache"),
    }
    config.write_text(yaml.safe_dump({**settings, **fields}))
    return {
        "root": root,
        "config": str(config),
        "env": {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return addition_run(tmp_path_factory.mktemp("sharding"), 24, max_steps=MAX_STEPS)  # 6 steps of 4: one epoch


def torchrun(
    setup, output_dir, *overrides, driver: tuple[str, ...] = (), env: dict | None = None
) -> subprocess.CompletedProcess:
    """`sftlab train` on 2 processes; with `driver`, through test_faults.DRIVER (a kill or a signal at a chosen point)."""
    if driver:
        script = setup["root"] / "driver.py"
        script.write_text(DRIVER)
        program = [str(script), *driver]
    else:
        program = ["-m", "sftlab.cli"]
    argv = ["train", setup["config"], f"output_dir={output_dir}", *overrides]
    return subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", *program, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**setup["env"], **(env or {})},
    )


def torchrun_checks(setup, script: str) -> dict:
    """What a checks script (tests/*_checks.py) writes, run on 2 processes by torchrun."""
    out = setup["root"] / f"{os.path.basename(script)}.json"
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", script, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=setup["env"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle) if r["type"] == "train"}


def assert_close_weights(ours: dict, theirs: dict, tolerance: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys() and theirs
    for name in theirs:
        assert float((ours[name] - theirs[name]).norm() / theirs[name].norm()) < tolerance, name


def assert_equal_weights(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and theirs
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def resume_from(setup, source_dir, step: int, name: str) -> str:
    """A fresh output folder holding only checkpoint `step` of `source_dir`."""
    output_dir = setup["root"] / name
    shutil.copytree(
        os.path.join(source_dir, "checkpoints", f"step-{step}"), output_dir / "checkpoints" / f"step-{step}"
    )
    return str(output_dir)


@pytest.fixture(scope="module")
def one_process(setup) -> str:
    output_dir = str(setup["root"] / "one-process")
    assert main(["train", setup["config"], f"output_dir={output_dir}", *ONE_PROCESS]) == 0
    return output_dir


@pytest.fixture(scope="module")
def fsdp_run(setup) -> dict:
    output_dir = str(setup["root"] / "fsdp")
    result = succeeded(torchrun(setup, output_dir, *FSDP))
    return {"dir": output_dir, "stdout": result.stdout}


def test_fsdp_shards_and_the_sparse_tied_head_matches_the_dense_reference(setup):
    checks = torchrun_checks(setup, CHECKS)
    # Each process holds half the rows of every weight: the layers' and the root's (tied embeddings/head).
    shapes = checks["shards"]["shapes"]
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == [[128, 64], [64, 64]]
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == [[32, 64], [16, 64]]
    assert shapes["model.embed_tokens.weight"] == [[96, 64], [48, 64]]
    assert "lm_head.weight" not in shapes and checks["shards"]["tied_after_sharding"]
    # Sparse head under FSDP == dense logits of the whole batch: loss and every gradient.
    for variant, head in checks["heads"].items():
        assert head["loss"] == pytest.approx(head["dense_loss"], rel=1e-6), variant
        assert head["worst_grad_error"] < 1e-5, variant
        assert head["grads"] == head["nonzero_reference_grads"] > 0, variant
    assert "model.embed_tokens.weight" in checks["heads"]["plain"]["trained"]  # the tied weight got its gradient
    assert checks["heads"]["checkpointing"]["grads"] == 20
    assert any("lm_head.lora_A" in name for name in checks["heads"]["lora-head"]["trained"])
    bf16 = checks["bf16"]
    assert bf16["loss"] != bf16["fp32_loss"] and bf16["loss"] == pytest.approx(bf16["fp32_loss"], rel=2e-2)
    assert bf16["shard_dtypes"] == bf16["grad_dtypes"] == ["torch.float32"] and bf16["grads_finite"]
    # The export gathered from the shards is, file for file, what the unsharded model saves.
    assert checks["export"]["same_files"] == {
        "config.json": True,
        "generation_config.json": True,
        "model.safetensors": True,
    }


def test_fsdp_on_2_processes_x_2_equals_1_process_x_4(setup, one_process, fsdp_run):
    assert "fsdp: 2 decoder layers and the root sharded over 2 processes" in fsdp_run["stdout"]
    assert_close_weights(final(fsdp_run["dir"]), final(one_process))
    assert set(final(one_process)) == set(final(fsdp_run["dir"])) and "lm_head.weight" not in final(
        one_process
    )  # the tie, saved once
    ours, theirs = losses(fsdp_run["dir"]), losses(one_process)
    assert list(ours) == list(theirs) == list(range(1, MAX_STEPS + 1))
    assert list(ours.values()) == pytest.approx(list(theirs.values()), rel=1e-6)
    # The checkpoint is sharded: each process wrote its half of every weight and optimizer moment.
    step = os.path.join(fsdp_run["dir"], "checkpoints", "step-2")
    halves = []
    for rank in (1, 2):
        with safe_open(os.path.join(step, f"shard-0000{rank}-model-00001-of-00001.safetensors"), "pt") as handle:
            offsets = json.loads(handle.metadata()["DCP_SHARDING_INFO"])
            name = "model.model.layers.0.mlp.gate_proj.weight"
            halves.append(
                (
                    handle.get_slice(name).get_shape(),
                    offsets[name]["saved_offsets"],
                    handle.get_slice(f"optimizer.state.{name[6:]}.exp_avg").get_shape(),
                )
            )
    assert halves == [([64, 64], [0, 0], [64, 64]), ([64, 64], [64, 0], [64, 64])]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(fsdp_run["dir"], "final"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_an_fsdp_checkpoint_resumes_on_one_process(setup, one_process, fsdp_run, capsys):
    output_dir = resume_from(setup, fsdp_run["dir"], 2, "fsdp-to-one")
    assert (
        main(["train", setup["config"], f"output_dir={output_dir}", "resume_from_checkpoint=auto", *ONE_PROCESS]) == 0
    )
    assert "at step 2 (written by 2 processes, now 1)" in capsys.readouterr().out
    assert_close_weights(final(output_dir), final(one_process))
    assert list(losses(output_dir)) == list(range(3, MAX_STEPS + 1))


def test_a_one_process_checkpoint_resumes_onto_fsdp(setup, one_process, fsdp_run):
    output_dir = resume_from(setup, one_process, 2, "one-to-fsdp")
    result = succeeded(torchrun(setup, output_dir, "resume_from_checkpoint=auto", *FSDP))
    assert "at step 2 (written by 1 processes, now 2)" in result.stdout
    assert_close_weights(final(output_dir), final(fsdp_run["dir"]))
    assert_close_weights(final(output_dir), final(one_process))


def test_a_ddp_checkpoint_resumes_onto_fsdp(setup, one_process, fsdp_run):
    ddp_dir = str(setup["root"] / "ddp")
    succeeded(torchrun(setup, ddp_dir, *DDP))
    assert_close_weights(final(ddp_dir), final(one_process))
    output_dir = resume_from(setup, ddp_dir, 4, "ddp-to-fsdp")
    succeeded(torchrun(setup, output_dir, "resume_from_checkpoint=auto", *FSDP))
    assert_close_weights(final(output_dir), final(fsdp_run["dir"]))


def test_a_rank_killed_while_writing_its_shard_leaves_the_previous_checkpoint(setup, fsdp_run):
    output_dir = str(setup["root"] / "fsdp-killed")
    # Rank 1 truncates its shard of checkpoint 4 to half and SIGKILLs itself; torchrun then ends rank 0.
    killed = torchrun(setup, output_dir, *FSDP, driver=("checkpoint-write", "4"), env={"KILL_RANK": "1"})
    assert killed.returncode != 0
    assert "exitcode  : -9" in killed.stderr  # torchrun's report of rank 1: killed by SIGKILL
    assert list_checkpoints(output_dir) == [2]
    partial = os.path.join(output_dir, "checkpoints", ".tmp-step-4")
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(partial, "state.json"))
    assert not os.path.exists(os.path.join(output_dir, "final"))

    resumed = succeeded(torchrun(setup, output_dir, "resume_from_checkpoint=auto", *FSDP))
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert_equal_weights(final(output_dir), final(fsdp_run["dir"]))
    assert losses(output_dir) == losses(fsdp_run["dir"])


def test_sigterm_to_torchrun_checkpoints_exits_75_and_resumes_exactly(setup, fsdp_run):
    output_dir = str(setup["root"] / "fsdp-sigterm")
    # Rank 0 sends SIGTERM to torchrun once step 1 is done; torchrun passes it to both workers,
    # which see it at their next step's all-reduce (the second, or a later one if it travels slowly).
    stopped = torchrun(setup, output_dir, *FSDP, driver=("sigterm-launcher", "1"))
    assert stopped.returncode != 0, stopped.stdout[-2000:]  # torchrun reports the signal it got
    for rank in (0, 1):  # both workers stopped on their own, with the documented code
        assert f"sftlab exit code {EXIT_PREEMPTED} on rank {rank}" in stopped.stdout, (
            stopped.stdout[-2000:] + stopped.stderr[-2000:]
        )
    (line,) = [line for line in stopped.stdout.splitlines() if "SIGTERM received: stopped after step" in line]
    step = int(line.split("stopped after step ")[1].split(" ")[0])
    assert 1 < step < MAX_STEPS and step in list_checkpoints(output_dir)
    assert not os.path.exists(os.path.join(output_dir, "final"))

    succeeded(torchrun(setup, output_dir, "resume_from_checkpoint=auto", *FSDP))
    assert_equal_weights(final(output_dir), final(fsdp_run["dir"]))
    assert losses(output_dir) == losses(fsdp_run["dir"])


def test_a_signal_to_one_process_stops_all_of_them_at_the_same_step(setup):
    output_dir = str(setup["root"] / "fsdp-one-signalled")
    # Only rank 1 gets SIGUSR1, after step 1: its flag rides on step 2's all-reduce, so both stop there.
    stopped = torchrun(setup, output_dir, *FSDP, driver=("sigusr1-self", "1"), env={"SIGNAL_RANK": "1"})
    assert stopped.returncode != 0  # torchrun reports workers that exited 75 as failed
    for rank in (0, 1):
        assert f"sftlab exit code {EXIT_PREEMPTED} on rank {rank}" in stopped.stdout, (
            stopped.stdout[-2000:] + stopped.stderr[-2000:]
        )
    assert "a stop signal to another process received: stopped after step 2 of 6" in stopped.stdout  # rank 0's own line
    assert list_checkpoints(output_dir) == [2] and not os.path.exists(os.path.join(output_dir, "final"))
