"""Atomic checkpoints that resume exactly, on the same or on another number of processes.

A checkpoint is written under a temporary name and renamed into place, so a folder named
`step-N` is always complete: a run killed mid-write leaves only a `.tmp-*` folder, which
`resume_from_checkpoint=auto` ignores. It holds

    shard-0000R-model-00001-of-00001.safetensors   what process R holds of the trainable weights and
                                                   the optimizer's tensors, written by
                                                   torch.distributed.checkpoint (DCP), every process its own
    optimizer.json                                 the optimizer's plain values (learning rates, betas, ...)
    scheduler.pt, rng-R.pt                         scheduler and per-process RNG states (tensors, plain values)
    state.json                                     step, items per step, processes; written last

One format for one process, DDP and FSDP: tensors are named by parameter (not by position in
the optimizer) and each file records where its pieces sit in the full tensors, so DCP reads
any checkpoint onto any number of processes, sharded or not (2 -> 1, 1 -> 2, DDP -> FSDP).

Nothing read back can unpickle an object. DCP's default format keeps its index in a pickled
`.metadata` file and loads non-tensor values with torch.load(weights_only=False); sftlab uses
DCP's safetensors storage instead (HuggingFaceStorageWriter/Reader), whose index is each file's
JSON header, hands DCP tensors only, keeps plain values in JSON, and reads the small .pt files
with torch.load(weights_only=True). The data position is the step alone: the step plan is
rebuilt from the seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from sftlab.errors import TrainingError
from sftlab.files import publish_directory, remove_directory, temporary_name, temporary_sibling
from sftlab.training.identity import blocking, describe

STEP_DIR = re.compile(r"^step-(\d+)$")
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


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


def save_checkpoint(folder: str, step: int, model, optimizer, scheduler, state: dict, processes) -> str:
    """Write checkpoints/step-N atomically. Every process calls it: each writes its shard and its
    RNG state, the main one the rest. A write that fails on any process fails on all of them,
    with the partial folder removed and earlier checkpoints untouched."""
    root = os.path.join(folder, "checkpoints")
    final = os.path.join(root, f"step-{step}")
    tmp = temporary_name(final)  # every process writes its shard there

    def start():
        if processes.is_main:
            temporary_sibling(final)

    def write_shards():
        tensors, plain = _checkpoint_values(model, optimizer)
        try:
            with _one_process_is_fine():
                dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True))
        except CheckpointException as error:  # raised on every process when one fails
            raise _first_os_error(error) from None
        torch.save(rng_state(), os.path.join(tmp, f"rng-{processes.rank}.pt"))
        if processes.is_main:
            with open(os.path.join(tmp, "optimizer.json"), "w") as handle:
                json.dump(plain, handle)
            if scheduler is not None:
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "state.json"), "w") as handle:
                json.dump({**state, "step": step}, handle, indent=1)

    def publish():
        if processes.is_main:
            publish_directory(tmp, final, fsync=True)

    for part in (start, write_shards, publish):
        failure = None
        try:
            part()
        except OSError as error:
            failure = error
        if processes.any(failure is not None):
            if processes.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(
                f"cannot write the checkpoint for step {step}",
                source=final,
                found=f"{type(failure).__name__}: {failure.strerror or failure}" if failure else "the write failed on another process",
                fix="free disk space or make output_dir writable; earlier checkpoints are intact",
            ) from None
    return final


def _checkpoint_values(model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for DCP, plain values for JSON). Weights by parameter name, trainable ones only;
    named_parameters() yields a tied weight once. The optimizer state is keyed by parameter name
    too (flattened: 'state.<name>.exp_avg', 'param_groups.<name>.lr'), so a checkpoint does not
    depend on the order in which one run handed parameters to its optimizer."""
    tensors = {f"model.{name}": p for name, p in model.named_parameters() if p.requires_grad}
    plain = {}
    for key, value in get_optimizer_state_dict(model, optimizer, options=_FLAT).items():
        if torch.is_tensor(value):
            tensors[f"optimizer.{key}"] = value
        else:
            plain[key] = value
    return tensors, plain


def _first_os_error(error: CheckpointException) -> OSError:
    for failure in error.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return OSError(str(error).strip().splitlines()[-1][:200])


def prune_checkpoints(folder: str, keep: int | None) -> None:
    if not keep:
        return
    for step in list_checkpoints(folder)[:-keep]:
        _remove_step_dir(os.path.join(folder, "checkpoints"), step)


def _remove_step_dir(root: str, step: int) -> None:
    # Renamed out of the step-N namespace first (remove_directory): a run killed mid-delete must not
    # leave a step-N folder that still has its state.json but has lost its weights.
    remove_directory(os.path.join(root, f"step-{step}"))


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


