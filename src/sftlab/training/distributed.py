"""The processes of a run: the process group a launcher describes (torchrun, `accelerate launch`,
srun + torchrun) or one process, the seeds, and the stop signals a scheduler sends.

    start_processes     one process, or the group the launcher set up
    launcher_precision  the config's bf16, or the launcher's mixed-precision setting
    seed_everything     Python, numpy and torch seeds
    Preemption          SIGTERM/SIGUSR1 -> finish the step, checkpoint, exit 75
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from sftlab.errors import ConfigError


@dataclass
class Processes:
    """This process's place in the run. `started_group`: train() created the process group (a
    run without a launcher that asked for FSDP) and destroys it when it ends.

    With sequence parallelism the processes form a data x sequence mesh: consecutive ranks share
    each row (a sequence group of `sequence_size`, best within one machine, where the all-to-all is
    cheapest), and the data rank says which micro-batches the group trains."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_group: bool = False
    sequence_size: int = 1
    sequence_group: object = None  # this process's sequence group (a ProcessGroup) when sequence_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence_size

    @property
    def data_world(self) -> int:
        return self.world // self.sequence_size

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_size

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (on the device the backend needs), returned on the CPU."""
        if not self.distributed:
            return tensor.cpu()
        tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu()

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([float(flag)]))[0] > 0)

    @contextlib.contextmanager
    def local_main_first(self):
        """The first process of each machine (LOCAL_RANK 0) goes first, the others then find its
        result: converting a GGUF model into the machine's cache. The barrier is over all processes,
        so with several machines each one's first process works at once and every other waits for
        all of them. (Prepared data needs no barrier: a cache entry's file lock, data/store.py.)"""
        if self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.local_rank == 0:
                self.barrier()

    def close(self) -> None:
        if self.started_group and self.distributed:
            dist.destroy_process_group()


def _device(local_rank: int | None, world: int, gpus: int) -> torch.device:
    """GPU LOCAL_RANK of this machine, or the CPU on a machine without GPUs. `local_rank` None: the
    launcher set no LOCAL_RANK, which is refused for several processes on GPUs (each would take
    GPU 0 of its machine, as a hand-made `srun` launch that exports only RANK and WORLD_SIZE does)."""
    if gpus == 0:
        return torch.device("cpu")
    if local_rank is None and world > 1:
        raise ConfigError(
            f"{world} processes (WORLD_SIZE) but no LOCAL_RANK: every process of a machine would take its GPU 0",
            source="the launcher's environment",
            fix="launch with torchrun or accelerate launch, which set it; with srun alone, export LOCAL_RANK=$SLURM_LOCALID",
        )
    local_rank = local_rank or 0
    if local_rank >= gpus:
        raise ConfigError(
            f"process {local_rank} of this machine (LOCAL_RANK) has no GPU of its own: the machine shows {gpus}",
            source="the launcher's environment",
            fix=f"start at most {gpus} processes per machine (torchrun --nproc_per_node {gpus})",
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start_processes(fsdp: bool, sequence_parallel_size: int = 1) -> Processes:
    """Join the process group a launcher describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ... as torchrun and `accelerate launch` set them), or run as one process. FSDP
    needs a process group even alone, so a single process asking for it gets a group of one.
    With sequence_parallel_size N > 1, the (world / N) x N mesh and this process's sequence group."""
    processes = _join(fsdp)
    if sequence_parallel_size == 1:
        return processes
    if processes.world % sequence_parallel_size:
        processes.close()
        raise ConfigError(
            f"sequence_parallel_size {sequence_parallel_size} does not divide the {processes.world} processes",
            field="sequence_parallel_size",
            found=str(sequence_parallel_size),
            fix=f"launch a multiple of {sequence_parallel_size} processes, or choose a size that divides {processes.world}",
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        processes.device.type,
        (processes.world // sequence_parallel_size, sequence_parallel_size),
        mesh_dim_names=("data", "sequence"),
    )
    processes.sequence_size = sequence_parallel_size
    processes.sequence_group = mesh.get_group("sequence")
    return processes


def _join(fsdp: bool) -> Processes:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device = _device(local_rank, world, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    local_rank = local_rank or 0
    if dist.is_initialized():  # the caller set up its own group
        return Processes(dist.get_rank(), dist.get_world_size(), local_rank, device)
    # nccl for CUDA tensors, gloo for the CPU ones (RNG states, flags) in the same group.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return Processes(rank, world, local_rank, device, started_group=True)
    if fsdp:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Processes(0, 1, 0, device, started_group=True)
    return Processes(0, 1, 0, device)


def launcher_precision(bf16: bool) -> bool:
    """The config's bf16, or `accelerate launch --mixed_precision bf16`. Accelerate's own engines
    are not used by sftlab: a launch asking for them is stopped rather than silently run as DDP."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError(
            "accelerate launch asks for DeepSpeed, which sftlab does not run (it has never been tested here)",
            field="fsdp",
            fix="launch without a DeepSpeed config and set fsdp: true (FSDP2 shards like ZeRO-3)",
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError(
            "accelerate launch asks for Accelerate's FSDP; sftlab runs FSDP2 itself and would not read those settings",
            field="fsdp",
            fix="launch without an FSDP config and set fsdp: true (and fsdp_* options) in the sftlab config",
        )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "bf16"):
        raise ConfigError(
            f"accelerate launch asks for mixed precision '{precision}', which sftlab does not offer",
            field="bf16",
            fix="use bf16: true (fp16 needs loss scaling, which sftlab does not do)",
        )
    return bf16 or precision == "bf16"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Preemption:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they stop a job) set a flag
    instead of killing the process: the loop finishes the optimizer step, writes a checkpoint and
    returns, and `sftlab train` exits with EXIT_PREEMPTED. The previous handlers come back after."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = False
        self.name = None
        self._previous = {}

    def _handle(self, number, frame):
        self.received = True
        self.name = signal.Signals(number).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python installs handlers only there
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        return False
