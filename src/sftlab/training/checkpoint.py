"""Atomic checkpoints that resume exactly, and the final export.

A checkpoint is written under a temporary name and renamed into place, so a folder named
`step-N` is always complete: a run killed mid-write leaves only a `.tmp-*` folder, which
`resume_from_checkpoint=auto` ignores. It holds the trainable weights (safetensors), the
optimizer and scheduler states and the RNG states (torch.save of tensors and plain values,
read back with weights_only=True, so nothing can unpickle arbitrary objects), and state.json
with the step, which is all the data position needs: the step plan is rebuilt from the seed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sftlab.errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() yields tied weights once, so safetensors never sees shared storage.
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str, step: int, model, optimizer, scheduler, state: dict, rank: int, is_main: bool) -> str:
    """Write checkpoints/step-N atomically; every process writes its RNG state, the main one the rest."""
    root = os.path.join(folder, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        _barrier()
        torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
        if is_main:
            save_file(trainable_state(model), os.path.join(tmp, "trainable.safetensors"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            if scheduler is not None:
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "state.json"), "w") as handle:
                json.dump({**state, "step": step}, handle, indent=1)
        _barrier()
        if is_main:
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as handle:
                    os.fsync(handle.fileno())
            if os.path.exists(final):
                _remove_step_dir(root, step)
            os.rename(tmp, final)
            _fsync_dir(root)
        _barrier()
    except OSError as error:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"cannot write the checkpoint for step {step}",
            source=final,
            found=f"{type(error).__name__}: {error.strerror or error}",
            fix="free disk space or make output_dir writable; earlier checkpoints are intact",
        ) from None
    return final


def prune_checkpoints(folder: str, keep: int | None) -> None:
    if not keep:
        return
    for step in list_checkpoints(folder)[:-keep]:
        _remove_step_dir(os.path.join(folder, "checkpoints"), step)


def _remove_step_dir(root: str, step: int) -> None:
    # Renamed out of the step-N namespace first: a run killed mid-delete must not leave a step-N
    # folder that still has its state.json but has lost its weights.
    doomed = os.path.join(root, f".tmp-delete-step-{step}")
    shutil.rmtree(doomed, ignore_errors=True)  # left by a run killed while deleting
    os.rename(os.path.join(root, f"step-{step}"), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(folder: str) -> list[int]:
    root = os.path.join(folder, "checkpoints")
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, "state.json")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_checkpoint(output_dir: str, spec: str) -> str | None:
    """The folder to resume from: `spec` itself, or with 'auto' the newest complete one (None if none)."""
    if spec == "auto":
        steps = list_checkpoints(output_dir)
        return os.path.join(output_dir, "checkpoints", f"step-{steps[-1]}") if steps else None
    if not os.path.isfile(os.path.join(spec, "state.json")):
        raise TrainingError("not a complete sftlab checkpoint", source=spec, expected="a checkpoints/step-N folder with state.json",
                            fix="use resume_from_checkpoint=auto to pick the newest complete one")
    return spec


def load_checkpoint(path: str, model, optimizer, scheduler, rank: int) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return state.json. A file that cannot be read,
    or that holds anything but tensors and plain values, is a TrainingError naming the file."""
    weights = _read(os.path.join(path, "trainable.safetensors"), load_file)
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise TrainingError("checkpoint does not match the model", source=path, found=f"no weights for {missing[:3]}",
                            fix="resume with the same model and LoRA settings the checkpoint was written with")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer_file = os.path.join(path, "optimizer.pt")
    try:
        optimizer.load_state_dict(_read(optimizer_file, _load_tensors))
    except (ValueError, KeyError) as error:
        raise TrainingError("checkpoint does not match the optimizer", source=optimizer_file, found=str(error)[:200],
                            fix="resume with the optimizer and LoRA settings the checkpoint was written with") from None
    if scheduler is not None and os.path.exists(os.path.join(path, "scheduler.pt")):
        scheduler.load_state_dict(_read(os.path.join(path, "scheduler.pt"), _load_tensors))
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(_read(rng_file, _load_tensors))
    return _read(os.path.join(path, "state.json"), _load_json)


def _load_tensors(file: str):
    # weights_only=True: tensors, containers and plain values only; any other pickled object is
    # refused by torch's restricted unpickler instead of being constructed (and run).
    return torch.load(file, weights_only=True, map_location="cpu")


def _load_json(file: str) -> dict:
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)


def _unpickler_complaint(message: str) -> str:
    # torch's message is a page long and suggests weights_only=False; keep the line naming the object.
    for line in message.splitlines():
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.strip().split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
    return message.strip().splitlines()[0][:200] if message.strip() else "a pickled object"


def _read(file: str, loader):
    try:
        return loader(file)
    except pickle.UnpicklingError as error:
        raise TrainingError(
            "checkpoint file holds objects other than tensors and plain values; refused to load it (nothing in it was run)",
            source=file, found=_unpickler_complaint(str(error)),
            fix="resume only from checkpoints sftlab wrote; delete this checkpoint folder to resume from an earlier one",
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as error:
        detail = str(error).strip().splitlines()
        raise TrainingError(
            "cannot read the checkpoint file (missing, truncated or corrupt)", source=file,
            found=f"{type(error).__name__}: {detail[0][:200]}" if detail else type(error).__name__,
            fix="delete this checkpoint folder to resume from an earlier one, or start without resume_from_checkpoint",
        ) from None


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