def find_checkpoint(output_dir: str, spec: str, identity: dict) -> tuple[str | None, dict | None]:
    """(folder, the identity it was written with) to resume from: `spec` itself, or with 'auto'
    the newest complete checkpoint in output_dir; (None, None) when 'auto' finds none. A
    checkpoint of another run (identity.py) is refused, never resumed: with 'auto', any in the folder.
    Checkpoints written before run identities carry none (None) and are not checked."""
    if spec == "auto":
        found = [os.path.join(output_dir, "checkpoints", f"step-{step}") for step in list_checkpoints(output_dir)]
        for path in reversed(found):
            _refuse_another_run(path, identity, auto=True)
        return (found[-1], _written_identity(found[-1])) if found else (None, None)
    if not os.path.isfile(os.path.join(spec, "state.json")):
        raise TrainingError("not a complete sftlab checkpoint", source=spec, expected="a checkpoints/step-N folder with state.json",
                            fix="use resume_from_checkpoint=auto to pick the newest complete one")
    _refuse_another_run(spec, identity, auto=False)
    return spec, _written_identity(spec)


def _written_identity(path: str) -> dict | None:
    return _read(os.path.join(path, "state.json"), _load_json).get("run")


def _refuse_another_run(path: str, identity: dict, auto: bool) -> None:
    written = _written_identity(path)
    if written is None:
        return
    found = blocking(written, identity)
    if not found:
        return
    more = f" (and {len(found) - 1} more: {', '.join(name for name, _, _ in found[1:])})" if len(found) > 1 else ""
    if auto:
        raise TrainingError("output_dir holds a checkpoint of another run, which resume_from_checkpoint=auto will not continue",
                            source=path, found=describe(found[0]) + more,
                            fix="resume with the settings that run had; start this run in a new output_dir; or set "
                                "overwrite_output_dir: true (without resume_from_checkpoint) to delete that run's checkpoints and final model")
    raise TrainingError("the checkpoint was written by another run", source=path, found=describe(found[0]) + more,
                        fix="resume with the settings it was written with (its state.json 'run'), or train from the start "
                            "without resume_from_checkpoint")


def load_checkpoint(path: str, model, optimizer, scheduler, processes, items_per_step: int) -> dict:
    """Restore weights, optimizer, scheduler and RNG onto however many processes this run has;
    return state.json. A file that cannot be read, or that holds anything but tensors and plain
    values, is a TrainingError naming the file."""
    state = _read(os.path.join(path, "state.json"), _load_json)
    written = state.get("items_per_step")
    if written is not None and written != items_per_step:
        raise TrainingError(
            "the checkpoint was written with another number of examples (or packed rows) per optimizer step", source=path,
            found=f"{written} per step then ({state.get('processes', '?')} processes), {items_per_step} now",
            fix=f"make per_device_train_batch_size x gradient_accumulation_steps x processes = {written}, "
                "so the resumed run takes the steps the interrupted one planned")
    shards = sorted(name for name in os.listdir(path) if name.startswith("shard-") and name.endswith(".safetensors"))
    if not shards:
        raise TrainingError("checkpoint has no weight shards (shard-*.safetensors)", source=path,
                            fix="resume from a checkpoint written by this version of sftlab, or start without resume_from_checkpoint")
    for name in shards:  # a truncated or corrupt file is named here, before DCP reads any of them
        _read(os.path.join(path, name), _check_safetensors)
    tensors, _ = _checkpoint_values(model, optimizer)  # the values to fill, in this run's layout
    try:
        with _one_process_is_fine():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(path))
    except (CheckpointException, RuntimeError) as error:
        missing = re.search(r"Missing key in checkpoint state_dict: ([\w.]+)", str(error))
        raise TrainingError("checkpoint does not match the model and optimizer", source=path,
                            found=f"nothing saved for {missing.group(1)}" if missing else str(error).strip().splitlines()[-1][:200],
                            fix="resume with the model, LoRA and optimizer settings the checkpoint was written with") from None
    optimizer_file = os.path.join(path, "optimizer.json")
    plain = _read(optimizer_file, _load_json)
    restored = {**{key[len("optimizer."):]: value for key, value in tensors.items() if key.startswith("optimizer.")}, **plain}
    try:
        set_optimizer_state_dict(model, optimizer, restored, options=_FLAT)
    except (ValueError, KeyError, RuntimeError) as error:
        raise TrainingError("checkpoint does not match the optimizer", source=optimizer_file, found=str(error)[:200],
                            fix="resume with the optimizer and LoRA settings the checkpoint was written with") from None
    if scheduler is not None and os.path.exists(os.path.join(path, "scheduler.pt")):
        scheduler.load_state_dict(_read(os.path.join(path, "scheduler.pt"), _load_tensors))
    # A run resumed on more processes than wrote the checkpoint keeps its seeded RNG on the new
    # ones: only dropout draws from it, and those cannot match across another split anyway.
    rng_file = os.path.join(path, f"rng-{processes.rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(_read(rng_file, _load_tensors))
    return state


@contextlib.contextmanager
def _one_process_is_fine():
    # DCP warns that it "assumes the intent" when there is no process group: one process is meant.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_safetensors(file: str) -> None:
    with safe_open(file, framework="pt") as handle:
        handle.keys()


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
