"""How a run is spread over processes: the process group, and the model replicated (DDP) or
sharded (FSDP2), on CPU (gloo) and GPU (nccl) by the same code.

    start_processes     one process, or the group torchrun / `accelerate launch` / srun+torchrun set up
    replicate_model     DDP: every process holds all weights; gradients all-reduced
    shard_model         FSDP2: `fully_shard` on each decoder layer, then on the loss module (root)
    clip_gradients      total norm over replicated or sharded gradients
    full_state_dict     the whole model gathered on the main process, for the final export

Why torch.distributed directly and not Accelerate: Accelerate does not run FSDP without a GPU
(under torchrun on CPU it quietly builds DDP), so its FSDP and DeepSpeed paths could not be
tested anywhere sftlab's CI runs. FSDP2 and DDP from torch both run on CPU with gloo; the tests
compare them with one process step by step (docs/training.md).

The root of the FSDP tree is the SupervisedLoss module, not the causal LM: its forward runs the
trunk AND the sparse LM head, so the root's parameters (embeddings, final norm, lm_head, which
SmolLM2-style models tie to the embeddings) stay gathered while the head's custom autograd
Function reads `head.weight` directly, and the gradient it returns for that full weight is
reduce-scattered into the shard by FSDP's own post-backward.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sftlab.errors import ConfigError


@dataclass
class Processes:
    """This process's place in the run. `started_group`: train() created the process group (a
    run without a launcher that asked for FSDP) and destroys it when it ends."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        """The first process of each machine goes first (preparing the data cache), the others then
        find its result; with a cache on a shared filesystem `sftlab prepare` does it once ahead."""
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


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_processes(fsdp: bool) -> Processes:
    """Join the process group a launcher describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ... as torchrun and `accelerate launch` set them), or run as one process. FSDP
    needs a process group even alone, so a single process asking for it gets a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(local_rank)
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
        raise ConfigError("accelerate launch asks for DeepSpeed, which sftlab does not run (it has never been tested here)",
                          field="fsdp", fix="launch without a DeepSpeed config and set fsdp: true (FSDP2 shards like ZeRO-3)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError("accelerate launch asks for Accelerate's FSDP; sftlab runs FSDP2 itself and would not read those settings",
                          field="fsdp", fix="launch without an FSDP config and set fsdp: true (and fsdp_* options) in the sftlab config")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "bf16"):
        raise ConfigError(f"accelerate launch asks for mixed precision '{precision}', which sftlab does not offer",
                          field="bf16", fix="use bf16: true (fp16 needs loss scaling, which sftlab does not do)")
    return bf16 or precision == "bf16"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def decoder_layers(model: nn.Module, purpose: str = "fsdp") -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the modules whose class the model names in
    `_no_split_modules` (transformers' list of blocks that must not be split across devices)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    # By the classes a module derives from: fully_shard gives a sharded layer a subclass of its own.
    layers = [m for m in base.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ConfigError(f"{purpose}: true needs a model whose decoder layers are known (transformers' _no_split_modules)",
                          field=purpose, found=f"{type(base).__name__} names none", fix=f"train this model without {purpose}")
    return layers


def shard_model(loss_module: nn.Module, processes: Processes, *, reshard_after_forward: bool, cpu_offload: bool,
                bf16: bool) -> nn.Module:
    """FSDP2 in place: each decoder layer is one all-gather unit, the root (the loss module) holds
    the rest. With bf16, layers compute with bf16 copies of the fp32 shards and gradients are
    reduced in fp32 (torchtitan's policy); the optimizer steps the fp32 shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(processes.device.type, (processes.world,))
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy(),
        # Pinned host memory needs CUDA; on a CPU-only machine the shards already live on the CPU.
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    )
    model = getattr(loss_module, "model", loss_module)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    # The root's weights are needed again at the start of backward: FSDP keeps them gathered.
    fully_shard(loss_module, **options)
    return loss_module


def replicate_model(loss_module: nn.Module, processes: Processes) -> nn.Module:
    loss_module.to(processes.device)
    if processes.world == 1:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_module, device_ids=[processes.device.index] if processes.device.type == "cuda" else None)


def unwrap(wrapper: nn.Module) -> nn.Module:
    """The loss module inside a DDP wrapper (evaluation needs no gradient sync); FSDP shards in place."""
    from torch.nn.parallel import DistributedDataParallel

    return wrapper.module if isinstance(wrapper, DistributedDataParallel) else wrapper


def accumulating(wrapper: nn.Module, last: bool):
    """Context for one micro-batch's backward. DDP skips the gradient all-reduce until the last
    micro-batch of a step. FSDP reduce-scatters after every micro-batch instead: skipping would
    keep a full, unsharded gradient on every process until the step ends, the memory FSDP exists to save."""
    if last or not hasattr(wrapper, "no_sync"):
        return contextlib.nullcontext()
    return wrapper.no_sync()


def clip_gradients(parameters: list[torch.Tensor], max_norm: float | None) -> float:
    """Total gradient norm (before clipping). Sharded gradients are DTensors: torch computes their
    norm over all shards, and `full_tensor` makes it one number on every process."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module, processes: Processes) -> dict[str, torch.Tensor] | None:
    """Every weight as a full CPU tensor on the main process (None elsewhere); a collective, so
    every process calls it. Names tied to one parameter (lm_head and the embeddings) point at
    one tensor again, so save_pretrained writes what a single process would: the tie, not two copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not processes.is_main:
        return None
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state
