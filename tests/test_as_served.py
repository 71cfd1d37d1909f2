"""Conversations trained exactly as served: reasoning, tools, and templates that rewrite history.

The templates are written for these tests in the style of their families (not copied; the Qwen3,
harmony, DeepSeek-V3.1 and GLM ones live in examples/templates/, where the docs render them too):
Qwen3 (thinking dropped before the last user query, an empty think block on the last turn,
tools in the system message, tool calls as <tool_call> blocks), harmony/gpt-oss (channels,
<|return|> on the last turn and <|end|> in history, <|call|> after a tool call, a tool call's
analysis dropped once a final answer follows), a generation prompt that opens "<think>\\n"
(Qwen3.6 style), DeepSeek-R1 (thinking cut from every reply, the generation prompt opens it),
DeepSeek-V3.1 (thinking switched by a template argument, every reply rendered as "</think>" + answer),
GLM-4.5 and Apertus (no end marker after the last reply: the next message's token stops the model),
and Llama-3 style tools in the first user message.

Each expected example is written out by hand with its trained text between ⟦ and ⟧:
P_k (what inference feeds, `add_generation_prompt=True`) is the text before a ⟦, C_k (what the
model writes, through its end marker) the text inside. `marked()` turns it into ids by tiny.py's
hand rules. A second, independent check runs transformers' own `apply_chat_template` for every
P_k and asserts that each assistant turn is trained exactly once, right after exactly those tokens.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from sftlab import DataError, TargetSettings, prepare_examples
from sftlab.data.chat import CHATML
from sftlab.inspect import stats_rows
from sftlab.training.progress import _chat_summary
from tiny import char_tokenizer, hand_ids, marked

X = -100

# ---------------------------------------------------------------- templates, in each family's style

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "examples", "templates")
QWEN3 = open(os.path.join(TEMPLATES, "qwen3_style.jinja"), encoding="utf-8").read()  # shared with the docs
HARMONY = open(os.path.join(TEMPLATES, "harmony_style.jinja"), encoding="utf-8").read()
V31 = pathlib.Path(TEMPLATES, "deepseek_v31_style.jinja").read_text(encoding="utf-8")

# The generation prompt opens the thinking; the history shows earlier replies without it.
OPENS_THINK = (
    "{%- set ns = namespace(last_query=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_query %}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# Thinking is cut from every reply it renders; the generation prompt opens it.
R1 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|User|>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{%- set c = m.content %}{%- if '</think>' in c %}{%- set c = c.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|Assistant|>' + c + eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|Assistant|><think>\\n' }}{%- endif %}"
)

# Llama-3 style: tools written into the first user message; prefix-stable.
LLAMA_TOOLS = (
    "{{- bos_token }}{%- set ns = namespace(done=false) %}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}"
    "{%- if m.role == 'user' and tools and not ns.done %}{{- 'Functions:\\n' }}{%- for t in tools %}{{- t | tojson + '\\n' }}{%- endfor %}"
    "{%- set ns.done = true %}{%- endif %}"
    "{%- if m.tool_calls %}{{- m.tool_calls[0].function | tojson }}{%- else %}{{- m.content }}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TEMP_TOOL = {"type": "function", "function": {"name": "get_temp"}}
CALL = {"type": "function", "function": {"name": "get_temp", "arguments": '{"city": "Oslo"}'}}


def agent_chat(tool_reasoning: str | None = None) -> list[dict]:
    """System, a greeting with reasoning, then a tool call, its result and a final answer."""
    call = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    if tool_reasoning is not None:
        call["reasoning_content"] = tool_reasoning
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo", "reasoning_content": "greet"},
        {"role": "user", "content": "Temp in Oslo?"},
        call,
        {"role": "tool", "name": "get_temp", "content": "7C"},
        {"role": "assistant", "content": "7C in Oslo.", "reasoning_content": "read it"},
    ]


def without_reasoning(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


# ---------------------------------------------------------------- helpers


def examples_of(records, template, skip_invalid_records=False, **settings):
    tokenizer = char_tokenizer(chat_template=template, chat_tokens=True)
    examples = prepare_examples(
        records, tokenizer, TargetSettings(**settings), use_cache=False, skip_invalid_records=skip_invalid_records
    )
    return [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))], examples


def expected_examples(*texts):
    return [marked(t, chat_tokens=True)[1:3] for t in texts]


def trained_runs(input_ids, targets):
    """(context ids, trained ids) of each run of trained tokens: token t is trained when targets[t - 1] != -100."""
    trained = [t + 1 for t in range(len(targets)) if targets[t] != X]
    runs, start = [], None
    for i, position in enumerate(trained):
        if start is None:
            start = position
        if i + 1 == len(trained) or trained[i + 1] != position + 1:
            runs.append((input_ids[:start], input_ids[start : position + 1]))
            start = None
    return runs


def assert_every_turn_trained_once_as_served(record, template, tokenizer=None, **settings):
    """Independent of sftlab's splitter: transformers renders each P_k, and the trained runs over all the
    record's examples must start right after exactly those tokens, one run per assistant turn."""
    tokenizer = tokenizer or char_tokenizer(chat_template=template, chat_tokens=True)
    examples = prepare_examples([record], tokenizer, TargetSettings(**settings), use_cache=False)
    pairs = [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))]
    contexts = sorted(tuple(context) for ids, targets in pairs for context, _ in trained_runs(ids, targets))
    kwargs = {**(settings.get("chat_template_kwargs") or {}), **(record.get("chat_template_kwargs") or {})}
    # Tool-call arguments reach templates as objects (as vLLM passes them); transformers passes what it is given.
    messages = json.loads(json.dumps(record["messages"]))
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    prompts = sorted(
        tuple(
            tokenizer.apply_chat_template(
                messages[:k],
                tools=record.get("tools"),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **kwargs,
            )
        )
        for k, m in enumerate(messages)
        if m["role"] == "assistant"
    )
    assert contexts == prompts


# ---------------------------------------------------------------- Qwen3: thinking dropped from history


def test_qwen3_each_turn_gets_the_think_block_it_is_served_with():
    pairs, examples = examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)
    head = "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\nget_temp\n</tools><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    call = '<tool_call>\n{"name": "get_temp", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    assert pairs == expected_examples(
        # the whole render serves the last turn only: the greeting lost its thinking, the tool call has no think block
        head
        + "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        + call
        + "\n<|im_start|>user\n<tool_response>\n7C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n⟦<think>\nread it\n</think>\n\n7C in Oslo.<|im_end|>⟧\n",
        # the tool call as served: it is the last message, after the last user query, so it opens an empty think block
        head + "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        "⟦<think>\n\n</think>\n\n" + call + "⟧\n",
        # the greeting as served, with its thinking
        head + "<|im_start|>assistant\n⟦<think>\ngreet\n</think>\n\nYo<|im_end|>⟧\n",
    )
    assert examples.record_index.tolist() == [0, 0, 0]
    chat = examples.stats["chat"]
    assert (chat["turns_trained"], chat["records_split"], chat["extra_examples"]) == (3, 1, 2)
    assert chat["extra_tokens"] == len(pairs[1][0]) + len(pairs[2][0])


def test_qwen3_turns_after_the_last_query_share_the_whole_render():
    # With its own reasoning the tool call keeps its think block in the whole render too.
    pairs, examples = examples_of([{"messages": agent_chat(tool_reasoning="use it"), "tools": [TEMP_TOOL]}], QWEN3)
    head = "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\nget_temp\n</tools><|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert pairs == expected_examples(
        head + "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        '⟦<think>\nuse it\n</think>\n\n<tool_call>\n{"name": "get_temp", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>⟧\n'
        "<|im_start|>user\n<tool_response>\n7C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n⟦<think>\nread it\n</think>\n\n7C in Oslo.<|im_end|>⟧\n",
        head + "<|im_start|>assistant\n⟦<think>\ngreet\n</think>\n\nYo<|im_end|>⟧\n",
    )
    assert examples.stats["chat"]["extra_examples"] == 1


def test_qwen3_enable_thinking_false_from_the_record_or_the_config():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    want = expected_examples(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n⟦Yo<|im_end|>⟧\n"
    )
    assert examples_of([{"messages": chat, "chat_template_kwargs": {"enable_thinking": False}}], QWEN3)[0] == want
    assert examples_of([{"messages": chat, "chat_template_kwargs": '{"enable_thinking": false}'}], QWEN3)[0] == want
    assert examples_of([{"messages": chat}], QWEN3, chat_template_kwargs={"enable_thinking": False})[0] == want
    # the record's own arguments win over the dataset's
    thinking = {"messages": chat, "chat_template_kwargs": {"enable_thinking": True}}
    assert examples_of([thinking], QWEN3, chat_template_kwargs={"enable_thinking": False})[0] == expected_examples(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦<think>\n\n</think>\n\nYo<|im_end|>⟧\n"
    )


