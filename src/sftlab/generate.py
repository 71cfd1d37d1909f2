"""Answer prompts with a model: the chat template applied as in training, greedy decoding.

    generate(model_dir, prompt)            -> the reply to one prompt (what `sftlab generate` prints)
    load_for_generation(model_dir)         -> (model, tokenizer), to answer many prompts
    generate_replies(model, tokenizer, prompts) -> one reply per prompt, in left-padded batches
    generate_batch(model, prompt_ids, ...)      -> token-level replies to one batch (what training's
                                                   evaluation by generation calls, training/evaluation.py)

`model_dir` is anything `resolve_model_path` accepts (a folder, a .gguf file, a short name), or a
LoRA adapter folder written by `sftlab train` with use_peft=true (its base model is loaded first).
The prompt is rendered by the same template and tokenized the same way as training examples
(sftlab.data.chat, no extra special tokens), so a fine-tuned model sees at inference exactly the
prefix it was trained to continue. A reply stops where the template ends an assistant turn (and at
EOS): the same stop ids as training's evaluation by generation (sftlab.data.special_tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from sftlab.data.chat import ChatRenderer, resolve_chat_template
from sftlab.data.special_tokens import pad_token_id, reply_stop_ids
from sftlab.errors import ConfigError
from sftlab.models import load_model, load_tokenizer, resolve_model_path


def load_for_generation(model_dir: str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) for a model folder, GGUF, short name or LoRA adapter folder."""
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        return _load_adapter(model_dir, trust_remote_code), load_tokenizer(model_dir, trust_remote_code)
    path = resolve_model_path(model_dir)
    model = load_model(path, trust_remote_code=trust_remote_code)
    model.eval()
    return model, load_tokenizer(path, trust_remote_code)


def _load_adapter(folder: str, trust_remote_code: bool):
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    # PEFT records the folder the base was loaded from; for a GGUF or short name that is the
    # conversion cache, which may have been cleared since. The training config names the source.
    trained_from = _sftlab_config(folder).get("model")
    if trained_from and not (base and os.path.isdir(base)):
        base = trained_from
    if not base:
        raise ConfigError("LoRA adapter does not name its base model", source=folder, field="base_model_name_or_path",
                          fix="load the base model and the adapter with peft yourself, or use final/merged (merge_lora=true)")
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("this folder holds a LoRA adapter, which needs the peft package", source=folder,
                          fix="pip install 'sftlab[peft]'") from None
    base_model = load_model(resolve_model_path(base), trust_remote_code=trust_remote_code)
    vocab_size = len(load_tokenizer(folder, trust_remote_code))
    if vocab_size > base_model.get_input_embeddings().weight.shape[0]:
        # Trained with add_chat_tokens: the adapter holds the new tokens' rows, for a base resized to the tokenizer.
        base_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model = PeftModel.from_pretrained(base_model, folder)
    # Generation never trains the adapter, so it is folded into the weights: the same function,
    # without the extra LoRA matmuls in every layer at every decoding step.
    model = model.merge_and_unload()
    model.eval()
    return model


def chat_template_for(model_dir: str, tokenizer) -> str:
    """The template the model was trained with: the tokenizer's, else the `chat_template` of the
    sftlab_config.yaml that `sftlab train` leaves next to the model (e.g. the built-in 'chatml')."""
    return resolve_chat_template(tokenizer, _sftlab_config(model_dir).get("chat_template"))


def _sftlab_config(folder: str) -> dict:
    """The sftlab_config.yaml that `sftlab train` writes next to a model, or {}."""
    path = os.path.join(folder, "sftlab_config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle)
    return loaded if isinstance(loaded, dict) else {}


def render_prompts(tokenizer, template: str, prompts: list[str], system: str | None = None,
                   template_kwargs: dict | None = None) -> list[str]:
    renderer = ChatRenderer(tokenizer, template, template_kwargs=template_kwargs)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [renderer.render(head + [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def generate_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, system: str | None = None,
                     template: str | None = None, batch_size: int = 16, template_kwargs: dict | None = None) -> list[str]:
    """Greedy replies to `prompts`, decoded without special tokens and stripped.

    Prompts are batched with left padding (the attention mask hides the pads and position ids
    follow it), which on a CPU is several times faster than one prompt at a time.
    """
    template = template or resolve_chat_template(tokenizer, None)
    texts = render_prompts(tokenizer, template, prompts, system, template_kwargs)
    stops = reply_stop_ids(tokenizer, ChatRenderer(tokenizer, template, template_kwargs=template_kwargs))
    pad = pad_token_id(tokenizer)
    replies: list[str] = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start : start + batch_size]]
        for reply in generate_batch(model, encoded, stop_ids=stops, pad_id=pad, max_new_tokens=max_new_tokens):
            replies.append(tokenizer.decode(reply.token_ids, skip_special_tokens=True).strip())
    return replies


@dataclass
class Reply:
    token_ids: list[int]  # the generated tokens before the first stop token
    stopped: bool  # a stop token ended it (False: max_new_tokens did)


def generate_batch(model, prompt_ids: list[list[int]], *, stop_ids: list[int], pad_id: int, max_new_tokens: int,
                   synced_processes: bool = False) -> list[Reply]:
    """Greedy continuations of token-id prompts in one left-padded batch, with the KV cache.

    `synced_processes`: every process of a sharded (FSDP) model calls this together, and each
    decoding step is a forward that all-gathers weights, so all must run the same number of
    steps: transformers' synced_gpus keeps a process whose rows have all stopped running forwards
    (one all-reduce per step says whether any process still has a row going)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids or None,
                              pad_token_id=pad_id, use_cache=True)
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                synced_gpus=synced_processes)
    replies = []
    stops = set(stop_ids)
    for row in output[:, width:].tolist():
        # A finished row is filled up with pad tokens while the others go on: cut at the first stop.
        end = next((i for i, token in enumerate(row) if token in stops), None)
        replies.append(Reply(row[:end] if end is not None else row, end is not None))
    return replies


def generate(model_dir: str, prompt: str, max_new_tokens: int = 128, system: str | None = None) -> str:
    """The model's greedy reply to one user prompt (chat template applied)."""
    model, tokenizer = load_for_generation(model_dir)
    template = chat_template_for(model_dir, tokenizer)
    # Served as it was trained: the run's chat_template_kwargs (enable_thinking, ...) shape the prompt too.
    kwargs = _sftlab_config(model_dir).get("chat_template_kwargs")
    return generate_replies(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, system=system, template=template,
                            template_kwargs=kwargs)[0]
