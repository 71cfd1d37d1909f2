"""Conversations through five template families, with and without {% generation %} tags.

For every family the expected render is written out below with the supervised text between
⟦ and ⟧: each assistant reply and the end-of-turn token that makes the model stop, nothing
else. `expected()` turns it into ids by tiny.py's hand rules (one id per character, one per
special token); the texts avoid the merges he / ll / ok / " a" except where a test names them.
"""

from __future__ import annotations


import pytest

from sftlab import DataError, TargetSettings, prepare_examples
from sftlab.data.chat import CHATML, ChatRenderer
from tiny import char_id, char_tokenizer, ids, marked, merged_id, special_id

X = -100
BOS = special_id("<s>")


# ---------------------------------------------------------------- templates, in each family's style


def generation_spans(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The render and the character spans inside its `{% generation %}` tags, found by transformers
    (what apply_chat_template's assistant mask is made of): an oracle that shares no code with sftlab's."""
    from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices

    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    text, spans = _render_with_assistant_indices(_compile_jinja_template(template), messages, None, None, False, **special)
    return text, [tuple(s) for s in spans]


def _reply(body: str, tags: bool) -> str:
    return "{% generation %}" + body + "{% endgeneration %}" if tags else body


def chatml(tags: bool) -> str:
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}" + _reply("{{ message['content'] + '<|im_end|>' }}", tags) +
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def llama3(tags: bool) -> str:
    # bos_token is written by the template, as Llama 3's is.
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}" + _reply("{{ message['content'] | trim }}{{ '<|eot_id|>' }}", tags) +
        "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    )


def mistral(tags: bool) -> str:
    # [INST] turns; the system prompt goes into the first user turn; a reply ends with eos_token;
    # the generation prompt is empty (the model answers right after [/INST]).
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}" + _reply("{{ message['content'] + eos_token }}", tags) + "{% endif %}{% endfor %}"
    )


def gemma(tags: bool) -> str:
    # No system role: the system prompt is prefixed to the first user turn; the assistant is "model".
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% if message['role'] == 'assistant' %}"
        "{{ '<start_of_turn>model\n' }}" + _reply("{{ message['content'] | trim }}{{ '<end_of_turn>' }}", tags) + "{{ '\n' }}"
        "{% else %}{{ '<start_of_turn>user\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )


def phi3(tags: bool) -> str:
    # Like Phi-3's own template, it writes eos_token after the last message when no generation
    # prompt follows: text that closes the conversation and belongs to no turn.
    return (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
        + _reply("{{ message['content'] + '<|end|>' }}", tags) + "{{ '\n' }}"
        "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )


SYSTEM = {"role": "system", "content": "Be brief."}
HI = {"role": "user", "content": "Hi"}
YO = {"role": "assistant", "content": "Yo"}
ASK = {"role": "user", "content": "2+2?"}
FOUR = {"role": "assistant", "content": "4"}
MULTI_TURN = [SYSTEM, HI, YO, ASK, FOUR]
SINGLE_TURN = [HI, YO]

# family -> (template, render of MULTI_TURN, render of SINGLE_TURN); supervised text in ⟦ ⟧
FAMILIES = {
    "chatml": (
        chatml,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n⟦Yo<|im_end|>⟧\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n⟦4<|im_end|>⟧\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n⟦Yo<|im_end|>⟧\n",
    ),
    "llama3": (
        llama3,
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦Yo<|eot_id|>⟧"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦4<|eot_id|>⟧",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n⟦Yo<|eot_id|>⟧",
    ),
    "mistral": (
        mistral,
        "<s>[INST] Be brief.\n\nHi [/INST]⟦Yo</s>⟧[INST] 2+2? [/INST]⟦4</s>⟧",
        "<s>[INST] Hi [/INST]⟦Yo</s>⟧",
    ),
    "gemma": (
        gemma,
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n⟦Yo<end_of_turn>⟧\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n⟦4<end_of_turn>⟧\n",
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n⟦Yo<end_of_turn>⟧\n",
    ),
    "phi3": (
        phi3,
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n⟦Yo<|end|>⟧\n"
        "<|user|>\n2+2?<|end|>\n<|assistant|>\n⟦4<|end|>⟧\n</s>",
        "<|user|>\nHi<|end|>\n<|assistant|>\n⟦Yo<|end|>⟧\n</s>",
    ),
}


# ---------------------------------------------------------------- hand tokenization of the expected renders

def expected(text: str) -> tuple[str, list[int], list[int], list[tuple[int, int]]]:
    """(rendered text, input_ids, targets, supervised character spans) of a render marked with ⟦ ⟧."""
    return marked(text)


def only_last_marked(marked: str) -> str:
    """The same render with only the last ⟦ ⟧ kept."""
    head, tail = marked.rsplit("⟦", 1)
    return head.replace("⟦", "").replace("⟧", "") + "⟦" + tail


def prepare(records, tokenizer, **settings):
    examples = prepare_examples(records, tokenizer, TargetSettings(**settings), use_cache=False)
    assert len(examples) == len(records)
    return [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))]


def test_hand_ids_agree_with_the_tokenizer():
    text, input_ids, _, _ = expected(FAMILIES["llama3"][1])
    assert char_tokenizer()(text, add_special_tokens=False)["input_ids"] == input_ids


families = pytest.mark.parametrize("family", list(FAMILIES))
with_and_without_tags = pytest.mark.parametrize("tags", [False, True], ids=["plain", "generation-tags"])


# ---------------------------------------------------------------- what is supervised


@families
@with_and_without_tags
def test_multi_turn_with_system_prompt(family, tags):
    template, marked, _ = FAMILIES[family]
    text, input_ids, targets, _ = expected(marked)
    assert ChatRenderer(char_tokenizer(), template(tags)).render(MULTI_TURN) == text
    assert prepare([{"messages": MULTI_TURN}], char_tokenizer(chat_template=template(tags))) == [(input_ids, targets)]


@families
@with_and_without_tags
def test_single_turn(family, tags):
    template, _, marked = FAMILIES[family]
    _, input_ids, targets, _ = expected(marked)
    assert prepare([{"messages": SINGLE_TURN}], char_tokenizer(chat_template=template(tags))) == [(input_ids, targets)]


@families
def test_supervised_text_agrees_with_the_generation_tags(family):
    template, marked, _ = FAMILIES[family]
    text, _, _, spans = expected(marked)
    renderer = ChatRenderer(char_tokenizer(), template(True))
    assert generation_spans(char_tokenizer(), template(True), MULTI_TURN) == (text, spans)
    # sftlab does not read the tags: it finds the same spans by rendering prefixes.
    assert renderer.conversation_examples(MULTI_TURN, [2, 4]).examples == [(text, spans)]
    assert ChatRenderer(char_tokenizer(), template(False)).conversation_examples(MULTI_TURN, [2, 4]).examples == [(text, spans)]


@families
@with_and_without_tags
def test_last_assistant_only(family, tags):
    template, marked, _ = FAMILIES[family]
    _, input_ids, targets, _ = expected(only_last_marked(marked))
    tokenizer = char_tokenizer(chat_template=template(tags))
    assert prepare([{"messages": MULTI_TURN}], tokenizer, last_assistant_only=True) == [(input_ids, targets)]


@families
@with_and_without_tags
def test_assistant_only_loss_off_trains_on_everything(family, tags):
    template, marked, _ = FAMILIES[family]
    _, input_ids, _, _ = expected(marked)
    tokenizer = char_tokenizer(chat_template=template(tags))
    assert prepare([{"messages": MULTI_TURN}], tokenizer, assistant_only_loss=False) == [(input_ids, input_ids[1:] + [X])]


@families
def test_prompt_tokens_are_what_inference_feeds(family):
    template, marked, _ = FAMILIES[family]
    tokenizer = char_tokenizer(chat_template=template(False))
    ((input_ids, targets),) = prepare([{"messages": MULTI_TURN}], tokenizer)
    # first token of each supervised run: position t + 1 where targets[t] starts being supervised
    starts = [t + 1 for t in range(len(targets)) if targets[t] != X and (t == 0 or targets[t - 1] == X)]
    assert len(starts) == 2
    for start, turn in zip(starts, [2, 4]):
        fed = tokenizer.apply_chat_template(MULTI_TURN[:turn], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert input_ids[:start] == fed


# ---------------------------------------------------------------- other shapes of chat data


def as_sharegpt(messages):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": speaker[m["role"]], "value": m["content"]} for m in messages]


@families
def test_sharegpt_conversations(family):
    template, marked, _ = FAMILIES[family]
    _, input_ids, targets, _ = expected(marked)
    record = {"conversations": as_sharegpt(MULTI_TURN)}
    assert prepare([record], char_tokenizer(chat_template=template(False))) == [(input_ids, targets)]


@families
def test_chat_prompt_completion_trains_on_the_completion_only(family):
    template, marked, _ = FAMILIES[family]
    tokenizer = char_tokenizer(chat_template=template(False))
    record = {"prompt": MULTI_TURN[:4], "completion": MULTI_TURN[4:]}  # the earlier reply "Yo" is prompt
    _, input_ids, targets, _ = expected(only_last_marked(marked))
    assert prepare([record], tokenizer) == [(input_ids, targets)]
    assert prepare([record], tokenizer, completion_only_loss=False) == [(input_ids, input_ids[1:] + [X])]


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma"])
def test_no_double_bos_when_the_template_writes_bos(family):
    template, marked, _ = FAMILIES[family]
    _, input_ids, targets, _ = expected(marked)
    tokenizer = char_tokenizer(chat_template=template(False), bos=True)
    assert tokenizer("x")["input_ids"][0] == BOS  # this tokenizer adds BOS to plain text...
    ((got_ids, got_targets),) = prepare([{"messages": MULTI_TURN}], tokenizer)
    assert got_ids.count(BOS) == 1 and got_ids[0] == BOS  # ...but the template's BOS is the only one
    assert (got_ids, got_targets) == (input_ids, targets)


def test_chat_adds_no_bos_the_template_does_not_write():
    # Same as apply_chat_template: the template alone decides the special tokens of a conversation.
    _, input_ids, targets, _ = expected(FAMILIES["chatml"][2])
    assert prepare([{"messages": SINGLE_TURN}], char_tokenizer(chat_template=chatml(False), bos=True)) == [(input_ids, targets)]


def test_reply_with_merges_is_supervised_whole():
    im_start, im_end = special_id("<|im_start|>"), special_id("<|im_end|>")
    hell, o = merged_id("hell"), char_id("o")
    tokenizer = char_tokenizer(chat_template=chatml(False))
    prompt = [im_start] + ids("user\nHi") + [im_end] + ids("\n") + [im_start] + ids("assistant\n")
    reply = [hell, o, im_end]
    assert prepare([{"messages": [HI, {"role": "assistant", "content": "hello"}]}], tokenizer) == [
        (prompt + reply + ids("\n"), [X] * (len(prompt) - 1) + reply + [X, X])
    ]


def test_truncation_inside_the_last_reply():
    _, input_ids, targets, _ = expected(FAMILIES["chatml"][2])  # ... assistant\n Yo <|im_end|> \n
    examples = prepare_examples(
        [{"messages": SINGLE_TURN}], char_tokenizer(chat_template=chatml(False)), TargetSettings(max_length=len(input_ids) - 2),
        use_cache=False,
    )
    # Cut after "Y": the last position cannot see the "o" that was cut, so its target is -100 too.
    assert examples[0][0].tolist() == input_ids[:-2]
    assert examples[0][1].tolist() == targets[:-3] + [X]
    assert examples.stats["truncated"] == 1


# ---------------------------------------------------------------- templates that are not prefix-stable


def mistral_system_last(tags: bool) -> str:
    """Like Mistral's newer templates: the system prompt goes into the LAST user turn, so the render
    of a conversation's beginning is not a prefix of the whole render."""
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% set ns = namespace(last_user=0) %}{% for m in loop_messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.index0 == ns.last_user else '') + message['content'] + ' [/INST]' }}"
        "{% else %}" + _reply("{{ message['content'] + eos_token }}", tags) + "{% endif %}{% endfor %}"
    )