def test_final_render_mode_keeps_one_example_and_counts_what_it_leaves_untrained():
    pairs, examples = examples_of(
        [{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3, chat_examples="final_render"
    )
    assert pairs == examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)[0][:1]
    chat = examples.stats["chat"]
    assert (chat["turns_trained"], chat["turns_not_served"], chat["records_split"]) == (1, 2, 0)
    assert ("turns left untrained (chat_examples=final_render)", "2") in stats_rows(examples.stats)


# ---------------------------------------------------------------- harmony: channels and stop tokens


def test_harmony_trains_its_stop_tokens_and_the_analysis_it_is_served_with():
    pairs, examples = examples_of([{"messages": agent_chat(tool_reasoning="use it"), "tools": [TEMP_TOOL]}], HARMONY)
    head = "<|start|>system<|message|>Reasoning: medium<|end|><|start|>developer<|message|># Tools\nget_temp<|end|><|start|>user<|message|>Hi<|end|>"
    tool_call = (
        "<|channel|>analysis<|message|>use it<|end|>"
        '<|start|>assistant to=functions.get_temp<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
    )
    assert pairs == expected_examples(
        # Inference for the final answer feeds the tool call WITH its analysis (no final answer follows it yet);
        # the whole render drops that analysis, so this example is P_6 + C_6, and it serves the tool call too.
        head + "<|start|>assistant<|channel|>final<|message|>Yo<|end|><|start|>user<|message|>Temp in Oslo?<|end|>"
        "<|start|>assistant⟦"
        + tool_call
        + "⟧<|start|>functions.get_temp to=assistant<|channel|>commentary<|message|>7C<|end|>"
        "<|start|>assistant⟦<|channel|>analysis<|message|>read it<|end|><|start|>assistant<|channel|>final<|message|>7C in Oslo.<|return|>⟧",
        # the greeting ends with <|return|> when served, <|end|> in history
        head
        + "<|start|>assistant⟦<|channel|>analysis<|message|>greet<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>⟧",
    )
    chat = examples.stats["chat"]
    assert (chat["rule_rewritten_history"], chat["rule_prefix"], chat["extra_examples"]) == (1, 2, 1)


def test_harmony_template_arguments_and_reasoning_under_any_name():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "thinking": "greet"}]
    want = expected_examples(
        "<|start|>system<|message|>Reasoning: high<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
        "⟦<|channel|>analysis<|message|>greet<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>⟧"
    )
    for name in ("thinking", "reasoning_content", "reasoning"):
        record = {
            "messages": [chat[0], {"role": "assistant", "content": "Yo", name: "greet"}],
            "chat_template_kwargs": {"reasoning_effort": "high"},
        }
        assert examples_of([record], HARMONY)[0] == want, name


# ---------------------------------------------------------------- generation prompts that open the reply


def test_a_generation_prompt_that_opens_thinking_is_the_context_of_every_turn():
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo", "reasoning_content": "greet"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]
    pairs, _ = examples_of([{"messages": chat}], OPENS_THINK)
    # Before: the first reply was trained as "Yo<|im_end|>" after "<|im_start|>assistant\n", a prompt inference never feeds.
    assert pairs == expected_examples(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n⟦add\n</think>\n\n4<|im_end|>⟧\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n⟦greet\n</think>\n\nYo<|im_end|>⟧\n",
    )


def test_r1_reply_written_with_its_thinking_continues_the_generation_prompt():
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nYo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
    ]
    pairs, examples = examples_of([{"messages": chat}], R1)
    assert pairs == expected_examples(
        "<s><|User|>Hi<|Assistant|>\n\nYo</s><|User|>2+2?<|Assistant|><think>\n⟦add\n</think>\n\n4</s>⟧",
        "<s><|User|>Hi<|Assistant|><think>\n⟦greet\n</think>\n\nYo</s>⟧",
    )
    assert examples.stats["chat"]["rule_opened_reply"] == 2


def test_r1_reply_without_its_thinking_is_refused_naming_file_line_record_and_turn(tmp_path):
    data = tmp_path / "chats.jsonl"
    good = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        ]
    }
    bad = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    tokenizer = char_tokenizer(chat_template=R1, chat_tokens=True)
    with pytest.raises(DataError) as error:
        prepare_examples(str(data), tokenizer, use_cache=False)
    message = str(error.value)
    assert message.startswith(
        f"{data}:2, record 1, field 'messages[1]': the chat template cannot serve assistant turn messages[1]"
    )
    assert "the generation prompt ends with '<think>\\n'" in message and "fix:" in message
    skipped = prepare_examples(str(data), tokenizer, skip_invalid_records=True, use_cache=False)
    assert len(skipped) == 1 and sum(skipped.stats["skipped_invalid"].values()) == 1


# DeepSeek-V3.1 style: thinking switched by a template argument; every rendered reply is "</think>" + answer.
THINKING = {"thinking": True}
V31_CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>greet</think>Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>add</think>4"},
]


def test_v31_thinking_on_reasoning_inline_trains_the_answer_and_its_closing_tag_once():
    # The render writes "</think>" before the answer itself: the reply as written ends with "</think>4", and
    # only eos_token comes from the template. (Before: "add</think>4</think>4</s>", the answer trained twice.)
    pairs, examples = examples_of([{"messages": V31_CHAT, "chat_template_kwargs": THINKING}], V31)
    assert pairs == expected_examples(
        "<s><|User|>Hi<|Assistant|></think>Yo</s><|User|>2+2?<|Assistant|><think>⟦add</think>4</s>⟧",
        "<s><|User|>Hi<|Assistant|><think>⟦greet</think>Yo</s>⟧",
    )
    assert examples.stats["chat"]["rule_opened_reply"] == 2
    assert_every_turn_trained_once_as_served({"messages": V31_CHAT, "chat_template_kwargs": THINKING}, V31)


def test_v31_thinking_on_with_whitespace_the_template_does_not_echo_is_refused_not_trained_twice():
    # The answer as written ends in "\n", and the template renders it so: the reply still matches its render.
    ends_in_newline = [V31_CHAT[0], {"role": "assistant", "content": "<think>greet</think>Yo\n"}]
    pairs, _ = examples_of([{"messages": ends_in_newline}], V31, chat_template_kwargs=THINKING)
    assert pairs == expected_examples("<s><|User|>Hi<|Assistant|><think>⟦greet</think>Yo\n</s>⟧")
    # A template that trims the answer renders "</think>Yo</s>" for "Yo  ": no stretch of its render ends the
    # reply as written, so the turn is refused instead of trained as "greet</think>Yo  </think>Yo</s>".
    trims = V31.replace("{{- content + eos_token }}", "{{- content | trim + eos_token }}")
    padded = [V31_CHAT[0], {"role": "assistant", "content": "<think>greet</think>Yo  "}]
    with pytest.raises(DataError, match=r"messages\[1\].*cannot find the end of the reply as written"):
        examples_of([{"messages": padded}], trims, chat_template_kwargs=THINKING)


def test_an_answer_the_template_writes_again_after_the_reply_is_refused_not_trained_twice():
    echoes = V31.replace("{{- content + eos_token }}", "{{- content + eos_token + content }}")
    with pytest.raises(DataError, match=r"messages\[1\].*writes this turn's answer again after the reply"):
        examples_of([{"messages": V31_CHAT[:2]}], echoes, chat_template_kwargs=THINKING)


def test_v31_thinking_on_with_reasoning_in_reasoning_content_is_refused():
    # This template never reads reasoning_content, and the model is served to think first.
    chat = [V31_CHAT[0], {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]
    with pytest.raises(DataError, match=r"messages\[1\].*the generation prompt ends with '<think>'"):
        examples_of([{"messages": chat, "chat_template_kwargs": THINKING}], V31)


def test_v31_thinking_off_is_prefix_stable_and_refuses_reasoning_it_would_drop():
    plain = [{**m, "content": m["content"].split("</think>")[-1]} for m in V31_CHAT]
    pairs, examples = examples_of([{"messages": plain}], V31)
    assert pairs == expected_examples(
        "<s><|User|>Hi<|Assistant|></think>⟦Yo</s>⟧<|User|>2+2?<|Assistant|></think>⟦4</s>⟧"
    )
    assert examples.stats["chat"]["rule_prefix"] == 2
    assert examples_of([{"messages": plain, "chat_template_kwargs": {"thinking": False}}], V31)[0] == pairs
    inline = {"messages": V31_CHAT}
    in_field = {"messages": [V31_CHAT[0], {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]}
    for record in (inline, in_field):
        with pytest.raises(DataError, match=r"messages\[1\].*does not hold its reasoning"):
            examples_of([record], V31)


# ---------------------------------------------------------------- no end marker after the last reply

# GLM-4.5 style (examples/templates/, shared with the docs): a reply ends where the next <|user|> or <|observation|>
# begins, and generation stops on those (generation_config.json's eos_token_id); reasoning kept only after the last
# user message.
GLM = pathlib.Path(TEMPLATES, "glm_style.jinja").read_text(encoding="utf-8")

# Apertus style: <|assistant_end|> (the tokenizer's eos_token) is written only when a user message follows.
APERTUS = (
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '<|user_start|>' + m.content + '<|user_end|>' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|assistant_start|>' + m.content }}"
    "{%- if not loop.last and messages[loop.index0 + 1].role == 'user' %}{{- '<|assistant_end|>' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant_start|>' }}{%- endif %}"
)


def tokenizer_with_stops(tmp_path, template, stops, eos="</s>"):
    """The chat tokenizer saved with a generation_config.json whose eos_token_id lists `stops`, loaded back."""
    from transformers import AutoTokenizer

    char_tokenizer(chat_template=template, chat_tokens=True, eos=eos).save_pretrained(tmp_path)
    config = {"eos_token_id": [hand_ids(t, True)[0] for t in stops]}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(tmp_path))


def pairs_of(records, tokenizer):
    examples = prepare_examples(records, tokenizer, use_cache=False)
    return [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))], examples


