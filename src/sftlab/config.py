"""The training config, declared once: each field's type, default and one-line description.

CLI help (`sftlab config`), validation messages and docs all come from this declaration.
It is the only validator: every rule that relates fields lives here beside them, and each set of
allowed values is declared here once (data/ and training/ import the tuples). It imports nothing
of sftlab but errors, so that data/ and training/ can import it without a cycle.
Names follow the ones SFT users know from TRL/transformers where the concept is the same.
"""

from __future__ import annotations

import json
import os
import re
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftlab.errors import ConfigError, describe, did_you_mean

# Allowed values, declared once: the fields below are typed with these, and the modules that
# check the same values without a config (public functions) import the tuples from here.
Truncation = Literal["right", "drop"]
TRUNCATION_POLICIES = get_args(Truncation)
ChatExamples = Literal["as_served", "final_render"]
CHAT_EXAMPLES = get_args(ChatExamples)
ReasoningWhenMissing = Literal["refuse", "empty"]
REASONING_WHEN_MISSING = get_args(ReasoningWhenMissing)
ReasoningWhenDropped = Literal["refuse", "as_rendered"]
REASONING_WHEN_DROPPED = get_args(ReasoningWhenDropped)
Role = Literal["system", "developer", "user", "assistant", "tool", "function", "ipython"]
ROLES = get_args(Role)
AlpacaLayout = Literal["alpaca", "chat"]
ALPACA_LAYOUTS = get_args(AlpacaLayout)
LossType = Literal["nll", "dft"]
LOSS_TYPES = get_args(LossType)
Objective = Literal["sft", "dpo", "simpo", "orpo", "kto"]
OBJECTIVES = get_args(Objective)
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
DPO_LOSS_TYPES = get_args(DPOLossType)

# Field names a field map may give (sftlab's name -> the source's name): record fields, and the
# keys of a message inside a conversation.
RECORD_FIELDS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "chosen", "rejected")
MESSAGE_KEYS = ("role", "content")

# Evaluation by generation: the built-in metrics (training/evaluation.py holds their functions),
# a user's module:function, and the keys of the eval record that count rather than score (the
# scores are eval_generate_<metric>; `sftlab plot` draws those).
BUILTIN_METRIC_NAMES = ("exact_match", "json_exact_match", "contains")
USER_METRIC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
COUNT_KEYS = ("eval_generate_samples", "eval_generate_unfinished", "eval_generate_new_tokens", "eval_generate_seconds")


def metric_key(name: str) -> str:
    """What a metric is logged as: eval_generate_exact_match, eval_generate_<function> for module:function."""
    return "eval_generate_" + name.rsplit(":", 1)[-1]


def check_metric_names(names: list[str]) -> list[str]:
    """eval_generate_metrics checked before anything is imported: built-in names or module:function,
    each logged under a name of its own."""
    for position, name in enumerate(names):
        if name not in BUILTIN_METRIC_NAMES and not (isinstance(name, str) and USER_METRIC.match(name)):
            raise ConfigError(
                "unknown generation metric",
                field=f"eval_generate_metrics[{position}]",
                found=repr(name),
                expected=f"one of {sorted(BUILTIN_METRIC_NAMES)}, or module:function for a function of your own",
                fix="e.g. eval_generate_metrics: [exact_match] or [my_metrics:score] "
                "(score(prediction, reference) -> float in my_metrics.py)",
            )
    keys = [metric_key(name) for name in names]
    for position, key in enumerate(keys):
        if key in COUNT_KEYS:
            raise ConfigError(
                "a generation metric would be logged under the name of a count",
                field=f"eval_generate_metrics[{position}]",
                found=f"{names[position]!r} logs {key}",
                fix="rename the function",
            )
        if key in keys[:position]:
            raise ConfigError(
                "two generation metrics would be logged under one name",
                field=f"eval_generate_metrics[{position}]",
                found=f"{names[position]!r} and {names[keys.index(key)]!r} both log {key}",
                fix="keep one, or rename one of the functions",
            )
    return names


def parse_tools(tools: list | str | None) -> list | None:
    """`tools` as given: a list as it is, or read from a .json file or from JSON text (a mapping
    {"tools": [...]} is unwrapped); anything else is a ConfigError."""
    if tools is None or isinstance(tools, list):
        return tools
    text = tools
    if os.path.isfile(tools):
        with open(tools, encoding="utf-8") as handle:
            text = handle.read()
    elif not tools.lstrip().startswith(("[", "{")) and (tools.strip().endswith(".json") or os.sep in tools):
        # a path, not JSON text (which starts with a list or a mapping): say it is missing
        raise ConfigError(
            "tools file not found",
            field="tools",
            found=repr(tools),
            expected="a list of function schemas, a path to a .json file holding one, or its JSON text",
            fix="check the path (relative paths start from the working directory)",
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            "tools is neither a .json file nor JSON text",
            field="tools",
            found=f"{error.msg} in {tools[:60]!r}",
            expected="a list of function schemas, a path to a .json file holding one, or its JSON text",
        ) from None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(
            "tools must be a list of function schemas",
            field="tools",
            found=type(value).__name__,
            expected='[{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...]',
        )
    return value


