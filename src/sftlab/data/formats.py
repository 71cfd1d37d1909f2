"""Detect the format of every record and validate it, naming the record, field and fix.

Formats:
  text                  {"text": str}  (field name configurable)
  prompt_completion     {"prompt": str, "completion": str}
  conversational        {"messages": [{"role", "content"}, ...]}  (ShareGPT "conversations" converted;
                        content a string, a list of "text"/"thinking" parts, or a mapping:
                        {"text"}, {"parts"}, {"blocks"} as the Apertus format writes them)
  chat_prompt_completion {"prompt": [messages], "completion": [messages]}
                        both chat formats may carry "tools" (function schemas, or their JSON text)
                        and "chat_template_kwargs"; messages may carry OpenAI-style "tool_calls",
                        reasoning ("reasoning_content", "thinking" or "reasoning"), "train": bool
                        and "weight": 0 or 1 (the same choice: 0 is context only)
  pretokenized          {"input_ids": [int], "labels"?: [int | -100], "completion_mask"?: [0/1]}
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sftlab.config import ROLES
from sftlab.data.sources import Records
from sftlab.errors import DataError, RecordError, describe

TEXT = "text"
PROMPT_COMPLETION = "prompt_completion"
CONVERSATIONAL = "conversational"
CHAT_PROMPT_COMPLETION = "chat_prompt_completion"
PRETOKENIZED = "pretokenized"

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


@dataclass
class Record:
    """One validated record, in a normal form the tokenizer stage consumes."""

    index: int  # position in the source, kept so every later message can name it
    format: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None
    # conversations: messages before this index are the prompt (chat prompt/completion)
    completion_start: int = 0
    tools: list[dict] | None = None  # function schemas the template renders (the record's own)
    template_kwargs: dict | None = None  # the record's chat_template_kwargs
    train: list[bool | None] | None = None  # per message: its "train" flag, where the record gives one
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    completion_mask: list[int] | None = None


def detect_format(record: dict, text_field: str = "text") -> str:
    """The format a single record is in, from its field names."""
    if "input_ids" in record:
        return PRETOKENIZED
    if "messages" in record or "conversations" in record:
        return CONVERSATIONAL
    if "prompt" in record and "completion" in record:
        if isinstance(record["prompt"], list) or isinstance(record["completion"], list):
            return CHAT_PROMPT_COMPLETION
        return PROMPT_COMPLETION
    if text_field in record:
        return TEXT
    fields = sorted(record.keys())
    hint = ""
    if "prompt" in record:
        hint = "a 'prompt' without a 'completion'"
    elif "completion" in record:
        hint = "a 'completion' without a 'prompt'"
    raise RecordError(
        "record fits no known format" + (f" ({hint})" if hint else ""),
        field=",".join(fields) or "(no fields)",
        found=f"fields {fields}",
        expected=f"'{text_field}', 'prompt'+'completion', 'messages', 'conversations' or 'input_ids'",
        fix="rename the fields, or set text_field if your text lives under another name",
    )


class RecordValidator:
    """Validation of one pass over a source, chunk by chunk: the format is fixed by the first
    record that validates, and the counts add up over the chunks.

    `normalize` (fields.FieldMap) renames a record's fields to sftlab's names, or converts it
    (Alpaca), before its format is detected; errors then name the source's own fields.
    `expected` with `expected_from` give a worker that validates chunks out of order what the
    pass found first: the format, and the index of the first valid record (before it, records
    are checked as if no format were fixed yet, exactly as in one pass)."""

    def __init__(
        self,
        *,
        text_field: str = "text",
        skip_invalid: bool = False,
        vocab_size: int | None = None,
        normalize=None,
        expected: str | None = None,
        expected_from: int = 0,
    ):
        self.text_field, self.skip_invalid, self.vocab_size = text_field, skip_invalid, vocab_size
        self.normalize = normalize
        self.expected_format, self.expected_from = expected, expected_from
        self.first_valid: int | None = None  # index of the first record that validated, in this pass
        self.formats: Counter = Counter()
        self.skipped: Counter = Counter()  # reason -> count

    def validate(self, records: Records) -> list[Record]:
        valid = []
        for offset, raw in enumerate(records.records):
            index = records.start + offset
            try:
                label = None
                if self.normalize is not None:
                    raw, label = self.normalize.apply(raw)
                kind = detect_format(raw, self.text_field)
                expected = self.expected_format if index >= self.expected_from else None
                if expected is not None and kind != expected:
                    raise RecordError(
                        "mixed formats in one dataset",
                        field=",".join(sorted(raw.keys())),
                        found=f"a {kind} record",
                        expected=f"{expected} like the first valid record",
                        fix="split the data into one file per format, or convert the records to one format",
                    )
                valid.append(_VALIDATORS[kind](raw, index, self.text_field, self.vocab_size))
                # Set by the first record that validates, so one broken record at the top cannot get
                # every good record skipped as "mixed formats".
                if self.expected_format is None:
                    self.expected_format, self.expected_from = kind, index
                if self.first_valid is None:
                    self.first_valid = index
                self.formats[label or kind] += 1
            except RecordError as bad:
                where = bad.field if self.normalize is None else self.normalize.source_field(bad.field)
                if self.skip_invalid:
                    # messages[3].role and messages[5].role are one reason, counted together.
                    reason = re.sub(r"\[\d+\]", "[]", where)
                    self.skipped[f"invalid {reason}: {bad.problem}"] += 1
                    continue
                source, row = records.locate(offset)
                raise DataError(
                    bad.problem,
                    source=source,
                    index=row,
                    field=where,
                    found=bad.found,
                    expected=bad.expected,
                    fix=bad.fix
                    or "correct the record, or set skip_invalid_records=true to count and skip such records",
                ) from None
        return valid

    def finish(self, name: str) -> None:
        """At the end of the pass: a source without one valid record is an error."""
        require_valid(self.formats, self.skipped, name)


def require_valid(formats: Counter, skipped: Counter, name: str) -> None:
    """A source of which no record validated (`formats` empty) is an error, with the reasons."""
    if not formats:
        raise DataError(
            "no valid records",
            source=name,
            found=f"{sum(skipped.values())} records skipped: {dict(skipped)}",
            fix="fix the data; see the reasons above",
        )


def _string(raw: dict, name: str, allow_empty: bool = False) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise RecordError("must be a string", field=name, found=describe(value), expected="a string")
    if not allow_empty and not value.strip():
        raise RecordError(
            "is empty",
            field=name,
            found=repr(value),
            expected="non-empty text",
            fix="remove the record or fill in the text",
        )
    return value


def _text(raw: dict, index: int, text_field: str, vocab_size: int | None) -> Record:
    return Record(index, TEXT, text=_string(raw, text_field))


def _prompt_completion(raw: dict, index: int, text_field: str, vocab_size: int | None) -> Record:
    return Record(index, PROMPT_COMPLETION, prompt=_string(raw, "prompt"), completion=_string(raw, "completion"))


# Names a message's reasoning comes under; the template gets all that transformers gives it.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _messages(value: Any, name: str, sharegpt: bool) -> tuple[list[dict], list[bool | None] | None]:
    """The messages in the form the template is rendered with, and each one's "train" flag (None: not given).

    As transformers' apply_chat_template does: keys whose value is None are dropped (OpenAI exports
    write `"tool_calls": null`), and reasoning under any of its names is also given as
    `reasoning_content` and `thinking` (gpt-oss templates read the latter). Tool-call arguments
    written as JSON text are parsed into objects, as serving stacks (vLLM) pass them to templates
    (the renderer gives a template that joins them as text their JSON text again).
    """
    if not isinstance(value, list):
        raise RecordError(
            "must be a list of messages",
            field=name,
            found=describe(value),
            expected="[{'role': ..., 'content': ...}, ...]",
        )
    if not value:
        raise RecordError(
            "is an empty conversation", field=name, found="[]", expected="at least a user and an assistant message"
        )
    messages, flags = [], []
    for position, message in enumerate(value):
        where = f"{name}[{position}]"
        if not isinstance(message, dict):
            raise RecordError(
                "must be a message dict", field=where, found=describe(message), expected="{'role': ..., 'content': ...}"
            )
        if sharegpt and "from" in message:
            speaker = message.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise RecordError(
                    "unknown speaker",
                    field=f"{where}.from",
                    found=describe(speaker),
                    expected=f"one of {sorted(SHAREGPT_ROLES)}",
                )
            rest = {k: v for k, v in message.items() if k not in ("from", "value")}
            message = {"role": SHAREGPT_ROLES[speaker], "content": message.get("value"), **rest}
            content_field = f"{where}.value"
        else:
            content_field = f"{where}.content"
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(
                "unknown role", field=f"{where}.role", found=describe(role), expected=f"one of {list(ROLES)}"
            )
        flag = message.pop("train", None)
        if flag is not None and not isinstance(flag, bool):
            raise RecordError(
                "must be true or false",
                field=f"{where}.train",
                found=describe(flag),
                expected="a boolean: whether to train on this message",
            )
        weight = message.pop("weight", None)
        if weight is not None:
            # 0/1 only: a fractional weight would need a weight per token through the store, batching and loss.
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                fractional = isinstance(weight, float) and 0 < weight < 1
                raise RecordError(
                    "fractional message weights are not supported" if fractional else "must be 0 or 1",
                    field=f"{where}.weight",
                    found=describe(weight),
                    expected='0 (context only) or 1 (trained), as "train": false/true',
                    fix="give 0 or 1: sftlab does not scale a message's loss by a fraction" if fractional else None,
                )
            if flag is not None and flag != bool(weight):
                raise RecordError(
                    'contradicts the message\'s "train" flag',
                    field=f"{where}.weight",
                    found=f"weight {describe(weight)} and train {describe(flag)}",
                    fix="give one of them",
                )
            flag = bool(weight)
        flags.append(flag)
        if "tool_calls" in message:
            if role != "assistant":
                raise RecordError(
                    "only assistant messages make tool calls", field=f"{where}.tool_calls", found=f"role {role!r}"
                )
            message["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            if not message["tool_calls"]:
                del message["tool_calls"]
                if message.get("content") is None and not any(message.get(key) for key in REASONING_FIELDS):
                    # Else "content must be a string; found None", which hides that the turn says nothing.
                    raise RecordError(
                        "assistant message is empty",
                        field=where,
                        found="no content, and tool_calls []",
                        expected="the text the model should learn to write, or at least one tool call",
                    )
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            if not isinstance(reasoning, str):
                field_name = next(key for key in REASONING_FIELDS if key in message)
                raise RecordError(
                    "must be a string",
                    field=f"{where}.{field_name}",
                    found=describe(reasoning),
                    expected="the reasoning text",
                )
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        content = message.get("content")
        if role == "tool" and isinstance(content, (dict, list)):
            content = message["content"] = json.dumps(content, ensure_ascii=False)  # a tool result given as JSON
        if role == "assistant" and content is None and ("tool_calls" in message or reasoning):
            content = message["content"] = ""  # templates read content even on a tool-call turn
        if isinstance(content, list):
            text = _content_parts(content, content_field)
        elif isinstance(content, dict):
            # Keys whose value is None dropped, as for the message (a Parquet struct column writes every key).
            content = message["content"] = {k: v for k, v in content.items() if v is not None}
            text = _content_mapping(content, content_field)
        elif not isinstance(content, str):
            raise RecordError(
                "must be a string",
                field=content_field,
                found=describe(content),
                expected="the message text as a string, a list of content parts, or a mapping "
                '({"text": ...}, {"parts": [...]}, {"blocks": [...]})',
            )
        else:
            text = content
        if role == "assistant" and not text.strip() and "tool_calls" not in message and not (reasoning or "").strip():
            raise RecordError(
                "assistant message is empty",
                field=content_field,
                found=repr(content),
                expected="the text the model should learn to write (or tool_calls)",
            )
        messages.append(message)
    return messages, (flags if any(f is not None for f in flags) else None)


# Content parts sftlab trains on (OpenAI's text part, Mistral's thinking part), and the key holding each one's text.
CONTENT_PARTS = {"text": "text", "thinking": "thinking"}


def _content_parts(parts: list, where: str) -> str:
    """Checks content given as a list of parts (kept as given: the renderer decides what the template gets) and
    returns their text, joined. A part sftlab cannot represent as text (an image, audio) is refused."""
    texts = []
    for position, part in enumerate(parts):
        here = f"{where}[{position}]"
        if not isinstance(part, dict):
            raise RecordError(
                "must be a content part", field=here, found=describe(part), expected="{'type': 'text', 'text': ...}"
            )
        kind = part.get("type")
        if kind not in CONTENT_PARTS:
            raise RecordError(
                f"a {kind!r} content part cannot be trained on: sftlab trains on text",
                field=f"{here}.type",
                found=describe(kind),
                expected=f"one of {sorted(CONTENT_PARTS)}",
                fix="remove the part (or the record), or describe what it holds in a text part",
            )
        value = part.get(CONTENT_PARTS[kind])
        if not isinstance(value, str):
            raise RecordError(
                "must be a string",
                field=f"{here}.{CONTENT_PARTS[kind]}",
                found=describe(value),
                expected=f"the {kind} as text",
            )
        texts.append(value)
    return "".join(texts)


# Content given as a mapping (the Apertus format): one key says its shape. {"text": str} (a system message),
# {"parts": [content parts]} (a user message), {"blocks": [...]} (a reply, in the order the model writes them).
CONTENT_MAPPINGS = ("text", "parts", "blocks")
# The blocks of a reply, and the key holding each one's text or items: "thoughts" is the reasoning (the template
# writes it in the reply's inner section), "response" the answer, "tool_calls" calls [{"name", "arguments"}]
# (arguments as JSON text, as the Apertus template joins them), "tool_outputs" the results [{"output"}].
CONTENT_BLOCKS = {"thoughts": "text", "response": "text", "tool_calls": "calls", "tool_outputs": "outputs"}
_MAPPING_EXPECTED = '{"text": ...}, {"parts": [...]} or {"blocks": [...]} (the Apertus format)'


def _content_mapping(content: dict, where: str) -> str:
    """Checks content given as a mapping (kept as given: the renderer passes it to a template that reads it, and
    refuses it for one that does not) and returns its text: the text, the text parts, or the blocks' texts and
    tool-call names (so that a reply of tool calls only is not taken for an empty one)."""
    if len(content) != 1 or next(iter(content)) not in CONTENT_MAPPINGS:
        raise RecordError(
            "content given as a mapping must hold exactly one of 'text', 'parts' or 'blocks'",
            field=where,
            found=describe(content),
            expected=_MAPPING_EXPECTED,
        )
    ((key, value),) = content.items()
    here = f"{where}.{key}"
    if key == "text":
        if not isinstance(value, str):
            raise RecordError("must be a string", field=here, found=describe(value), expected="the message text")
        return value
    if not isinstance(value, list):
        raise RecordError(
            "must be a list", field=here, found=describe(value), expected=f"a list of {key}, as in {_MAPPING_EXPECTED}"
        )
    if key == "parts":
        return _content_parts(value, here)
    texts = []
    for position, block in enumerate(value):
        at = f"{here}[{position}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in CONTENT_BLOCKS:
            raise RecordError(
                "must be a block of a reply",
                field=at,
                found=describe(block),
                expected=f"a mapping whose 'type' is one of {sorted(CONTENT_BLOCKS)}",
            )
        items = block.get(CONTENT_BLOCKS[kind])
        if CONTENT_BLOCKS[kind] == "text":
            if not isinstance(items, str):
                raise RecordError("must be a string", field=f"{at}.text", found=describe(items), expected=f"the {kind}")
            texts.append(items)
            continue
        if not isinstance(items, list) or not items:
            raise RecordError(
                "must be a non-empty list",
                field=f"{at}.{CONTENT_BLOCKS[kind]}",
                found=describe(items),
                expected='[{"name": ..., "arguments": "{...}"}]' if kind == "tool_calls" else '[{"output": ...}]',
            )
        for number, item in enumerate(items):
            item_at = f"{at}.{CONTENT_BLOCKS[kind]}[{number}]"
            if kind == "tool_calls":
                if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
                    raise RecordError("a tool call needs a name", field=f"{item_at}.name", found=describe(item))
                if not isinstance(item.get("arguments"), (str, dict)):
                    raise RecordError(
                        "must be the call's arguments",
                        field=f"{item_at}.arguments",
                        found=describe(item.get("arguments")),
                        expected="JSON text (as the Apertus format writes them) or an object",
                    )
                texts.append(item["name"])
            elif not isinstance(item, dict) or not isinstance(item.get("output"), str):
                raise RecordError(
                    "must be a tool output", field=item_at, found=describe(item), expected='{"output": "..."}'
                )
    return "".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict]:
    """OpenAI-shaped tool calls: [{"type": "function", "function": {"name", "arguments": {...}}, "id"?}]."""
    if not isinstance(value, list):
        raise RecordError(
            "must be a list of tool calls",
            field=where,
            found=describe(value),
            expected='[{"type": "function", "function": {"name": ..., "arguments": {...}}}]',
        )
    calls = []
    for position, call in enumerate(value):
        here = f"{where}[{position}]"
        if not isinstance(call, dict):
            raise RecordError(
                "must be a tool call dict",
                field=here,
                found=describe(call),
                expected='{"function": {"name": ..., "arguments": ...}}',
            )
        function = call.get("function", call)  # {"name", "arguments"} without the "function" wrapper is accepted too
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(
                "a tool call needs a function name",
                field=f"{here}.function.name",
                found=describe(function.get("name") if isinstance(function, dict) else function),
                expected="the function's name",
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise RecordError(
                    "arguments are not valid JSON",
                    field=f"{here}.function.arguments",
                    found=f"{error.msg} in {arguments[:40]!r}",
                    expected="a JSON object, as text or as an object",
                ) from None
        if not isinstance(arguments, dict):
            raise RecordError(
                "arguments must be a JSON object",
                field=f"{here}.function.arguments",
                found=describe(arguments),
                expected="an object of argument names to values",
            )
        normal = {k: v for k, v in call.items() if k != "function" and v is not None and k not in ("name", "arguments")}
        normal["type"] = call.get("type") or "function"
        normal["function"] = {
            **{k: v for k, v in function.items() if v is not None},
            "name": function["name"],
            "arguments": arguments,
        }
        calls.append(normal)
    return calls


def _json_field(raw: dict, name: str, kind: type, expected: str) -> Any:
    """A record field that may also come as JSON text (datasets store nested objects that way)."""
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise RecordError(
                "is not valid JSON", field=name, found=f"{error.msg} in {value[:40]!r}", expected=expected
            ) from None
    if not isinstance(value, kind):
        raise RecordError(f"must be {expected}", field=name, found=describe(value), expected=expected)
    return value


def _chat_extras(raw: dict) -> dict:
    tools = _json_field(raw, "tools", list, "a list of function schemas (or their JSON text)")
    for position, tool in enumerate(tools or ()):
        if not isinstance(tool, dict):
            raise RecordError(
                "must be a function schema",
                field=f"tools[{position}]",
                found=describe(tool),
                expected='{"type": "function", "function": {"name": ..., "parameters": {...}}}',
            )
    kwargs = _json_field(raw, "chat_template_kwargs", dict, "a mapping of template arguments (or its JSON text)")
    return {"tools": tools or None, "template_kwargs": kwargs or None}


def _conversation(raw: dict, index: int, text_field: str, vocab_size: int | None) -> Record:
    name = "messages" if "messages" in raw else "conversations"
    messages, flags = _messages(raw[name], name, sharegpt=name == "conversations")
    _check_conversation(messages, name)
    return Record(index, CONVERSATIONAL, messages=messages, train=flags, **_chat_extras(raw))


def _check_conversation(messages: list[dict], name: str) -> None:
    if len(messages) < 2:
        raise RecordError(
            "a conversation needs at least two messages",
            field=name,
            found=f"{len(messages)} message",
            expected="a prompt (user turn) and an assistant reply",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(
            "conversation has no assistant message", field=name, expected="at least one assistant turn to learn from"
        )
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            "conversation ends on a non-assistant turn",
            field=f"{name}[{len(messages) - 1}].role",
            found=messages[-1]["role"],
            expected="'assistant' (the last turn is what the model learns to answer)",
            fix="drop the trailing turn or add the assistant's reply",
        )


def _chat_prompt_completion(raw: dict, index: int, text_field: str, vocab_size: int | None) -> Record:
    prompt, prompt_flags = _messages(raw["prompt"], "prompt", sharegpt=False)
    completion, completion_flags = _messages(raw["completion"], "completion", sharegpt=False)
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError(
            "completion has no assistant message", field="completion", expected="[{'role': 'assistant', ...}]"
        )
    messages = prompt + completion
    _check_conversation(messages, "prompt+completion")
    flags = None
    if prompt_flags or completion_flags:
        flags = (prompt_flags or [None] * len(prompt)) + (completion_flags or [None] * len(completion))
    return Record(
        index, CHAT_PROMPT_COMPLETION, messages=messages, completion_start=len(prompt), train=flags, **_chat_extras(raw)
    )


def _int_list(raw: dict, name: str, vocab_size: int | None, allow: tuple[int, ...] = ()) -> list[int]:
    value = raw.get(name)
    if not isinstance(value, list) or not value:
        raise RecordError(
            "must be a non-empty list of integers", field=name, found=describe(value), expected="[int, ...]"
        )
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise RecordError(
                "must hold integers", field=f"{name}[{position}]", found=describe(item), expected="an integer token id"
            )
        if item in allow:
            continue
        if item < 0 or (vocab_size is not None and item >= vocab_size):
            raise RecordError(
                "token id out of the vocabulary range",
                field=f"{name}[{position}]",
                found=str(item),
                expected=f"0 <= id < {vocab_size}" + (" or -100" if allow else ""),
                fix="re-tokenize the data with this model's tokenizer",
            )
    return value


def _pretokenized(raw: dict, index: int, text_field: str, vocab_size: int | None) -> Record:
    input_ids = _int_list(raw, "input_ids", vocab_size)
    record = Record(index, PRETOKENIZED, input_ids=input_ids)
    if raw.get("labels") is not None:
        record.labels = _int_list(raw, "labels", vocab_size, allow=(-100,))
        if len(record.labels) != len(input_ids):
            raise RecordError(
                "labels and input_ids differ in length",
                field="labels",
                found=f"{len(record.labels)} labels for {len(input_ids)} input_ids",
                expected="one label per input id (-100 where not trained)",
            )
        # Labels follow transformers' convention (unshifted: the token itself, or -100) and are
        # shifted here; labels shifted already would be shifted twice and train on the wrong token.
        for position, (label, token) in enumerate(zip(record.labels, input_ids)):
            if label != -100 and label != token:
                raise RecordError(
                    "a label must be -100 or the input id at the same position",
                    field=f"labels[{position}]",
                    found=f"{label} where input_ids[{position}] is {token}",
                    expected=f"{token} or -100 (labels as transformers takes them, not shifted)",
                    fix="pass unshifted labels (sftlab shifts them), or a completion_mask",
                )
    if raw.get("completion_mask") is not None:
        mask = raw["completion_mask"]
        if not isinstance(mask, list) or len(mask) != len(input_ids) or any(m not in (0, 1) for m in mask):
            raise RecordError(
                "completion_mask must be 0/1, one per input id",
                field="completion_mask",
                found=f"{len(mask) if isinstance(mask, list) else describe(mask)} values",
                expected=f"{len(input_ids)} values of 0 or 1",
            )
        record.completion_mask = [int(m) for m in mask]
    return record


def validate_record(raw: dict, index: int, text_field: str = "text", vocab_size: int | None = None) -> Record:
    """One record detected and validated on its own (RecordError when it is not valid): for callers
    that build SFT records themselves, as preference pairs do for each reply."""
    return _VALIDATORS[detect_format(raw, text_field)](raw, index, text_field, vocab_size)


_VALIDATORS = {
    TEXT: _text,
    PROMPT_COMPLETION: _prompt_completion,
    CONVERSATIONAL: _conversation,
    CHAT_PROMPT_COMPLETION: _chat_prompt_completion,
    PRETOKENIZED: _pretokenized,
}