def test_glm_style_turns_are_closed_by_the_stop_token_that_begins_the_next_message(tmp_path):
    from sftlab.data.chat import stop_tokens_of
    from sftlab.data.prepare import _cache_key
    from sftlab.data.workers import Recipe

    tokenizer = tokenizer_with_stops(tmp_path, GLM, ["</s>", "<|user|>", "<|observation|>"])
    assert stop_tokens_of(tokenizer) == {"</s>", "<|user|>", "<|observation|>"}
    # They shape the examples, so they are part of the cache key (the same tokenizer without them is another entry).
    without = [char_tokenizer(chat_template=GLM, chat_tokens=True) for _ in range(2)]
    keys = [_cache_key("data", Recipe(t, TargetSettings())) for t in [tokenizer, *without]]
    assert keys[0] != keys[1] == keys[2]
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo", "reasoning_content": "greet"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"},
    ]
    pairs, examples = pairs_of([{"messages": chat}], tokenizer)
    # Each reply is trained through the <|user|> the model writes to stop; the first reply loses its reasoning in
    # history (and once a message follows it), so it is served in an example of its own.
    assert pairs == expected_examples(
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nYo<|user|>\n2+2?<|assistant|>"
        "⟦\n<think>add</think>\n4<|user|>⟧",
        "[gMASK]<sop><|user|>\nHi<|assistant|>⟦\n<think>greet</think>\nYo<|user|>⟧",
    )
    # Reasoning tags that are plain text: the rewritten turn is found by its answer in the render that follows it.
    plain_tags = GLM.replace("<think>", "[t]").replace("</think>", "[/t]")
    pairs, _ = pairs_of(
        [{"messages": chat[:2]}],
        tokenizer_with_stops(tmp_path / "plain", plain_tags, ["</s>", "<|user|>", "<|observation|>"]),
    )
    assert pairs == expected_examples("[gMASK]<sop><|user|>\nHi<|assistant|>⟦\n[t]greet[/t]\nYo<|user|>⟧")
    # A tool call is closed by <|observation|>, the final answer by <|user|>; the render serves both in one example.
    tools = [
        {"role": "user", "content": "Temp?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_temp", "content": "7C"},
        {"role": "assistant", "content": "7C."},
    ]
    pairs, examples = pairs_of([{"messages": tools}], tokenizer)
    assert pairs == expected_examples(
        "[gMASK]<sop><|user|>\nTemp?<|assistant|>"
        "⟦\n<think></think>\n<tool_call>get_temp\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call>"
        "<|observation|>⟧"
        "\n<tool_response>7C</tool_response><|assistant|>⟦\n<think></think>\n7C.<|user|>⟧"
    )
    assert examples.stats["chat"]["turns_trained"] == 2


def test_glm_style_generation_prompts_stop_on_the_token_training_ends_replies_with(tmp_path):
    from sftlab.data.chat import ChatRenderer
    from sftlab.data.prompts import reply_stop_ids

    tokenizer = tokenizer_with_stops(tmp_path, GLM, ["</s>", "<|user|>", "<|observation|>"])
    # A reply ends where <|user|> begins, a tool call where <|observation|> does (the stop rule probes both).
    assert reply_stop_ids(tokenizer, ChatRenderer(tokenizer, GLM)) == sorted(
        hand_ids("</s><|user|><|observation|>", True)
    )


def test_final_render_mode_trains_the_last_reply_through_the_token_a_next_message_writes(tmp_path):
    tokenizer = tokenizer_with_stops(tmp_path, GLM, ["</s>", "<|user|>", "<|observation|>"])
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    want = expected_examples(
        "[gMASK]<sop><|user|>\nHi<|assistant|>⟦\n<think></think>\nYo<|user|>⟧\n2+2?"
        "<|assistant|>⟦\n<think></think>\n4<|user|>⟧"
    )
    for mode in ("as_served", "final_render"):
        settings = TargetSettings(chat_examples=mode)
        examples = prepare_examples([{"messages": chat}], tokenizer, settings, use_cache=False)
        assert [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))] == want, mode
        assert examples.stats["chat"]["turns_trained"] == 2 and examples.stats["chat"]["turns_not_served"] == 0


def test_the_docs_example_of_a_template_without_end_marker_still_renders():
    # docs/render_examples.py renders it with SmolLM2's tokenizer (not installed in CI); here with the tiny one.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_examples", os.path.join(TEMPLATES, "..", "..", "docs", "render_examples.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    block = module.no_end_marker(char_tokenizer(chat_template=CHATML))["as_served_glm"]
    assert "# example 1: trains messages [3, 5]" in block and "Paris?<|assistant|>⟦" in block
    assert "21C and sunny.<|user|>⟧" in block and "</tool_call><|observation|>⟧" in block


def test_the_docs_examples_of_the_reasoning_options_still_render():
    # docs/render_examples.py renders them with SmolLM2's tokenizer; here with the tiny one (one token per character).
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_examples", os.path.join(TEMPLATES, "..", "..", "docs", "render_examples.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    blocks = module.reasoning(char_tokenizer(chat_template=CHATML))
    assert "<|Assistant|><think>⟦</think>⟧⟦4⟧⟦</s>⟧" in blocks["reasoning_when_missing"]
    assert "<|Assistant|></think>⟦4⟧⟦</s>⟧" in blocks["reasoning_when_dropped"]
    assert "⟦<think>⟧⟦↵\n⟧Add·them.⟦↵\n⟧⟦</think>⟧" in blocks["train_on_reasoning"]  # · a token of spaces
    assert "assistant↵\n5<|im_end|>" in blocks["message_weight"] and "⟦4⟧⟦.⟧⟦<|im_end|>⟧" in blocks["message_weight"]


def test_apertus_style_last_reply_is_closed_by_the_end_token_a_next_user_message_gets():
    tokenizer = char_tokenizer(chat_template=APERTUS, chat_tokens=True, eos="<|assistant_end|>")
    pairs, _ = pairs_of([{"messages": CHATML_CHAT}], tokenizer)
    assert pairs == expected_examples(
        "<|user_start|>Hi<|user_end|><|assistant_start|>⟦Yo<|assistant_end|>⟧"
        "<|user_start|>2+2?<|user_end|><|assistant_start|>⟦4<|assistant_end|>⟧"
    )


def test_a_next_message_token_that_does_not_stop_generation_is_not_trained():
    # Without the generation config, <|user|> is not a stop token: the GLM-style reply has no marker to end with.
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    with pytest.raises(DataError, match=r"messages\[1\].*does not end with an end-of-turn token.*generation_config"):
        examples_of([{"messages": chat}], GLM)


# ---------------------------------------------------------------- content as a list of parts

# Mistral style, reading content parts: text as written, a thinking part inside [THINK]...[/THINK].
MISTRAL_PARTS = (
    "{%- macro content(c) %}{%- if c is string %}{{- c }}{%- else %}{%- for b in c %}"
    "{%- if b.type == 'text' %}{{- b.text }}{%- elif b.type == 'thinking' %}{{- '[THINK]' + b.thinking + '[/THINK]' }}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{{- bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}{{- '[INST]' + content(m.content) + '[/INST]' }}"
    "{%- else %}{{- content(m.content) + eos_token }}{%- endif %}{%- endfor %}"
)


def text(*parts: str) -> list[dict]:
    return [{"type": "text", "text": p} for p in parts]


def test_text_parts_are_joined_for_a_template_that_reads_strings():
    chat = [{"role": "user", "content": text("Hi")}, {"role": "assistant", "content": text("Yo", "!")}]
    pairs, _ = examples_of([{"messages": chat}], CHATML)
    # joined with "\n", as vLLM joins the text parts for such templates
    assert pairs == expected_examples("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Yo\n!<|im_end|>⟧\n")
    as_strings = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo\n!"}]
    assert examples_of([{"messages": as_strings}], CHATML)[0] == pairs


