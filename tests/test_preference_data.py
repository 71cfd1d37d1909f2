"""Preference data: records -> Pairs (prompt P as served, chosen C and rejected R as its served continuations).

Every expected id list is written out by hand from tiny.py's rules (one id per character, a special
or added token one id, no text that merges) and the template's text: `hand_ids` of the text the
template writes. P is what inference feeds (the render with add_generation_prompt=True); C and R run
from there through the marker that ends the reply, and not past it.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from sftlab import DataError, TargetSettings
from sftlab.data.chat import CHATML
from sftlab.data.preference import check_same_prompt, looks_like_pairs, prepare_pairs, shared_prompt
from sftlab.errors import RecordError
from tiny import char_tokenizer, hand_ids, ids, special_id

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "examples", "templates")
QWEN3 = open(os.path.join(TEMPLATES, "qwen3_style.jinja"), encoding="utf-8").read()
HARMONY = open(os.path.join(TEMPLATES, "harmony_style.jinja"), encoding="utf-8").read()
EOS, BOS, IM_END = special_id("</s>"), special_id("<s>"), special_id("<|im_end|>")

# ChatML whose first message is a default system prompt when the record has none (Qwen2.5's habit).
DEFAULT_SYSTEM = (
    "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nBe terse.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A template that writes BOS itself (Llama 3's habit), for a tokenizer that also adds one.
WITH_BOS = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# DeepSeek-R1 style: thinking cut from every reply it renders; the generation prompt opens it.
R1 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|User|>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{%- set c = m.content %}{%- if '</think>' in c %}"
    "{%- set c = c.split('</think>')[-1] %}{%- endif %}{{- '<|Assistant|>' + c + eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|Assistant|><think>\\n' }}{%- endif %}"
)

TEMP_TOOL = {"type": "function", "function": {"name": "get_temp"}}
CALL = {"type": "function", "function": {"name": "get_temp", "arguments": '{"city": "Oslo"}'}}
HI = [{"role": "user", "content": "Hi"}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def pairs_of(records, tokenizer, **options):
    settings = {k: options.pop(k) for k in list(options) if k in TargetSettings.__dataclass_fields__}
    pairs = prepare_pairs(records, tokenizer, TargetSettings(**settings), use_cache=False, **options)
    return [tuple(part.tolist() for part in pairs[i]) for i in range(len(pairs))], pairs


def chat(text):
    return hand_ids(text, chat_tokens=True)


# ---------------------------------------------------------------- the formats


def test_standard_pairs_are_prompt_then_each_completion_and_eos():
    got, pairs = pairs_of([{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5!"}], char_tokenizer())
    assert got == [(ids("Q: 2+2?"), ids(" 4") + [EOS], ids(" 5!") + [EOS])]
    assert pairs.record_index.tolist() == [0]
    stats = pairs.stats
    assert (stats["records"], stats["pairs"], stats["formats"]) == (1, 1, {"standard": 1})
    assert (stats["prompt_tokens"], stats["chosen_tokens"], stats["rejected_tokens"], stats["tokens"]) == (7, 3, 4, 14)


def test_conversational_pairs_end_at_the_end_marker_not_the_newline_after_it():
    tokenizer = char_tokenizer(CHATML)
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, user("Hi")],
        "chosen": [assistant("Yo")],
        "rejected": [assistant("No.")],
    }
    got, pairs = pairs_of([record], tokenizer)
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # The "\n" ChatML writes after <|im_end|> is not generated, so it is in neither reply.
    assert got == [(hand_ids(prompt), hand_ids("Yo<|im_end|>"), hand_ids("No.<|im_end|>"))]
    assert pairs.stats["formats"] == {"conversational": 1}
    assert pairs.stats["chat"]["turns_trained"] == 2


def test_implicit_prompt_is_the_shared_start_of_both_conversations():
    tokenizer = char_tokenizer(CHATML)
    history = [user("Hi"), assistant("Yo"), user("2+2?")]
    got, pairs = pairs_of([{"chosen": history + [assistant("4")], "rejected": history + [assistant("5")]}], tokenizer)
    prompt = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert got == [(hand_ids(prompt), hand_ids("4<|im_end|>"), hand_ids("5<|im_end|>"))]
    assert pairs.stats["formats"] == {"implicit_prompt": 1}
    explicit, _ = pairs_of([{"prompt": history, "chosen": [assistant("4")], "rejected": [assistant("5")]}], tokenizer)
    assert explicit == got


@pytest.mark.parametrize(
    "chosen, rejected, shared",
    [
        ([user("a"), assistant("x")], [user("a"), assistant("y")], 1),
        # the first difference is a user message: back to the assistant message before it
        (
            [user("a"), assistant("x"), user("b"), assistant("y")],
            [user("a"), assistant("x"), user("c"), assistant("z")],
            1,
        ),
        # identical up to a tool result: the replies start at the assistant message after it
        (
            [user("a"), assistant("", tool_calls=[CALL]), {"role": "tool", "content": "7"}, assistant("x")],
            [user("a"), assistant("", tool_calls=[CALL]), {"role": "tool", "content": "7"}, assistant("y")],
            3,
        ),
    ],
)
def test_shared_prompt_ends_right_before_an_assistant_message(chosen, rejected, shared):
    assert shared_prompt(chosen, rejected) == shared


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ([user("a"), assistant("x")], [user("b"), assistant("x")]),  # nothing shared
        ([assistant("x"), user("a")], [assistant("y"), user("a")]),  # shared part is empty before an assistant
    ],
)
def test_no_shared_prompt_is_refused(chosen, rejected):
    with pytest.raises(RecordError, match="share no prompt"):
        shared_prompt(chosen, rejected)


def test_tools_reach_the_prompt_and_a_tool_call_is_a_reply_qwen3_style():
    tokenizer = char_tokenizer(QWEN3, chat_tokens=True)
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, user("Temp in Oslo?")],
        "chosen": [assistant(None, tool_calls=[CALL])],
        "rejected": [assistant("No idea.")],
        "tools": [TEMP_TOOL],
    }
    got, _ = pairs_of([record], tokenizer)
    prompt = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n<tools>\nget_temp\n</tools><|im_end|>\n"
        "<|im_start|>user\nTemp in Oslo?<|im_end|>\n<|im_start|>assistant\n"
    )
    call = '<tool_call>\n{"name": "get_temp", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    # The last reply after the last user query opens a think block, empty without reasoning.
    empty_think = "<think>\n\n</think>\n\n"
    assert got == [(chat(prompt), chat(empty_think + call), chat(empty_think + "No idea.<|im_end|>"))]


def test_qwen3_style_prompt_history_loses_its_thinking_and_the_reply_keeps_its_own():
    tokenizer = char_tokenizer(QWEN3, chat_tokens=True)
    prompt_messages = [user("Hi"), assistant("Yo", reasoning_content="greet"), user("2+2?")]
    record = {
        "prompt": prompt_messages,
        "chosen": [assistant("4", reasoning_content="add")],
        "rejected": [assistant("5")],
    }
    got, _ = pairs_of([record], tokenizer)
    # "greet" is history once the user spoke again: the template strips it, so inference never feeds it.
    prompt = (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert got == [
        (chat(prompt), chat("<think>\nadd\n</think>\n\n4<|im_end|>"), chat("<think>\n\n</think>\n\n5<|im_end|>"))
    ]


def test_qwen3_style_enable_thinking_false_puts_the_empty_think_block_in_the_prompt():
    tokenizer = char_tokenizer(QWEN3, chat_tokens=True)
    record = {
        "prompt": HI,
        "chosen": [assistant("Yo")],
        "rejected": [assistant("No")],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    got, _ = pairs_of([record], tokenizer)
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert got == [(chat(prompt), chat("Yo<|im_end|>"), chat("No<|im_end|>"))]


def test_harmony_style_replies_carry_their_analysis_and_end_with_return():
    tokenizer = char_tokenizer(HARMONY, chat_tokens=True)
    record = {
        "prompt": HI,
        "chosen": [assistant("Yo", thinking="greet")],
        "rejected": [assistant("No")],
        "chat_template_kwargs": {"reasoning_effort": "low"},
    }
    got, _ = pairs_of([record], tokenizer)
    prompt = "<|start|>system<|message|>Reasoning: low<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
    chosen = "<|channel|>analysis<|message|>greet<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>"
    assert got == [(chat(prompt), chat(chosen), chat("<|channel|>final<|message|>No<|return|>"))]


def test_a_reply_of_several_messages_is_one_continuation_all_scored():
    tokenizer = char_tokenizer(CHATML)
    reply = [assistant("Go"), {"role": "tool", "content": "7C"}, assistant("7C.")]
    got, _ = pairs_of([{"prompt": HI, "chosen": reply, "rejected": [assistant("No")]}], tokenizer)
    chosen = "Go<|im_end|>\n<|im_start|>tool\n7C<|im_end|>\n<|im_start|>assistant\n7C.<|im_end|>"
    assert got[0][1] == hand_ids(chosen)


def test_a_reply_the_template_cannot_serve_in_one_render_is_refused():
    # Qwen3 style: the tool call is served with an empty think block that the whole reply's render drops.
    tokenizer = char_tokenizer(QWEN3, chat_tokens=True)
    reply = [assistant(None, tool_calls=[CALL]), {"role": "tool", "content": "7C"}, assistant("7C.")]
    with pytest.raises(DataError, match="does not serve the chosen reply in one render") as error:
        pairs_of([{"prompt": [user("Temp?")], "chosen": reply, "rejected": [assistant("No")]}], tokenizer)
    assert "record 0, field 'chosen'" in str(error.value)


# ---------------------------------------------------------------- the four traps


def test_bos_is_written_once_and_never_starts_a_reply():
    got, _ = pairs_of([{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}], char_tokenizer(bos=True))
    assert got == [([BOS] + ids("Q: 2+2?"), ids(" 4") + [EOS], ids(" 5") + [EOS])]
    # A template that writes BOS, with a tokenizer that adds one to every call: still one.
    got, _ = pairs_of(
        [{"prompt": HI, "chosen": [assistant("Yo")], "rejected": [assistant("No")]}], char_tokenizer(WITH_BOS, bos=True)
    )
    assert got == [
        (
            hand_ids("<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            hand_ids("Yo<|im_end|>"),
            hand_ids("No<|im_end|>"),
        )
    ]


def test_eos_is_not_appended_after_the_templates_own_end_marker():
    # eos_token is <|im_end|>, the marker ChatML ends a turn with: it ends each reply once, not twice.
    got, _ = pairs_of(
        [{"prompt": HI, "chosen": [assistant("Yo")], "rejected": [assistant("No")]}],
        char_tokenizer(CHATML, eos="<|im_end|>"),
    )
    assert got[0][1:] == (hand_ids("Yo<|im_end|>"), hand_ids("No<|im_end|>"))
    assert got[0][1][-2:] != [IM_END, IM_END]
    # A text completion that already ends with EOS gets no second one.
    got, _ = pairs_of([{"prompt": "Q: 2+2?", "chosen": " 4</s>", "rejected": " 5"}], char_tokenizer())
    assert got[0][1:] == (ids(" 4") + [EOS], ids(" 5") + [EOS])


def test_a_default_system_prompt_is_in_the_prompt_and_never_in_a_reply():
    got, _ = pairs_of(
        [{"prompt": HI, "chosen": [assistant("Yo")], "rejected": [assistant("No")]}], char_tokenizer(DEFAULT_SYSTEM)
    )
    prompt = "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert got == [(hand_ids(prompt), hand_ids("Yo<|im_end|>"), hand_ids("No<|im_end|>"))]


def test_thinking_is_in_a_reply_only_as_the_template_serves_it():
    # R1 style cuts the thinking from replies it renders, but the generation prompt opens "<think>\n":
    # the reply is trained from there, with its thinking, as the model writes it after that prompt.
    tokenizer = char_tokenizer(R1, chat_tokens=True)
    history = [user("Hi"), assistant("<think>\ngreet\n</think>\n\nYo"), user("2+2?")]
    record = {
        "prompt": history,
        "chosen": [assistant("<think>\nadd\n</think>\n\n4")],
        "rejected": [assistant("<think>\nguess\n</think>\n\n5")],
    }
    got, _ = pairs_of([record], tokenizer)
    # The history's thinking is cut (inference feeds it so); each reply keeps its own.
    prompt = "<s><|User|>Hi<|Assistant|>\n\nYo</s><|User|>2+2?<|Assistant|><think>\n"
    assert got == [(chat(prompt), chat("add\n</think>\n\n4</s>"), chat("guess\n</think>\n\n5</s>"))]
    # A template that never renders reasoning: the reply is refused, not trained with thinking nobody serves.
    with pytest.raises(DataError, match="does not hold its reasoning"):
        pairs_of(
            [{"prompt": HI, "chosen": [assistant("Yo", reasoning_content="greet")], "rejected": [assistant("No")]}],
            char_tokenizer(CHATML),
        )


# ---------------------------------------------------------------- truncation


def test_right_truncation_keeps_the_end_of_the_prompt_then_cuts_the_replies():
    records = [
        {"prompt": "0123456789", "chosen": "AB", "rejected": "CDE"},  # 10 + 4 > 12: prompt cut to its last 5
        {"prompt": "012", "chosen": "ABCDEFGHIJ", "rejected": "X"},  # 3 + 11 > 12: the chosen reply cut
        {"prompt": "01", "chosen": "A", "rejected": "B"},  # fits
    ]
    got, pairs = pairs_of(records, char_tokenizer(), max_length=12, max_prompt_length=5)
    assert got == [
        (ids("56789"), ids("AB") + [EOS], ids("CDE") + [EOS]),
        (ids("012"), ids("ABCDEFGHI"), ids("X") + [EOS]),
        (ids("01"), ids("A") + [EOS], ids("B") + [EOS]),
    ]
    stats = pairs.stats
    counts = (stats["truncated_prompt"], stats["truncated_completion"], stats["truncated"], stats["dropped"])
    assert counts == (1, 1, 2, {})


def test_the_default_prompt_budget_is_half_of_max_length():
    record = {"prompt": "0123456789", "chosen": "ABCDEFG", "rejected": "C"}
    got, pairs = pairs_of([record], char_tokenizer(), max_length=10)
    assert got == [(ids("56789"), ids("ABCDE"), ids("C") + [EOS])]
    assert (pairs.stats["truncated_prompt"], pairs.stats["truncated_completion"]) == (1, 1)


def test_drop_truncation_drops_the_pair_and_counts_it():
    records = [
        {"prompt": "0123456789", "chosen": "AB", "rejected": "C"},
        {"prompt": "01", "chosen": "A", "rejected": "B"},
    ]
    got, pairs = pairs_of(records, char_tokenizer(), max_length=12, truncation="drop")
    assert got == [(ids("01"), ids("A") + [EOS], ids("B") + [EOS])]
    assert pairs.record_index.tolist() == [1]
    assert pairs.stats["dropped"] == {"longer than max_length=12": 1}
    assert (pairs.stats["records"], pairs.stats["pairs"], pairs.stats["truncated"]) == (2, 1, 0)


def test_a_prompt_budget_that_leaves_no_room_is_refused():
    with pytest.raises(DataError, match="max_prompt_length must leave room"):
        pairs_of([{"prompt": "0", "chosen": "A", "rejected": "B"}], char_tokenizer(), max_length=8, max_prompt_length=8)


# ---------------------------------------------------------------- bad input


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


GOOD = {"prompt": "Q", "chosen": "A", "rejected": "B"}


@pytest.mark.parametrize(
    "bad, field, problem",
    [
        ({"prompt": "Q", "chosen": "A"}, "rejected", "a preference record needs 'rejected'"),
        ({"prompt": "Q", "chosen": ["A"], "rejected": "B"}, "chosen", "must be a string, as the prompt is"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, "chosen", "is empty"),
        (
            {"chosen": "A", "rejected": "B"},
            "chosen",
            "without a prompt, chosen and rejected must be whole conversations",
        ),
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, "prompt", "must be text or a list of messages"),
    ],
    ids=["missing", "type", "empty", "no-prompt", "prompt-type"],
)
def test_bad_records_are_named_by_file_line_record_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as error:
        prepare_pairs(path, char_tokenizer(), use_cache=False)
    assert str(error.value).startswith(f"{path}:2, record 1, field '{field}': {problem}")
    assert "fix:" in str(error.value)


def test_a_bad_message_of_a_reply_is_named_in_the_records_own_terms(tmp_path):
    tokenizer = char_tokenizer(CHATML)
    bad = {"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [{"role": "assistant", "content": 7}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [bad])
    with pytest.raises(DataError, match=r"pairs.jsonl:1, record 0, field 'rejected\[0\].content': must be a string"):
        prepare_pairs(path, tokenizer, use_cache=False)
    starts_with_user = {"prompt": [user("Hi")], "chosen": [user("Hm"), assistant("Yo")], "rejected": [assistant("No")]}
    with pytest.raises(DataError, match=r"field 'chosen\[0\].role': a reply starts with an assistant message"):
        prepare_pairs([starts_with_user], tokenizer, use_cache=False)
    implicit = {"chosen": [user("Hi"), assistant("Yo")], "rejected": [user("Hi"), {"role": "robot", "content": "x"}]}
    with pytest.raises(DataError, match=r"field 'chosen,rejected': chosen and rejected share no prompt"):
        prepare_pairs(write_jsonl(tmp_path / "implicit.jsonl", [implicit]), tokenizer, use_cache=False)


def test_a_reply_the_template_cannot_serve_is_named_as_its_turn_in_the_record(tmp_path):
    # R1 style: a reply without the thinking its generation prompt opens cannot continue it.
    tokenizer = char_tokenizer(R1, chat_tokens=True)
    good = {
        "prompt": [user("2+2?")],
        "chosen": [assistant("<think>\nadd\n</think>\n\n4")],
        "rejected": [assistant("<think>\nx\n</think>\n\n5")],
    }
    bad = {**good, "rejected": [assistant("5")]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, bad])
    with pytest.raises(DataError) as error:
        prepare_pairs(path, tokenizer, use_cache=False)
    assert str(error.value).startswith(
        f"{path}:2, record 1, field 'rejected[0]': the chat template cannot serve assistant turn rejected[0]"
    )
    skipped = prepare_pairs(path, tokenizer, skip_invalid_records=True, use_cache=False)
    assert len(skipped) == 1 and skipped.record_index.tolist() == [0]
    reasons = {"invalid rejected: the rejected reply was skipped or has no trained token": 1}
    assert skipped.stats["skipped_invalid"] == reasons
    (reason,) = skipped.stats["skipped_replies"]
    assert reason.startswith("chat template cannot serve messages[]: ")


def test_a_reply_left_untrained_is_refused_not_dropped(tmp_path):
    untrained = {"prompt": [user("Hi")], "chosen": [assistant("Yo", train=False)], "rejected": [assistant("No")]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [untrained])
    with pytest.raises(
        DataError,
        match=r"pairs.jsonl:1, record 0, field 'chosen': the chosen reply was skipped or has "
        r"no trained token",
    ):
        prepare_pairs(path, char_tokenizer(CHATML), use_cache=False)


def test_mixed_formats_are_refused_and_invalid_records_skipped_on_request(tmp_path):
    conversational = {"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [assistant("No")]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, conversational])
    with pytest.raises(DataError, match="mixed formats in one dataset"):
        prepare_pairs(path, char_tokenizer(CHATML), use_cache=False)
    path = write_jsonl(
        tmp_path / "skip.jsonl",
        [GOOD, {"prompt": "Q", "chosen": "A"}, {"prompt": "Q", "chosen": 1, "rejected": "B"}, GOOD],
    )
    pairs = prepare_pairs(path, char_tokenizer(), skip_invalid_records=True, use_cache=False)
    assert pairs.record_index.tolist() == [0, 3]
    assert pairs.stats["skipped_invalid"] == {
        "invalid rejected: a preference record needs 'rejected'": 1,
        "invalid chosen: must be a string, as the prompt is": 1,
    }
    with pytest.raises(DataError, match="no valid records"):
        prepare_pairs([{"prompt": "Q", "chosen": "A"}], char_tokenizer(), skip_invalid_records=True, use_cache=False)


def test_replies_must_continue_the_same_prompt():
    tokenizer = char_tokenizer()
    check_same_prompt(ids("Q: x"), ids("Q: x"), tokenizer)
    with pytest.raises(RecordError, match="renders the prompt differently") as error:
        check_same_prompt(ids("Q: x"), ids("Q: y"), tokenizer)
    assert "from prompt token 3" in error.value.found


def test_a_pair_whose_replies_follow_different_prompts_is_refused_naming_it(tmp_path, monkeypatch):
    # SFT's rules give both replies the same P today; the check guards the engine's shared-prompt row
    # against a renderer that ever does otherwise, so it is forced here.
    from sftlab.data import preference

    real = preference.reply_of
    calls = []

    def second_prompt_differs(input_ids, targets):
        prompt, reply = real(input_ids, targets)
        calls.append(1)
        return (prompt[:-1] + [prompt[-1] + 1] if len(calls) % 2 == 0 else prompt), reply

    monkeypatch.setattr(preference, "reply_of", second_prompt_differs)
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(
        DataError,
        match=r"pairs.jsonl:1, record 0, field 'prompt': the chat template renders the "
        r"prompt differently before the chosen and the rejected reply",
    ):
        prepare_pairs(path, char_tokenizer(), use_cache=False)


def test_field_maps_rename_chosen_and_rejected(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "Q", "better": "A", "worse": "B"}])
    fields = {"prompt": "question", "chosen": "better", "rejected": "worse"}
    got, _ = pairs_of(path, char_tokenizer(), fields=fields)
    assert got == [(ids("Q"), ids("A") + [EOS], ids("B") + [EOS])]
    assert looks_like_pairs(path, fields=fields) and not looks_like_pairs(path)
    with pytest.raises(DataError, match=r"field 'worse': a preference record needs 'rejected'"):
        prepare_pairs([{"question": "Q", "better": "A"}], char_tokenizer(), fields=fields, use_cache=False)


# ---------------------------------------------------------------- the config entry and `sftlab inspect`


@pytest.fixture
def pair_config(tmp_path):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    tokenizer = char_tokenizer(CHATML)
    tokenizer.save_pretrained(model)
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(model)
    records = [
        {"prompt": [user("Hi")], "chosen": [assistant("Yo")], "rejected": [assistant("No!")]},
        {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {model}\ntrain_data: {data}\ncache_dir: {tmp_path / 'cache'}\n")
    return config


def test_prepare_preference_split_takes_the_configs_settings(pair_config):
    from sftlab.config import load_config
    from sftlab.data.splits import is_preference_split, prepare_preference_split

    config = load_config(str(pair_config), ["max_length=20", "max_prompt_length=6"])
    assert is_preference_split(config)
    pairs = prepare_preference_split(config, char_tokenizer(CHATML))
    # P of "Hi" is 21 tokens: its last 6 are kept, and the replies fit in the 14 left.
    assert [pairs[i][0].tolist() for i in range(2)] == [hand_ids("<|im_start|>assistant\n")[-6:]] * 2
    assert pairs.stats["truncated_prompt"] == 2 and pairs.stats["truncated_completion"] == 0


def test_cli_inspect_shows_each_pair_and_its_counts(pair_config, capsys):
    from sftlab.cli import main

    assert main(["inspect", str(pair_config), "--json", "-n", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["pairs"]
    prompt = hand_ids("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert [t["id"] for t in row["prompt"]] == prompt and not any(t["target"] for t in row["prompt"])
    assert [(t["id"], t["target"]) for t in row["chosen"]] == [(i, True) for i in hand_ids("Yo<|im_end|>")]
    assert [t["text"] for t in row["rejected"]] == ["N", "o", "!", "<|im_end|>"]
    assert row["counts"] == {"prompt": len(prompt), "chosen": 3, "rejected": 4}
    assert (out["stats"]["pairs"], out["stats"]["records"]) == (2, 2)

    assert main(["inspect", str(pair_config)]) == 0
    text = capsys.readouterr().out
    assert "first 2 of 2 preference pairs" in text
    second_prompt = hand_ids("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert f"pair 1 (record 1): prompt {len(second_prompt)}, chosen 2, rejected 2 tokens" in text
    assert "replies cut at their end" in text

    assert main(["prepare", str(pair_config), "--json"]) == 0
    prepared = json.loads(capsys.readouterr().out)["train"]
    assert (prepared["pairs"], prepared["cached"]) == (2, True)  # the entry inspect wrote


def test_pairs_are_cached_by_data_tokenizer_and_every_setting(tmp_path):
    records = [{"prompt": "0123456789", "chosen": "AB", "rejected": "C"}]
    tokenizer = char_tokenizer()

    def prepare(**options):
        return prepare_pairs(records, tokenizer, TargetSettings(max_length=12), cache_dir=str(tmp_path), **options)

    first, second = prepare(), prepare()
    assert (first.stats["cached"], second.stats["cached"]) == (False, True)
    assert first.stats["cache_entry"] == second.stats["cache_entry"]
    assert [p.tolist() for p in second[0]] == [ids("456789"), ids("AB") + [EOS], ids("C") + [EOS]]
    assert second.stats["truncated_prompt"] == 1 and second.record_index.tolist() == [0]
    other = prepare(max_prompt_length=4)  # another setting: another entry
    assert other.stats["cached"] is False and [p.tolist() for p in other[0]][0] == ids("6789")


def test_pairs_stream_over_chunks_and_a_late_bad_reply_is_named_by_its_line(tmp_path):
    # More records than one chunk (2048): the pairs of both chunks are joined in order, and a reply the
    # template refuses in the second chunk is traced back to its own line.
    tokenizer = char_tokenizer(R1, chat_tokens=True)
    good = {
        "prompt": [user("2+2?")],
        "chosen": [assistant("<think>\nadd\n</think>\n\n4")],
        "rejected": [assistant("<think>\nx\n</think>\n\n5")],
    }
    records = [good] * 2100
    pairs = prepare_pairs(records, tokenizer, use_cache=False)
    assert len(pairs) == 2100 and pairs.record_index.tolist() == list(range(2100))
    assert [p.tolist() for p in pairs[2099]] == [p.tolist() for p in pairs[0]]
    records[2090] = {**good, "chosen": [assistant("4")]}
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DataError, match=r"pairs.jsonl:2091, record 2090, field 'chosen\[0\]'"):
        prepare_pairs(path, tokenizer, use_cache=False)


# --- unpaired (KTO) ----------------------------------------------------------------------------


def test_unpaired_examples_carry_the_record_befores_completion_for_the_kl_estimate():
    from sftlab.data.preference import prepare_unpaired

    records = [
        {"prompt": "Q: 1?", "completion": "7", "label": True},
        {"prompt": "Q: 2?", "completion": "88", "label": False},
        {"prompt": "Q: 3?", "completion": "9", "label": True},
    ]
    pairs = prepare_unpaired(records, char_tokenizer(), TargetSettings(), use_cache=False)
    got = [tuple(part.tolist() for part in pairs[i]) for i in range(len(pairs))]
    # Each prompt with its own completion, and with the completion of the record before (the first: the last's).
    assert got == [
        (ids("Q: 1?"), ids("7") + [EOS], ids("9") + [EOS]),
        (ids("Q: 2?"), ids("88") + [EOS], ids("7") + [EOS]),
        (ids("Q: 3?"), ids("9") + [EOS], ids("88") + [EOS]),
    ]
    assert pairs.desirable.tolist() == [True, False, True]
    assert (pairs.stats["desirable"], pairs.stats["undesirable"]) == (2, 1)


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"prompt": "Q", "completion": " a"}, "label", "an unpaired (KTO) record needs 'label'"),
        ({"prompt": "Q", "completion": " a", "label": "yes"}, "label", "must be true or false"),
        ({"prompt": "Q", "label": True}, "completion", "an unpaired (KTO) record needs 'completion'"),
    ],
)
def test_bad_unpaired_records_are_named(tmp_path, record, field, problem):
    from sftlab.data.preference import prepare_unpaired

    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": " ok", "label": True}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as error:
        prepare_unpaired(str(path), char_tokenizer(), TargetSettings(), use_cache=False)
    assert error.value.field == field and problem in str(error.value) and f"{path}:2" in str(error.value)


# --- streamed into the store ---------------------------------------------------------------------

PAIR_FILES = (
    "prompt_ids",
    "prompt_offsets",
    "chosen_ids",
    "chosen_offsets",
    "rejected_ids",
    "rejected_offsets",
    "record_index",
)


def growing_pairs(n: int) -> list[dict]:
    """Standard pairs of growing length (no character pair that merges); every 7th chosen is empty (invalid)."""
    return [
        {
            "prompt": "Q" * (1 + i % 9) + str(i),
            "chosen": "" if i % 7 == 3 else "x" * (1 + i % 5),
            "rejected": "y" * (1 + i % 8),
        }
        for i in range(n)
    ]


def expected_pairs(records, max_length: int, max_prompt_length: int):
    """The pairs by the documented rule: P + C + EOS and P + R + EOS; a pair whose P + longer reply is
    too long keeps the end of P (max_prompt_length tokens), then each reply is cut to what is left."""
    pairs, truncated = [], Counter()
    for index, record in enumerate(records):
        if not record["chosen"]:
            continue
        prompt, chosen, rejected = ids(record["prompt"]), ids(record["chosen"]) + [EOS], ids(record["rejected"]) + [EOS]
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            truncated["pairs"] += 1
            if len(prompt) > max_prompt_length:
                prompt, truncated["prompt"] = prompt[-max_prompt_length:], truncated["prompt"] + 1
            room = max_length - len(prompt)
            if max(len(chosen), len(rejected)) > room:
                chosen, rejected, truncated["completion"] = chosen[:room], rejected[:room], truncated["completion"] + 1
        pairs.append((index, prompt, chosen, rejected))
    return pairs, truncated


def entry_bytes(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name + ".npy"), "rb").read() for name in PAIR_FILES}


def test_pairs_stream_into_a_memory_mapped_entry_and_two_workers_write_the_same_bytes(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 5)  # 23 records: 5 chunks over 2 workers
    records = growing_pairs(23)
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    settings = TargetSettings(max_length=12)  # max_prompt_length: 6
    tokenizer = char_tokenizer()
    one = prepare_pairs(
        path, tokenizer, settings, skip_invalid_records=True, cache_dir=str(tmp_path / "one"), workers=1
    )
    two = prepare_pairs(
        path, tokenizer, settings, skip_invalid_records=True, cache_dir=str(tmp_path / "two"), workers=2
    )
    expected, truncated = expected_pairs(records, 12, 6)
    for pairs in (one, two):
        assert [(int(pairs.record_index[i]), *(p.tolist() for p in pairs[i])) for i in range(len(pairs))] == expected
        assert all(isinstance(getattr(pairs, name), np.memmap) for name in PAIR_FILES)  # read back from disk
    assert entry_bytes(one.stats["cache_entry"]) == entry_bytes(two.stats["cache_entry"])
    # Records 3, 10 and 17 have an empty chosen (i % 7 == 3): skipped and counted.
    counts = {
        "records": 23,
        "pairs": 20,
        "skipped_invalid": {"invalid chosen: is empty": 3},
        "truncated": truncated["pairs"],
        "truncated_prompt": truncated["prompt"],
        "truncated_completion": truncated["completion"],
        "dropped": {},
        "prompt_tokens": sum(len(p) for _, p, _, _ in expected),
        "chosen_tokens": sum(len(c) for _, _, c, _ in expected),
        "rejected_tokens": sum(len(r) for _, _, _, r in expected),
    }
    assert truncated["pairs"] > 0 and truncated["prompt"] > 0 and truncated["completion"] > 0
    for pairs in (one, two):
        assert {key: pairs.stats[key] for key in counts} == counts
    # The counts are kept in the entry: a second run reads them back with the pairs, no record read.
    again = prepare_pairs(path, tokenizer, settings, skip_invalid_records=True, cache_dir=str(tmp_path / "one"))
    assert again.stats["cached"] is True and {key: again.stats[key] for key in counts} == counts
    dropped = prepare_pairs(
        path,
        tokenizer,
        TargetSettings(max_length=12, truncation="drop"),
        use_cache=False,
        skip_invalid_records=True,
        workers=2,
    )
    assert dropped.stats["dropped"] == {"longer than max_length=12": truncated["pairs"]}
    assert len(dropped) == 20 - truncated["pairs"]


def test_without_the_cache_pairs_are_still_memory_mapped_and_nothing_is_left(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    pairs = prepare_pairs([GOOD] * 3, char_tokenizer(), use_cache=False)
    assert isinstance(pairs.chosen_ids, np.memmap) and pairs.stats["cached"] is False
    assert "cache_entry" not in pairs.stats and os.listdir(tmp_path) == []
    assert [p.tolist() for p in pairs[2]] == [ids("Q"), ids("A") + [EOS], ids("B") + [EOS]]


def test_pair_entries_are_keyed_by_the_data_and_the_tokenizer_too(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [GOOD])
    first = prepare_pairs(str(path), char_tokenizer(), cache_dir=str(tmp_path / "c"))
    assert prepare_pairs(str(path), char_tokenizer(), cache_dir=str(tmp_path / "c")).stats["cached"] is True
    other_tokenizer = prepare_pairs(str(path), char_tokenizer(CHATML), cache_dir=str(tmp_path / "c"))
    write_jsonl(path, [{**GOOD, "chosen": "AA"}])
    other_data = prepare_pairs(str(path), char_tokenizer(), cache_dir=str(tmp_path / "c"))
    assert other_tokenizer.stats["cached"] is False and other_data.stats["cached"] is False
    entries = {first.stats["cache_entry"], other_tokenizer.stats["cache_entry"], other_data.stats["cache_entry"]}
    assert len(entries) == 3 and other_data[0][1].tolist() == ids("AA") + [EOS]


def test_with_workers_the_first_bad_pair_in_the_data_is_the_one_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 4)
    records = [GOOD] * 20
    records[6] = {"prompt": "Q", "chosen": "A"}  # chunk 1 (worker 2)
    records[13] = {"prompt": "Q", "rejected": "B"}  # chunk 3
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DataError, match=r"pairs.jsonl:7, record 6, field 'rejected'"):
        prepare_pairs(path, char_tokenizer(), use_cache=False, workers=2)


def test_unpaired_examples_stream_over_chunks_into_a_cached_entry_with_their_labels(tmp_path, monkeypatch):
    import numpy as np

    from sftlab.data.preference import prepare_unpaired

    monkeypatch.setattr("sftlab.data.sources.CHUNK_RECORDS", 3)  # 7 records: 3 chunks, the KL pairing crosses them
    records = [{"prompt": f"Q{i}", "completion": "z" * (i + 1), "label": i % 3 != 1} for i in range(7)]
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    cache = str(tmp_path / "cache")
    first = prepare_unpaired(path, char_tokenizer(), cache_dir=cache, workers=2)
    again = prepare_unpaired(path, char_tokenizer(), cache_dir=cache)
    assert (first.stats["cached"], again.stats["cached"]) == (False, True)
    assert os.path.basename(first.stats["cache_entry"]).startswith("unpaired-")
    for pairs in (first, again):
        # Each prompt with its completion, and the completion of the record before (record 0: record 6's).
        assert [tuple(p.tolist() for p in pairs[i]) for i in range(7)] == [
            (ids(f"Q{i}"), ids("z" * (i + 1)) + [EOS], ids("z" * ((i - 1) % 7 + 1)) + [EOS]) for i in range(7)
        ]
        assert pairs.desirable.tolist() == [True, False, True, True, False, True, True]
        assert isinstance(pairs.desirable, np.memmap)
        assert (pairs.stats["desirable"], pairs.stats["undesirable"], pairs.stats["records"]) == (5, 2, 7)
    # The same records as DPO-style pairs would be another entry (they are not pairs: refused).
    with pytest.raises(DataError, match="a preference record needs 'chosen'"):
        prepare_pairs(path, char_tokenizer(), cache_dir=cache)


def test_a_flipped_bit_in_the_labels_rebuilds_the_unpaired_entry(tmp_path, capsys):
    from sftlab.data.preference import prepare_unpaired

    records = [{"prompt": "Q", "completion": "z" * (i + 1), "label": i % 2 == 0} for i in range(4)]
    cache = tmp_path / "cache"
    entry = prepare_unpaired(records, char_tokenizer(), cache_dir=str(cache)).stats["cache_entry"]
    path = os.path.join(entry, "desirable.npy")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 1  # label 1: False -> True
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    again = prepare_unpaired(records, char_tokenizer(), cache_dir=str(cache))
    assert f"the cache entry {entry} is damaged: desirable.npy does not match its checksum" in capsys.readouterr().err
    assert again.stats["cached"] is False and again.desirable.tolist() == [True, False, True, False]


def test_a_bad_unpaired_reply_is_named_by_its_line_in_the_records_terms(tmp_path):
    from sftlab.data.preference import prepare_unpaired

    records = [{"prompt": "Q", "completion": "a", "label": True}] * 3 + [
        {"prompt": "Q", "completion": "", "label": True}
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    with pytest.raises(DataError) as error:
        prepare_unpaired(path, char_tokenizer(), use_cache=False)
    # Record 3's completion is empty; record 0 carries it as its mismatched completion and comes first,
    # so record 0 is named, under the name its KL pairing gives the field.
    assert str(error.value).startswith(f"{path}:1, record 0, field 'completion of the record before (KL pairing)'")
