"""The model spread over the processes: replicated (DDP) or sharded (FSDP2), on CPU (gloo) and
GPU (nccl) by the same code.

    replicate_model     DDP: every process holds all weights; gradients all-reduced
    shard_model         FSDP2: `fully_shard` on each decoder layer, then on the loss module (root)
    accumulating        DDP skips the gradient all-reduce until the last micro-batch of a step
    clip_gradients      total norm over replicated or sharded gradients
    full_state_dict     the whole model gathered on the main process, for the final export

Why torch.distributed directly and not Accelerate: Accelerate does not run FSDP without a GPU
(under torchrun on CPU it quietly builds DDP), so its FSDP and DeepSpeed paths could not be
tested anywhere sftlab's CI runs. FSDP2 and DDP from torch both run on CPU with gloo; the tests
compare them with one process step by step (docs/training.md).

The root of the FSDP tree is the objective's loss module, not the causal LM: its forward runs the
trunk AND the sparse LM head, so the root's parameters (embeddings, final norm, lm_head, which
SmolLM2-style models tie to the embeddings) stay gathered while the head's custom autograd
Function reads `head.weight` directly, and the gradient it returns for that full weight is
reduce-scattered into the shard by FSDP's own post-backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sftlab.errors import ConfigError
from sftlab.training.distributed import Processes


def decoder_layers(model: nn.Module, purpose: str = "fsdp") -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the modules whose class the model names in
    `_no_split_modules` (transformers' list of blocks that must not be split across devices)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    # By the classes a module derives from: fully_shard gives a sharded layer a subclass of its own.
    layers = [m for m in base.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ConfigError(
            f"{purpose}: true needs a model whose decoder layers are known (transformers' _no_split_modules)",
            field=purpose,
            found=f"{type(base).__name__} names none",
            fix=f"train this model without {purpose}",
        )
    return layers


def shard_model(
    loss_module: nn.Module, processes: Processes, *, reshard_after_forward: bool, cpu_offload: bool, bf16: bool
) -> nn.Module:
    """FSDP2 in place: each decoder layer is one all-gather unit, the root (the loss module) holds
    the rest. With bf16, layers compute with bf16 copies of the fp32 shards and gradients are
    reduced in fp32 (torchtitan's policy); the optimizer steps the fp32 shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(processes.device.type, (processes.world,))
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy(),
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

    return DistributedDataParallel(
        loss_module, device_ids=[processes.device.index] if processes.device.type == "cuda" else None
    )


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