def test_parts_reach_a_template_that_reads_them_with_their_thinking():
    thinks = [{"type": "thinking", "thinking": "add"}, {"type": "text", "text": "4"}]
    record = {"messages": [{"role": "user", "content": text("2+2?")}, {"role": "assistant", "content": thinks}]}
    pairs, _ = examples_of([record], MISTRAL_PARTS)
    assert pairs == expected_examples("<s>[INST]2+2?[/INST]⟦[THINK]add[/THINK]4</s>⟧")
    assert_every_turn_trained_once_as_served(record, MISTRAL_PARTS)
    # A template that reads strings gets the thinking as the message's reasoning (Qwen3 renders it in <think>).
    pairs, _ = examples_of([record], QWEN3)
    assert pairs == expected_examples(
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nadd\n</think>\n\n4<|im_end|>⟧\n"
    )


def test_a_thinking_part_the_template_drops_is_refused():
    # reads text parts, skips every other part
    text_only = CHATML.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join) + '<|im_end|>'",
    )
    thinks = [{"type": "thinking", "thinking": "add"}, {"type": "text", "text": "4"}]
    chat = [{"role": "user", "content": text("2+2?")}, {"role": "assistant", "content": thinks}]
    with pytest.raises(DataError, match=r"messages\[1\].*does not hold its reasoning"):
        examples_of([{"messages": chat}], text_only)


def test_a_part_that_is_not_text_is_refused_naming_the_record_and_the_part():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    chat = [{"role": "user", "content": text("What is it?") + [image]}, {"role": "assistant", "content": "A cat."}]
    with pytest.raises(
        DataError,
        match=r"record 1, field 'messages\[0\]\.content\[1\]\.type': a 'image_url' "
        r"content part cannot be trained on",
    ):
        examples_of([{"messages": CHATML_CHAT}, {"messages": chat}], CHATML)
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.content\[0\]\.text': must be a string"):
        examples_of([{"messages": [chat[1], {"role": "assistant", "content": [{"type": "text", "text": 4}]}]}], CHATML)


# ---------------------------------------------------------------- content as a mapping (Apertus blocks)

# Apertus style (examples/templates/, shared with the docs): {"text"} system, {"parts"} user, {"blocks"} replies;
# thoughts in <|inner_prefix|>, a response after them behind <|inner_suffix|>, tool calls as JSON text in
# <|tools_prefix|>[...]<|tools_suffix|>, <|assistant_end|> only before a user message.
APERTUS_BLOCKS = pathlib.Path(TEMPLATES, "apertus_style.jinja").read_text(encoding="utf-8")
APERTUS_STOPS = ["<|assistant_end|>", "<|tools_suffix|>"]  # generation_config.json's eos_token_id, as Apertus's


def blocks(*items: tuple[str, str]) -> dict:
    """A reply's content as Apertus writes it: ("thoughts" | "response", text) or ("call", name) blocks."""
    made = []
    for kind, value in items:
        if kind == "call":
            made.append({"type": "tool_calls", "calls": [{"name": value, "arguments": '{"city": "Oslo"}'}]})
        elif kind == "outputs":
            made.append({"type": "tool_outputs", "outputs": [{"output": value}]})
        else:
            made.append({"type": kind, "text": value})
    return {"blocks": made}


APERTUS_CHAT = [
    {"role": "system", "content": {"text": "Be brief."}},
    {"role": "user", "content": {"parts": [{"type": "text", "text": "Hi"}]}},
    {"role": "assistant", "content": blocks(("thoughts", "greet"), ("response", "Yo"))},
    {"role": "user", "content": "Temp in Oslo?"},
    {"role": "assistant", "content": blocks(("thoughts", "use get_temp"), ("call", "get_temp"))},
]
APERTUS_HEAD = "<s><|system_start|>Be brief.<|system_end|><|user_start|>Hi<|user_end|><|assistant_start|>"
APERTUS_MIDDLE = "<|user_start|>Temp in Oslo?<|user_end|><|assistant_start|>"
APERTUS_CALL = '<|tools_prefix|>[{"get_temp": {"city": "Oslo"}}]<|tools_suffix|>'


def test_apertus_blocks_are_rendered_as_given_and_each_turn_trained_as_served(tmp_path):
    tokenizer = tokenizer_with_stops(tmp_path, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    record = {"messages": APERTUS_CHAT}
    pairs, examples = pairs_of([record], tokenizer)
    # The thinking reply is closed by the <|assistant_end|> the next user message gets; the tool call by the
    # <|tools_suffix|> it ends with (a stop token). One render serves both turns.
    assert pairs == expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|>greet<|inner_suffix|>Yo<|assistant_end|>⟧"
        "" + APERTUS_MIDDLE + "⟦<|inner_prefix|>use get_temp" + APERTUS_CALL + "⟧"
    )
    chat = examples.stats["chat"]
    assert (chat["turns_trained"], chat["rule_prefix"], chat["records_split"]) == (2, 2, 0)
    assert_every_turn_trained_once_as_served(record, APERTUS_BLOCKS, tokenizer=tokenizer)
    # Parts are read in the mapping as written: back to back, not joined with "\n" as a list's are for strings.
    two_parts = json.loads(json.dumps(APERTUS_CHAT[:3]))
    two_parts[1]["content"]["parts"] = [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]
    assert pairs_of([{"messages": two_parts}], tokenizer)[0] == expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|>greet<|inner_suffix|>Yo<|assistant_end|>⟧"
    )


def test_apertus_thoughts_are_the_reasoning_train_on_reasoning_false_keeps_them_as_context(tmp_path):
    tokenizer = tokenizer_with_stops(tmp_path, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    settings = TargetSettings(train_on_reasoning=False)
    examples = prepare_examples([{"messages": APERTUS_CHAT}], tokenizer, settings, use_cache=False)
    # The thoughts' text is context; <|inner_prefix|>, <|inner_suffix|>, the answer, the call and the end stay trained.
    assert [(examples[0][0].tolist(), examples[0][1].tolist())] == expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|>⟧greet⟦<|inner_suffix|>Yo<|assistant_end|>⟧"
        "" + APERTUS_MIDDLE + "⟦<|inner_prefix|>⟧use get_temp⟦" + APERTUS_CALL + "⟧"
    )
    chat = examples.stats["chat"]
    assert (chat["turns_reasoning_context"], chat["reasoning_tokens_context"]) == (
        2,
        len("greet") + len("use get_temp"),
    )


def test_apertus_thoughts_the_template_drops_are_refused_or_trained_as_rendered(tmp_path):
    drops = APERTUS_BLOCKS.replace(
        "{{- b.text -}}\n                {%- elif b.type == 'response'", "{%- elif b.type == 'response'"
    )
    assert drops != APERTUS_BLOCKS
    tokenizer = tokenizer_with_stops(tmp_path, drops, APERTUS_STOPS, eos="<|assistant_end|>")
    record = {"messages": APERTUS_CHAT[:3]}
    with pytest.raises(DataError, match=r"messages\[2\].*does not hold its reasoning.*reasoning_when_dropped"):
        pairs_of([record], tokenizer)
    settings = TargetSettings(reasoning_when_dropped="as_rendered")
    examples = prepare_examples([record], tokenizer, settings, use_cache=False)
    assert [(examples[0][0].tolist(), examples[0][1].tolist())] == expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|><|inner_suffix|>Yo<|assistant_end|>⟧"
    )
    assert examples.stats["chat"]["turns_reasoning_dropped"] == 1


def test_apertus_tool_results_stay_context(tmp_path):
    tokenizer = tokenizer_with_stops(tmp_path, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    answer = {"role": "assistant", "content": blocks(("response", "7C in Oslo."))}
    after_tool = APERTUS_CHAT + [{"role": "tool", "content": "7C"}, answer]
    # Apertus's generation prompt after a tool result opens a new <|assistant_start|> that its history never writes
    # (the reply continues the turn): that reply has no served form, and is refused naming it.
    with pytest.raises(
        DataError, match=r"record 0, field 'messages\[6\]'.*generation prompt ends with '<\|assistant_start\|>'"
    ):
        pairs_of([{"messages": after_tool}], tokenizer)
    # Kept as context, it follows the trained tool call; the result is written inside the turn, in brackets.
    after_tool[-1] = {**answer, "train": False}
    rest = "[7C]<|inner_suffix|>7C in Oslo."
    want = expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|>greet<|inner_suffix|>Yo<|assistant_end|>⟧"
        "" + APERTUS_MIDDLE + "⟦<|inner_prefix|>use get_temp" + APERTUS_CALL + "⟧" + rest
    )
    assert pairs_of([{"messages": after_tool}], tokenizer)[0] == want
    # A tool_outputs block inside a trained reply would train the model to write the tool's result: refused; as
    # context it renders as the tool message does.
    inside = APERTUS_CHAT[:4] + [
        {
            "role": "assistant",
            "content": blocks(
                ("thoughts", "use get_temp"), ("call", "get_temp"), ("outputs", "7C"), ("response", "7C in Oslo.")
            ),
        }
    ]
    with pytest.raises(
        DataError,
        match=r"record 0, field 'messages\[4\]'.*holds a tool_outputs block.*found tool output '7C'.*"
        r"fix: end the reply with its tool_calls block",
    ):
        pairs_of([{"messages": inside}], tokenizer)
    inside[4] = {**inside[4], "train": False}
    pairs, _ = pairs_of([{"messages": inside}], tokenizer)
    assert pairs == expected_examples(
        APERTUS_HEAD + "⟦<|inner_prefix|>greet<|inner_suffix|>Yo<|assistant_end|>⟧"
        "" + APERTUS_MIDDLE + "<|inner_prefix|>use get_temp" + APERTUS_CALL + rest
    )


