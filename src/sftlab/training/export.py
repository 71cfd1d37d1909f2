"""The run's output folder: checked writable before anything runs, and the final model written to
output_dir/final at the end (save_pretrained, tokenizer and chat template, the config used)."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import yaml

from sftlab.config import SFTConfig
from sftlab.errors import ConfigError, TrainingError
from sftlab.files import atomic_directory
from sftlab.training.setup import converts_base


def check_output_dir(path: str, is_main: bool) -> None:
    if not is_main:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".sftlab-write-test")
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError("output_dir is not writable", source=path, field="output_dir",
                          found=error.strerror or str(error), fix="choose a folder you can write to") from None


def export_final(model, tokenizer, config: SFTConfig, state_dict: dict | None = None) -> str:
    """output_dir/final: save_pretrained (safetensors), tokenizer + chat template, the config used;
    with LoRA the adapter, and on request the merged model in final/merged. Written under a
    temporary name and renamed, so `final/` is always complete. `state_dict`: the full weights
    gathered from a sharded model (the model object itself then holds only this process's shards)."""
    final = os.path.join(config.output_dir, "final")
    try:
        with atomic_directory(final) as tmp:  # written as .tmp-final, then renamed over any earlier final/
            initial = os.path.join(config.output_dir, "lora-initial")
            if converts_base(config) and os.path.isdir(initial):
                # Saved as the difference from the ORIGINAL base (a LoRA of rank 2r), so final/ applies to the model
                # users have. PEFT's conversion loads the initial adapter beside the trained one and then warns that
                # PiSSA/OLoRA should be converted: the very thing it is doing.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*(PiSSA|OLoRA) changes the base weights")
                    model.save_pretrained(tmp, safe_serialization=True, path_initial_model_for_weight_conversion=initial)
            else:
                # An adapter after add_chat_tokens holds the new rows as trainable tokens; PEFT would also save
                # the whole resized embedding and head. They apply to the original base, resized (docs/training.md).
                peft = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **peft)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "sftlab_config.yaml"), "w") as handle:
                yaml.safe_dump(config.model_dump(), handle, sort_keys=False)
            if config.use_peft and config.merge_lora and hasattr(model, "merge_and_unload"):
                merged = os.path.join(tmp, "merged")
                model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
                tokenizer.save_pretrained(merged)
    except OSError as error:
        raise TrainingError("cannot write the final model", source=final, found=error.strerror or str(error),
                            fix="free disk space or make output_dir writable") from None
    return final


def previous_run(path: str) -> list[str]:
    """What a finished or interrupted run left in output_dir that a new run would replace or mix with."""
    found = ["final/"] if os.path.isdir(os.path.join(path, "final")) else []
    checkpoints = os.path.join(path, "checkpoints")
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # being deleted by another process (overwrite)
        found += [f"checkpoints/{name}" for name in sorted(os.listdir(checkpoints)) if name.startswith("step-")]
    return found


def claim_output_dir(path: str, *, overwrite: bool, is_main: bool) -> list[str]:
    """A new run starts in an output_dir with no earlier run's final model or checkpoints in it; with
    overwrite those are deleted first (on the main process), never silently replaced one by one.
    Returns what was deleted."""
    found = previous_run(path)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError("output_dir holds an earlier run", source=path, field="output_dir", found=shown,
                          fix="choose a new output_dir; continue that run with resume_from_checkpoint=auto; or set "
                              "overwrite_output_dir: true to delete its final model, checkpoints and logs first")
    if is_main:
        for name in ("final", "checkpoints", "lora-initial"):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        for name in ("metrics.jsonl", "generations.jsonl"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, name))
    return found
