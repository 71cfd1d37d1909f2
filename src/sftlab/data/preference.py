"""Preference records -> Pairs: the prompt P as inference feeds it, and the chosen and rejected
replies C and R, each the served continuation of P through the marker that ends the reply.

Formats (those TRL's preference trainers accept); a record is a pair when it has `chosen` or `rejected`:
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                  (the prompt may hold system/tool messages; the replies are usually one assistant
                  message, with reasoning or tool_calls as in SFT records; "tools" and
                  "chat_template_kwargs" as SFT records carry them)
  implicit prompt {"chosen": [messages], "rejected": [messages]}: the messages both start with are
                  the prompt, cut back to end right before an assistant message

There is no second renderer. Each reply becomes the SFT record it would be as SFT data (standard:
{"prompt", "completion"}; conversational: a chat prompt/completion, its assistant turns trained)
and goes through SFT's validation, rendering, tokenization and self-checks (formats.py, chat.py,
examples.py). From each SFT example, P is input_ids up to and including the position of the first
target (targets[t] != -100 trains input_ids[t + 1]) and the reply is input_ids from there through
the last trained token: an untrained tail the template writes after its end marker (ChatML's
"\\n") is not generated, so it is not part of C. The two replies of a pair must give the same P.
So P and C follow SFT's rules exactly: BOS once, EOS only where the convention wants it and never
after the template's own end marker, a template's default system prompt in P (never in C), a
reply's thinking in C exactly when the template serves it.

A reply of several messages (a tool call, its result, the answer) is one continuation, all of it
scored, as TRL scores it; the template must serve all of it in one render (the SFT rules give it
one example), else the record is refused.

Truncation (`max_length` bounds P + C and P + R, as TRL's max_length): with `truncation: right`,
a pair whose P + the longer reply is too long first keeps the END of its prompt, cut from the start
down to `max_prompt_length` (default max_length // 2), then each reply is cut at its end to fit;
with `drop` the pair is dropped. Both are counted: `truncated_prompt`, `truncated_completion`
(pairs), `dropped` (by reason).

Pairs are prepared as SFT examples are (prepare.py, store.py, workers.py): the records are
streamed in chunks and each chunk's pairs are appended to a cache entry `pairs-<key>` on disk
(keyed by the data, the tokenizer and every setting), by this process or by `workers` spawned
processes; the entry is written under a temporary name and renamed, checksummed, and read back
memory-mapped, so preparation memory does not grow with the data and every process of a machine
shares one copy. The counts (truncated, dropped and skipped per reason) are kept in the entry.
KTO's unpaired examples (`prepare_unpaired`) go the same way, as an entry `unpaired-<key>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from sftlab import __version__
from sftlab.config import TRUNCATION_POLICIES
from sftlab.data.chat import stop_tokens_of
from sftlab.data.container import IGNORE, Pairs
from sftlab.data.examples import CHAT_STATS, ExampleBuilder, TargetSettings
from sftlab.data.fields import FieldMap
from sftlab.data.formats import Record, require_valid, validate_record
from sftlab.data.prepare import default_cache_dir, default_workers, tokenizer_fingerprint
from sftlab.data.sources import Records, RecordStream, open_records
from sftlab.data.store import PAIRS, UNPAIRED, built_entry
from sftlab.data.workers import add_counts, build_store
from sftlab.errors import DataError, RecordError, describe

STANDARD = "standard"
CONVERSATIONAL = "conversational"
IMPLICIT_PROMPT = "implicit_prompt"
SIDES = ("chosen", "rejected")


def is_pair_record(raw: Any) -> bool:
    """Whether a record (with sftlab's field names) is preference data: it has `chosen` or `rejected`."""
    return isinstance(raw, dict) and ("chosen" in raw or "rejected" in raw)


def looks_like_pairs(
    source: Any, split: str | None = None, fields: dict | None = None, alpaca_layout: str = "alpaca"
) -> bool:
    """Whether `source` holds preference data, from its first record's fields (after the field map):
    how `sftlab inspect` chooses its view. Reads one chunk."""
    field_map = FieldMap(dict(fields or {}), alpaca_layout)
    for chunk in open_records(source, split).chunks():
        for raw in chunk.records[:1]:
            try:
                raw, _ = field_map.apply(raw)
            except RecordError:
                return False  # not a pair record either way; preparation names the problem
            return is_pair_record(raw)
    return False


PAIR_KIND, UNPAIRED_KIND, SFT_KIND = "preference pairs", "unpaired (KTO) examples", "SFT records"


def record_kind(raw: dict) -> str:
    """What a record (with sftlab's field names) is training data for: preference pairs (it has
    chosen or rejected), KTO's unpaired examples (a completion and a label), else SFT."""
    if is_pair_record(raw):
        return PAIR_KIND
    if "label" in raw and "completion" in raw:
        return UNPAIRED_KIND
    return SFT_KIND


def require_kind(
    source: Any,
    wanted: str,
    where: str,
    split: str | None = None,
    fields: dict | None = None,
    alpaca_layout: str = "alpaca",
) -> None:
    """Refuse a source whose first record is another kind of data than `wanted` (SFT records in a
    DPO run's mixture, pairs in an SFT one), naming the source (`where`, e.g. train_data[1]), the
    record and its fields. Reads one chunk."""
    field_map = FieldMap(dict(fields or {}), alpaca_layout)
    stream = open_records(source, split)
    for chunk in stream.chunks():
        for offset, raw in enumerate(chunk.records[:1]):
            try:
                raw, _ = field_map.apply(raw)
            except RecordError:
                return  # not a record of any kind: preparation names its problem
            kind = record_kind(raw) if isinstance(raw, dict) else SFT_KIND
            # An SFT prompt/completion record may well carry a field named label: only pairs are refused there.
            if kind == wanted or (wanted == SFT_KIND and kind == UNPAIRED_KIND):
                return
            location, row = chunk.locate(offset)
            expected = {
                PAIR_KIND: "prompt, chosen and rejected (or chosen and rejected conversations)",
                UNPAIRED_KIND: "prompt, completion and label",
                SFT_KIND: "text, prompt/completion or messages",
            }[wanted]
            raise DataError(
                f"{where} holds {kind}, not {wanted}",
                source=location,
                index=row,
                field=",".join(sorted(raw)) if isinstance(raw, dict) else None,
                found=f"a record with fields {sorted(raw) if isinstance(raw, dict) else describe(raw)}",
                expected=expected,
                fix=f"remove {where} from the mixture, or give it as {wanted} "
                "(SFT data trains in an SFT run, before preference tuning)",
            )
        return


@dataclass
class PairRecords:
    """A preference record as the two SFT records of its replies, and what names their fields back."""

    format: str
    chosen: dict
    rejected: dict
    shared: int = 0  # implicit prompt: messages of chosen/rejected that are the prompt


def pair_records(raw: dict) -> PairRecords:
    """The SFT records the chosen and the rejected reply would be as SFT data (RecordError if the
    record is no preference record)."""
    for side in SIDES:
        if raw.get(side) is None:
            raise RecordError(
                f"a preference record needs '{side}'",
                field=side,
                found=f"fields {sorted(raw)}",
                expected="prompt (optional when chosen/rejected are conversations), chosen and rejected",
                fix=f"add '{side}', or map your field to it with fields: {{{side}: your_field}}",
            )
    extras = {name: raw[name] for name in ("tools", "chat_template_kwargs") if raw.get(name) is not None}
    prompt, chosen, rejected = raw.get("prompt"), raw["chosen"], raw["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            side = "chosen" if not isinstance(chosen, list) else "rejected"
            raise RecordError(
                "without a prompt, chosen and rejected must be whole conversations",
                field=side,
                found=describe(raw[side]),
                expected="a list of messages that starts with the prompt",
                fix="add the 'prompt' field, or give chosen and rejected as message lists",
            )
        shared = shared_prompt(chosen, rejected)
        return PairRecords(
            IMPLICIT_PROMPT,
            {"prompt": chosen[:shared], "completion": chosen[shared:], **extras},
            {"prompt": rejected[:shared], "completion": rejected[shared:], **extras},
            shared,
        )
    if isinstance(prompt, str):
        for side in SIDES:
            if not isinstance(raw[side], str):
                raise RecordError(
                    "must be a string, as the prompt is",
                    field=side,
                    found=describe(raw[side]),
                    expected="the reply text",
                    fix="give prompt, chosen and rejected all as text, or all as message lists",
                )
        return PairRecords(
            STANDARD, {"prompt": prompt, "completion": chosen}, {"prompt": prompt, "completion": rejected}
        )
    if isinstance(prompt, list):
        for side in SIDES:
            if not isinstance(raw[side], list):
                raise RecordError(
                    "must be a list of messages, as the prompt is",
                    field=side,
                    found=describe(raw[side]),
                    expected='[{"role": "assistant", "content": ...}]',
                    fix="give prompt, chosen and rejected all as text, or all as message lists",
                )
            first = raw[side][0] if raw[side] else None
            if isinstance(first, dict) and first.get("role") != "assistant":
                # A reply that opened with a user or tool message would move that message into its P.
                raise RecordError(
                    "a reply starts with an assistant message",
                    field=f"{side}[0].role",
                    found=describe(first.get("role")),
                    expected="'assistant'",
                    fix="move the messages before the reply into the prompt",
                )
        return PairRecords(
            CONVERSATIONAL,
            {"prompt": prompt, "completion": chosen, **extras},
            {"prompt": prompt, "completion": rejected, **extras},
        )
    raise RecordError(
        "must be text or a list of messages",
        field="prompt",
        found=describe(prompt),
        expected="a string, or [{'role': ..., 'content': ...}, ...]",
    )


def shared_prompt(chosen: list, rejected: list) -> int:
    """Messages of an implicit prompt: the longest run both conversations start with, cut back so
    that it ends right before an assistant message (TRL's rule), so each reply starts a served turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and not (
        shared < len(chosen)
        and _role(chosen[shared]) == "assistant"
        and shared < len(rejected)
        and _role(rejected[shared]) == "assistant"
    ):
        shared -= 1
    if shared == 0:
        found = (
            "different first messages"
            if chosen[:1] != rejected[:1]
            else "no assistant message right after the shared ones"
        )
        raise RecordError(
            "chosen and rejected share no prompt",
            field="chosen,rejected",
            found=found,
            expected="two conversations that start with the same messages, then differ from an assistant message on",
            fix="give the prompt as its own 'prompt' field, or repeat it at the start of both",
        )
    return shared


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def record_field(field: str | None, side: str, pair: PairRecords, prompt_messages: int) -> str | None:
    """A field of a reply's SFT record (prompt[2], completion[0].content, messages[3]) named as the
    preference record has it (prompt[2], chosen[0].content); `prompt_messages`: the SFT record's prompt length."""
    if field is None:
        return None
    implicit = pair.format == IMPLICIT_PROMPT

    def one(part: str) -> str:
        indexed = re.match(r"(prompt|completion|messages)\[(\d+)\](.*)", part)
        if indexed:
            name, position, rest = indexed.group(1), int(indexed.group(2)), indexed.group(3)
            if name == "messages":  # a turn of the whole conversation, prompt then reply
                name, position = (
                    ("prompt", position) if position < prompt_messages else ("completion", position - prompt_messages)
                )
            if name == "completion":
                return f"{side}[{position + pair.shared}]{rest}"
            return f"{side if implicit else 'prompt'}[{position}]{rest}"
        if part == "completion":
            return side
        if part == "prompt+completion":
            return side if implicit else f"prompt+{side}"
        return part

    return ",".join(one(part) for part in field.split(","))


def reply_of(input_ids, targets) -> tuple[list[int], list[int]]:
    """(P, reply) of an SFT example: P is input_ids through the position of the first target, the
    reply the tokens from there through the last trained one."""
    trained = np.flatnonzero(np.asarray(targets) != IGNORE)
    ids = [int(t) for t in input_ids]
    if not len(trained):
        return ids, []
    first, last = int(trained[0]), int(trained[-1])
    return ids[: first + 1], ids[first + 1 : last + 2]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_same_prompt(chosen_prompt: list[int], rejected_prompt: list[int], tokenizer) -> None:
    """Both replies must continue the same P: the engine scores them after one shared prompt."""
    if chosen_prompt == rejected_prompt:
        return
    at = first_difference(chosen_prompt, rejected_prompt)
    pieces = [tokenizer.decode(p[at : at + 8]) for p in (chosen_prompt, rejected_prompt)]
    raise RecordError(
        "the chat template renders the prompt differently before the chosen and the rejected reply",
        field="prompt",
        found=f"from prompt token {at}: {pieces[0]!r} before chosen, {pieces[1]!r} before rejected",
        expected="one prompt, as inference feeds it, for both replies",
        fix="give both replies the same conversation before them (same tools and chat_template_kwargs)",
    )


@dataclass
class PairCounts:
    """What a pass over preference records counted; counts of several workers add up to one pass's."""

    records: int = 0
    pairs: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # pairs skipped (skip_invalid_records), by reason
    skipped_replies: Counter = field(default_factory=Counter)  # why the example builder skipped a reply
    truncated: int = 0
    truncated_prompt: int = 0
    truncated_completion: int = 0
    dropped: Counter = field(default_factory=Counter)
    chat: Counter | None = None

    def add_chunk(self, records: int, pairs: Pairs) -> None:
        self.records += records
        self.pairs += len(pairs)

    def merge(self, other: PairCounts) -> None:
        add_counts(self, other)


@dataclass(frozen=True)
class PairRecipe:
    """Everything that turns a chunk of preference records into pairs: what every worker is sent
    once (workers.py builds stores from any recipe)."""

    tokenizer: Any
    settings: TargetSettings
    max_prompt_length: int | None = None
    text_field: str = "text"
    skip_invalid: bool = False
    field_map: FieldMap = field(default_factory=FieldMap)

    @property
    def layout(self):
        return PAIRS

    def chunk_pass(self, skip_invalid: bool | None = None) -> PairBuilder:
        return PairBuilder(
            self.tokenizer,
            self.settings,
            max_prompt_length=self.max_prompt_length,
            skip_invalid=self.skip_invalid if skip_invalid is None else skip_invalid,
            text_field=self.text_field,
            field_map=self.field_map,
        )

    def probe(self) -> PairBuilder:
        """A builder whose `validate` finds the first valid record without raising."""
        return self.chunk_pass(skip_invalid=True)

    def counts(self) -> PairCounts:
        return PairCounts()


class PairBuilder:
    """One pass over a stream of preference records: each chunk validated into the SFT records of
    its replies, tokenized by SFT's ExampleBuilder, and cut into pairs; counts as it goes.

    The chunk pass of workers.py: `run` yields each chunk's pairs, `failed` is the tag of the
    chunk an error was found in, `expect` is what the pass over all chunks knows of the format
    (the first valid record's, and its index), `finish` and `counts` close the pass."""

    def __init__(
        self,
        tokenizer,
        settings: TargetSettings,
        *,
        max_prompt_length: int | None = None,
        skip_invalid: bool = False,
        text_field: str = "text",
        field_map: FieldMap | None = None,
    ):
        if settings.truncation not in TRUNCATION_POLICIES:
            raise DataError(
                "unknown truncation policy",
                field="truncation",
                found=repr(settings.truncation),
                expected=f"one of {TRUNCATION_POLICIES}",
            )
        max_length = settings.max_length
        if max_prompt_length is None and max_length is not None:
            max_prompt_length = max_length // 2
        too_long = max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length
        if max_prompt_length is not None and (max_prompt_length < 1 or too_long):
            raise DataError(
                "max_prompt_length must leave room for the replies",
                field="max_prompt_length",
                found=str(max_prompt_length),
                expected=f"1 <= max_prompt_length < max_length={max_length}",
                fix="lower max_prompt_length (default: max_length // 2)",
            )
        self.tokenizer, self.skip_invalid, self.text_field = tokenizer, skip_invalid, text_field
        self.max_length, self.max_prompt_length, self.truncation = max_length, max_prompt_length, settings.truncation
        self.field_map = field_map or FieldMap()
        # Each reply is SFT data with its assistant turns trained and no truncation (a pair is cut as one).
        reply_settings = replace(
            settings,
            max_length=None,
            completion_only_loss=True,
            assistant_only_loss=True,
            last_assistant_only=False,
            train_on_roles=("assistant",),
        )
        self.examples = ExampleBuilder(tokenizer, reply_settings, skip_invalid=skip_invalid)
        self.vocab_size = len(tokenizer)
        # The format fixed by the first valid record, and that record's index (before it, records
        # are checked as if no format were fixed yet, as formats.RecordValidator does).
        self.expected_format: str | None = None
        self.expected_from = 0
        self.first_valid: int | None = None
        self.formats: Counter = Counter()
        self.skipped: Counter = Counter()
        self.dropped: Counter = Counter()
        self.truncated_prompt = 0
        self.truncated_completion = 0
        self.truncated = 0
        self.failed: Any = None

    # --- validation -------------------------------------------------------------------------

    def validate(self, chunk: Records) -> list[tuple[int, PairRecords, Record, Record]]:
        """(index, pair, chosen SFT record, rejected SFT record) for each valid record of the chunk.
        The SFT records' indices are 2 * index (chosen) and 2 * index + 1 (rejected)."""
        valid = []
        for offset, raw in enumerate(chunk.records):
            index = chunk.start + offset
            try:
                raw, _ = self.field_map.apply(raw)
                pair = pair_records(raw)
                expected = self.expected_format if index >= self.expected_from else None
                if expected is not None and pair.format != expected:
                    raise RecordError(
                        "mixed formats in one dataset",
                        field=",".join(sorted(raw)),
                        found=f"a {pair.format} pair",
                        expected=f"{expected} like the first valid record",
                        fix="split the data into one file per format, or convert the records to one",
                    )
                built = []
                for number, (side, sft) in enumerate(zip(SIDES, (pair.chosen, pair.rejected))):
                    try:
                        built.append(validate_record(sft, 2 * index + number, self.text_field, self.vocab_size))
                    except RecordError as bad:
                        prompt_messages = len(sft["prompt"]) if isinstance(sft["prompt"], list) else 0
                        raise RecordError(
                            bad.problem,
                            field=record_field(bad.field, side, pair, prompt_messages),
                            found=bad.found,
                            expected=bad.expected,
                            fix=bad.fix,
                        ) from None
            except RecordError as bad:
                self._refuse(bad, chunk, offset)
                continue
            if self.expected_format is None:
                self.expected_format, self.expected_from = pair.format, index
            if self.first_valid is None:
                self.first_valid = index
            self.formats[pair.format] += 1
            valid.append((index, pair, built[0], built[1]))
        return valid

    def _refuse(self, bad: RecordError, chunk: Records, offset: int) -> None:
        """Count and skip (skip_invalid_records), or raise naming the file, line and record."""
        where = self.field_map.source_field(bad.field) if bad.field else bad.field
        if self.skip_invalid:
            reason = re.sub(r"\[\d+\]", "[]", where or "record")
            self.skipped[f"invalid {reason}: {bad.problem}"] += 1
            return
        source, row = chunk.locate(offset)
        raise DataError(
            bad.problem,
            source=source,
            index=row,
            field=where,
            found=bad.found,
            expected=bad.expected,
            fix=bad.fix or "correct the record, or set skip_invalid_records=true to count and skip such records",
        )

    # --- pairs --------------------------------------------------------------------------------

    def run(self, chunks: Iterable[tuple[Any, Records]]) -> Iterator[tuple[Any, Records, Pairs]]:
        """(tag, chunk, its pairs) for each (tag, chunk), in order."""
        pending: deque = deque()  # chunks given to the example builder, not yet cut into pairs

        def replies():
            for tag, chunk in chunks:
                self.failed = tag
                valid = self.validate(chunk)
                pending.append((tag, chunk, valid))
                yield [record for _, _, chosen, rejected in valid for record in (chosen, rejected)]
            self.failed = None

        try:
            for examples in self.examples.build(replies()):
                tag, chunk, valid = pending.popleft()
                ahead, self.failed = self.failed, tag  # an error cutting these pairs is this chunk's
                pairs = self._pairs(chunk, valid, examples)
                self.failed = ahead
                yield tag, chunk, pairs
        except DataError as error:
            if error.source is None and error.index is not None:  # from the example builder: a reply
                raise self._located(error, pending) from None
            raise

    def _located(self, error: DataError, pending) -> DataError:
        index, number = divmod(error.index, 2)
        for tag, chunk, valid in pending:
            for record_index, pair, chosen, rejected in valid:
                if record_index == index:
                    self.failed = tag
                    reply = (chosen, rejected)[number]
                    source, row = chunk.locate(index - chunk.start)
                    field = record_field(error.field, SIDES[number], pair, reply.completion_start)
                    where = self.field_map.source_field(field) if field else field
                    problem = re.sub(
                        r"messages\[\d+\]",
                        lambda m: record_field(m.group(0), SIDES[number], pair, reply.completion_start),
                        error.problem,
                    )
                    return DataError(
                        problem,
                        source=source,
                        index=row,
                        field=where,
                        found=error.found,
                        expected=error.expected,
                        fix=error.fix,
                    )
        return error

    def _pairs(self, chunk: Records, valid, examples) -> Pairs:
        by_record: dict[int, list[int]] = {}
        for position, index in enumerate(examples.record_index.tolist()):
            by_record.setdefault(int(index), []).append(position)
        triples, kept = [], []
        for index, _, _, _ in valid:
            try:
                sides = []
                for number, side in enumerate(SIDES):
                    found = by_record.get(2 * index + number, [])
                    if not found:
                        # The example builder skipped the reply (skip_invalid_records: it counts why
                        # under skipped_replies) or found nothing trained in it; the pair is counted here.
                        raise RecordError(
                            f"the {side} reply was skipped or has no trained token",
                            field=side,
                            expected="an assistant reply the template serves",
                            fix="check the reply's messages (a 'train': false flag, or "
                            "chat_examples: final_render, can leave it untrained)",
                        )
                    if len(found) > 1:
                        raise RecordError(
                            f"the chat template does not serve the {side} reply in one render",
                            field=side,
                            found=f"{len(found)} examples as SFT data (it rewrites the reply's earlier turns)",
                            expected="a reply the template renders as one continuation of the prompt",
                            fix="give the reply as one assistant message, or end the prompt later",
                        )
                    sides.append(reply_of(*examples[found[0]]))
                (prompt, chosen), (rejected_prompt, rejected) = sides
                check_same_prompt(prompt, rejected_prompt, self.tokenizer)
            except RecordError as bad:
                self._refuse(bad, chunk, index - chunk.start)
                continue
            triple = self._fit(prompt, chosen, rejected)
            if triple is not None:
                triples.append(triple)
                kept.append(index)
        return Pairs.from_lists(triples, kept)

    def _fit(self, prompt: list[int], chosen: list[int], rejected: list[int]):
        """The pair within max_length, as the truncation policy says (None: dropped); counted."""
        limit = self.max_length
        if limit is None or len(prompt) + max(len(chosen), len(rejected)) <= limit:
            return prompt, chosen, rejected
        if self.truncation == "drop":
            self.dropped[f"longer than max_length={limit}"] += 1
            return None
        if len(prompt) > self.max_prompt_length:
            # The end of the prompt is kept: it holds the question and the generation prompt the
            # replies continue; what is lost is the start (BOS, system prompt, early turns).
            prompt = prompt[len(prompt) - self.max_prompt_length :]
            self.truncated_prompt += 1
        room = limit - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            self.truncated_completion += 1
        self.truncated += 1
        return prompt, chosen, rejected

    def expect(self, expected: str | None, expected_from: int) -> None:
        """What the pass over all chunks knows at the next chunk (a worker sees chunks out of order)."""
        self.expected_format, self.expected_from = expected, expected_from

    def finish(self, name: str) -> None:
        """At the end of the pass: a source without one valid record is an error."""
        require_valid(self.formats, self.skipped, name)

    def counts(self) -> PairCounts:
        """What the pass counted besides each chunk's records and pairs. Pairs are counted once in
        `skipped`; why the example builder skipped a reply (the template cannot serve it) is told
        by `skipped_replies`, one count per reply."""
        built = self.examples.stats()
        counts = PairCounts(
            formats=Counter(self.formats),
            skipped=Counter(self.skipped),
            skipped_replies=Counter(built["skipped_invalid"]),
            truncated=self.truncated,
            truncated_prompt=self.truncated_prompt,
            truncated_completion=self.truncated_completion,
            dropped=Counter(self.dropped),
        )
        if "chat" in built:
            counts.chat = Counter({key: int(built["chat"][key]) for key in CHAT_STATS})
        return counts


def prepare_pairs(
    source: Any,
    tokenizer,
    settings: TargetSettings = TargetSettings(),
    *,
    max_prompt_length: int | None = None,
    split: str | None = None,
    text_field: str = "text",
    skip_invalid_records: bool = False,
    cache_dir: str | None = None,
    use_cache: bool = True,
    fields: dict[str, str] | None = None,
    alpaca_layout: str = "alpaca",
    workers: int | None = None,
) -> Pairs:
    """Read, validate and tokenize preference records into Pairs; `pairs.stats` says what happened
    to every record (see the module docstring for the formats, the rules and truncation).

    `settings` are SFT's: max_length, truncation, chat_template, tools, chat_template_kwargs and
    chat_examples apply; the replies are always trained whole. The records are streamed in chunks
    into a cache entry on disk and the pairs returned are that entry, memory-mapped (with
    use_cache false, a temporary one); `workers` processes share the work (None: what pays on
    this machine, prepare.default_workers)."""
    started = time.perf_counter()
    stream = open_records(source, split)
    recipe = PairRecipe(
        tokenizer,
        settings,
        max_prompt_length,
        text_field,
        skip_invalid_records,
        FieldMap(dict(fields or {}), alpaca_layout),
    )
    workers = default_workers(stream) if workers is None else max(1, int(workers))

    def build(folder: str) -> None:
        counts = build_store(stream, recipe, folder, workers)
        _write_stats(folder, counts, stream.name)

    return _prepared(stream, recipe, build, "pairs", {}, PAIRS, cache_dir, use_cache, started)


def _prepared(stream, recipe: PairRecipe, build, kind: str, key_extra: dict, layout, cache_dir, use_cache, started):
    """The entry `<kind>-<key>` read or built (store.built_entry); the key hashes the data, the
    tokenizer and every setting (and `key_extra`)."""
    # Checked before the cache is looked at, so a bad setting is refused even when an entry exists.
    builder = recipe.chunk_pass()
    key = f"{kind}-" + _cache_key(stream.fingerprint(), recipe, builder.max_prompt_length, key_extra)
    root = (cache_dir or default_cache_dir()) if use_cache else None
    pairs, folder = built_entry(root, key if use_cache else "uncached", build, waiting=_waiting, layout=layout)
    pairs.stats["seconds"] = time.perf_counter() - started
    if folder is not None:
        pairs.stats["cache_entry"] = folder
    return pairs


def _waiting(entry: str) -> None:
    print(f"waiting for another process to finish preparing {entry}", file=sys.stderr, flush=True)


def _write_stats(folder: str, counts: PairCounts, source: str, **extra) -> None:
    """stats.json of an entry just built: what the pass counted, and the token counts and length
    percentiles of the pairs, read from the entry's offsets (memory-mapped)."""
    offsets = {
        part: np.load(os.path.join(folder, f"{part}_offsets.npy"), mmap_mode="r")
        for part in ("prompt", "chosen", "rejected")
    }
    lengths = sum(np.diff(cuts) for cuts in offsets.values())
    percentiles = {}
    if len(lengths):
        for q in (0, 50, 90, 99, 100):
            percentiles[f"p{q}"] = int(np.percentile(lengths, q, method="nearest"))
    stats = {
        "records": counts.records,
        "formats": dict(counts.formats),
        "skipped_invalid": dict(counts.skipped),
        "skipped_replies": dict(counts.skipped_replies),
        "truncated": counts.truncated,
        "truncated_prompt": counts.truncated_prompt,
        "truncated_completion": counts.truncated_completion,
        "dropped": dict(counts.dropped),
        **({"chat": {key: int(counts.chat.get(key, 0)) for key in CHAT_STATS}} if counts.chat is not None else {}),
        "source": source,
        "pairs": counts.pairs,
        "prompt_tokens": int(offsets["prompt"][-1]),
        "chosen_tokens": int(offsets["chosen"][-1]),
        "rejected_tokens": int(offsets["rejected"][-1]),
        "tokens": int(lengths.sum()) if len(lengths) else 0,
        "length": percentiles,
        **extra,
    }
    with open(os.path.join(folder, "stats.json"), "w") as handle:
        json.dump(stats, handle)


# --- the cache -----------------------------------------------------------------------------------

# 2: checksums.json in every entry (store.seal_entry)
# 3: streamed into the entry (store.PAIRS layout; KTO's desirable.npy)
PAIRS_CACHE_FORMAT = 3


def _cache_key(data: str, recipe: PairRecipe, max_prompt_length: int | None, extra: dict) -> str:
    settings = recipe.settings
    parts = {
        "format": PAIRS_CACHE_FORMAT,
        "version": __version__,
        "data": data,
        "tokenizer": tokenizer_fingerprint(recipe.tokenizer),
        "settings": asdict(settings),
        "max_prompt_length": max_prompt_length,
        "text_field": recipe.text_field,
        "skip_invalid_records": recipe.skip_invalid,
        "fields": recipe.field_map.fields,
        "alpaca_layout": recipe.field_map.alpaca_layout,
        **extra,
    }
    stops, eos = sorted(stop_tokens_of(recipe.tokenizer)), recipe.tokenizer.eos_token
    if stops != ([str(eos)] if eos else []):
        # The generation config's stop tokens close turns of templates that write no end marker (GLM).
        parts["stop_tokens"] = stops
    if settings.chat_template and os.path.isfile(settings.chat_template):
        # A template given as a file: its text, not its path, shapes the pairs.
        with open(settings.chat_template, "rb") as handle:
            parts["chat_template_file"] = hashlib.sha256(handle.read()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --- unpaired (KTO) ----------------------------------------------------------------------------


def prepare_unpaired(
    source: Any,
    tokenizer,
    settings: TargetSettings = TargetSettings(),
    *,
    max_prompt_length: int | None = None,
    split: str | None = None,
    text_field: str = "text",
    skip_invalid_records: bool = False,
    cache_dir: str | None = None,
    use_cache: bool = True,
    fields: dict[str, str] | None = None,
    alpaca_layout: str = "alpaca",
    workers: int | None = None,
) -> Pairs:
    """KTO's unpaired records (`prompt`, `completion`, `label`: true where the completion is
    desirable) as Pairs whose chosen part is the completion and whose rejected part is the
    completion of the record before (the first record takes the last one's): the mismatched
    completion whose log-ratio estimates KTO's KL reference point, as TRL pairs them, but fixed by
    the data's order rather than by the batch, so the reference log-probs can be computed once and
    the estimate does not depend on how a step is split. `pairs.desirable` holds the labels.

    Streamed as pairs are: a first pass over the records checks them and keeps their labels (a
    byte each) and the last record's completion; the second turns each record into a pair record
    (carrying the completion before it) on the way into prepare_pairs' builder, its rendering,
    checks, truncation, workers and cache (an entry `unpaired-<key>` with desirable.npy)."""
    started = time.perf_counter()
    stream = open_records(source, split)
    field_map = FieldMap(dict(fields or {}), alpaca_layout)
    # The field map is applied on the way in (as_pair_records), so the builder gets sftlab's names.
    recipe = PairRecipe(tokenizer, settings, max_prompt_length, text_field, skip_invalid_records, FieldMap())
    workers = default_workers(stream) if workers is None else max(1, int(workers))

    def build(folder: str) -> None:
        labels, last_completion = _unpaired_labels(stream, field_map)
        counts = build_store(_as_pair_records(stream, field_map, last_completion), recipe, folder, workers)
        record_index = np.load(os.path.join(folder, "record_index.npy"), mmap_mode="r")
        desirable = labels[record_index]
        np.save(os.path.join(folder, "desirable.npy"), desirable)
        desired = int(desirable.sum())
        _write_stats(folder, counts, stream.name, desirable=desired, undesirable=len(desirable) - desired)

    key_extra = {"unpaired": 1, "unpaired_fields": field_map.fields, "unpaired_alpaca_layout": alpaca_layout}
    try:
        return _prepared(stream, recipe, build, "unpaired", key_extra, UNPAIRED, cache_dir, use_cache, started)
    except DataError as error:  # named in the unpaired record's own terms
        field_name = (error.field or "").replace("rejected", "completion of the record before (KL pairing)")
        raise DataError(
            error.problem,
            source=error.source,
            index=error.index,
            field=field_name.replace("chosen", "completion"),
            found=error.found,
            expected=error.expected,
            fix=error.fix,
        ) from None


def _unpaired_labels(stream: RecordStream, field_map: FieldMap) -> tuple[np.ndarray, Any]:
    """The first pass: every record checked (prompt, completion, a boolean label), its label kept,
    and the last record's completion (the first record's mismatched one)."""
    labels = bytearray()
    last = None
    for chunk in stream.chunks():
        for offset, raw in enumerate(chunk.records):
            try:
                raw, _ = field_map.apply(raw)
                for name in ("prompt", "completion", "label"):
                    if name not in raw:
                        raise RecordError(
                            f"an unpaired (KTO) record needs '{name}'",
                            field=name,
                            found=f"fields {sorted(raw)}",
                            expected="prompt, completion and label (true: desirable)",
                            fix=f"add '{name}', or map your field to it with fields: {{{name}: your_field}}",
                        )
                if not isinstance(raw["label"], bool):
                    raise RecordError(
                        "must be true or false",
                        field="label",
                        found=describe(raw["label"]),
                        expected="true (the completion is desirable) or false",
                    )
            except RecordError as bad:
                where, row = chunk.locate(offset)
                raise DataError(
                    bad.problem,
                    source=where,
                    index=row,
                    field=bad.field,
                    found=bad.found,
                    expected=bad.expected,
                    fix=bad.fix,
                ) from None
            labels.append(raw["label"])
            last = raw["completion"]
    return np.frombuffer(bytes(labels), dtype=np.bool_), last


def _as_pair_records(stream: RecordStream, field_map: FieldMap, last_completion: Any) -> RecordStream:
    """The stream with each unpaired record as a pair record: chosen its completion, rejected the
    completion of the record before (the first record's: `last_completion`). Files, lines and
    indices stay the records' own, so errors name them."""

    def converter():
        before = [last_completion]

        def convert(raw: dict) -> dict:
            raw, _ = field_map.apply(raw)
            pair = {
                **{k: v for k, v in raw.items() if k not in ("completion", "label")},
                "chosen": raw["completion"],
                "rejected": before[0],
            }
            before[0] = raw["completion"]
            return pair

        return convert

    return stream.mapped(converter)