def test_apertus_eval_prompts_feed_the_prompt_and_expect_the_response_text(tmp_path):
    from sftlab.data.prompts import generation_prompts

    tokenizer = tokenizer_with_stops(tmp_path, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    prompts = generation_prompts([{"messages": APERTUS_CHAT[:3]}], tokenizer, limit=1)
    (prompt,) = prompts.prompts
    assert prompt.input_ids == hand_ids(APERTUS_HEAD, True) and prompt.reference == "Yo"  # the response, no thoughts
    assert prompts.stop_token_ids == sorted(hand_ids("<|assistant_end|><|tools_suffix|>", True))
    unread = [{"role": "user", "content": {"parts": [{"type": "text", "text": "Hi"}]}}, APERTUS_CHAT[2]]
    with pytest.raises(DataError, match=r"record 0, field 'messages\[0\]\.content': its content is a mapping"):
        generation_prompts([{"messages": unread}], char_tokenizer(chat_template=CHATML, chat_tokens=True), limit=1)


def test_the_docs_example_of_content_as_a_mapping_still_renders():
    # docs/render_examples.py renders it with SmolLM2's tokenizer (not installed in CI); here with the tiny one.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "render_examples", os.path.join(TEMPLATES, "..", "..", "docs", "render_examples.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    block = module.content_mapping(char_tokenizer(chat_template=CHATML))["content_mapping"]
    assert "# example 1: trains messages [2, 4]" in block
    assert (
        "<|assistant_start|>⟦<|inner_prefix|>A greeting.<|inner_suffix|>Hello! How can I help?<|assistant_end|>⟧"
        in block
    )
    assert '<|tools_prefix|>[{"get_weather": {"city": "Paris"}}]<|tools_suffix|>⟧' in block
    assert "⟦<|inner_prefix|>⟧A·greeting.⟦<|inner_suffix|>⟧⟦H⟧" in block  # one token per character here
    assert "the reasoning of 1 turn as context, 11 tokens" in block


def test_apertus_blocks_as_preference_replies(tmp_path):
    from sftlab.data.preference import prepare_pairs

    tokenizer = tokenizer_with_stops(tmp_path, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    record = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": blocks(("thoughts", "add"), ("response", "4"))}],
        "rejected": [{"role": "assistant", "content": blocks(("thoughts", "guess"), ("response", "5"))}],
    }
    pairs = prepare_pairs([record], tokenizer, TargetSettings(), use_cache=False)
    assert [list(map(int, part)) for part in pairs[0]] == [
        hand_ids("<s><|user_start|>2+2?<|user_end|><|assistant_start|>", True),
        hand_ids("<|inner_prefix|>add<|inner_suffix|>4<|assistant_end|>", True),
        hand_ids("<|inner_prefix|>guess<|inner_suffix|>5<|assistant_end|>", True),
    ]


# ChatML writes content with "+": a mapping fails there; with "| string" it would be written as a Python dict.
PRINTS_CONTENT = CHATML.replace("message['content'] + '<|im_end|>'", "(message['content'] | string) + '<|im_end|>'")


@pytest.mark.parametrize("template", [CHATML, PRINTS_CONTENT], ids=["fails-on-it", "prints-it"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_mapping_the_template_does_not_read_is_refused_naming_record_field_and_fix(template, position):
    assert PRINTS_CONTENT.count("| string") == 2
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    chat[position] = {**chat[position], "content": APERTUS_CHAT[position]["content"]}
    shape = next(iter(chat[position]["content"]))
    with pytest.raises(
        DataError,
        match=rf"record 1, field 'messages\[{position}\]\.content': .*its content is a mapping \(\{{'{shape}': "
        r"\.\.\.\}\), and the chat template does not read one.*fix: give the content as a string",
    ):
        examples_of([{"messages": CHATML_CHAT}, {"messages": chat}], template)
    # Counted and skipped on request, like any record the template cannot serve.
    pairs, examples = examples_of([{"messages": CHATML_CHAT}, {"messages": chat}], template, skip_invalid_records=True)
    assert len(pairs) == 1 and examples.record_index.tolist() == [0]
    assert sum(examples.stats["skipped_invalid"].values()) == 1


@pytest.mark.parametrize(
    "content, field, problem",
    [
        ({"text": "x", "blocks": []}, r"messages\[1\]\.content", "exactly one of 'text', 'parts' or 'blocks'"),
        ({"answer": "x"}, r"messages\[1\]\.content", "exactly one of 'text', 'parts' or 'blocks'"),
        ({"blocks": "x"}, r"messages\[1\]\.content\.blocks", "must be a list"),
        ({"blocks": [{"type": "image"}]}, r"messages\[1\]\.content\.blocks\[0\]", "must be a block of a reply"),
        ({"blocks": [{"type": "thoughts", "text": 4}]}, r"messages\[1\]\.content\.blocks\[0\]\.text", "string"),
        (
            {"blocks": [{"type": "tool_calls", "calls": []}]},
            r"messages\[1\]\.content\.blocks\[0\]\.calls",
            "must be a non-empty list",
        ),
        (
            {"blocks": [{"type": "tool_calls", "calls": [{"arguments": "{}"}]}]},
            r"messages\[1\]\.content\.blocks\[0\]\.calls\[0\]\.name",
            "needs a name",
        ),
        (
            {"blocks": [{"type": "tool_outputs", "outputs": ["7C"]}]},
            r"messages\[1\]\.content\.blocks\[0\]\.outputs\[0\]",
            "must be a tool output",
        ),
        ({"parts": [{"type": "image_url"}]}, r"messages\[1\]\.content\.parts\[0\]\.type", "cannot be trained on"),
    ],
)
def test_a_malformed_mapping_is_refused_naming_the_field(content, field, problem):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]
    with pytest.raises(DataError, match=rf"record 0, field '{field}': .*{problem}"):
        examples_of([{"messages": chat}], APERTUS_BLOCKS)


def test_inspect_shows_an_apertus_blocks_record(tmp_path, capsys):
    from transformers import LlamaConfig

    from sftlab.cli import main as cli_main

    model = tmp_path / "model"
    tokenizer = tokenizer_with_stops(model, APERTUS_BLOCKS, APERTUS_STOPS, eos="<|assistant_end|>")
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(model)
    data = tmp_path / "apertus.jsonl"
    data.write_text(json.dumps({"messages": APERTUS_CHAT}) + "\n")
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: {model}\ntrain_data: {data}\nuse_cache: false\ntrain_on_reasoning: false\n")
    assert cli_main(["inspect", str(config), "--json", "-n", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    tokens = printed["examples"][0]["tokens"]
    plain, ids, targets, _ = marked(
        APERTUS_HEAD + "⟦<|inner_prefix|>⟧greet⟦<|inner_suffix|>Yo<|assistant_end|>⟧"
        "" + APERTUS_MIDDLE + "⟦<|inner_prefix|>⟧use get_temp⟦" + APERTUS_CALL + "⟧",
        chat_tokens=True,
    )
    assert "".join(t["text"] for t in tokens) == plain and [t["id"] for t in tokens] == ids
    assert [t["target"] for t in tokens] == [False] + [target != X for target in targets[:-1]]
    chat = printed["stats"]["chat"]
    assert (chat["turns_trained"], chat["turns_reasoning_context"], chat["reasoning_tokens_context"]) == (2, 2, 17)


# ---------------------------------------------------------------- tools reach the template


def tool_records(**extra):
    messages = [
        {"role": "user", "content": "Temp in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "name": "get_temp", "content": "7C"},
        {"role": "assistant", "content": "7C."},
    ]
    return {"messages": messages, **extra}


LLAMA_EXPECTED = (
    "<s><|start_header_id|>user<|end_header_id|>\n\nFunctions:\n" + json.dumps(TEMP_TOOL) + "\nTemp in Oslo?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n⟦"
    + json.dumps({"name": "get_temp", "arguments": {"city": "Oslo"}})
    + "<|eot_id|>⟧"
    "<|start_header_id|>tool<|end_header_id|>\n\n7C<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n⟦7C.<|eot_id|>⟧"
)


@pytest.mark.parametrize(
    "record, settings",
    [
        (tool_records(tools=[TEMP_TOOL]), {}),
        (tool_records(tools=json.dumps([TEMP_TOOL])), {}),  # tools as JSON text (datasets store them so)
        (tool_records(), {"tools": [TEMP_TOOL]}),  # dataset-wide tools
        (
            tool_records(tools=[TEMP_TOOL]),
            {"tools": [{"type": "function", "function": {"name": "other"}}]},
        ),  # the record's win
    ],
    ids=["list", "json-text", "config", "record-wins"],
)
def test_tools_are_rendered_into_the_prompt(record, settings):
    pairs, _ = examples_of([record], LLAMA_TOOLS, **settings)
    assert pairs == expected_examples(LLAMA_EXPECTED)
    assert_every_turn_trained_once_as_served({**record, "tools": [TEMP_TOOL]}, LLAMA_TOOLS, **settings)


def test_tool_call_arguments_as_object_or_text_and_empty_content_are_one_thing():
    as_text = tool_records(tools=[TEMP_TOOL])
    as_object = json.loads(json.dumps(as_text))
    as_object["messages"][1] = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "function": {"name": "get_temp", "arguments": {"city": "Oslo"}}}],
    }
    assert (
        examples_of([as_text], LLAMA_TOOLS)[0]
        == examples_of([as_object], LLAMA_TOOLS)[0]
        == expected_examples(LLAMA_EXPECTED)
    )


# DeepSeek style: a tool call's arguments joined to the text as they are, so the template reads JSON text.
JOINS_TEXT = (
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '<|User|>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{- '<|Assistant|>' + m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    "{{- '<tool_call>' + c.function.name + '\\n' + c.function.arguments + '</tool_call>' }}"
    "{%- endfor %}{{- eos_token }}{%- elif m.role == 'tool' %}{{- '<tool_response>' + m.content + '</tool_response>' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|Assistant|>' }}{%- endif %}"
)
JOINS_EXPECTED = (
    '<|User|>Temp in Oslo?<|Assistant|>⟦<tool_call>get_temp\n{"city": "Oslo"}</tool_call></s>⟧'
    "<tool_response>7C</tool_response><|Assistant|>⟦7C.</s>⟧"
)


@pytest.mark.parametrize(
    "arguments", ['{"city": "Oslo"}', '{"city":"Oslo"}', {"city": "Oslo"}], ids=["text", "compact-text", "object"]
)
@pytest.mark.parametrize(
    "template, want", [(LLAMA_TOOLS, LLAMA_EXPECTED), (JOINS_TEXT, JOINS_EXPECTED)], ids=["reads-objects", "joins-text"]
)
def test_tool_call_arguments_in_the_form_the_template_reads(template, want, arguments):
    # A probe call rendered both ways decides: Llama's tojson gets an object, DeepSeek's join gets JSON text;
    # either way the arguments are written as JSON once (never a Python dict, never JSON inside a JSON string).
    record = tool_records(tools=[TEMP_TOOL])
    call = {"type": "function", "function": {"name": "get_temp", "arguments": arguments}}
    record["messages"][1]["tool_calls"] = [call]
    assert examples_of([record], template)[0] == expected_examples(want)


def test_a_template_that_writes_arguments_wrongly_either_way_is_refused():
    twice = JOINS_TEXT.replace("c.function.arguments", "(c.function.arguments | tojson | tojson)")
    with pytest.raises(
        DataError,
        match=r"record 0, field 'chat_template': .*renders tool-call arguments neither from "
        r"an object nor from JSON text as JSON once",
    ):
        examples_of([tool_records()], twice)


def test_bad_tool_calls_are_named():
    record = tool_records()
    record["messages"][1]["tool_calls"] = [
        {"type": "function", "function": {"name": "get_temp", "arguments": "{city: Oslo}"}}
    ]
    with pytest.raises(
        DataError,
        match=r"record 0, field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': arguments are not valid JSON",
    ):
        examples_of([record], LLAMA_TOOLS)
    record["messages"][1]["tool_calls"] = [{"type": "function", "function": {"arguments": {}}}]
    with pytest.raises(
        DataError, match=r"field 'messages\[1\]\.tool_calls\[0\]\.function\.name': a tool call needs a function name"
    ):
        examples_of([record], LLAMA_TOOLS)
    with pytest.raises(DataError, match=r"field 'tools': is not valid JSON"):
        examples_of([tool_records(tools="[{")], LLAMA_TOOLS)


def test_a_template_failing_on_a_record_in_python_is_a_clear_error():
    # Adds a number to text whatever form the arguments come in (a template joining them as text, as DeepSeek's
    # do, now gets them as text: see test_tool_call_arguments_in_the_form_the_template_reads).
    joins = (
        "{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}"
        "{{ '<|call|>' + c.function.arguments | length }}"
        "{% endfor %}{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>' }}{% endif %}"
    )
    with pytest.raises(
        DataError,
        match=r"record 0, field 'chat_template': the chat template failed on this record; "
        r"found TemplateError: TypeError: can only concatenate str",
    ):
        examples_of([tool_records()], joins)


# ---------------------------------------------------------------- which messages are trained


CHATML_CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
CHATML_TEXT = "<|im_start|>user\n{0}Hi{1}\n<|im_start|>assistant\n{2}Yo<|im_end|>{3}\n<|im_start|>user\n{4}2+2?{5}\n<|im_start|>assistant\n{6}4<|im_end|>{7}\n"


def chatml_marked(*trained: int) -> str:
    """CHATML_CHAT's render with messages `trained` between ⟦ ⟧ (a user message: its content and <|im_end|>)."""
    marks = []
    for i in range(4):
        open_, close = ("⟦", "⟧") if i in trained else ("", "")
        marks += [open_, ("<|im_end|>" + close) if i % 2 == 0 else close]
    return CHATML_TEXT.format(*marks)


def test_a_message_marked_train_false_is_context_only():
    chat = [dict(m) for m in CHATML_CHAT]
    chat[1]["train"] = False
    pairs, _ = examples_of([{"messages": chat}], "chatml", chat_template="chatml")
    assert pairs == expected_examples(chatml_marked(3))


def test_train_on_roles_and_a_user_message_marked_train_true():
    pairs, _ = examples_of(
        [{"messages": CHATML_CHAT}], None, chat_template="chatml", train_on_roles=("assistant", "user")
    )
    assert pairs == expected_examples(chatml_marked(0, 1, 2, 3))
    chat = [dict(m) for m in CHATML_CHAT]
    chat[2]["train"] = True
    assert examples_of([{"messages": chat}], None, chat_template="chatml")[0] == expected_examples(
        chatml_marked(1, 2, 3)
    )


def test_train_flag_must_be_a_boolean():
    chat = [dict(m) for m in CHATML_CHAT]
    chat[1]["train"] = "no"
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.train': must be true or false"):
        examples_of([{"messages": chat}], None, chat_template="chatml")


# ---------------------------------------------------------------- the self-check


DROPS_REASONING = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, problem",
    [
        # renders the reply only when another message follows: the last turn's span holds no reply
        (
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if not loop.last %}{{ m.content }}{% endif %}{{ '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            "does not hold its content",
        ),
        # writes only the header for a last reply (Qwen3's multi-turn bug had this shape): the span is empty
        (
            "{% for m in messages %}{% if loop.last and m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
            "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            "the turn's trained text is empty",
        ),
        # writes the reply but nothing after it: the model would never learn to stop
        (
            "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
            "does not end with an end-of-turn token",
        ),
        (DROPS_REASONING, "does not hold its reasoning"),
    ],
    ids=["reply-missing", "empty-span", "no-end-marker", "reasoning-dropped"],
)
def test_the_self_check_refuses_a_turn_that_would_train_wrongly(template, problem):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    if "reasoning" in problem:
        record["messages"][1]["reasoning_content"] = "greet"
    with pytest.raises(
        DataError,
        match=rf"^list\(1 records\), record 0, field 'messages\[1\]': the chat template cannot serve assistant turn messages\[1\] "
        rf"as written: .*{problem}",
    ):
        examples_of([record], template)


def test_a_turn_that_fails_the_self_check_is_counted_and_skipped_on_request():
    with_reasoning = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo", "reasoning_content": "greet"},
        ]
    }
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    pairs, examples = examples_of([with_reasoning, plain], DROPS_REASONING, skip_invalid_records=True)
    assert pairs == expected_examples("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Yo<|im_end|>⟧\n")
    assert examples.record_index.tolist() == [1]
    assert examples.stats["skipped_invalid"] == {
        "chat template cannot serve messages[]: the turn's trained text does not hold its reasoning": 1
    }