def check_field_map(fields: dict, alpaca_layout: str = "alpaca") -> None:
    """A field map and Alpaca layout as data/fields.py's FieldMap takes them; the config runs the
    same check for its own `fields` and each source's."""
    for name, value in fields.items():
        if name not in RECORD_FIELDS + MESSAGE_KEYS:
            raise ConfigError(
                f"unknown field '{name}'",
                field=f"fields.{name}",
                expected=f"one of {list(RECORD_FIELDS + MESSAGE_KEYS)}",
                fix=did_you_mean(name, RECORD_FIELDS + MESSAGE_KEYS)
                or "map sftlab's field name to yours: {prompt: question}",
            )
        if not isinstance(value, str) or not value:
            raise ConfigError(
                "a field maps to a field name",
                field=f"fields.{name}",
                found=describe(value),
                expected="the name of the field in your data",
            )
    if alpaca_layout not in ALPACA_LAYOUTS:
        raise ConfigError(
            "unknown Alpaca layout",
            field="alpaca_layout",
            found=repr(alpaca_layout),
            expected=f"one of {ALPACA_LAYOUTS}",
        )


class DataSource(BaseModel):
    """One source of a mixture (a list in train_data or eval_data). A plain path is a source
    with every key at its default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    path: str = Field(
        description="A .jsonl/.json/.parquet/.csv file, a glob, a folder of them, or a folder written by datasets' save_to_disk."
    )
    split: str | None = Field(None, description="Split of a saved DatasetDict (default: train).")
    name: str | None = Field(
        None, description="How the training log and `sftlab inspect` name this source (default: its path)."
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Relative sampling weight: the weighted sources together give as many examples as they hold, shared in proportion to their weights (a seeded subset, or repeats).",
    )
    max_samples: int | None = Field(
        None, gt=0, description="Take at most this many of the source's examples (a seeded subset)."
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Use the source's examples this many times: 2 repeats each twice, 0.5 takes a seeded half.",
    )
    fields: dict[str, str] | None = Field(
        None, description="This source's field names for sftlab's (default: the config's `fields`)."
    )
    text_field: str | None = Field(None, description="This source's text field (default: the config's `text_field`).")
    alpaca_layout: AlpacaLayout | None = Field(
        None, description="This source's Alpaca layout (default: the config's `alpaca_layout`)."
    )


def validated(model: type[BaseModel], values: dict, *, source: str | None = None, where: str | None = None):
    """model(**values) with every mistake as a ConfigError: an unknown key suggests the closest
    known one (checked first: a typo explains the "missing" key pydantic would report), an invalid
    value names its key and the field's description. `where` names a data source (train_data[2]);
    without it the keys are the config's own, and `source` its file."""
    known = list(model.model_fields)
    for key in values:
        if key not in known:
            if where is not None:
                raise ConfigError(
                    f"unknown key '{key}' in a data source",
                    field=f"{where}.{key}",
                    fix=did_you_mean(key, known) or f"a source takes {known}",
                )
            raise ConfigError(
                f"unknown config key '{key}'",
                source=source,
                fix=did_you_mean(key, known) or "run `sftlab config` to list every key",
            )
    try:
        return model(**values)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        name = first["loc"][0] if first["loc"] else None
        found = repr(first.get("input")) if first["type"] != "missing" else "nothing"
        expected = model.model_fields[name].description if name in model.model_fields else None
        if where is not None:
            raise ConfigError(
                f"invalid value: {first['msg']}", field=f"{where}.{key}", found=found, expected=expected
            ) from None
        raise ConfigError(
            f"invalid value for '{key}': {first['msg']}",
            source=source,
            found=found,
            expected=expected,
            fix=f"set {name or 'it'} to a valid value (`sftlab config` lists every key with its type and default)",
        ) from None


def data_sources(value, name: str):
    """train_data / eval_data as given: a path, or a list of sources (paths or mappings), checked
    with errors that name the source and the key."""
    if value is None or isinstance(value, str) or not isinstance(value, (list, tuple)):
        return value  # a path (or a wrong type, which pydantic reports)
    if not value:
        raise ConfigError(f"{name} is an empty list", field=name, expected="a path, or a list of sources")
    sources = []
    for position, item in enumerate(value):
        where = f"{name}[{position}]"
        if isinstance(item, DataSource):
            sources.append(item)
            continue
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(
                "a source must be a path or a mapping",
                field=where,
                found=type(item).__name__,
                expected="a path, or {path: ..., weight: ...}",
            )
        source = validated(DataSource, item, where=where)
        chosen = [key for key in ("weight", "max_samples", "epochs") if getattr(source, key) is not None]
        if len(chosen) > 1:
            raise ConfigError(
                "weight, max_samples and epochs are alternatives",
                field=f"{where}.{chosen[1]}",
                found=f"{', '.join(chosen)} on one source",
                fix="keep one of them",
            )
        sources.append(source)
    return sources


LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")


