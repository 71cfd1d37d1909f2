"""Several machines, proven on one: two `torchrun --nnodes 2` launchers that meet at a c10d
rendezvous on 127.0.0.1, as two machines' launchers meet at the first machine's address (the
SLURM recipe in docs/training.md, "Several machines", runs the same command on each machine),
train exactly as one launcher with the same number of processes: DDP and FSDP2, 2 machines x 1
process and 2 machines x 2.

Bitwise, not within a tolerance: a process computes the same thing whichever launcher started it.
Its global rank alone decides its share of each step (the plan is drawn from the seed), the number
of processes decides gloo's reduction algorithm and so the order of every sum, and gloo on CPU
moves tensors over TCP whether the peer is on this machine or another. The launchers change where
a process lives, not one operand nor the order of one addition.

Also here, as a run on several machines meets them: the prepared-data cache shared by the
machines (one entry) or one per machine ($SFTLAB_CACHE differing per launcher: each holds its
entry); DPO's stored reference log-probs with a cache per machine (read where one machine held
them and computed where the other did not, the run hung); SIGUSR1 to every machine's torchrun,
as SLURM's `--signal=USR1@T` sends it, stops the run with a checkpoint that
`resume_from_checkpoint=auto` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sftlab.cli import EXIT_PREEMPTED
from sftlab.errors import ConfigError
from sftlab.training.checkpoint import list_checkpoints
from sftlab.training.distributed import _device
from test_faults import DRIVER
from tiny import char_tokenizer
from tiny_models import save_tiny_llama

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MAX_STEPS = 6
EXAMPLES_PER_STEP = 4
# One line per parallelism: its name and the overrides that choose it. Each runs on both layouts.
MODES = {
    "ddp": ("fsdp=false",),
    "fsdp": ("fsdp=true",),
    # On 2 x 2: a sequence group on each machine (consecutive ranks), FSDP2 across both: the 2-D mesh.
    "sequence parallel + fsdp": ("sequence_parallel_size=2", "fsdp=true"),
}
LAYOUTS = {"2x1": (2, 1), "2x2": (2, 2)}  # machines x processes on each
# Each mode on each layout would take ~10 minutes here: DDP on 2 x 1 (a cache per machine), FSDP2 and
# sequence parallelism on 2 x 2 (one shared cache).
CASES = [("ddp", "2x1"), ("fsdp", "2x2"), ("sequence parallel + fsdp", "2x2")]
# What docs/training.md's recipe gives torchrun: SIGUSR1 is passed on to the workers (torchrun
# would die of it otherwise), and they get time for a step and a checkpoint before SIGKILL.
SIGNALS = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout", "120"]
PAIRS = [
    {"prompt": f"add {i} and 1:", "chosen": f" {i + 1}", "rejected": f" {i + 2} or so" * (1 + i % 2)} for i in range(8)
]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multinode")
    model = save_tiny_llama(str(root / "model"), char_tokenizer(), tie=True)
    data = root / "train.jsonl"
    with open(data, "w") as handle:
        for i in range(MAX_STEPS * EXAMPLES_PER_STEP):  # one epoch
            handle.write(
                json.dumps({"prompt": f"add {i} and {i % 7}", "completion": f" {i + i % 7} ok" * (1 + i % 3)}) + "\n"
            )
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    # No cache_dir: each launcher's $SFTLAB_CACHE decides where its machine's processes cache.
    settings = {"model": model, "max_length": 48, "seed": 3, "logging_steps": 1, "warmup_steps": 1}
    config, dpo = root / "config.yaml", root / "dpo.yaml"
    config.write_text(
        yaml.safe_dump({**settings, "train_data": str(data), "learning_rate": 3e-3, "max_steps": MAX_STEPS})
    )
    dpo.write_text(yaml.safe_dump({**settings, "train_data": str(pairs), "objective": "dpo", "max_steps": 2}))
    (root / "driver.py").write_text(DRIVER)
    return {"root": root, "config": str(config), "dpo": str(dpo)}


@dataclass
class Launcher:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    setup,
    output_dir,
    *overrides: str,
    machines: int,
    per_machine: int,
    caches: list,
    config: str | None = None,
    driver: tuple[str, ...] = ("none", "0"),
) -> list[Launcher]:
    """`sftlab train` under `machines` torchrun launchers started at once, `per_machine` processes
    each, launcher i's $SFTLAB_CACHE being caches[i]; every worker runs through test_faults.DRIVER,
    which prints its rank and exit code (and with `driver` signals at a chosen step)."""
    if machines == 1:
        rendezvous = ["--standalone"]
    else:  # the same command for every machine: the rendezvous assigns the machines' ranks
        endpoint = f"127.0.0.1:{free_port()}"
        rendezvous = ["--nnodes", str(machines), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint]
        rendezvous += ["--rdzv_id", os.path.basename(str(output_dir))]
    argv = ["train", config or setup["config"], f"output_dir={output_dir}", *overrides]
    pids = setup["root"] / "launchers.txt"
    started = []
    with contextlib.ExitStack() as stack:
        for machine in range(machines):
            log = str(output_dir) + f".machine{machine}"
            out = stack.enter_context(open(log + ".out", "w+"))
            err = stack.enter_context(open(log + ".err", "w+"))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            env.update(SFTLAB_CACHE=str(caches[machine]), LAUNCHER_PIDS=str(pids))
            command = [TORCHRUN, *rendezvous, "--nproc_per_node", str(per_machine), *SIGNALS]
            command += [str(setup["root"] / "driver.py"), *driver, *argv]
            started.append((subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True), out, err))
        pids.write_text(" ".join(str(process.pid) for process, _, _ in started))
        try:
            for process, _, _ in started:
                process.wait(timeout=400)
        finally:
            for process, _, _ in started:
                if process.poll() is None:  # a launcher left waiting: torchrun ends its workers on SIGTERM
                    process.terminate()
                    process.wait(timeout=60)
        launchers = []
        for process, out, err in started:
            out.seek(0)
            err.seek(0)
            launchers.append(Launcher(process.returncode, out.read(), err.read()))
    return launchers


def succeeded(launchers: list[Launcher]) -> list[Launcher]:
    for launcher in launchers:
        assert launcher.returncode == 0, launcher.stdout[-3000:] + launcher.stderr[-3000:]
    return launchers


def ranks(launcher: Launcher, code: int) -> list[int]:
    """The global ranks of the workers this launcher started that ended with `code`."""
    prefix = f"sftlab exit code {code} on rank "
    return sorted(int(line[len(prefix) :]) for line in launcher.stdout.splitlines() if line.startswith(prefix))


def final(output_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(output_dir, "final", "model.safetensors"))


def losses(output_dir) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle) if r["type"] == "train"}


def assert_equal_weights(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and theirs
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


def batch_size(world: int, overrides: tuple[str, ...]) -> str:
    """Each step's examples split over the data-parallel groups (a sequence-parallel group shares its rows)."""
    values = dict(override.split("=", 1) for override in overrides)
    return f"per_device_train_batch_size={EXAMPLES_PER_STEP * int(values.get('sequence_parallel_size', 1)) // world}"