# ---------------------------------------------------------------- reported where users look


def test_inspect_and_the_training_log_report_the_split():
    _, examples = examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)
    rows = dict(stats_rows(examples.stats))
    assert rows["conversation turns trained"] == "3"
    assert rows["  records split to serve every turn"] == "1"
    assert rows["  extra examples"] == "2"
    assert rows["  extra tokens"] == str(examples.stats["chat"]["extra_tokens"])
    assert _chat_summary(examples.stats["chat"]) == (
        f"; 3 conversation turns trained, 1 records split as served into 2 extra examples (+{examples.stats['chat']['extra_tokens']} tokens)"
    )


# ---------------------------------------------------------------- the rule, checked against transformers' renders


@pytest.mark.parametrize(
    "template, record",
    [
        (QWEN3, {"messages": agent_chat(), "tools": [TEMP_TOOL]}),
        (QWEN3, {"messages": agent_chat(tool_reasoning="use it"), "tools": [TEMP_TOOL]}),
        (
            QWEN3,
            {
                "messages": without_reasoning(agent_chat()),
                "chat_template_kwargs": {"enable_thinking": False},
                "tools": [TEMP_TOOL],
            },
        ),
        (HARMONY, {"messages": agent_chat(tool_reasoning="use it"), "tools": [TEMP_TOOL]}),
        (
            HARMONY,
            {"messages": agent_chat(), "tools": [TEMP_TOOL], "chat_template_kwargs": {"reasoning_effort": "low"}},
        ),
        (OPENS_THINK, {"messages": [m for m in agent_chat() if not m.get("tool_calls") and m["role"] != "tool"][1:]}),
        (
            R1,
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nYo"},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
                ]
            },
        ),
        (LLAMA_TOOLS, tool_records(tools=[TEMP_TOOL])),
    ],
    ids=[
        "qwen3",
        "qwen3-tool-reasoning",
        "qwen3-no-thinking",
        "harmony",
        "harmony-low",
        "opens-think",
        "r1",
        "llama-tools",
    ],
)
def test_every_assistant_turn_is_trained_once_after_exactly_what_inference_feeds(template, record):
    assert_every_turn_trained_once_as_served(record, template)


