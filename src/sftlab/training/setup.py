"""What a run is built from, each piece by a small function that takes the few values it needs:
the model (weights, LoRA/QLoRA, gradient checkpointing, compiled layers), the optimizer and the
learning-rate schedule.
"""

from __future__ import annotations

import os

import torch

from sftlab.config import SFTConfig
from sftlab.data.chat_tokens import AddedChatTokens
from sftlab.errors import ConfigError
from sftlab.models import load_model
from sftlab.training import parallelize
from sftlab.training.optimizer import AdamWBF16States


def setup_model(
    path: str,
    *,
    attn_implementation: str,
    trust_remote_code: bool,
    gradient_checkpointing: bool,
    lora: dict | None,
    quantization=None,
    added_tokens: AddedChatTokens | None = None,
    packing: bool = False,
):
    model = load_model(
        path,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        quantization=quantization,
        packing=packing,
    )
    model.config.use_cache = False
    if added_tokens is not None:  # before LoRA: the adapter is built on the resized embeddings
        add_token_rows(model, added_tokens)
        if lora is not None and added_tokens.ids:
            lora = dict(lora, trainable_tokens=new_token_layers(model, added_tokens.ids, lora.get("modules_to_save")))
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Norms and the head back in fp32 and input gradients on, so LoRA on frozen 4-bit layers
        # gets gradients; checkpointing is turned on below (as for any model), not here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = apply_lora(model, **lora)
    return model


def add_token_rows(model, added: AddedChatTokens) -> None:
    """Rows for the tokens add_chat_tokens added (data/chat_tokens.py): the embedding (and an untied
    head) grows to the tokenizer's size (a model with spare rows past its tokenizer's ids, as Qwen's, uses
    those without growing), and each new token's row is the mean of the rows of the tokens
    the tokenizer had before (ids below the first new one), computed in float64. No random draw (unlike
    transformers' mean_resizing, which samples around the mean), so every process and every resumed run
    builds the same rows bitwise. A tied head is the same tensor and is set once. Generation stops on the
    new EOS (the template's end-of-turn marker) and on the old one."""
    embedding = model.get_input_embeddings()
    if added.vocab_size > embedding.weight.shape[0]:
        model.resize_token_embeddings(added.vocab_size, mean_resizing=False)
    if added.ids:
        first_new, rows = min(added.ids), torch.tensor(added.ids)
        layers = [model.get_input_embeddings(), model.get_output_embeddings()]
        with torch.no_grad():
            for layer in {id(layer.weight): layer for layer in layers if layer is not None}.values():
                for tensor in (layer.weight, getattr(layer, "bias", None)):
                    if tensor is not None:
                        tensor[rows] = tensor[:first_new].double().mean(0).to(tensor.dtype)
    if added.eos_ids:
        model.config.eos_token_id = added.eos_ids[0]
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = list(added.eos_ids)


def new_token_layers(model, ids: list[int], modules_to_save: list[str] | None) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices for LoRA after adding tokens: the new rows of the embedding and of
    an untied head, trained on top of the adapter (a tied head follows its embedding: PEFT ties them). A
    layer already in lora_modules_to_save is trained whole, and PEFT refuses both on one layer."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    saved = set(modules_to_save or ())
    return {names[id(layer)]: list(ids) for layer in layers if names[id(layer)].rsplit(".", 1)[-1] not in saved}


def lora_settings(config: SFTConfig) -> dict | None:
    if not config.use_peft:
        return None
    return dict(
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        modules_to_save=config.lora_modules_to_save,
        init=config.lora_init,
        target_parameters=config.lora_target_parameters,
    )


def quantization_settings(config: SFTConfig):
    """BitsAndBytesConfig for load_in_4bit (QLoRA), after checking bitsandbytes can run here."""
    if not config.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "load_in_4bit needs the bitsandbytes package",
            field="load_in_4bit",
            fix="pip install bitsandbytes (0.45 or newer also runs 4-bit layers on the CPU), or train LoRA without load_in_4bit",
        ) from None
    except Exception as error:  # its native library fails to load on this machine
        raise ConfigError(
            "bitsandbytes is installed but cannot run on this machine",
            field="load_in_4bit",
            found=str(error).splitlines()[0][:200],
            fix="install a bitsandbytes build for this hardware, or train LoRA without load_in_4bit",
        ) from None
    from transformers import BitsAndBytesConfig

    # Compute in the dtype training computes in: the 4-bit weights are dequantized to it per matmul.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16 if config.bf16 else torch.float32,
    )


def apply_lora(
    model,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    use_dora: bool = False,
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    init: str = "default",
    target_parameters: list[str] | None = None,
    trainable_tokens: dict[str, list[int]] | None = None,
):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            "use_peft=true needs the peft package", field="use_peft", fix="pip install 'sftlab[peft]'"
        ) from None
    return get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=all_linear(model) if target_modules == "all-linear" else target_modules,
            task_type="CAUSAL_LM",
            use_dora=use_dora,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=True if init == "default" else init,
            **({"target_parameters": target_parameters} if target_parameters else {}),
            **({"trainable_token_indices": trainable_tokens} if trainable_tokens else {}),
        ),
    )


