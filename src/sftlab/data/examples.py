"""Tokenize validated records into examples: aligned `input_ids` and `targets`.

`targets[t]` is the token the model must predict at position t: `input_ids[t + 1]` when that
token is supervised, else -100. The shift happens here, once, per example; nothing downstream
shifts again, so the last position of every example has target -100 and packed examples can
never pass loss to one another.

Each record becomes a list of text segments, each supervised or not, tokenized separately in
one batched call. Tokenizing the prompt on its own is what makes the boundary exact: the
prompt's tokens are what the tokenizer gives for the prompt alone (what inference feeds),
whatever it would merge across the boundary in the joined text.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from jinja2 import TemplateError

from sftlab.config import CHAT_EXAMPLES, REASONING_WHEN_DROPPED, REASONING_WHEN_MISSING, TRUNCATION_POLICIES
from sftlab.data import formats
from sftlab.data.chat import AS_SERVED, ChatRenderer, resolve_chat_templates
from sftlab.data.container import IGNORE, Examples
from sftlab.data.formats import Record
from sftlab.errors import DataError, TurnError


@dataclass(frozen=True)
class TargetSettings:
    """What becomes a training target, and how long an example may be."""

    max_length: int | None = 1024
    truncation: str = "right"
    completion_only_loss: bool = True
    assistant_only_loss: bool = True
    last_assistant_only: bool = False
    chat_template: str | None = None
    # Conversations: the roles trained (a message's own "train" flag wins), how turns become
    # examples (as served, or the final render only), and what every render of the dataset gets.
    train_on_roles: tuple[str, ...] = ("assistant",)
    chat_examples: str = AS_SERVED
    tools: list | None = None
    chat_template_kwargs: dict | None = None
    # Reasoning (see chat.py): a reply without it after a prompt that opens it, a template that drops it,
    # and whether its text is trained or context.
    reasoning_when_missing: str = "refuse"
    reasoning_when_dropped: str = "refuse"
    train_on_reasoning: bool = True


def shift_labels(label_ids: list[int]) -> list[int]:
    """Per-token labels (the token itself, or -100) -> targets (what to predict at each position)."""
    return label_ids[1:] + [IGNORE]


class SegmentEncoder:
    """Batched fast-tokenizer calls, with the tokenizer's own BOS/EOS conventions made explicit."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = self._encode_plain(["a"])[0]
        special = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos_id = bos if bos is not None and special[:1] == [bos] and plain[:1] != [bos] else None
        self.eos_id = tokenizer.eos_token_id
        self.anchor_ids = self._find_anchor(plain)

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _find_anchor(self, plain_a: list[int]) -> list[int] | None:
        # SentencePiece-style tokenizers prepend a "▁" to every call, which would insert a space at
        # the start of every completion or assistant segment. Those segments are then encoded behind
        # a newline anchor whose tokens are cut off again.
        pieces = self.tokenizer.convert_ids_to_tokens(plain_a)
        if not pieces or not pieces[0].startswith("▁"):
            return None
        anchor = self._encode_plain(["\n"])[0]
        for probe in ("a", "Hello world", " x", "\n\nok"):
            ids = self._encode_plain(["\n" + probe])[0]
            if ids[: len(anchor)] != anchor:
                raise DataError(
                    "this tokenizer adds a prefix space that sftlab cannot strip reliably",
                    field="tokenizer",
                    found=type(self.tokenizer).__name__,
                    fix="use pre-tokenized data (input_ids + labels) for this tokenizer",
                )
        return anchor

    def insert_bos(self, ids: list[int], labels: list[int] | None = None) -> None:
        """Put BOS in front of a text or prompt/completion example (and IGNORE in front of its labels)
        where the tokenizer adds one to a call with special tokens and the text does not start with it:
        the prompt tokens are then the ones inference feeds. Chat templates write their own BOS."""
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
            if labels is not None:
                labels.insert(0, IGNORE)

    def holding(self, text: str, continuation: bool, ranges: list[tuple[int, int]], count: int) -> list[bool]:
        """For each of the `count` tokens `encode` gives `text`, whether it holds a character of `ranges`: the
        tokens of a reasoning kept as context. A token that straddles an edge (Qwen's ".\\n" ending a reasoning
        before "</think>") holds reasoning, so the trained tokens hold none of it."""
        if self.backend is None:
            raise DataError(
                "train_on_reasoning: false needs a fast tokenizer, to find the reasoning's tokens",
                field="train_on_reasoning",
                found=type(self.tokenizer).__name__,
                fix="use the model's fast tokenizer (tokenizer.json), or train_on_reasoning: true",
            )
        shift = 1 if continuation and self.anchor_ids is not None else 0  # encoded behind a newline, as in encode
        offsets = self.backend.encode("\n" * shift + text, add_special_tokens=False).offsets
        offsets = offsets[len(self.anchor_ids) :] if shift else offsets
        if len(offsets) != count:
            raise RuntimeError(
                f"the tokenizer encodes {text[:40]!r} as {len(offsets)} tokens with offsets and {count} without"
            )
        return [any(start - shift < b and a < end - shift for a, b in ranges) for start, end in offsets]

    def encode(self, texts: list[str], continuation: list[bool]) -> list[list[int]]:
        """Token ids of each text; `continuation[i]` marks texts that follow other text in an example."""
        if self.anchor_ids is None:
            return self._encode_plain(texts)
        cut = len(self.anchor_ids)
        prepared = ["\n" + t if c else t for t, c in zip(texts, continuation)]
        encoded = self._encode_plain(prepared)
        return [ids[cut:] if c else ids for ids, c in zip(encoded, continuation)]


