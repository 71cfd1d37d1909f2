"""Field maps (a source's own field names for sftlab's) and the Alpaca format: renamed records give
exactly the examples of records written with sftlab's names; errors name the source's fields."""

from __future__ import annotations

import pytest

from sftlab import ConfigError, DataError, TargetSettings, prepare_examples
from sftlab.data.fields import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, FieldMap
from tiny import char_tokenizer, ids, special_id

X = -100
EOS = special_id("</s>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare(records, **kwargs):
    settings = kwargs.pop("settings", TargetSettings())
    return prepare_examples(records, char_tokenizer(chat_template=CHATML), settings, use_cache=False, **kwargs)


def as_lists(examples):
    return [(list(map(int, i)), list(map(int, t))) for i, t in (examples[k] for k in range(len(examples)))]


def test_prompt_and_completion_under_other_names():
    mapped = prepare(
        [{"question": "Q: 1+1=", "answer": "2", "id": 7}], fields={"prompt": "question", "completion": "answer"}
    )
    plain = prepare([{"prompt": "Q: 1+1=", "completion": "2"}])
    assert as_lists(mapped) == as_lists(plain) == [(ids("Q: 1+1=2") + [EOS], [X] * 6 + ids("2") + [EOS, X])]
    assert mapped.stats["formats"] == {"prompt_completion": 1}


def test_messages_role_and_content_under_other_names():
    dialog = [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Yo"}]
    mapped = prepare([{"dialog": dialog}], fields={"messages": "dialog", "role": "speaker", "content": "text"})
    plain = prepare([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}])
    assert as_lists(mapped) == as_lists(plain)
    assert len(mapped) == 1 and mapped.stats["formats"] == {"conversational": 1}


def test_sharegpt_under_another_name_stays_automatic():
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    mapped = prepare([{"dialog": turns}], fields={"messages": "dialog"})
    assert as_lists(mapped) == as_lists(prepare([{"conversations": turns}]))


def test_errors_name_the_sources_own_fields():
    fields = {"messages": "dialog", "role": "speaker", "content": "text"}
    bad = [{"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "robot", "text": "beep"}]}]
    with pytest.raises(DataError) as error:
        prepare(bad, fields=fields)
    assert str(error.value).startswith(
        "list(1 records), record 0, field 'dialog[1].speaker': unknown role; found str 'robot'"
    )
    good = [{"dialog": [{"speaker": "user", "text": "Hi"}, {"speaker": "assistant", "text": "Yo"}]}]
    skipped = prepare(bad + good, fields=fields, skip_invalid_records=True)
    assert skipped.stats["skipped_invalid"] == {"invalid dialog[].speaker: unknown role": 1}
    assert len(skipped) == 1


def test_a_mapped_field_next_to_a_field_of_the_same_name_is_an_error():
    with pytest.raises(DataError) as error:
        prepare(
            [{"question": "Q", "prompt": "other", "answer": "A"}], fields={"prompt": "question", "completion": "answer"}
        )
    assert "the record has 'prompt' and a field mapped to it" in str(error.value)


def test_an_unknown_field_name_in_the_map_suggests_the_right_one():
    with pytest.raises(ConfigError) as error:
        FieldMap({"promt": "question"})
    assert str(error.value).startswith("field 'fields.promt': unknown field 'promt'")
    assert "did you mean 'prompt'?" in str(error.value)


# --- Alpaca ---------------------------------------------------------------------------------------


def encode(text):
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_alpaca_is_trained_on_the_output_after_the_documented_layout():
    examples = prepare(
        [
            {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
            {"instruction": "Add.", "input": "2 2", "output": "4"},
        ]
    )
    assert ALPACA_PROMPT.format(instruction="Add 2 and 2.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd 2 and 2.\n\n### Response:\n"
    )
    for (input_ids, targets), prompt in zip(
        as_lists(examples),
        [
            ALPACA_PROMPT.format(instruction="Add 2 and 2."),
            ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 2"),
        ],
    ):
        prompt_ids = encode(prompt)
        assert input_ids == prompt_ids + ids("4") + [EOS]
        # Only the output and EOS are targets: the last prompt token predicts "4", "4" predicts EOS.
        assert targets == [X] * (len(prompt_ids) - 1) + ids("4") + [EOS, X]
    assert "### Input:\n2 2\n\n### Response:\n" in ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 2")
    assert examples.stats["formats"] == {"alpaca": 2}


def test_alpaca_as_a_conversation_through_the_chat_template():
    examples = prepare([{"instruction": "Add.", "input": "2 2", "output": "4"}], alpaca_layout="chat")
    chat = prepare([{"messages": [{"role": "user", "content": "Add.\n\n2 2"}, {"role": "assistant", "content": "4"}]}])
    assert as_lists(examples) == as_lists(chat)
    assert examples.stats["formats"] == {"alpaca": 1}


def test_alpaca_under_other_names_and_its_errors():
    mapped = prepare([{"task": "Add.", "answer": "4"}], fields={"instruction": "task", "output": "answer"})
    assert as_lists(mapped) == as_lists(prepare([{"instruction": "Add.", "output": "4"}]))
    with pytest.raises(DataError) as error:
        prepare([{"task": "Add."}], fields={"instruction": "task", "output": "answer"})
    assert "field 'answer': an Alpaca record needs 'instruction' and 'output'" in str(error.value)
    with pytest.raises(DataError) as error:
        prepare([{"instruction": "Add.", "output": "  "}])
    assert "field 'output': is empty" in str(error.value)


def test_changing_the_field_map_or_the_layout_misses_the_cache(tmp_path):
    tokenizer, cache = char_tokenizer(chat_template=CHATML), str(tmp_path)
    alpaca = [{"instruction": "Add.", "output": "4"}]
    assert prepare_examples(alpaca, tokenizer, cache_dir=cache).stats["cached"] is False
    assert prepare_examples(alpaca, tokenizer, cache_dir=cache).stats["cached"] is True
    assert prepare_examples(alpaca, tokenizer, cache_dir=cache, alpaca_layout="chat").stats["cached"] is False
    # The same records read two ways: as text, or (mapped) as prompt/completion.
    records = [{"text": "abc", "question": "Q", "answer": "A"}]
    as_text = prepare_examples(records, tokenizer, cache_dir=cache)
    mapped = prepare_examples(
        records, tokenizer, cache_dir=cache, fields={"prompt": "question", "completion": "answer"}
    )
    assert mapped.stats["cached"] is False
    assert (as_text.stats["formats"], mapped.stats["formats"]) == ({"text": 1}, {"prompt_completion": 1})
