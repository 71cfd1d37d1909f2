"""RecordValidator: every record is checked, and every error names the record index and the field."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sftlab import DataError, TargetSettings, load_records, prepare_examples
from sftlab.data.formats import CONVERSATIONAL, PRETOKENIZED, PROMPT_COMPLETION, TEXT, RecordValidator, detect_format
from tiny import char_tokenizer

VOCAB = 119  # len(char_tokenizer()): 18 special tokens + 96 characters + 5 merges

GOOD_TEXT = {"text": "fine"}
GOOD_PAIR = {"prompt": "Q", "completion": "A"}
USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Yo"}


def validate_records(records, **kwargs) -> SimpleNamespace:
    """One validation pass over `records` as preparation runs it (workers.ChunkPass, then the pass's
    end check): the valid records, and the formats and skip reasons counted."""
    validator = RecordValidator(**kwargs)
    valid = validator.validate(records)
    validator.finish(records.name)
    return SimpleNamespace(records=valid, formats=validator.formats, skipped=validator.skipped)


def test_vocab_size_of_the_test_tokenizer():
    assert len(char_tokenizer()) == VOCAB


def error_for(records, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        validate_records(load_records(records), vocab_size=VOCAB, **kwargs)
    return str(error.value)


# (records, index of the bad record, field, problem, what was found)
CASES = {
    "text missing": (
        [GOOD_TEXT, {"body": "x"}], 1, "body", "record fits no known format", "found fields ['body']",
    ),
    "completion missing": (
        [GOOD_PAIR, {"prompt": "Q"}], 1, "prompt", "a 'prompt' without a 'completion'", "found fields ['prompt']",
    ),
    "prompt missing": (
        [GOOD_PAIR, {"completion": "A"}], 1, "completion", "a 'completion' without a 'prompt'", None,
    ),
    "text is a list": ([GOOD_TEXT, {"text": ["a", "b"]}], 1, "text", "must be a string", "found list ['a', 'b']"),
    "text is None": ([GOOD_TEXT, GOOD_TEXT, {"text": None}], 2, "text", "must be a string", "found None"),
    "completion is a number": ([GOOD_PAIR, {"prompt": "Q", "completion": 5}], 1, "completion", "must be a string", "found int 5"),
    "prompt is a number": ([{"prompt": 2.5, "completion": "A"}], 0, "prompt", "must be a string", "found float 2.5"),
    "text is empty": ([GOOD_TEXT, {"text": "  \n"}], 1, "text", "is empty", "found '  \\n'"),
    "completion is empty": ([GOOD_PAIR, {"prompt": "Q", "completion": ""}], 1, "completion", "is empty", "found ''"),
    "messages is not a list": ([{"messages": "Hi"}], 0, "messages", "must be a list of messages", "found str 'Hi'"),
    "empty conversation": ([{"messages": [USER, ASSISTANT]}, {"messages": []}], 1, "messages", "is an empty conversation", "found []"),
    "single message": ([{"messages": [USER, ASSISTANT]}, {"messages": [ASSISTANT]}], 1, "messages",
                       "a conversation needs at least two messages", "found 1 message"),
    "message is not a dict": ([{"messages": ["Hi", ASSISTANT]}], 0, "messages[0]", "must be a message dict", "found str 'Hi'"),
    "unknown role": ([{"messages": [USER, {"role": "robot", "content": "beep"}]}], 0, "messages[1].role", "unknown role", "found str 'robot'"),
    "role missing": ([{"messages": [{"content": "Hi"}, ASSISTANT]}], 0, "messages[0].role", "unknown role", "found None"),
    "content is None": ([{"messages": [{"role": "user", "content": None}, ASSISTANT]}], 0, "messages[0].content",
                        "must be a string", "found None"),
    "content is a number": ([{"messages": [USER, {"role": "assistant", "content": 4}]}], 0, "messages[1].content",
                            "must be a string", "found int 4"),
    "assistant content empty": ([{"messages": [USER, {"role": "assistant", "content": " "}]}], 0, "messages[1].content",
                                "assistant message is empty", "found ' '"),
    "reasoning is not a string": ([{"messages": [USER, {"role": "assistant", "content": "Yo", "thinking": ["a"]}]}], 0,
                                  "messages[1].thinking", "must be a string", "found list ['a']"),
    "tool calls on a user message": ([{"messages": [{"role": "user", "content": "x", "tool_calls": []}, ASSISTANT]}], 0,
                                     "messages[0].tool_calls", "only assistant messages make tool calls", "found role 'user'"),
    "tool calls not a list": ([{"messages": [USER, {"role": "assistant", "tool_calls": {"name": "f"}}]}], 0,
                              "messages[1].tool_calls", "must be a list of tool calls", "found dict {'name': 'f'}"),
    "tool call arguments a list": ([{"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}],
                                   0, "messages[1].tool_calls[0].function.arguments", "arguments must be a JSON object", "found list [1]"),
    "tools hold a string": ([{"messages": [USER, ASSISTANT], "tools": ["get_temp"]}], 0, "tools[0]", "must be a function schema",
                            "found str 'get_temp'"),
    "template kwargs not a mapping": ([{"messages": [USER, ASSISTANT], "chat_template_kwargs": [1]}], 0, "chat_template_kwargs",
                                      "must be a mapping of template arguments", "found list [1]"),
    "assistant with nothing to say": ([{"messages": [USER, {"role": "assistant", "content": None}]}], 0, "messages[1].content",
                                      "must be a string", "found None"),
    "ends on a user turn": ([{"messages": [USER, ASSISTANT, {"role": "user", "content": "Bye"}]}], 0, "messages[2].role",
                            "conversation ends on a non-assistant turn", "found user"),
    "sharegpt unknown speaker": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "beep"}]}],
                                 0, "conversations[1].from", "unknown speaker", "found str 'robot'"),
    "sharegpt value None": ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": None}]}],
                            0, "conversations[1].value", "must be a string", "found None"),
    "chat completion without assistant": ([{"prompt": [USER], "completion": [{"role": "user", "content": "x"}]}], 0,
                                          "completion", "completion has no assistant message", None),
    "chat prompt is a string": ([{"prompt": "Hi", "completion": [ASSISTANT]}], 0, "prompt", "must be a list of messages",
                                "found str 'Hi'"),
    "mixed formats": ([GOOD_TEXT, GOOD_TEXT, GOOD_PAIR], 2, "completion,prompt", "mixed formats in one dataset",
                      "found a prompt_completion record"),
    "input_ids empty": ([{"input_ids": []}], 0, "input_ids", "must be a non-empty list of integers", "found list []"),
    "input_ids holds a string": ([{"input_ids": [20, "21"]}], 0, "input_ids[1]", "must hold integers", "found str '21'"),
    "input_ids holds a bool": ([{"input_ids": [20, True]}], 0, "input_ids[1]", "must hold integers", "found bool True"),
    "token id too large": ([{"input_ids": [20, 21]}, {"input_ids": [20, 119]}], 1, "input_ids[1]",
                           "token id out of the vocabulary range", "found 119"),
    "token id negative": ([{"input_ids": [-100, 20]}], 0, "input_ids[0]", "token id out of the vocabulary range", "found -100"),
    "label out of range": ([{"input_ids": [20, 21], "labels": [-1, 21]}], 0, "labels[0]",
                           "token id out of the vocabulary range", "found -1"),
    "labels length mismatch": ([{"input_ids": [20, 21, 22], "labels": [21, 22]}], 0, "labels",
                               "labels and input_ids differ in length", "found 2 labels for 3 input_ids"),
    "labels already shifted": ([{"input_ids": [20, 21, 22], "labels": [21, 22, -100]}], 0, "labels[0]",
                               "a label must be -100 or the input id at the same position", "found 21 where input_ids[0] is 20"),
    "completion_mask too short": ([{"input_ids": [20, 21, 22], "completion_mask": [0, 1]}], 0, "completion_mask",
                                  "completion_mask must be 0/1, one per input id", "found 2 values"),
    "completion_mask not 0/1": ([{"input_ids": [20, 21, 22], "completion_mask": [0, 1, 2]}], 0, "completion_mask",
                                "completion_mask must be 0/1, one per input id", "found 3 values"),
    "completion_mask not a list": ([{"input_ids": [20, 21], "completion_mask": "01"}], 0, "completion_mask",
                                   "completion_mask must be 0/1, one per input id", "found str '01' values"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_error_names_record_and_field(name):
    records, index, field, problem, found = CASES[name]
    message = error_for(records)
    assert message.startswith(f"list({len(records)} records), record {index}, field '{field}': ")
    assert problem in message
    if found is not None:
        assert f"; {found};" in message + ";"
    assert "; fix: " in message  # every error says how to get past it


def test_default_fix_offers_skipping():
    message = error_for([{"text": None}])
    assert message.endswith("fix: correct the record, or set skip_invalid_records=true to count and skip such records")


def test_every_record_is_validated_not_only_the_first():
    records = [GOOD_TEXT] * 5 + [{"text": 7}] + [GOOD_TEXT] * 2
    assert "record 5, field 'text'" in error_for(records)


def test_error_in_a_file_names_the_file_and_the_record_within_it(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(GOOD_TEXT) + "\n" + json.dumps(GOOD_TEXT) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(GOOD_TEXT) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(DataError) as error:
        validate_records(load_records(str(tmp_path / "*.jsonl")))
    # file:line, then the record's index within that file.
    assert str(error.value).startswith(f"{tmp_path / 'b.jsonl'}:2, record 1, field 'text': must be a string")


def test_good_records_of_every_format():
    cases = {
        TEXT: [{"text": "hi"}],
        PROMPT_COMPLETION: [{"prompt": "Q", "completion": "A"}],
        CONVERSATIONAL: [{"messages": [USER, ASSISTANT]}, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}],
        "chat_prompt_completion": [{"prompt": [USER], "completion": [ASSISTANT]}],
        PRETOKENIZED: [{"input_ids": [20, 118], "labels": [-100, 118]}, {"input_ids": [20], "completion_mask": [1]}],
    }
    for kind, records in cases.items():
        validated = validate_records(load_records(records), vocab_size=VOCAB)
        assert dict(validated.formats) == {kind: len(records)}
        assert [r.index for r in validated.records] == list(range(len(records)))


def test_sharegpt_becomes_role_and_content():
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    (validated,) = validate_records(load_records([record])).records
    assert validated.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]


def test_assistant_tool_call_without_content_is_valid():
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    record = {"messages": [USER, call, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "42"}]}
    assert validate_records(load_records([record])).formats == {CONVERSATIONAL: 1}


def test_detect_format_by_field_names():
    assert detect_format({"input_ids": [1], "text": "x"}) == PRETOKENIZED
    assert detect_format({"messages": [], "text": "x"}) == CONVERSATIONAL
    assert detect_format({"prompt": "a", "completion": "b", "text": "x"}) == PROMPT_COMPLETION
    assert detect_format({"prompt": [], "completion": "b"}) == "chat_prompt_completion"
    assert detect_format({"body": "x"}, text_field="body") == TEXT


# ---------------------------------------------------------------- skip_invalid_records


SOME_BAD = [
    {"text": "one"},                   # 0 kept
    {"text": None},                    # 1 must be a string
    {"text": ""},                      # 2 is empty
    {"text": "four"},                  # 3 kept
    {"text": 5},                       # 4 must be a string
    {"prompt": "Q", "completion": "A"},  # 5 mixed formats
    {"body": "x"},                     # 6 fits no format
]
SOME_BAD_REASONS = {
    "invalid text: must be a string": 2,
    "invalid text: is empty": 1,
    "invalid completion,prompt: mixed formats in one dataset": 1,
    "invalid body: record fits no known format": 1,
}


def test_skip_invalid_counts_skips_by_reason():
    validated = validate_records(load_records(SOME_BAD), skip_invalid=True)
    assert [r.index for r in validated.records] == [0, 3]
    assert [r.text for r in validated.records] == ["one", "four"]
    assert dict(validated.skipped) == SOME_BAD_REASONS


def test_skip_reasons_do_not_depend_on_the_message_position():
    robot = {"role": "robot", "content": "beep"}
    records = [
        {"messages": [USER, ASSISTANT]},
        {"messages": [USER, robot, USER, ASSISTANT]},
        {"messages": [USER, ASSISTANT, robot, ASSISTANT]},
    ]
    validated = validate_records(load_records(records), skip_invalid=True)
    assert dict(validated.skipped) == {"invalid messages[].role: unknown role": 2}


def test_skip_invalid_through_prepare_examples_reports_stats():
    examples = prepare_examples(SOME_BAD, char_tokenizer(), TargetSettings(), skip_invalid_records=True, use_cache=False)
    assert examples.stats["skipped_invalid"] == SOME_BAD_REASONS
    assert examples.stats["records"] == 7
    assert examples.stats["examples"] == 2
    assert examples.record_index.tolist() == [0, 3]


def test_every_record_invalid_even_when_skipping():
    with pytest.raises(DataError, match="no valid records") as error:
        validate_records(load_records([{"text": None}, {"text": ""}]), skip_invalid=True)
    assert "2 records skipped" in str(error.value)


def test_a_broken_first_record_does_not_fix_the_format():
    # The first record is a conversation with no assistant turn; the rest are good text records.
    records = [{"messages": [{"role": "user", "content": "hi"}]}] + [GOOD_TEXT] * 3
    validated = validate_records(load_records(records), skip_invalid=True)
    assert validated.formats == {TEXT: 3}
    assert sum(validated.skipped.values()) == 1


def test_chat_records_are_normalised_as_transformers_renders_them():
    """None-valued keys dropped, reasoning under every name, tool-call arguments as objects, a tool-call
    turn's missing content as "", a JSON tool result as text, the train flag taken out of the message."""
    record = {"messages": [
        {"role": "user", "content": "Temp?", "name": None},
        {"role": "assistant", "content": None, "reasoning": "use it", "train": True,
         "tool_calls": [{"id": "c1", "function": {"name": "get_temp", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"temp": 7}},
        {"role": "assistant", "content": "7C.", "tool_calls": None},
    ], "tools": '[{"type": "function", "function": {"name": "get_temp"}}]', "chat_template_kwargs": '{"enable_thinking": false}'}
    (validated,) = validate_records(load_records([record]), vocab_size=VOCAB).records
    assert validated.messages == [
        {"role": "user", "content": "Temp?"},
        {"thinking": "use it", "role": "assistant", "reasoning": "use it", "content": "", "reasoning_content": "use it",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_temp", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 7}'},
        {"role": "assistant", "content": "7C."},
    ]
    assert validated.train == [None, True, None, None]
    assert validated.tools == [{"type": "function", "function": {"name": "get_temp"}}]
    assert validated.template_kwargs == {"enable_thinking": False}


# --- the config: the only validator, checking each rule beside its fields ----------------------


def config_error(values: dict, source: str | None = "run.yaml"):
    from sftlab.config import make_config
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "d.jsonl", **values}, source=source)
    return error.value


def test_fsdp_with_merge_lora_is_refused_by_the_config():
    error = config_error({"fsdp": True, "use_peft": True, "merge_lora": True})
    assert error.field == "merge_lora"
    assert str(error) == ("run.yaml, field 'merge_lora': merge_lora is not available with fsdp: true "
                          "(the merge needs the whole model in one process); "
                          "fix: merge final/ afterwards in one process: "
                          "PeftModel.from_pretrained(base, final).merge_and_unload()")


@pytest.mark.parametrize("values, field, wanted, found", [
    ({"max_grad_norm": 1.0}, "max_grad_norm",
     "null (clipping needs the norm of every gradient before any update)", "1.0"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "1", "2"),
    ({"skip_nonfinite_steps": True}, "skip_nonfinite_steps",
     "false (the update is made before the loss is known to be finite)", "True"),
    ({"fsdp": True}, "fsdp", "false, and one process", "True"),
])
def test_optimizer_in_backward_conflicts_are_refused_by_the_config(values, field, wanted, found):
    error = config_error({"optimizer_in_backward": True, "max_grad_norm": None, **values})
    assert error.field == field
    assert str(error) == (f"run.yaml, field '{field}': optimizer_in_backward needs {field}: {wanted}; found {found}; "
                          f"fix: set {field} accordingly, or optimizer_in_backward: false")


def test_tools_are_read_and_parsed_at_config_time(tmp_path, monkeypatch):
    tools = [{"type": "function", "function": {"name": "get_temp"}}]
    (tmp_path / "tools.json").write_text(json.dumps({"tools": tools}))
    from sftlab.config import make_config

    assert make_config({"model": "m", "train_data": "d.jsonl", "tools": str(tmp_path / "tools.json")}).tools == tools
    assert make_config({"model": "m", "train_data": "d.jsonl", "tools": json.dumps(tools)}).tools == tools
    expected = "expected a list of function schemas, a path to a .json file holding one, or its JSON text"
    missing = config_error({"tools": "tools.json"})  # a path that names no file: said so, not "invalid JSON"
    assert missing.field == "tools"
    assert str(missing) == ("run.yaml, field 'tools': tools file not found; found 'tools.json'; "
                            f"{expected}; fix: check the path (relative paths start from the working directory)")
    assert config_error({"tools": "configs/tools.json"}).problem == "tools file not found"
    (tmp_path / "bad.json").write_text('[{"type": "function",]')
    monkeypatch.chdir(tmp_path)
    bad = config_error({"tools": "bad.json"})
    assert bad.field == "tools"
    assert str(bad) == ("run.yaml, field 'tools': tools is neither a .json file nor JSON text; "
                        f"found Expecting property name enclosed in double quotes in 'bad.json'; {expected}")
    not_a_list = config_error({"tools": '{"name": "get_temp"}'})
    assert (not_a_list.field, not_a_list.found) == ("tools", "dict")
    assert not_a_list.problem == "tools must be a list of function schemas"


def test_an_unknown_key_suggests_the_known_one_at_the_top_and_in_a_data_source():
    top = config_error({"learnig_rate": 1e-4})
    assert str(top) == "run.yaml: unknown config key 'learnig_rate'; fix: did you mean 'learning_rate'?"
    source = config_error({"train_data": [{"path": "a.jsonl", "max_sample": 3}]})
    assert source.field == "train_data[0].max_sample"
    assert str(source) == ("run.yaml, field 'train_data[0].max_sample': unknown key 'max_sample' in a data source; "
                           "fix: did you mean 'max_samples'?")
    field_map = config_error({"fields": {"complition": "answer"}})
    assert field_map.field == "fields.complition"
    assert field_map.fix == "did you mean 'completion'?"


def test_train_data_is_needed_only_without_a_dataset_object(tmp_path):
    from sftlab import SFTConfig, train
    from sftlab.errors import ConfigError
    from tiny_models import tiny_model

    tokenizer = char_tokenizer()
    config = SFTConfig(model="unused", output_dir=str(tmp_path), use_cache=False, max_steps=1)
    assert config.train_data is None
    with pytest.raises(ConfigError) as error:
        train(config, model=tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)
    assert error.value.field == "train_data"
    assert str(error.value) == ("field 'train_data': train_data is not set; "
                                "fix: set train_data: to a data file, a folder or a list of sources, "
                                "or pass train_dataset= to train()")
    result = train(config, model=tiny_model("llama", len(tokenizer)), tokenizer=tokenizer,
                   train_dataset=[{"prompt": "Q", "completion": " A"}] * 4)
    assert [r["step"] for r in result.history if r["type"] == "train"] == [1]


def test_the_config_imports_nothing_of_sftlab_but_errors():
    import os
    import subprocess
    import sys

    import sftlab

    # sftlab/__init__.py imports the public API (data included), so the package is stood in for
    # by an empty module: what remains in sys.modules is what config.py itself imports, also while
    # it validates (imports inside validators were the hidden cycle).
    package = os.path.dirname(sftlab.__file__)
    code = ("import sys, types; package = types.ModuleType('sftlab'); package.__path__ = [sys.argv[1]]; "
            "sys.modules['sftlab'] = package; import sftlab.config; "
            "sftlab.config.make_config({'model': 'm', 'train_data': [{'path': 'a.jsonl', 'fields': {'prompt': 'q'}}], "
            "'fields': {'completion': 'a'}, 'eval_generate_samples': 2, 'eval_generate_metrics': ['contains', 'm:f'], "
            "'tools': '[]'}); "
            "print(sorted(name for name in sys.modules if name.startswith('sftlab')))")
    loaded = subprocess.run([sys.executable, "-c", code, package], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['sftlab', 'sftlab.config', 'sftlab.errors']"


def test_an_assistant_turn_with_no_content_and_empty_tool_calls_is_named_as_empty():
    # tool_calls [] is dropped as no calls at all; the turn then says nothing, and the error says
    # that of the turn, not "content must be a string; found None".
    record = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": []}]}
    with pytest.raises(DataError) as caught:
        validate_records(load_records([record]))
    assert (caught.value.index, caught.value.field) == (0, "messages[1]")
    assert caught.value.problem == "assistant message is empty"
    assert caught.value.found == "no content, and tool_calls []"
    skipped = validate_records(load_records([record, {"messages": [USER, ASSISTANT]}]), skip_invalid=True)
    assert len(skipped.records) == 1 and sum(skipped.skipped.values()) == 1
    with_text = {"messages": [USER, {"role": "assistant", "content": "Yo", "tool_calls": []}]}
    assert len(validate_records(load_records([with_text])).records) == 1  # text and no calls: fine as before