def trained_turns(record: Record, settings: TargetSettings) -> list[int]:
    """Indices of the messages a conversation trains on: the roles in train_on_roles, after the
    prompt of a chat prompt/completion record; a message's own "train" flag overrides its role."""
    turns = []
    for i, message in enumerate(record.messages):
        if i < record.completion_start:
            continue
        flag = record.train[i] if record.train is not None else None
        if flag if flag is not None else message["role"] in settings.train_on_roles:
            turns.append(i)
    if settings.last_assistant_only:
        turns = [i for i in turns if record.messages[i]["role"] == "assistant"][-1:]
    return turns


def _record_examples(
    record: Record, settings: TargetSettings, renderer: ChatRenderer | None, counts: Counter
) -> list[list[tuple[str, bool | list[tuple[int, int]]]]]:
    """The record's examples, each as (text, supervised) pieces in order. One example, except for a
    conversation whose template cannot serve every turn in one render (see chat.py). A trained piece
    holding reasoning that stays context (train_on_reasoning: false) has, for supervised, the character
    ranges of that reasoning in its text."""
    if record.format == formats.TEXT:
        return [[(record.text, True)]]
    if record.format == formats.PROMPT_COMPLETION:
        return [[(record.prompt, not settings.completion_only_loss), (record.completion, True)]]
    messages = record.messages
    all_tokens = not settings.assistant_only_loss
    if record.format == formats.CHAT_PROMPT_COMPLETION:
        all_tokens = not settings.completion_only_loss
    if all_tokens:
        return [[(renderer.render(messages, tools=record.tools, kwargs=record.template_kwargs), True)]]
    planned = renderer.conversation_examples(
        messages,
        trained_turns(record, settings),
        tools=record.tools,
        kwargs=record.template_kwargs,
        mode=settings.chat_examples,
        train_reasoning=settings.train_on_reasoning,
    )
    counts.update(planned.counts)
    examples = []
    for position, (text, spans) in enumerate(planned.examples):
        reasoning = planned.reasoning[position] if planned.reasoning else ()
        pieces, cursor = [], 0
        for start, end in spans:
            pieces.append((text[cursor:start], False))
            # The turn stays one piece, tokenized as one text as the model writes it: its reasoning's tokens
            # are found after encoding (SegmentEncoder.holding), so no token is split at the reasoning's edges.
            inside = [(a - start, b - start) for a, b in reasoning if start <= a and b <= end] if reasoning else None
            pieces.append((text[start:end], inside or True))
            cursor = end
        pieces.append((text[cursor:], False))
        examples.append([(t, supervised) for t, supervised in pieces if t])
    return examples