def cache_entries(cache) -> list[str]:
    """The prepared-data entries in a cache folder, and any temporary folder a writer left."""
    folder = os.path.join(cache, "prepared")
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def stored_references(cache) -> list[str]:
    folder = os.path.join(cache, "prepared", "reference")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def one_launcher(setup):
    """The run of one launcher with `world` processes in `mode`, once per module."""
    runs = {}

    def run(mode: str, world: int) -> str:
        if (mode, world) not in runs:
            output_dir = setup["root"] / f"one-launcher-{mode.replace(' ', '-')}-{world}"
            overrides = MODES[mode]
            succeeded(
                launch(
                    setup,
                    output_dir,
                    *overrides,
                    batch_size(world, overrides),
                    machines=1,
                    per_machine=world,
                    caches=[setup["root"] / "cache-one-launcher"],
                )
            )
            runs[mode, world] = str(output_dir)
        return runs[mode, world]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode, layout", CASES)
def test_two_machines_train_bitwise_as_one_launcher(setup, one_launcher, mode, layout):
    machines, per_machine = LAYOUTS[layout]
    world = machines * per_machine
    output_dir = setup["root"] / f"machines-{mode.replace(' ', '-')}-{layout}"
    # 2 x 1: a cache on each machine; 2 x 2: one cache both machines share.
    shared = per_machine == 2
    caches = [
        setup["root"] / f"cache-{mode.replace(' ', '-')}-{layout}" / ("shared" if shared else f"machine{m}")
        for m in range(2)
    ]
    overrides = MODES[mode]
    launchers = succeeded(
        launch(
            setup,
            output_dir,
            *overrides,
            batch_size(world, overrides),
            machines=machines,
            per_machine=per_machine,
            caches=caches,
        )
    )
    # Each machine's processes are a block of consecutive ranks (which block, the rendezvous decides).
    blocks = sorted(ranks(launcher, 0) for launcher in launchers)
    assert blocks == [list(range(m * per_machine, (m + 1) * per_machine)) for m in range(machines)]

    reference = one_launcher(mode, world)
    assert losses(output_dir) == losses(reference) and list(losses(output_dir)) == list(range(1, MAX_STEPS + 1))
    assert_equal_weights(final(output_dir), final(reference))

    # The data was prepared into each cache once: one entry (the same one), no temporary folder left.
    entries = [cache_entries(cache) for cache in dict.fromkeys(caches)]
    assert len(entries) == (1 if shared else 2) and all(found == entries[0] for found in entries), entries
    assert len(entries[0]) == 1 and not entries[0][0].startswith("."), entries


