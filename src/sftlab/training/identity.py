"""A run's identity: what must be the same for a checkpoint to be resumed by a run.

Every checkpoint records it (state.json "run"); resuming compares it with the resuming run's, so
a run never continues from another run's checkpoint (the same output_dir reused for a new run,
a changed learning rate, other data). It holds

    model      the model as named in the config (or the class of a model object) and a hash of
               its architecture config
    tokenizer  the tokenizer's fingerprint (vocabulary, special tokens, chat template)
    data       a hash of the training examples themselves (token ids, targets, boundaries): any
               change of data, field maps, template or truncation that changes what is trained
    settings   each setting that changes what the steps compute or in which order (RESUME_SETTINGS)

Settings that may change on resume (CHANGEABLE) are recorded too, and a change is logged:
max_steps / num_train_epochs (more steps; the learning-rate schedule follows the new total).
Everything else (logging, evaluation, checkpoint cadence, workers, cache) may change freely.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from sftlab.data.container import Examples, Pairs
from sftlab.data.prepare import tokenizer_fingerprint

RESUME_SETTINGS = (
    "seed", "objective", "beta", "label_smoothing", "rpo_alpha", "simpo_gamma", "packing", "max_length", "shuffle", "group_by_length", "learning_rate", "lr_scheduler_type", "warmup_ratio",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "loss_type",
    "neftune_noise_alpha", "bf16", "optimizer_state_dtype", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_target_parameters", "use_dora", "use_rslora", "lora_modules_to_save", "lora_init", "load_in_4bit",
    "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "add_chat_tokens", "special_tokens",
)
CHANGEABLE = ("max_steps", "num_train_epochs")
_CHUNK = 1 << 22  # values per hashing chunk: 32 MB as int64


def run_identity(config, model, tokenizer, examples: Examples) -> dict:
    """The identity of the run `config` describes, with this model, tokenizer and training data."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    architecture = base.config.to_dict() if hasattr(base, "config") else {}
    # The dtype a model was loaded in and the library version are not the architecture.
    architecture = {k: v for k, v in architecture.items() if k not in ("torch_dtype", "dtype", "transformers_version")
                    and not k.startswith("_")}
    return {
        "model": config.model or type(base).__name__,
        "architecture": _digest(json.dumps(architecture, sort_keys=True, default=str).encode()),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": examples_digest(examples),
        **{name: _plain(getattr(config, name)) for name in RESUME_SETTINGS + CHANGEABLE},
    }


def examples_digest(examples: Examples | Pairs) -> str:
    """A hash of what is trained on: boundaries, token ids and targets of SFT examples, or the
    prompts and completions of preference pairs (read once, sequentially)."""
    if isinstance(examples, Pairs):
        arrays = (examples.prompt_offsets, examples.prompt_ids, examples.chosen_offsets, examples.chosen_ids,
                  examples.rejected_offsets, examples.rejected_ids)
    else:
        arrays = (examples.offsets, examples.input_ids, examples.targets)
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(str(len(array)).encode())
        # As int64 whatever the stored width, in chunks: the same examples give the same hash
        # whether built in memory or read memory-mapped from the cache.
        for start in range(0, len(array), _CHUNK):
            digest.update(np.asarray(array[start : start + _CHUNK], dtype="<i8").tobytes())
    return digest.hexdigest()


def weights_digest(model) -> str:
    """A hash of every weight of `model` as it is now (names, shapes, fp32 values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def differences(written: dict, now: dict, names) -> list[tuple[str, object, object]]:
    """(name, value in the checkpoint, value now) for each of `names` that differs."""
    return [(name, written.get(name), now.get(name)) for name in names if written.get(name) != now.get(name)]


def blocking(written: dict, now: dict) -> list[tuple[str, object, object]]:
    """The differences that forbid resuming: everything but CHANGEABLE."""
    return differences(written, now, [name for name in now if name not in CHANGEABLE])


def describe(difference: tuple[str, object, object]) -> str:
    name, then, now = difference
    if name in ("architecture", "tokenizer", "data"):
        return f"{name} differs (hash {str(then)[:12]} then, {str(now)[:12]} now)"
    return f"{name} was {then!r}, is {now!r} now"


def _plain(value):
    """A JSON value that compares equal after a round trip through state.json (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