class ExampleBuilder:
    """Turns chunks of validated records into chunks of examples, one pipeline for a whole pass:
    `build` takes the chunks as they come (a stream) and gives each chunk's examples as soon as
    they are assembled; `stats()` holds the counts of everything built so far."""

    def __init__(self, tokenizer, settings: TargetSettings, skip_invalid: bool = False):
        # The config checks these too; TargetSettings is public and may be built without one.
        if settings.truncation not in TRUNCATION_POLICIES:
            raise DataError(
                "unknown truncation policy",
                field="truncation",
                found=repr(settings.truncation),
                expected=f"one of {TRUNCATION_POLICIES}",
            )
        if settings.chat_examples not in CHAT_EXAMPLES:
            raise DataError(
                "unknown chat_examples mode",
                field="chat_examples",
                found=repr(settings.chat_examples),
                expected=f"one of {CHAT_EXAMPLES}",
            )
        for name, allowed in (
            ("reasoning_when_missing", REASONING_WHEN_MISSING),
            ("reasoning_when_dropped", REASONING_WHEN_DROPPED),
        ):
            if getattr(settings, name) not in allowed:
                raise DataError(
                    f"unknown {name}", field=name, found=repr(getattr(settings, name)), expected=f"one of {allowed}"
                )
        self.tokenizer, self.settings, self.skip_invalid = tokenizer, settings, skip_invalid
        self.encoder = SegmentEncoder(tokenizer)
        self.renderer: ChatRenderer | None = None
        self.eos_checked = False
        self.truncated = 0
        self.dropped: Counter = Counter()
        self.skipped: Counter = Counter()
        self.chat: Counter = Counter()  # how conversations became examples (see chat.py)

    def stats(self) -> dict:
        stats = dict(truncated=self.truncated, dropped=dict(self.dropped), skipped_invalid=dict(self.skipped))
        if self.renderer is not None:
            stats["chat"] = {key: int(self.chat[key]) for key in CHAT_STATS}
        return stats

    def _prepare_for(self, chunk: list[Record]) -> None:
        """What the first conversation (or text) of the pass needs: the compiled template (or EOS)."""
        if self.renderer is None and any(
            r.format in (formats.CONVERSATIONAL, formats.CHAT_PROMPT_COMPLETION) for r in chunk
        ):
            template, tool_template = resolve_chat_templates(self.tokenizer, self.settings.chat_template)
            try:
                self.renderer = ChatRenderer(
                    self.tokenizer,
                    template,
                    tool_template=tool_template,
                    tools=self.settings.tools,
                    template_kwargs=self.settings.chat_template_kwargs,
                    reasoning_when_missing=self.settings.reasoning_when_missing,
                    reasoning_when_dropped=self.settings.reasoning_when_dropped,
                )
            except TemplateError as error:
                raise _template_error(error, None) from error
        if not self.eos_checked and any(r.format in (formats.TEXT, formats.PROMPT_COMPLETION) for r in chunk):
            if self.encoder.eos_id is None:
                raise DataError(
                    "the tokenizer has no EOS token, which text and prompt/completion examples end with",
                    field="tokenizer.eos_token",
                    fix="set an eos_token on the tokenizer before training",
                )
            self.eos_checked = True

    def _render(self, chunk: list[Record]):
        settings, chat = self.settings, self.chat
        per_record: list[list[list[tuple[str, bool]]] | None] = []
        texts: list[str] = []
        continuation: list[bool] = []
        for record in chunk:
            if record.format == formats.PRETOKENIZED:
                per_record.append(None)
                continue
            try:
                examples = _record_examples(record, settings, self.renderer, chat)
            except TemplateError as error:
                raise _template_error(error, record.index) from error
            except TurnError as error:
                if not self.skip_invalid:
                    raise _turn_error(error, record) from None
                self.skipped[f"chat template cannot serve messages[]: {error.problem}"] += 1
                examples = []
            if len(examples) > 1:
                chat["records_split"] += 1
                chat["extra_examples"] += len(examples) - 1
            per_record.append(examples)
            for segments in examples:
                for position, (text, _) in enumerate(segments):
                    texts.append(text)
                    continuation.append(position > 0)
        return per_record, texts, continuation

    def _assemble(self, chunk: list[Record], per_record, encoded_ids: list[list[int]]) -> Examples:
        settings, encoder, chat = self.settings, self.encoder, self.chat
        pairs: list[tuple[list[int], list[int]]] = []
        kept_index: list[int] = []
        encoded = iter(encoded_ids)
        for record, examples in zip(chunk, per_record):
            for position, segments in enumerate(examples if examples is not None else [None]):
                if segments is None:
                    ids, labels = _pretokenized_labels(record)
                else:
                    ids, labels, reasoning = [], [], []
                    for at, (text, supervised) in enumerate(segments):
                        piece = next(encoded)
                        if isinstance(supervised, list):  # a trained turn whose reasoning stays context
                            context = encoder.holding(text, at > 0, supervised, len(piece))
                            reasoning.extend(len(ids) + t for t, inside in enumerate(context) if inside)
                            labels.extend(IGNORE if inside else token for token, inside in zip(piece, context))
                        else:
                            labels.extend(piece if supervised else [IGNORE] * len(piece))
                        ids.extend(piece)
                    if record.format in (formats.TEXT, formats.PROMPT_COMPLETION):
                        encoder.insert_bos(ids, labels)
                        if ids[-1:] != [encoder.eos_id]:
                            ids.append(encoder.eos_id)
                            labels.append(encoder.eos_id)
                was_truncated = False
                if settings.max_length is not None and len(ids) > settings.max_length:
                    if settings.truncation == "drop":
                        self.dropped[f"longer than max_length={settings.max_length}"] += 1
                        continue
                    ids, labels = ids[: settings.max_length], labels[: settings.max_length]
                    was_truncated = True
                targets = shift_labels(labels)
                if targets.count(IGNORE) == len(targets):  # nothing supervised; count() runs in C
                    reason = "no supervised tokens left after truncation" if was_truncated else "no supervised tokens"
                    self.dropped[reason] += 1
                    continue
                if was_truncated:  # kept examples only: a dropped one is counted under its reason
                    self.truncated += 1
                if position:
                    chat["extra_tokens"] += len(ids)
                if segments is not None and reasoning:  # the tokens kept, after truncation
                    chat["reasoning_tokens_context"] += sum(t < len(ids) for t in reasoning)
                pairs.append((ids, targets))
                kept_index.append(record.index)
        return Examples.from_lists(pairs, kept_index)

    def build(self, chunks: Iterable[list[Record]]) -> Iterator[Examples]:
        """Each chunk's examples (record_index: the records' own indices), in the chunks' order."""
        # A pipeline: the fast tokenizer encodes chunk k in a worker thread (it releases the GIL)
        # while Python renders chunk k+1 and assembles chunk k-1. The garbage collector is paused:
        # millions of small int lists are created and none is cyclic; it cost ~0.6 s per 20k chats.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = None
                for chunk in chunks:
                    self._prepare_for(chunk)
                    per_record, texts, continuation = self._render(chunk)
                    future = pool.submit(self.encoder.encode, texts, continuation) if texts else None
                    if pending is not None:
                        yield self._assemble(pending[0], pending[1], pending[2].result() if pending[2] else [])
                    pending = (chunk, per_record, future)
                if pending is not None:
                    yield self._assemble(pending[0], pending[1], pending[2].result() if pending[2] else [])
        finally:
            if gc_was_enabled:
                gc.enable()