class SFTConfig(BaseModel):
    """Everything a training run needs. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    # --- model -------------------------------------------------------------------------------
    model: str = Field(
        description="Model: a local Hugging Face folder, a .gguf file, or a short name such as smollm2-135m-instruct."
    )
    tokenizer: str | None = Field(None, description="Tokenizer folder, when it differs from the model's.")
    chat_template: str | None = Field(
        None,
        description="Chat template for conversations: 'chatml', a .jinja file, or the template text. Default: the tokenizer's.",
    )
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "sdpa_packed", "flex_attention", "flash_attention_2", "flash_attention_3"
    ] = Field(
        "auto",
        description="Attention kernel passed to transformers. 'auto': sdpa where the model supports it, else eager (gpt-oss); with packing, sdpa_packed where the model's attention is causal without sliding windows; the log says which. 'sdpa_packed': sdpa run once per packed example, with no length x length mask (the same numbers, far less memory at long lengths; docs/training.md). A kernel the model does not support is an error naming the ones it does.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model folder to run. Off unless you trust its author."
    )

    # --- a base model becomes a chat model: the template's markers as new tokens (issue 24) --
    add_chat_tokens: bool = Field(
        False,
        description=(
            "Add the markers the chat template writes (its <|...|> literals; docs/training.md) that the tokenizer "
            "lacks as special tokens, make the end-of-turn marker the EOS, and give the model new embedding (and "
            "head) rows at the mean of the existing ones, trained with the run (LoRA: only the new rows)."
        ),
    )
    special_tokens: list[str] | None = Field(
        None,
        description=(
            "More special tokens to add (after the template's markers with add_chat_tokens), e.g. Gemma's "
            "[<start_of_turn>, <end_of_turn>] whose markers are not <|...|> literals; tokens the tokenizer "
            "has already are kept as they are."
        ),
    )

    # --- data --------------------------------------------------------------------------------
    # Optional here because train(config, train_dataset=...) may be given the data as an object;
    # without either, preparation (data/splits.py) stops with a ConfigError naming train_data.
    train_data: str | list[DataSource] | None = Field(
        None,
        description="Training data: a .jsonl/.json/.parquet/.csv file, a glob, a folder (of such files, or written by datasets' save_to_disk); or a list of sources to mix (paths, or mappings with the keys of `train_data[]` below). Needed unless the Python API's train() is given train_dataset.",
    )
    train_split: str | None = Field(None, description="Split to use when the data is a DatasetDict.")
    eval_data: str | list[DataSource] | None = Field(
        None, description="Evaluation data, in the same forms as train_data (a list is mixed the same way)."
    )
    eval_split: str | None = Field(None, description="Split to use when eval_data is a DatasetDict.")
    text_field: str = Field("text", description="Field holding raw text for language-modeling records.")
    max_length: int = Field(1024, gt=0, description="Longest example in tokens; longer ones follow `truncation`.")
    truncation: Truncation = Field(
        "right",
        description="'right' keeps the first max_length tokens; 'drop' drops longer examples. Both are counted.",
    )
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description=(
            "Preference pairs: when P + the longer reply exceed max_length, 'right' first cuts the prompt from its "
            "start down to this many tokens, then the replies at their end. Default: max_length // 2."
        ),
    )
    completion_only_loss: bool = Field(
        True, description="Prompt/completion data: train on the completion only (false: on prompt and completion)."
    )
    assistant_only_loss: bool = Field(
        True, description="Conversations: train on assistant turns only (false: on every token of the rendered chat)."
    )
    last_assistant_only: bool = Field(False, description="Conversations: train on the last assistant turn only.")
    train_on_roles: list[Role] = Field(
        default_factory=lambda: ["assistant"],
        description='Conversations: the roles whose messages are trained; a message\'s own "train": true/false wins.',
    )
    chat_examples: ChatExamples = Field(
        "as_served",
        description="Conversations: 'as_served' trains every turn after exactly the prompt inference feeds it, adding examples where the template rewrites history (counted); 'final_render' keeps one example per conversation and leaves the turns it cannot serve untrained (counted).",
    )
    reasoning_when_missing: ReasoningWhenMissing = Field(
        "refuse",
        description=(
            "Conversations whose generation prompt opens a thinking block (R1, MiniMax-M2, OLMo-3-Think) and a reply "
            "with no reasoning: 'refuse' stops naming the record; 'empty' trains the model to close the thinking at "
            "once, with the closing text the template writes for an empty reasoning (counted)."
        ),
    )
    reasoning_when_dropped: ReasoningWhenDropped = Field(
        "refuse",
        description=(
            "Conversations whose template renders a turn without the reasoning the record gives it (Kimi K2 Thinking's "
            "empty <think></think>): 'refuse' stops naming the record; 'as_rendered' trains the turn as the template "
            "renders it, without that reasoning (counted)."
        ),
    )
    train_on_reasoning: bool = Field(
        True,
        description=(
            "Conversations: false keeps each trained turn's reasoning as context (its tokens are read, not trained) "
            "and trains the rest of the turn: its tags, answer, tool calls and end marker (counted)."
        ),
    )
    tools: list[dict] | str | None = Field(
        None,
        description="Tools (function schemas) for conversations that carry none: a list, a .json file, or JSON text. A record's own 'tools' win.",
    )
    chat_template_kwargs: dict | None = Field(
        None,
        description="Arguments for every chat template render (enable_thinking, reasoning_effort, documents, ...); a record's own 'chat_template_kwargs' win.",
    )
    skip_invalid_records: bool = Field(
        False, description="Count and skip records that fail validation instead of stopping with an error."
    )
    cache_dir: str | None = Field(
        None, description="Where prepared examples are cached. Default: ~/.cache/sftlab/prepared ($SFTLAB_CACHE)."
    )
    use_cache: bool = Field(
        True, description="Reuse prepared examples when data, tokenizer and settings are unchanged."
    )

    # --- data at scale: workers, field maps, Alpaca (issue 11) ---------------------------------
    preprocessing_workers: int | None = Field(
        None,
        ge=1,
        description="Processes that tokenize the data, each on its share of the records (spawned; the result is the same for any number). Default: one per two cores for data of more than 50 MB (or 50k records), else 1.",
    )
    fields: dict[str, str] | None = Field(
        None,
        description="Your data's field names for sftlab's: {prompt: question, completion: answer}; {messages: dialog, role: speaker, content: text}; {instruction: task, input: context, output: answer}; {text: body}. ShareGPT from/value needs none.",
    )
    alpaca_layout: AlpacaLayout = Field(
        "alpaca",
        description="Alpaca records (instruction, optional input, output): 'alpaca' trains on the output after Stanford Alpaca's prompt layout (docs/data.md); 'chat' makes each a user turn and an assistant turn through the chat template.",
    )

    # --- batching ----------------------------------------------------------------------------
    packing: bool = Field(
        False,
        description="Pack examples into rows of up to max_length tokens (best-fit decreasing), attention kept inside each example.",
    )
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Examples (or packed rows) per micro-batch on each process."
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Examples per evaluation batch on each process.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    shuffle: bool = Field(
        True,
        description="Visit examples (or packed rows) in a new seeded random order every epoch. false keeps the data's order: for data already in the order wanted (a curriculum), or to compare batch by batch with another trainer.",
    )
    group_by_length: bool = Field(
        False, description="Padded batches: group examples of similar length to waste less padding."
    )
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="Pad batch lengths up to a multiple of this (e.g. 8 for tensor cores)."
    )

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(
        0.03, ge=0, le=1, description="Fraction of optimizer steps spent warming up linearly from 0."
    )
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, ge=0, description="Clip the gradient norm to this (null: no clipping).")
    num_train_epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0)."
    )
    max_steps: int = Field(-1, description="Optimizer steps to run; -1 means derive from num_train_epochs.")
    seed: int = Field(42, ge=0, lt=2**64, description="Seed for model init, data order and dropout.")
    loss_implementation: Literal["auto", "sparse", "dense"] = Field(
        "auto",
        description="'sparse' runs the LM head on supervised rows only, in chunks; 'dense' is plain model logits; 'auto' checks sparse against dense once and picks.",
    )
    objective: Objective = Field(
        "sft",
        description="What training optimises: 'sft' (supervised fine-tuning on examples), or preference tuning on prompt/chosen/rejected pairs: 'dpo' (with loss_type sigmoid, ipo, hinge or robust), 'simpo', 'orpo' (reference-free); or 'kto' on unpaired prompt/completion/label records. docs/preference.md.",
    )
    loss_type: LossType | DPOLossType = Field(
        "nll",
        description="sft: 'nll' (cross-entropy on every supervised token) or 'dft' (Dynamic Fine-Tuning: each token's cross-entropy scaled by the model's own probability of it, held constant; the log then shows the plain cross-entropy as 'nll' beside it, and eval_loss stays cross-entropy). dpo: 'sigmoid' (DPO; the default for dpo), 'ipo', 'hinge', 'robust' (rDPO, with label_smoothing).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="Preference tuning: dpo's temperature of the implicit reward (TRL's beta); simpo's reward scale; orpo's weight of the odds-ratio term (TRL's ORPO beta, the paper's lambda).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo sigmoid (conservative DPO) and robust, simpo: the assumed probability that a pair's preference label is flipped.",
    )
    rpo_alpha: float | None = Field(
        None, gt=0, description="dpo: add rpo_alpha x the chosen completion's NLL per token (RPO); null: off."
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="simpo: the target reward margin gamma (TRL's CPOConfig simpo_gamma)."
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto: the weight of a desirable example's loss (TRL's KTOConfig desirable_weight); raise it when desirable examples are fewer.",
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="kto: the weight of an undesirable example's loss (TRL's KTOConfig undesirable_weight)."
    )
    shared_prompt: bool = Field(
        True,
        description="Preference tuning: chosen and rejected in one row [prompt | chosen | rejected], the prompt computed once, where a start-of-run probe finds the log-probs exact (else two rows per pair, said in the log); false: always two rows per pair, as other trainers do.",
    )
    precompute_ref_log_probs: bool = Field(
        True,
        description="dpo and kto: compute the reference log-probs once before training and store them with the prepared data (keyed by the pairs and the weights; reused by a resumed or repeated run), so training holds no reference model. false, with LoRA (use_peft): compute them at every step instead, by the same model with its adapter disabled (one more forward without gradients per micro-batch; no store, no second copy). false without LoRA is refused: there is no adapter to disable.",
    )
    router_aux_loss_coef: float | None = Field(
        None,
        ge=0,
        description="Mixture-of-experts models: add the router's load-balancing loss times this coefficient, exactly as the model's own loss adds it (turns on output_router_logits; null keeps the model's config: its own coefficient when it returns router logits, else none). Averaged over the forward passes of each optimizer step and logged as aux_loss.",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: in training only, add uniform noise of bound alpha / sqrt(length x hidden) to the input embeddings, length being each example's own (also in packed rows). 5 is the paper's usual value; null: off. Never applied at evaluation or generation.",
    )
    skip_nonfinite_steps: bool = Field(
        False,
        description="On a NaN/inf loss, skip that optimizer step and go on (default: stop with the step and examples named).",
    )

    # --- precision and memory ----------------------------------------------------------------
    bf16: bool = Field(
        False,
        description="bfloat16 autocast with fp32 master weights; with fsdp, FSDP2's policy: bf16 weights in compute, gradients reduced in fp32. Slow on CPUs without native bf16. `accelerate launch --mixed_precision bf16` turns it on too.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    activation_offloading: bool = Field(
        False,
        description="On a GPU, move the activations saved for backward (with gradient_checkpointing: each decoder layer's input) to pinned host memory during forward, on a side stream, and bring each back one layer ahead in backward: less GPU memory, the same numbers, host memory and PCIe traffic instead. On the CPU there is nothing to move: accepted, and the log says so.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile each decoder layer of the trunk with torch.compile (inductor; one graph serves every layer, and works under fsdp). The first steps pay the compilation (minutes on a small CPU), and a new sequence length may recompile once; see docs/benchmarks.md for when it pays.",
    )
    optimizer_state_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="AdamW's two moment estimates in bfloat16 (stochastically rounded): 12 instead of 16 bytes per trained parameter, a slower optimizer step, updates within bf16 rounding noise of fp32's.",
    )
    optimizer_in_backward: bool = Field(
        False,
        description="Update each parameter as soon as its gradient is complete in backward and free that gradient, so the model's whole gradient never exists at once. The same updates; needs gradient_accumulation_steps: 1, max_grad_norm: null and one process.",
    )

    # --- sharding ----------------------------------------------------------------------------
    fsdp: bool = Field(
        False,
        description="Shard weights, gradients and optimizer state over the processes (FSDP2: fully_shard per decoder layer and the root); checkpoints are sharded and resume on any number of processes.",
    )
    fsdp_reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each layer's gathered weights after its forward and gather them again in backward (less memory); false keeps them until backward (one all-gather fewer per layer).",
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description="fsdp: keep the sharded weights, gradients and optimizer state in CPU memory and step the optimizer there (fits larger models on a GPU, slower steps).",
    )

    sequence_parallel_size: int = Field(
        1,
        ge=1,
        description="Processes that share each row (Ulysses sequence parallelism): each holds 1/N of the row's tokens and an all-to-all around attention gives it all tokens of 1/N of the heads, so activation memory per process falls by N. The processes form a data x sequence mesh (world = data x N); DDP or fsdp spans all of them. N must divide the process count and the model's attention heads. SFT objectives; attention-only models.",
    )

    # --- LoRA --------------------------------------------------------------------------------
    use_peft: bool = Field(False, description="Train LoRA adapters (PEFT) instead of all weights.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of names (add 'lm_head' to adapt the head)."
    )
    merge_lora: bool = Field(False, description="Also save the base model with the adapter merged in (final/merged).")
    use_dora: bool = Field(
        False,
        description="DoRA: LoRA on the direction of each weight plus a trained magnitude per output (PEFT's use_dora); slower steps, often closer to full fine-tuning.",
    )
    use_rslora: bool = Field(
        False,
        description="rsLoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r, so higher ranks keep learning.",
    )
    lora_target_parameters: list[str] | None = Field(
        None,
        description="LoRA on weights that are parameters rather than Linear layers, by name suffix: the fused expert weights of mixture-of-experts models, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] (PEFT's target_parameters; 'all-linear' does not reach them).",
    )
    lora_modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens] after adding tokens.",
    )
    lora_init: str = Field(
        "default",
        description="Adapter initialisation: 'default' (B = 0: the model starts unchanged), 'gaussian', 'pissa' / 'pissa_niter_<n>' (principal singular vectors; the base keeps the residual), 'olora' (QR), 'orthogonal'. With pissa and olora the saved adapter is converted to apply to the original base model.",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the base model's linear layers in 4-bit NF4 through bitsandbytes and train LoRA adapters on top (needs use_peft: true and `pip install bitsandbytes`).",
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="load_in_4bit: the 4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(
        True, description="load_in_4bit: quantize the quantization constants too (about 0.4 bits per weight fewer)."
    )

    # --- logging, evaluation, checkpoints ----------------------------------------------------
    output_dir: str = Field("outputs/run", description="Folder for metrics.jsonl, checkpoints/ and final/.")
    logging_steps: int = Field(10, gt=0, description="Log metrics every this many optimizer steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every this many steps (and at the end) when eval_data is set."
    )
    eval_generate_samples: int = Field(
        0,
        ge=0,
        description="Evaluation by generation: at every evaluation, greedy-generate replies to the first this many eval prompts (a prompt/completion's prompt, a conversation up to its last assistant turn, rendered as served; in a preference run the eval pairs' prompts, scored against their chosen completions) and score them with eval_generate_metrics; 0: off.",
    )
    eval_generate_metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Scores of the generated replies against the records' replies: exact_match, json_exact_match (parsed and compared as JSON values), contains (the reference appears in the reply), or module:function for your own function(prediction, reference) -> float (imported when training starts).",
    )
    eval_generate_max_new_tokens: int = Field(
        128,
        gt=0,
        description="Evaluation by generation: the longest reply in tokens; a reply stops earlier at the template's end-of-turn token (or EOS).",
    )
    eval_generate_log_samples: int = Field(
        4,
        ge=0,
        description="Evaluation by generation: prediction/reference pairs written to output_dir/generations.jsonl at every evaluation.",
    )
    save_steps: int | None = Field(None, gt=0, description="Write a checkpoint every this many steps.")
    save_total_limit: int | None = Field(None, gt=0, description="Keep only the newest this many checkpoints.")
    resume_from_checkpoint: str | None = Field(
        None,
        description="A checkpoint folder to resume from, or 'auto' for the newest complete one in output_dir. Only a checkpoint of the same run is resumed: same model, tokenizer, training data and step-changing settings (max_steps and num_train_epochs may change; docs/safety.md).",
    )
    overwrite_output_dir: bool = Field(
        False,
        description="Start a new run in an output_dir that holds an earlier run's final model or checkpoints, deleting them (and its logs) first. Without it such a folder is refused, so no finished run is replaced by accident.",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra metric sinks, when installed: tensorboard, wandb."
    )

    @field_validator("train_data", "eval_data", mode="before")
    @classmethod
    def _sources(cls, value, info):
        return data_sources(value, info.field_name)

    @model_validator(mode="after")
    def _field_maps(self) -> SFTConfig:
        checks = [("", self.fields, self.text_field)]
        for name in ("train_data", "eval_data"):
            for position, source in enumerate(getattr(self, name) if isinstance(getattr(self, name), list) else ()):
                checks.append((f"{name}[{position}].", source.fields, source.text_field or self.text_field))
        for where, fields, text_field in checks:
            try:
                check_field_map(dict(fields or {}))
            except ConfigError as error:
                raise ConfigError(
                    error.problem,
                    field=where + (error.field or "fields"),
                    found=error.found,
                    expected=error.expected,
                    fix=error.fix,
                ) from None
            if fields and "text" in fields and text_field != "text":
                raise ConfigError(
                    "text_field and fields.text both name the text field",
                    field=where + "fields.text",
                    found=f"text_field {text_field!r} and fields.text {fields['text']!r}",
                    fix="give one of them",
                )
        return self

    @model_validator(mode="after")
    def _reasoning(self) -> SFTConfig:
        # With assistant_only_loss false every token of the render is trained: there is no turn to take reasoning from.
        if not self.train_on_reasoning and not self.assistant_only_loss:
            raise ConfigError(
                "train_on_reasoning: false needs the turns of each conversation, and "
                "assistant_only_loss: false trains the whole render",
                field="train_on_reasoning",
                found="false",
                fix="set assistant_only_loss: true, or train_on_reasoning: true",
            )
        return self

    @field_validator("tools")
    @classmethod
    def _tools(cls, value):
        # Read and parsed here, so a missing file or bad JSON stops the run before the model loads,
        # and the data stage gets the list.
        return parse_tools(value)

    @field_validator("lora_init")
    @classmethod
    def _lora_init(cls, value: str) -> str:
        import re

        if value in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
            return value
        raise ValueError(f"must be one of {', '.join(LORA_INITS)} or pissa_niter_<n> (e.g. pissa_niter_4)")

    @field_validator("special_tokens")
    @classmethod
    def _special_tokens(cls, value: list[str] | None) -> list[str] | None:
        # A blank token would match everywhere, one with spaces around it is a different string
        # from the one the template writes: both are mistakes, refused before anything loads.
        for position, token in enumerate(value or ()):
            if not token or token != token.strip():
                raise ValueError(f"entry {position} ({token!r}) must be a token's text, without surrounding spaces")
        return list(dict.fromkeys(value)) if value else value

    @model_validator(mode="after")
    def _chat_tokens(self) -> SFTConfig:
        if self.add_chat_tokens and self.load_in_4bit:
            # Untried: the rows are added before prepare_model_for_kbit_training would run, on a
            # quantized model; refused rather than shipped unproven.
            raise ConfigError(
                "add_chat_tokens is not available with load_in_4bit yet",
                field="add_chat_tokens",
                fix="train LoRA without load_in_4bit, or start from a tokenizer that has the markers",
            )
        return self

    @model_validator(mode="after")
    def _peft_options(self) -> SFTConfig:
        peft_only = [name for name in ("use_dora", "use_rslora", "load_in_4bit") if getattr(self, name)]
        peft_only += ["lora_modules_to_save"] if self.lora_modules_to_save else []
        peft_only += ["lora_target_parameters"] if self.lora_target_parameters else []
        peft_only += ["lora_init"] if self.lora_init != "default" else []
        if peft_only and not self.use_peft:
            raise ConfigError(
                f"{peft_only[0]} configures LoRA adapters, but use_peft is false",
                field=peft_only[0],
                fix="set use_peft: true (or remove the option)",
            )
        if self.load_in_4bit and self.fsdp:
            raise ConfigError(
                "load_in_4bit cannot be sharded with fsdp: true (FSDP2 does not shard bitsandbytes' packed 4-bit weights)",
                field="load_in_4bit",
                fix="train QLoRA with DDP (fsdp: false), or full-precision LoRA with fsdp",
            )
        if self.fsdp and self.use_peft and self.merge_lora:
            raise ConfigError(
                "merge_lora is not available with fsdp: true (the merge needs the whole model in one process)",
                field="merge_lora",
                fix="merge final/ afterwards in one process: PeftModel.from_pretrained(base, final).merge_and_unload()",
            )
        if self.load_in_4bit and self.merge_lora:
            raise ConfigError(
                "merge_lora with load_in_4bit would merge the adapter into 4-bit weights, and lose precision",
                field="merge_lora",
                fix="merge final/ onto the full-precision base afterwards: PeftModel.from_pretrained(base, final).merge_and_unload()",
            )
        if self.lora_init.startswith(("pissa", "olora")) and self.fsdp:
            raise ConfigError(
                f"lora_init: {self.lora_init} changes the base weights, and its adapter conversion needs the whole model in one process",
                field="lora_init",
                fix="use lora_init: default with fsdp, or train without fsdp",
            )
        return self

    @model_validator(mode="after")
    def _optimizer_in_backward(self) -> SFTConfig:
        # Each parameter is updated the moment its gradient is complete: whatever needs every
        # gradient of the step first (their global norm, the next micro-batch, the other processes'
        # gradients, a decision to skip the step) cannot be honoured, so it is refused, not approximated.
        # That it runs in one process without fsdp is known only at run time (the loop checks it).
        if not self.optimizer_in_backward:
            return self
        needs = [
            (
                "max_grad_norm",
                self.max_grad_norm is not None,
                "null (clipping needs the norm of every gradient before any update)",
            ),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps != 1, "1"),
            (
                "skip_nonfinite_steps",
                self.skip_nonfinite_steps,
                "false (the update is made before the loss is known to be finite)",
            ),
            ("fsdp", self.fsdp, "false, and one process"),
        ]
        for name, conflict, wanted in needs:
            if conflict:
                raise ConfigError(
                    f"optimizer_in_backward needs {name}: {wanted}",
                    field=name,
                    found=str(getattr(self, name)),
                    fix=f"set {name} accordingly, or optimizer_in_backward: false",
                )
        return self

    @model_validator(mode="after")
    def _sequence_parallel(self) -> SFTConfig:
        # Refused rather than approximated: a preference loss is nonlinear in a completion's summed
        # log-probs, which sequence shards split; NEFTune's noise scale needs each example's whole
        # length; a router's load-balancing loss needs every token's routing. Whether the process count
        # divides is known at run time (the loop checks it).
        if self.sequence_parallel_size == 1:
            return self
        conflicts = [
            ("objective", self.objective != "sft", "sft (preference objectives need a completion's log-probs whole)"),
            (
                "neftune_noise_alpha",
                self.neftune_noise_alpha is not None,
                "null (its noise scale needs each example's length)",
            ),
            (
                "router_aux_loss_coef",
                self.router_aux_loss_coef not in (None, 0),
                "null (the router loss needs every token's routing)",
            ),
            ("optimizer_in_backward", self.optimizer_in_backward, "false (it needs one process)"),
            (
                "torch_compile",
                self.torch_compile,
                "false (the attention's per-example loop and all-to-all are not compiled)",
            ),
        ]
        for name, conflict, wanted in conflicts:
            if conflict:
                raise ConfigError(
                    f"sequence_parallel_size {self.sequence_parallel_size} needs {name}: {wanted}",
                    field=name,
                    found=str(getattr(self, name)),
                    fix=f"set {name} accordingly, or sequence_parallel_size: 1",
                )
        return self

    @model_validator(mode="after")
    def _objective_loss_type(self) -> SFTConfig:
        if self.objective == "dpo" and "loss_type" not in self.model_fields_set:
            object.__setattr__(self, "loss_type", "sigmoid")  # DPO's default; assignment would validate again
        allowed = {"sft": LOSS_TYPES, "dpo": DPO_LOSS_TYPES}.get(self.objective, ("nll",))
        if self.loss_type not in allowed:
            raise ConfigError(
                f"loss_type {self.loss_type} is not a loss of objective {self.objective}",
                field="loss_type",
                found=self.loss_type,
                expected=f"one of {', '.join(allowed)}"
                if self.objective in ("sft", "dpo")
                else f"none: {self.objective} has one loss",
                fix="set loss_type accordingly (or remove it)",
            )
        if not self.precompute_ref_log_probs:
            self._check_reference_on_the_fly()
        if self.objective != "dpo" and self.rpo_alpha is not None:
            raise ConfigError(
                "rpo_alpha adds an NLL term to DPO",
                field="rpo_alpha",
                found=f"objective {self.objective}",
                fix="use objective: dpo, or remove rpo_alpha",
            )
        return self

    def _check_reference_on_the_fly(self) -> None:
        # The reference computed at every step is the model with its LoRA adapter disabled: it is
        # the model before training only where the adapter starts at zero effect on unchanged base
        # weights. A frozen copy of the whole model instead would double its memory to save one
        # forward pass per pair, which the stored reference already saves without any copy.
        if self.objective not in ("dpo", "kto"):
            raise ConfigError(
                f"precompute_ref_log_probs concerns the reference model, and {self.objective} has none",
                field="precompute_ref_log_probs",
                found=f"objective {self.objective}",
                fix="remove precompute_ref_log_probs (or use objective: dpo or kto)",
            )
        if not self.use_peft:
            raise ConfigError(
                "precompute_ref_log_probs: false computes the reference by disabling the LoRA adapter, "
                "and without LoRA there is no adapter to disable",
                field="precompute_ref_log_probs",
                found="use_peft: false",
                fix="keep precompute_ref_log_probs: true (the default: the reference log-probs computed once "
                "before training and stored, no second copy of the model), or set use_peft: true",
            )
        if self.lora_init.startswith(("pissa", "olora")):
            raise ConfigError(
                f"lora_init: {self.lora_init} moves part of the base weights into the adapter, so the model "
                "with the adapter disabled is not the model before training",
                field="precompute_ref_log_probs",
                found=f"lora_init: {self.lora_init}",
                fix="keep precompute_ref_log_probs: true (the reference computed once before training), "
                "or use lora_init: default",
            )

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (derive from epochs) or a positive number of steps")
        return value

    @field_validator("eval_generate_metrics")
    @classmethod
    def _generation_metrics(cls, value: list[str]) -> list[str]:
        return check_metric_names(value)

    @model_validator(mode="after")
    def _generation_eval(self) -> SFTConfig:
        if self.eval_generate_samples and not self.eval_generate_metrics:
            raise ConfigError(
                "eval_generate_samples is set but no metric scores the replies",
                field="eval_generate_metrics",
                found="[]",
                fix="e.g. eval_generate_metrics: [exact_match], or eval_generate_samples: 0",
            )
        return self

    @model_validator(mode="after")
    def _sizes_that_can_work(self) -> SFTConfig:
        # Ranges that need another field (the single-field ones are in the Field declarations, and
        # allow_inf_nan=False refuses inf and NaN for every float). A pad_to_multiple_of beyond
        # max_length pads every batch past its longest possible row: at 1e9 the run was killed
        # for memory without a word.
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of > self.max_length:
            raise ConfigError(
                "pad_to_multiple_of is larger than max_length: every batch would be padded past the longest row",
                field="pad_to_multiple_of",
                found=f"pad_to_multiple_of {self.pad_to_multiple_of}, max_length {self.max_length}",
                expected="at most max_length",
                fix="e.g. pad_to_multiple_of: 8, or max_length itself for one compiled shape",
            )
        return self


def field_help() -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for every field: what `sftlab config` prints; the keys
    of one source of a mixture follow as train_data[].KEY (eval_data's are the same)."""
    rows = []
    for prefix, model in (("", SFTConfig), ("train_data[].", DataSource)):
        for name, info in model.model_fields.items():
            annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            annotation = annotation.replace("sftlab.config.", "")
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            rows.append((prefix + name, annotation, default, info.description or ""))
    return rows