# ---------------------------------------------------------------- end to end


def test_train_and_inspect_on_a_history_rewriting_template(tmp_path, capsys):
    from sftlab import SFTConfig, train
    from sftlab.cli import main as cli_main
    from tiny_models import save_tiny_llama

    tokenizer = char_tokenizer(chat_template=QWEN3, chat_tokens=True)
    model = save_tiny_llama(str(tmp_path / "model"), tokenizer)
    data = tmp_path / "agent.jsonl"
    data.write_text("".join(json.dumps({"messages": agent_chat(), "tools": [TEMP_TOOL]}) + "\n" for _ in range(3)))
    result = train(
        SFTConfig(
            model=model,
            train_data=str(data),
            output_dir=str(tmp_path / "run"),
            max_steps=2,
            per_device_train_batch_size=3,
            logging_steps=1,
            use_cache=False,
        )
    )
    summary = [r for r in result.history if r["type"] == "data"][0]
    assert summary["examples"] == 9 and summary["chat"]["records_split"] == 3 and summary["chat"]["extra_examples"] == 6
    assert all(r["supervised_tokens"] > 0 for r in result.history if r["type"] == "train")
    assert "3 records split as served into 6 extra examples" in capsys.readouterr().out
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: {model}\ntrain_data: {data}\nuse_cache: false\n")
    assert cli_main(["inspect", str(config), "--json", "-n", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stats"]["chat"]["turns_trained"] == 9 and printed["stats"]["examples"] == 9


# ---------------------------------------------------------------- reasoning the data lacks (reasoning_when_missing)

PLAIN_CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# Qwen3-style with a generation prompt that opens the thinking, as thinking-only models' templates have it.
QWEN3_OPENS = QWEN3.replace(
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}",
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}",
)
# ... and a think block only for a reasoning that is not empty (MiniMax-M2 style) or that is given at all.
QWEN3_OPENS_NONEMPTY = QWEN3_OPENS.replace("(loop.last or reasoning)", "reasoning")
QWEN3_OPENS_GIVEN = QWEN3_OPENS.replace("(loop.last or reasoning)", "m.reasoning_content is defined")


def test_qwen3_style_opened_thinking_and_a_plain_reply():
    assert QWEN3_OPENS != QWEN3 and QWEN3_OPENS_NONEMPTY != QWEN3_OPENS != QWEN3_OPENS_GIVEN
    head = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    history = head + "Yo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    want = expected_examples(
        history + "<think>\n⟦\n</think>\n\n4<|im_end|>⟧\n", head + "<think>\n⟦\n</think>\n\nYo<|im_end|>⟧\n"
    )
    # A template that writes the empty think block of a last reply continues its own opening: served as is.
    assert examples_of([{"messages": PLAIN_CHAT}], QWEN3_OPENS)[0] == want
    for template in (QWEN3_OPENS_NONEMPTY, QWEN3_OPENS_GIVEN):
        # Its render of a plain reply does not continue "<think>\n": refused, naming the option.
        with pytest.raises(
            DataError,
            match=r"messages\[1\].*the generation prompt ends with '<think>\\n'.*"
            r"reasoning_when_missing: empty",
        ):
            examples_of([{"messages": PLAIN_CHAT}], template)
        # empty: the model closes the opened thinking at once, with the text the template writes after a reasoning.
        pairs, examples = examples_of([{"messages": PLAIN_CHAT}], template, reasoning_when_missing="empty")
        assert pairs == want
        assert examples.stats["chat"]["turns_empty_reasoning"] == 2
        row = ("  turns closing an opened thinking at once (reasoning_when_missing=empty)", "2")
        assert row in stats_rows(examples.stats)
        assert_every_turn_trained_once_as_served({"messages": PLAIN_CHAT}, template, reasoning_when_missing="empty")
    # A reply with its reasoning is trained as before, and not counted.
    thought = [*PLAIN_CHAT[:3], {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    pairs, examples = examples_of([{"messages": thought}], QWEN3_OPENS_NONEMPTY, reasoning_when_missing="empty")
    assert pairs[0] == expected_examples(history + "<think>\n⟦add\n</think>\n\n4<|im_end|>⟧\n")[0]
    assert examples.stats["chat"]["turns_empty_reasoning"] == 1


def test_v31_thinking_on_plain_replies_close_the_thinking_with_the_templates_own_closing():
    record = {"messages": PLAIN_CHAT, "chat_template_kwargs": THINKING}
    with pytest.raises(
        DataError,
        match=r"messages\[1\].*the generation prompt ends with '<think>'.*"
        r"reasoning_when_missing: empty",
    ):
        examples_of([record], V31)
    # The template renders a reply as "</think>" + answer: that closing follows the prompt's "<think>".
    pairs, examples = examples_of([record], V31, reasoning_when_missing="empty")
    assert pairs == expected_examples(
        "<s><|User|>Hi<|Assistant|></think>Yo</s><|User|>2+2?<|Assistant|><think>⟦</think>4</s>⟧",
        "<s><|User|>Hi<|Assistant|><think>⟦</think>Yo</s>⟧",
    )
    assert examples.stats["chat"]["turns_empty_reasoning"] == 2
    assert_every_turn_trained_once_as_served(record, V31, reasoning_when_missing="empty")
    # Thinking off: the generation prompt opens nothing, so the option changes nothing.
    plain = examples_of([{"messages": PLAIN_CHAT}], V31, reasoning_when_missing="empty")
    assert plain[0] == expected_examples(
        "<s><|User|>Hi<|Assistant|></think>⟦Yo</s>⟧<|User|>2+2?<|Assistant|></think>⟦4</s>⟧"
    )
    assert plain[1].stats["chat"]["turns_empty_reasoning"] == 0


def test_a_template_that_writes_no_closing_for_an_empty_reasoning_is_refused_even_with_empty():
    # R1 cuts the thinking from every reply and never reads reasoning_content: no render of it closes "<think>\n".
    with pytest.raises(
        DataError,
        match=r"messages\[1\].*writes no text that closes it for an empty reasoning.*"
        r"fix: write the reply in content as the model writes it after '<think>\\n'",
    ):
        examples_of([{"messages": PLAIN_CHAT}], R1, reasoning_when_missing="empty")
    # The way out the fix names: the empty reasoning written inline.
    inline = [
        {**m, "content": "<think>\n\n</think>\n\n" + m["content"]} if m["role"] == "assistant" else m
        for m in PLAIN_CHAT
    ]
    want = expected_examples("<s><|User|>Hi<|Assistant|><think>\n⟦\n</think>\n\nYo</s>⟧")[0]
    assert examples_of([{"messages": inline}], R1)[0][1] == want


# ---------------------------------------------------------------- reasoning the template drops (reasoning_when_dropped)

# Kimi-K2-Thinking style: a final answer's reasoning rendered as an empty "<think></think>"; a tool call keeps it.
DROPS_FINAL_REASONING = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<think>' + (m.reasoning_content if m.tool_calls else '') + '</think>' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_reasoning_the_template_drops_is_refused_or_trained_as_rendered():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]
    with pytest.raises(
        DataError,
        match=r"messages\[1\].*does not hold its reasoning.*chat_template.*"
        r"reasoning_when_dropped: as_rendered",
    ):
        examples_of([{"messages": chat}], DROPS_FINAL_REASONING)
    pairs, examples = examples_of([{"messages": chat}], DROPS_FINAL_REASONING, reasoning_when_dropped="as_rendered")
    assert pairs == expected_examples(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦<think></think>Yo<|im_end|>⟧\n"
    )
    assert examples.stats["chat"]["turns_reasoning_dropped"] == 1
    # DeepSeek-V3.1 with thinking off drops it too; the answer and the end marker are still checked.
    in_field = [V31_CHAT[0], {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]
    pairs, examples = examples_of([{"messages": in_field}], V31, reasoning_when_dropped="as_rendered")
    assert pairs == expected_examples("<s><|User|>Hi<|Assistant|></think>⟦Yo</s>⟧")
    assert examples.stats["chat"]["turns_reasoning_dropped"] == 1
    with pytest.raises(DataError, match=r"messages\[1\].*does not hold its content"):
        examples_of(
            [{"messages": [chat[0], {**chat[1], "content": "Yo"}]}],
            DROPS_FINAL_REASONING.replace(
                "m.content + '<|im_end|>", "(m.content if m.role != 'assistant' else '') + '<|im_end|>"
            ),
            reasoning_when_dropped="as_rendered",
        )


# ---------------------------------------------------------------- train_on_reasoning: false


def test_qwen3_reasoning_as_context_inside_each_turn():
    pairs, examples = examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3, train_on_reasoning=False)
    head = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\nget_temp\n</tools><|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    call = '<tool_call>\n{"name": "get_temp", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    # Each reasoning's text is context; its tags, the answer, the tool call and <|im_end|> are trained.
    assert pairs == expected_examples(
        head
        + "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        + call
        + "\n<|im_start|>user\n<tool_response>\n7C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n⟦<think>\n⟧read it⟦\n</think>\n\n7C in Oslo.<|im_end|>⟧\n",
        head + "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
        "⟦<think>\n\n</think>\n\n" + call + "⟧\n",
        head + "<|im_start|>assistant\n⟦<think>\n⟧greet⟦\n</think>\n\nYo<|im_end|>⟧\n",
    )
    chat = examples.stats["chat"]
    assert (chat["turns_trained"], chat["turns_reasoning_context"], chat["reasoning_tokens_context"]) == (3, 2, 12)
    rows = dict(stats_rows(examples.stats))
    assert rows["  turns whose reasoning is context (train_on_reasoning=false)"] == "2"
    assert rows["  reasoning tokens, context not targets"] == "12"
    assert "the reasoning of 2 turns as context (12 tokens)" in _chat_summary(chat)
    # The same inputs as with the reasoning trained: only targets change.
    trained, _ = examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)
    assert [ids for ids, _ in pairs] == [ids for ids, _ in trained]
    trained_examples = examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)[1]
    assert trained_examples.stats["chat"]["turns_reasoning_context"] == 0