# How conversations became examples, in the order inspect and the training log show them.
CHAT_STATS = (
    "turns_trained",
    "turns_not_served",
    "records_split",
    "extra_examples",
    "extra_tokens",
    "rule_prefix",
    "rule_rewritten_history",
    "rule_opened_reply",
    "turns_empty_reasoning",
    "turns_reasoning_dropped",
    "turns_reasoning_context",
    "reasoning_tokens_context",
)


def _turn_error(error: TurnError, record: Record) -> DataError:
    role = record.messages[error.turn]["role"] if record.messages else "assistant"
    return DataError(
        f"the chat template cannot serve {role} turn messages[{error.turn}] as written: {error.problem}",
        index=record.index,
        field=error.field,
        found=error.found,
        fix=(error.fix + "; " if error.fix else "") + "or set skip_invalid_records=true to count and skip such records",
    )


def _template_error(error: Exception, index: int | None) -> DataError:
    # Templates run in transformers' sandboxed Jinja environment: a syntax error, an unsafe access
    # refused by the sandbox (SecurityError) or the template's own raise_exception() is a problem
    # with the template or the record, not a bug in sftlab.
    return DataError(
        "the chat template failed " + ("to compile" if index is None else "on this record"),
        index=index,
        field="chat_template",
        found=f"{type(error).__name__}: {error}",
        fix="fix the template (or set chat_template: chatml), or the record the template rejects",
    )


def _pretokenized_labels(record: Record) -> tuple[list[int], list[int]]:
    ids = list(record.input_ids)
    if record.labels is not None:
        return ids, list(record.labels)
    if record.completion_mask is not None:
        return ids, [t if m else IGNORE for t, m in zip(ids, record.completion_mask)]
    return ids, list(ids)