def parse_overrides(pairs: list[str]) -> dict:
    """['lr=1e-4', 'packing=true'] -> {'lr': 1e-4, 'packing': True}, values parsed as YAML scalars."""
    result = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError("an override must look like key=value", found=repr(pair), fix="e.g. learning_rate=1e-4")
        key, value = pair.split("=", 1)
        try:
            result[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:  # not a YAML scalar, e.g. a Jinja template: keep the text as typed
            result[key.strip()] = value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error: PyYAML would keep the last one
    silently, and a run would train with a value its author did not mean."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"config key '{key}' is given twice",
                    source=key_node.start_mark.name,
                    found=f"line {key_node.start_mark.line + 1}",
                    fix="keep one of them",
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> SFTConfig:
    """Read a YAML config and apply key=value overrides; every problem becomes a ConfigError."""
    values: dict = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.load(handle, Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            raise ConfigError(
                "config file not found",
                source=path,
                fix="check the path (relative paths start from the working directory)",
            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            found = (getattr(error, "problem", None) or str(error).splitlines()[0]) + (
                f" at line {mark.line + 1}" if mark else ""
            )
            raise ConfigError(
                "config file is not valid YAML", source=path, found=found, fix="fix the YAML syntax there"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                "config must be a mapping of key: value",
                source=path,
                found=type(loaded).__name__,
                fix="write one `key: value` per line, e.g. `learning_rate: 1.0e-4`",
            )
        values.update(loaded or {})
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides or []))
    return make_config(values, source=path)


def make_config(values: dict, source: str | None = None) -> SFTConfig:
    try:
        return validated(SFTConfig, values, source=source)
    except ConfigError as error:  # from the validators of the data sources: named by their keys
        if error.source is not None or source is None:
            raise
        raise ConfigError(
            error.problem, source=source, field=error.field, found=error.found, expected=error.expected, fix=error.fix
        ) from None