ECHO = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Say 4"},
    {"role": "assistant", "content": "4"},  # the reply repeats the end of the user's text
    {"role": "user", "content": "4?"},
    {"role": "assistant", "content": "4"},
]


@with_and_without_tags
@pytest.mark.parametrize(
    "messages, main, extra",
    [
        (MULTI_TURN, "<s>[INST] Hi [/INST]Yo</s>[INST] Be brief.\n\n2+2? [/INST]⟦4</s>⟧", "<s>[INST] Be brief.\n\nHi [/INST]⟦Yo</s>⟧"),
        (ECHO, "<s>[INST] Say 4 [/INST]4</s>[INST] S\n\n4? [/INST]⟦4</s>⟧", "<s>[INST] S\n\nSay 4 [/INST]⟦4</s>⟧"),
    ],
    ids=["multi-turn", "reply-echoes-user"],
)
def test_template_that_moves_the_system_prompt(messages, main, extra, tags):
    # Inference for the first reply feeds "[INST] Be brief.\n\nHi [/INST]" (the system prompt sits in the
    # last user message, which is then "Hi"); the whole render has "[INST] Hi [/INST]" there. So the
    # first reply is trained in an example of its own, after exactly what inference feeds, and the
    # whole render trains the last reply only.
    renderer = ChatRenderer(char_tokenizer(), mistral_system_last(tags))
    planned = renderer.conversation_examples(messages, [2, 4])
    assert planned.examples == [expected(main)[::3], expected(extra)[::3]]
    assert planned.turns == [[4], [2]]
    if tags:  # generation tags mark both replies in the whole render: the first after the wrong prefix
        full, _, _, spans = expected(main.replace("Yo</s>", "⟦Yo</s>⟧").replace("]4</s>[", "]⟦4</s>⟧["))
        assert generation_spans(char_tokenizer(), mistral_system_last(tags), messages) == (full, spans)
    tokenizer = char_tokenizer(chat_template=mistral_system_last(tags))
    examples = prepare_examples([{"messages": messages}], tokenizer, TargetSettings(), use_cache=False)
    assert [(examples[i][0].tolist(), examples[i][1].tolist()) for i in range(len(examples))] == [
        expected(main)[1:3], expected(extra)[1:3]]
    assert examples.record_index.tolist() == [0, 0]
    chat = examples.stats["chat"]
    assert (chat["turns_trained"], chat["records_split"], chat["extra_examples"]) == (2, 1, 1)
    assert chat["extra_tokens"] == len(expected(extra)[1])


