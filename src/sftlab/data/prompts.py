"""Eval records -> generation prompts: the tokens inference feeds, and the reply the record expects.

    prompt/completion        prompt ids = the prompt as its example tokenizes it (BOS where the
                             tokenizer adds one); reference = the completion
    conversations (and chat  prompt ids = P_k for the LAST assistant turn k: the template on
    prompt/completion)       messages[:k] with add_generation_prompt=True, the record's tools and
                             template arguments, as the example's context for that turn;
                             reference = that turn's content

    preference pairs         prompt ids = the pair's P exactly (as served: what training scores the
    (pair_prompts)           completions after); reference = the chosen completion C, decoded as
                             a generated reply is (special tokens skipped, the ends stripped), so a
                             reply equal to C scores 1; KTO: desirable completions only

Records pass through the same field maps, Alpaca layout and validation as training's
(formats.py, fields.py), so a prompt's ids are exactly the ids that the record's example has
before the first trained token of its last turn. A record that gives no prompt/reference pair
(text, pre-tokenized, a last turn made of tool calls only, a prompt of max_length tokens or
more) is counted under its reason, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from jinja2 import TemplateError

from sftlab.data import formats
from sftlab.data.chat import ChatRenderer, content_text, resolve_chat_templates
from sftlab.data.container import Pairs
from sftlab.data.examples import SegmentEncoder, TargetSettings
from sftlab.data.fields import FieldMap
from sftlab.data.formats import RecordValidator
from sftlab.data.sources import open_records
from sftlab.data.special_tokens import reply_stop_ids
from sftlab.errors import DataError, TurnError

NO_TEXT_REFERENCE = {
    formats.TEXT: "text record (no prompt/reply split)",
    formats.PRETOKENIZED: "pre-tokenized record (no reference text)",
}


@dataclass
class GenerationPrompt:
    record_index: int  # the record's position in its source, as training's examples name it
    input_ids: list[int]
    reference: str
    source: str | None = None


@dataclass
class GenerationPrompts:
    prompts: list[GenerationPrompt] = field(default_factory=list)
    records_read: int = 0  # records looked at to find the prompts (reading stops at the chunk that reaches `limit`)
    usable: int = 0  # of those, the records that give a prompt (the first `limit` of them are the prompts)
    unusable: Counter = field(default_factory=Counter)  # reason -> records that gave no prompt
    formats: Counter = field(default_factory=Counter)
    stop_token_ids: list[int] = field(default_factory=list)  # what ends a reply (special_tokens.reply_stop_ids)


def generation_prompts(
    source,
    tokenizer,
    settings: TargetSettings = TargetSettings(),
    *,
    limit: int,
    split: str | None = None,
    text_field: str = "text",
    skip_invalid_records: bool = False,
    fields: dict[str, str] | None = None,
    alpaca_layout: str = "alpaca",
    name: str | None = None,
) -> GenerationPrompts:
    """The first `limit` prompts of `source` (in record order, so every evaluation of a run, and
    every run on the same data, scores the same prompts)."""
    stream = open_records(source, split)
    validator = RecordValidator(
        text_field=text_field,
        skip_invalid=skip_invalid_records,
        vocab_size=len(tokenizer),
        normalize=FieldMap(dict(fields or {}), alpaca_layout),
    )
    encoder = SegmentEncoder(tokenizer)
    result = GenerationPrompts()
    renderer = None
    # Small chunks: reading stops once `limit` prompts are found, and eval sets can be large.
    for chunk in stream.chunks(256):
        records = validator.validate(chunk)
        result.records_read += len(chunk)
        for record in records:
            result.formats[record.format] += 1
            if record.format in NO_TEXT_REFERENCE:
                result.unusable[NO_TEXT_REFERENCE[record.format]] += 1
                continue
            if record.format == formats.PROMPT_COMPLETION:
                ids = encoder.encode([record.prompt], [False])[0]
                encoder.insert_bos(ids)  # as the record's example starts
                reference = record.completion
            else:
                if renderer is None:
                    renderer = _renderer(tokenizer, settings)
                last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
                reference = content_text(record.messages[last])  # content parts or a mapping: the reply's text
                if not reference.strip():
                    result.unusable["last assistant turn has no text (tool calls only)"] += 1
                    continue
                try:
                    context = renderer.render(
                        record.messages[:last],
                        add_generation_prompt=True,
                        tools=record.tools,
                        kwargs=record.template_kwargs,
                    )
                except TemplateError as error:
                    source_name, row = chunk.locate(record.index - chunk.start)
                    raise DataError(
                        "the chat template failed on this record",
                        source=source_name,
                        index=row,
                        field="chat_template",
                        found=f"{type(error).__name__}: {error}",
                        fix="fix the template, or the record the template rejects",
                    ) from error
                except TurnError as error:  # content the template does not read (a mapping)
                    source_name, row = chunk.locate(record.index - chunk.start)
                    raise DataError(
                        error.problem,
                        source=source_name,
                        index=row,
                        field=error.field,
                        found=error.found,
                        fix=error.fix,
                    ) from None
                ids = encoder.encode([context], [False])[0]
            if settings.max_length is not None and len(ids) >= settings.max_length:
                # Its example would keep no trained token (truncation cuts the reply): training never saw it either.
                result.unusable[f"prompt of max_length={settings.max_length} tokens or more"] += 1
                continue
            result.usable += 1
            if len(result.prompts) < limit:
                result.prompts.append(GenerationPrompt(record.index, ids, reference, name))
        # Whole chunks are counted, so `unusable` (which includes the validator's skips) and `usable`
        # add up to `records_read`.
        if len(result.prompts) == limit:
            break
    for reason, count in validator.skipped.items():
        result.unusable[f"skipped, {reason}"] += count
    result.stop_token_ids = reply_stop_ids(tokenizer, renderer)
    return result


def pair_prompts(
    pairs: Pairs, tokenizer, settings: TargetSettings = TargetSettings(), *, limit: int
) -> GenerationPrompts:
    """The first `limit` usable eval pairs as generation prompts: the prompt ids are P exactly as
    the pair holds it, the reference the chosen completion's text. Counted as unusable, by reason:
    a chosen completion cut by max_length (it does not end with a token that ends a reply, so no
    whole reply can equal it), one without text, and KTO's undesirable completions."""
    chat = any(kind in (pairs.stats.get("formats") or {}) for kind in ("conversational", "implicit_prompt"))
    renderer = _renderer(tokenizer, settings) if chat else None
    result = GenerationPrompts(stop_token_ids=reply_stop_ids(tokenizer, renderer))
    result.formats.update(pairs.stats.get("formats") or {})
    stops = set(result.stop_token_ids)
    source = pairs.stats.get("source")
    for i in range(len(pairs)):
        if len(result.prompts) == limit:
            break
        result.records_read += 1
        prompt, chosen, _ = pairs[i]
        if pairs.desirable is not None and not pairs.desirable[i]:
            result.unusable["undesirable completion (kto)"] += 1
            continue
        if not len(chosen) or int(chosen[-1]) not in stops:
            result.unusable["chosen completion cut by max_length"] += 1
            continue
        reference = tokenizer.decode(chosen.tolist(), skip_special_tokens=True).strip()
        if not reference:
            result.unusable["chosen completion has no text"] += 1
            continue
        result.usable += 1
        result.prompts.append(GenerationPrompt(int(pairs.record_index[i]), prompt.tolist(), reference, source))
    return result


def _renderer(tokenizer, settings: TargetSettings) -> ChatRenderer:
    template, tool_template = resolve_chat_templates(tokenizer, settings.chat_template)
    return ChatRenderer(
        tokenizer,
        template,
        tool_template=tool_template,
        tools=settings.tools,
        template_kwargs=settings.chat_template_kwargs,
    )
