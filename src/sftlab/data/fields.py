"""Rename a source's fields to the names sftlab reads, and turn Alpaca records into examples,
before records are validated (formats.py then sees only its own field names).

    fields: {prompt: question, completion: answer}             prompt/completion under other names
    fields: {messages: dialog, role: speaker, content: text}  conversations under other names
    fields: {instruction: task, input: context, output: answer}  Alpaca under other names

ShareGPT's from/value needs no mapping, under any name for its list. Errors name the source's
own fields (`dialog[3].speaker`, not `messages[3].role`).

Alpaca records ({"instruction", "input"?, "output"}) are recognised by their fields. With
layout "alpaca" they become prompt/completion in the prompt layout of Stanford Alpaca (below);
with layout "chat" a user turn (instruction, a blank line, input) and an assistant turn (output),
rendered by the chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sftlab.config import MESSAGE_KEYS, RECORD_FIELDS, check_field_map
from sftlab.errors import RecordError, describe

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py), with the newline after
# "### Response:" that inference prompts in this layout end with; the output follows it.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# A record with these is not Alpaca, whatever else it holds.
_OTHER_FORMATS = ("prompt", "completion", "messages", "conversations", "input_ids", "chosen", "rejected")
# Fields that may hold message lists, whose role/content keys a field map renames.
_MESSAGE_LISTS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")


@dataclass(frozen=True)
class FieldMap:
    """How one source's records become records sftlab reads: renames, and the Alpaca layout."""

    fields: dict[str, str] = field(default_factory=dict)  # sftlab's name -> the source's name
    alpaca_layout: str = "alpaca"

    def __post_init__(self):
        # Checked here too: prepare_examples(fields=..., alpaca_layout=...) is called without a config.
        check_field_map(self.fields, self.alpaca_layout)

    @property
    def renames(self) -> dict[str, str]:
        """The source's record field -> sftlab's, for the fields that differ."""
        return {source: name for name, source in self.fields.items() if name in RECORD_FIELDS and source != name}

    def apply(self, raw: dict) -> tuple[dict, str | None]:
        """The record with sftlab's field names (a new dict), and "alpaca" where it was converted."""
        renames = self.renames
        if renames:
            raw = self._renamed(raw, renames)
        keys = {key: source for key, source in self.fields.items() if key in MESSAGE_KEYS and source != key}
        if keys:
            raw = {name: self._message_keys(value, keys) if name in _MESSAGE_LISTS else value
                   for name, value in raw.items()}
        if ("instruction" in raw or "output" in raw) and not any(name in raw for name in _OTHER_FORMATS):
            for name in ("instruction", "output"):
                if name not in raw:
                    raise RecordError("an Alpaca record needs 'instruction' and 'output'", field=self.source_field(name),
                                   found=f"fields {sorted(raw)}", expected="instruction, input (optional) and output",
                                   fix="add the field, or map yours to it with fields: {" + name + ": your_field}")
            return self._alpaca(raw), "alpaca"
        return raw, None

    def _renamed(self, raw: dict, renames: dict[str, str]) -> dict:
        record = {}
        for name, value in raw.items():
            target = renames.get(name)
            if target is None:
                if name in record:
                    raise RecordError(f"the record has '{name}' and a field mapped to it",
                                   field=self.source_field(name), found=f"fields {sorted(raw)}",
                                   fix="map another field, or drop one of the two")
                record[name] = value
                continue
            if target == "messages" and _sharegpt(value):
                target = "conversations"  # from/value: converted by the ShareGPT rules, as without a mapping
            if target in record:
                raise RecordError(f"the record has '{target}' and a field mapped to it", field=name,
                               found=f"fields {sorted(raw)}", fix="map another field, or drop one of the two")
            record[target] = value
        return record

    @staticmethod
    def _message_keys(messages, keys: dict[str, str]):
        if not isinstance(messages, list):
            return messages
        sources = {source: key for key, source in keys.items()}
        return [{sources.get(name, name): value for name, value in message.items()} if isinstance(message, dict) else message
                for message in messages]

    def _alpaca(self, raw: dict) -> dict:
        instruction = _text(raw, "instruction", "the task, as text")
        extra = raw.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RecordError("must be a string", field="input", found=describe(extra), expected="the task's input as text, or empty")
        output = _text(raw, "output", "the response the model should learn")
        extra = (extra or "").strip() and extra
        if self.alpaca_layout == "chat":
            user = instruction + ("\n\n" + extra if extra else "")
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
        prompt = (ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        return {"prompt": prompt, "completion": output}

    def source_field(self, path: str) -> str:
        """A field path in sftlab's names ('messages[3].role', 'completion,prompt') in the source's."""
        back = {name: source for name, source in self.fields.items() if name in RECORD_FIELDS}
        if "messages" in back:
            back["conversations"] = back["messages"]
        keys = {name: source for name, source in self.fields.items() if name in MESSAGE_KEYS}

        def one(part: str) -> str:
            head = re.match(r"[^.\[]*", part).group(0)
            rest = part[len(head):]
            for key, source in keys.items():
                rest = re.sub(rf"(\]\.){key}\b", rf"\g<1>{source}", rest)
            return back.get(head, head) + rest

        return ",".join(one(part) for part in path.split(","))


def _text(raw: dict, name: str, expected: str) -> str:
    value = raw[name]
    if not isinstance(value, str):
        raise RecordError("must be a string", field=name, found=describe(value), expected=expected)
    if not value.strip():
        raise RecordError("is empty", field=name, found=repr(value), expected="non-empty text", fix="remove the record or fill in the text")
    return value


def _sharegpt(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict) \
        and "from" in messages[0] and "role" not in messages[0]