# ---------------------------------------------------------------- which template


def test_tokenizer_without_chat_template_is_a_clear_error():
    with pytest.raises(DataError, match="the tokenizer has no chat template") as error:
        prepare([{"messages": SINGLE_TURN}], char_tokenizer())
    message = str(error.value)
    assert "field 'chat_template'" in message
    assert "set chat_template: chatml" in message


def test_builtin_chatml_for_a_tokenizer_without_template():
    _, input_ids, targets, spans = expected(FAMILIES["chatml"][1])
    assert prepare([{"messages": MULTI_TURN}], char_tokenizer(), chat_template="chatml") == [(input_ids, targets)]
    # The built-in template carries generation tags, and they agree.
    assert generation_spans(char_tokenizer(), CHATML, MULTI_TURN)[1] == spans


def test_configured_template_wins_over_the_tokenizer_one(tmp_path):
    _, input_ids, targets, _ = expected(FAMILIES["gemma"][2])
    tokenizer = char_tokenizer(chat_template=chatml(False))
    assert prepare([{"messages": SINGLE_TURN}], tokenizer, chat_template=gemma(False)) == [(input_ids, targets)]
    path = tmp_path / "gemma.jinja"
    path.write_text(gemma(False), encoding="utf-8")
    assert prepare([{"messages": SINGLE_TURN}], tokenizer, chat_template=str(path)) == [(input_ids, targets)]


def test_unknown_template_name():
    with pytest.raises(DataError, match="neither a built-in name, a file nor a Jinja template") as error:
        prepare([{"messages": SINGLE_TURN}], char_tokenizer(), chat_template="chatml2")
    assert "one of ['chatml']" in str(error.value)