@pytest.mark.slow
def test_dpo_with_a_cache_on_each_machine_stores_the_reference_on_each(setup):
    caches = [setup["root"] / "cache-dpo" / f"machine{m}" for m in range(2)]
    run = dict(machines=2, per_machine=1, caches=caches, config=setup["dpo"])
    first = setup["root"] / "dpo-first"
    succeeded(launch(setup, first, "per_device_train_batch_size=2", **run))
    # The first process of each machine wrote the reference log-probs into its machine's cache.
    stored = [stored_references(cache) for cache in caches]
    assert stored[0] == stored[1] and len(stored[0]) == 1 and stored[0][0].endswith(".npy"), stored
    # One machine loses its cache (a new machine, a wiped /tmp): that machine's processes do not
    # find the file, the other's do. All compute them again (a collective), rather than one
    # machine reading while the other waits in the sum for it.
    os.remove(caches[1] / "prepared" / "reference" / stored[1][0])
    second = setup["root"] / "dpo-second"
    launchers = succeeded(launch(setup, second, "per_device_train_batch_size=2", **run))
    assert "reference log-probs of 8 train pairs: computed in" in "".join(launcher.stdout for launcher in launchers)
    assert stored_references(caches[1]) == stored[0]
    assert losses(second) == losses(first) and len(losses(first)) == 2
    assert_equal_weights(final(second), final(first))


@pytest.mark.slow
def test_sigusr1_to_both_machines_checkpoints_and_resume_auto_continues_exactly(setup, one_launcher):
    reference = one_launcher("fsdp", 2)
    caches = [setup["root"] / "cache-sigusr1" / f"machine{m}" for m in range(2)]
    run = dict(machines=2, per_machine=1, caches=caches)
    output_dir = setup["root"] / "machines-sigusr1"
    overrides = (*MODES["fsdp"], batch_size(2, MODES["fsdp"]), "resume_from_checkpoint=auto")
    # Rank 0 sends SIGUSR1 to both torchruns once step 1 is done, as SLURM signals each machine's job
    # step. torchrun starts its workers in sessions of their own, so it is the process sure to be
    # signalled; it passes SIGUSR1 on, and the workers stop at the next step they all see it by.
    stopped = launch(setup, output_dir, *overrides, driver=("sigusr1-launchers", "1"), **run)
    for launcher in stopped:
        assert launcher.returncode == 1, launcher.stdout[-2000:] + launcher.stderr[-2000:]
        assert "death signal, shutting down workers" in launcher.stderr  # it passed SIGUSR1 on, not died of it
        assert len(ranks(launcher, EXIT_PREEMPTED)) == 1, launcher.stdout[-2000:] + launcher.stderr[-2000:]
    (line,) = {line for launcher in stopped for line in launcher.stdout.splitlines() if "received: stopped" in line}
    step = int(line.split("stopped after step ")[1].split(" ")[0])
    assert 1 < step < MAX_STEPS and list_checkpoints(output_dir) == [step], line
    assert not os.path.exists(output_dir / "final")

    # The same command again (a requeued job): resume_from_checkpoint=auto finds the checkpoint.
    resumed = succeeded(launch(setup, output_dir, *overrides, **run))
    assert any(f"at step {step}" in launcher.stdout for launcher in resumed)
    assert losses(output_dir) == losses(reference)
    assert_equal_weights(final(output_dir), final(reference))


def test_several_processes_on_gpus_need_the_launchers_local_rank():
    # A hand-made srun launch exporting RANK and WORLD_SIZE only: every process would take GPU 0.
    with pytest.raises(ConfigError, match=r"2 processes \(WORLD_SIZE\) but no LOCAL_RANK.*LOCAL_RANK=\$SLURM_LOCALID"):
        _device(None, world=2, gpus=8)
    # More processes on a machine than it has GPUs: named, rather than CUDA's invalid device ordinal.
    with pytest.raises(ConfigError, match=r"process 4 of this machine \(LOCAL_RANK\).* shows 4.*--nproc_per_node 4"):
        _device(4, world=8, gpus=4)
    # On CPUs every process has the same device: nothing to refuse.
    assert _device(None, world=2, gpus=0) == torch.device("cpu")