def all_linear(model) -> list[str]:
    """What lora_target_modules 'all-linear' adapts: the names of the plain nn.Linear layers (the
    output head excepted, as PEFT's 'all-linear' does), but not a Linear subclass of a model's own
    code (Llama 4's router returns a tuple, which LoRA's wrapper cannot add to), nor the
    projections inside a state-space mixer (Mamba's in/out projections: PEFT refuses them on the
    Mamba models it knows, Falcon-H1 and Nemotron-H; adapt them by name where wanted). PEFT matches
    a name at the end of a module's path, so a name is kept only when every module it ends is such
    a Linear (Gemma 3n's lists of Linears have children named "0", "1", as decoder layers are)."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, skipped = set(), set()
    for _, parent in model.named_modules():
        inside_mixer = "mamba" in type(parent).__name__.lower() or type(parent).__name__.endswith("Mixer")
        for child_name, child in parent.named_children():
            # A Linear subclass from a model's own code has its own forward (Llama 4's router);
            # quantized layers (bitsandbytes' Linear4bit for QLoRA) are Linears as LoRA wraps them.
            own_code = type(child) is not nn.Linear and type(child).__module__.startswith("transformers.models.")
            plain = isinstance(child, nn.Linear) and not own_code and child is not head and not inside_mixer
            (names if plain else skipped).add(child_name)
    chosen = sorted(names - skipped)
    if not chosen:
        raise ConfigError(
            "lora_target_modules 'all-linear' finds no plain Linear layer to adapt outside state-space mixers",
            field="lora_target_modules",
            found=type(model).__name__,
            fix="name the modules to adapt, e.g. lora_target_modules: [in_proj, x_proj]",
        )
    return chosen


def compile_layers(model) -> int:
    """torch.compile each decoder layer in place (as torchtitan does), before FSDP wraps them.
    Per layer rather than the whole trunk: the trunk's mask building and cache logic break
    graphs, a layer does not, and layers of one class share one compiled graph. The embedding,
    final norm and the sparse head stay eager (the head is already one matmul per chunk)."""
    layers = parallelize.decoder_layers(model, purpose="torch_compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def converts_base(config: SFTConfig) -> bool:
    """PiSSA and OLoRA move part of each base weight into the adapter's initial value (the base
    keeps the residual), so their adapter applies to that residual, not to the model users have."""
    return config.use_peft and config.lora_init.startswith(("pissa", "olora"))


def save_initial_adapter(model, output_dir: str) -> str:
    """The adapter as initialised, marked as a plain (zero-effect) LoRA: what PEFT needs to turn the
    trained adapter into one that applies to the original base weights (see export_final)."""
    folder = os.path.join(output_dir, "lora-initial")
    adapter = model.peft_config["default"]
    init, adapter.init_lora_weights = adapter.init_lora_weights, True
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        adapter.init_lora_weights = init
    return folder


def setup_optimizer(
    model,
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    state_dtype: str = "float32",
):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "norm" not in name.lower() else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == "bfloat16":
        return AdamWBF16States([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps)
    # fused: one kernel for the whole update; on CPU 1.0-1.8 s -> 0.23 s per step for 135M weights (benchmarks/).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps, fused=fused)


def setup_scheduler(optimizer, kind: str, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def check_optimizer_in_backward(world: int) -> None:
    """The config refuses optimizer_in_backward with clipping, accumulation, skipping or fsdp; the
    number of processes is known only now. Each parameter is updated the moment its gradient is
    complete, before DDP could average it with the other processes' gradients."""
    if world > 1:
        raise ConfigError(
            "optimizer_in_backward needs fsdp: false, and one process",
            field="fsdp",
            found=f"False with {world} processes",
            fix="set fsdp accordingly, or optimizer_in_backward: false",
        )


def training_optimizer(
    given,
    model,
    *,
    fsdp: bool,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    state_dtype: str,
):
    """The optimizer train() steps: AdamW as configured, or the caller's own (an optimizer, or a
    function params -> optimizer). Built after parallelisation, on the parameters as they are then."""
    if given is None:
        return setup_optimizer(
            model, learning_rate=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps, state_dtype=state_dtype
        )
    if isinstance(given, torch.optim.Optimizer) and fsdp:
        raise ConfigError(
            "fsdp: true replaces the model's parameters by their shards, so an optimizer built beforehand "
            "would step the old ones",
            field="optimizer",
            fix="pass a function params -> optimizer instead",
        )
    if callable(given) and not isinstance(given, torch.optim.Optimizer):
        return given([p for p in model.parameters() if p.requires_grad])
    return given


def training_scheduler(given, optimizer, kind: str, total_steps: int, warmup_steps: int):
    """The learning-rate schedule: the configured one, or the caller's (a scheduler, or a function optimizer -> scheduler)."""
    if given is None:
        return setup_scheduler(optimizer, kind, total_steps, warmup_steps)
    if callable(given) and not hasattr(given, "step"):
        return given(optimizer)
    return given


def set_router_aux_loss(model, coefficient: float) -> None:
    """Make a mixture-of-experts model return router logits and weigh its load-balancing loss by
    `coefficient`, where its forward reads both (config.output_router_logits, router_aux_loss_coef)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "router_aux_loss_coef"):
        raise ConfigError(
            "router_aux_loss_coef is set, but the model has no router load-balancing loss",
            field="router_aux_loss_coef",
            found=type(base).__name__,
            fix="remove router_aux_loss_coef (it applies to mixture-of-experts models such as Mixtral, Qwen3-MoE, gpt-oss)",
        )
    base.config.output_router_logits = True
    base.config.router_aux_loss_coef = coefficient  # saved with the model: how it was trained
    base.router_aux_loss_coef = coefficient