def test_v31_inline_reasoning_as_context_trains_its_closing_the_answer_and_eos():
    record = {"messages": V31_CHAT, "chat_template_kwargs": THINKING}
    pairs, examples = examples_of([record], V31, train_on_reasoning=False)
    assert pairs == expected_examples(
        "<s><|User|>Hi<|Assistant|></think>Yo</s><|User|>2+2?<|Assistant|><think>add⟦</think>4</s>⟧",
        "<s><|User|>Hi<|Assistant|><think>greet⟦</think>Yo</s>⟧",
    )
    assert examples.stats["chat"]["reasoning_tokens_context"] == len("add") + len("greet")


# The reasoning follows "think: " without a tag: tiny.py's merge " "+"a" makes a token that straddles its start.
THOUGHT_AFTER_SPACE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content %}{{- 'think: ' + m.reasoning_content + '\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_token_across_the_reasoning_edge_is_context_and_the_ids_are_the_turns_own():
    from sftlab.data.examples import shift_labels
    from tiny import CHARS, MERGED, SPECIALS

    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    space_a = len(SPECIALS) + len(CHARS) + MERGED.index(" a")
    prompt = hand_ids("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", True)
    # The turn is tokenized as one text: "think:", " a" (the merge), "dd", "\n4<|im_end|>"; then the tail "\n".
    think, reasoning = hand_ids("think:", True), [space_a] + hand_ids("dd", True)
    answer = hand_ids("\n4<|im_end|>", True)
    input_ids = prompt + think + reasoning + answer + hand_ids("\n", True)
    labels = [X] * len(prompt) + think + [X] * len(reasoning) + answer + [X]
    pairs, examples = examples_of([{"messages": chat}], THOUGHT_AFTER_SPACE, train_on_reasoning=False)
    assert pairs == [(input_ids, shift_labels(labels))]
    assert examples.stats["chat"]["reasoning_tokens_context"] == 3
    # With the reasoning trained the ids are the same: only the targets differ.
    assert examples_of([{"messages": chat}], THOUGHT_AFTER_SPACE)[0] == [
        (input_ids, shift_labels([X] * len(prompt) + think + reasoning + answer + [X]))
    ]


def test_reasoning_tokens_cut_by_truncation_are_not_counted():
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "greet"}]
    # The example cut 2 tokens into "greet": the 2 kept are counted.
    cut = len(hand_ids("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", True)) + 2
    _, examples = examples_of([{"messages": chat}], QWEN3, train_on_reasoning=False, max_length=cut)
    assert examples.stats["chat"]["reasoning_tokens_context"] == 2 and examples.stats["truncated"] == 1


# ---------------------------------------------------------------- per-message weight


def test_a_message_weight_is_the_train_flag_as_0_or_1():
    chat = [dict(m) for m in CHATML_CHAT]
    chat[1]["weight"] = 0
    assert examples_of([{"messages": chat}], CHATML)[0] == expected_examples(chatml_marked(3))
    chat[1]["weight"], chat[2]["weight"] = 1.0, 1
    assert examples_of([{"messages": chat}], CHATML)[0] == expected_examples(chatml_marked(1, 2, 3))
    # Qwen3: a greeting of weight 0 is context; the turns after it are trained as served.
    agent = agent_chat()
    agent[2]["weight"] = 0
    pairs, examples = examples_of([{"messages": agent, "tools": [TEMP_TOOL]}], QWEN3)
    assert pairs == examples_of([{"messages": agent_chat(), "tools": [TEMP_TOOL]}], QWEN3)[0][:2]
    assert examples.stats["chat"]["turns_trained"] == 2


@pytest.mark.parametrize(
    "weight, train, problem",
    [
        (0.5, None, r"fractional message weights are not supported; found float 0\.5.*fix: give 0 or 1"),
        (2, None, r"must be 0 or 1; found int 2"),
        ("1", None, r"must be 0 or 1; found str '1'"),
        (True, None, r"must be 0 or 1; found bool True"),
        (0, True, r"contradicts the message's \"train\" flag"),
    ],
)
def test_a_weight_other_than_0_or_1_is_refused_naming_the_record_and_field(weight, train, problem):
    chat = [dict(m) for m in CHATML_CHAT]
    chat[1]["weight"] = weight
    if train is not None:
        chat[1]["train"] = train
    with pytest.raises(DataError, match=rf"record 1, field 'messages\[1\]\.weight': {problem}"):
        examples_of([{"messages": CHATML_CHAT}, {"messages": chat}], CHATML)


# ---------------------------------------------------------------- the options in the config and the cache key


def test_the_reasoning_options_are_config_fields_in_the_cache_key():
    from pydantic import ValidationError

    from sftlab import SFTConfig
    from sftlab.data.prepare import _cache_key
    from sftlab.data.splits import target_settings
    from sftlab.data.workers import Recipe
    from sftlab.errors import ConfigError

    options = {"reasoning_when_missing": "empty", "reasoning_when_dropped": "as_rendered", "train_on_reasoning": False}
    settings = target_settings(SFTConfig(model="m", **options))
    assert {name: getattr(settings, name) for name in options} == options
    tokenizer = char_tokenizer(chat_template=QWEN3, chat_tokens=True)
    keys = {_cache_key("data", Recipe(tokenizer, TargetSettings(**dict([item])))) for item in options.items()}
    assert len(keys | {_cache_key("data", Recipe(tokenizer, TargetSettings()))}) == 4
    with pytest.raises(ValidationError, match="reasoning_when_missing"):  # the CLI prints it as a ConfigError
        SFTConfig(model="m", reasoning_when_missing="guess")
    with pytest.raises(ConfigError, match="train_on_reasoning: false needs the turns"):
        SFTConfig(model="m", train_on_reasoning=False, assistant_only_loss=False)
    with pytest.raises(DataError, match="unknown reasoning_when_dropped"):
        examples_of([{"messages": CHATML_CHAT}], CHATML, reasoning_when_dropped="drop")
