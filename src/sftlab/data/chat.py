"""Render conversations with a chat template, and turn each one into examples trained *as served*.

The rule, for assistant turn k of a conversation `messages`:

    P_k = render(messages[:k], add_generation_prompt=True)   what inference feeds the model
    F_k = render(messages[:k + 1])                           the conversation with turn k last
    C_k = F_k after P_k, through the marker that ends the turn

The model must learn to write C_k in the context P_k, exactly. Text a turn's render writes
after its end marker is not generated (ChatML's "\\n"), nor is text a template writes only
where a conversation ends (Phi-3's closing eos_token): both stay context.

Templates whose renders are prefixes of each other serve every turn in one example, the
render of the whole conversation. Templates that rewrite history do not: Qwen3 drops a
turn's thinking once a user message follows, gpt-oss closes a final answer with <|end|>
instead of <|return|> once it is history, Mistral-Nemo moves the system prompt into the last
user message. A turn whose P_k + C_k is not a prefix of the whole render gets an example of
its own, and every example trains all the turns it serves, so a conversation needs as few
examples as the template allows. `final_render` mode keeps one example per conversation and
counts the turns it cannot serve.

When F_k does not start with P_k, two documented rules apply, else the record is refused:
- the template rewrites an EARLIER turn once turn k exists (gpt-oss drops a tool call's
  analysis once a final answer follows): turn k's text is what F_k writes after the longest
  stretch it shares with the end of P_k (which must hold the message turn k answers and the
  generation prompt), and it is trained after P_k;
- the generation prompt opens the reply and the turn's render does not continue it
  (DeepSeek-R1 feeds "<think>\\n" but renders replies with their thinking cut away): the reply
  as the record writes it must start with that opening; the text after it, then the end
  marker the template writes, is trained after P_k. The marker is the special token after the
  longest stretch of the turn's render that ends the reply as written and holds its answer
  (DeepSeek-V3.1 renders "</think>" + answer: the reply's own "</think>answer" is that stretch).

A turn whose render ends with no stop token (GLM ends a reply where the next <|user|> begins;
Apertus writes <|assistant_end|> only when a user message follows) is trained through the stop
token that a next message's render writes right after it (`closing_marker`). Content given as a
list of parts, and tool-call arguments, reach each template in the form it reads, decided once
per template by probe renders. Content given as a mapping (Apertus: {"text"}, {"parts"},
{"blocks": [thoughts, response, tool_calls, ...]}) is passed as given to a template a probe render
shows reads it, and refused naming messages[k].content otherwise; a reply's "thoughts" blocks are
its reasoning (the template's inner section), its "response" blocks its answer, and a trained
reply may not hold "tool_outputs" (the model would learn to write the tools' results).

Reasoning, three choices (config.py; all off by default, each counted):
- `reasoning_when_missing: empty`: a reply with no reasoning, after a generation prompt that opens what
  the turn's render does not continue (R1, MiniMax-M2: "<think>\n"), is trained as the model closing
  the opened thinking at once, with the text the template writes for an empty reasoning: the turn
  rendered with reasoning "" (it continues the opening: Qwen3.6; or it writes a closing before the
  reply where the opening was: DeepSeek-V3.1's "</think>"), else rendered with a probe reasoning that
  it writes right after the opening, the probe taken out (a template that writes its think block only
  for a non-empty reasoning). Else refused.
- `reasoning_when_dropped: as_rendered`: a turn whose render lacks the reasoning the record gives it
  (Kimi K2 Thinking's "<think></think>" for a final answer) is trained as rendered, not refused.
- `train_on_reasoning: false`: the reasoning's text, found in the trained turn as the self-check finds
  it, is context inside the turn (examples.py: the tokens holding any of it); its tags, the answer, tool
  calls and the end marker stay trained.

Every trained turn is checked: non-empty, holding its reply (content, reasoning, tool-call
names), ending with a special token. A failure is a `TurnError` naming the turn; the caller
names the record. Templates run in transformers' sandboxed Jinja environment.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from jinja2 import TemplateError

from sftlab.config import CHAT_EXAMPLES, REASONING_WHEN_DROPPED, REASONING_WHEN_MISSING
from sftlab.errors import DataError, TurnError

# A ChatML template with generation tags, for tokenizers that ship none (chat_template: chatml).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}

# How the turns of a conversation become examples.
AS_SERVED, FINAL_RENDER = CHAT_EXAMPLES  # declared in config.py


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """The template to use: the configured one (a built-in name, a file, or Jinja text), else the tokenizer's."""
    return resolve_chat_templates(tokenizer, chat_template)[0]


def resolve_chat_templates(tokenizer, chat_template: str | None) -> tuple[str, str | None]:
    """(template, template for records with tools or None). A configured template serves both; a
    tokenizer may ship a dict of named templates, whose "tool_use" one transformers picks when
    tools are given."""
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[chat_template], None
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as handle:
                return handle.read(), None
        if os.path.isdir(chat_template):
            return folder_chat_template(chat_template), None
        if "{%" in chat_template or "{{" in chat_template:
            return chat_template, None
        raise DataError(
            "chat_template is neither a built-in name, a file nor a Jinja template",
            field="chat_template",
            found=repr(chat_template[:60]),
            expected=f"one of {sorted(BUILTIN_TEMPLATES)}, a path to a .jinja file, a tokenizer folder, "
            "or the template text",
        )
    template = getattr(tokenizer, "chat_template", None)
    tool_template = None
    if isinstance(template, dict):
        template, tool_template = template.get("default"), template.get("tool_use")
    if not template:
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered",
            field="chat_template",
            found=f"{type(tokenizer).__name__} without chat_template",
            fix="set chat_template: chatml (built in) or a path to a Jinja template file",
        )
    return template, tool_template


def folder_chat_template(folder: str) -> str:
    """The chat template of another tokenizer's folder (save_pretrained writes chat_template.jinja, older
    versions the "chat_template" of tokenizer_config.json), read as text: its tokenizer is not loaded."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as handle:
            return handle.read()
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as handle:
            template = json.load(handle).get("chat_template")
    except (OSError, ValueError):
        template = None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        raise DataError(
            "the folder given as chat_template holds no chat template",
            source=folder,
            field="chat_template",
            expected="chat_template.jinja, or a chat_template in tokenizer_config.json",
            fix="point chat_template at a tokenizer folder that has one, a .jinja file, or 'chatml'",
        )
    return template


@dataclass
class Turn:
    """One trained turn: the text before it, the text trained, and what its own render writes after."""

    index: int  # message index
    context: str  # P_k for an assistant turn: exactly what inference feeds
    text: str  # C_k: what the model must write
    tail: str  # context after the turn in its own example (ChatML's "\n")
    rule: str  # "prefix", "rewritten_history" or "opened_reply": how C_k was found
    empty_reasoning: bool = False  # trained as closing an opened thinking at once (reasoning_when_missing: empty)
    dropped_reasoning: bool = False  # the render lacks the record's reasoning (reasoning_when_dropped: as_rendered)
    reasoning: list[tuple[int, int]] = field(default_factory=list)  # the reasoning's text in `text`, as found

    def served_by(self, text: str) -> bool:
        """`text` holds this turn as served: exactly its context, then exactly its trained text."""
        return text.startswith(self.context) and text.startswith(self.text, len(self.context))

    def span(self) -> tuple[int, int]:
        return len(self.context), len(self.context) + len(self.text)

    def reasoning_spans(self) -> list[tuple[int, int]]:
        start = len(self.context)
        return [(start + a, start + b) for a, b in self.reasoning]


@dataclass
class ConversationExamples:
    """The examples of one conversation: (text, trained character spans); the first holds the last turn."""

    examples: list[tuple[str, list[tuple[int, int]]]]
    counts: Counter = field(default_factory=Counter)
    turns: list[list[int]] = field(default_factory=list)  # the message index of each example's spans
    # per example: the reasoning inside its trained spans, to be left as context (train_on_reasoning: false)
    reasoning: list[list[tuple[int, int]]] = field(default_factory=list)


class ChatRenderer:
    """Renders messages with one template, the tokenizer's special tokens and the dataset's defaults."""

    def __init__(
        self,
        tokenizer,
        template: str,
        *,
        tool_template: str | None = None,
        tools: list | None = None,
        template_kwargs: dict | None = None,
        stop_tokens: list[str] | None = None,
        reasoning_when_missing: str = "refuse",
        reasoning_when_dropped: str = "refuse",
    ):
        self.template = _compile(template)
        self.tool_template = _compile(tool_template) if tool_template else None
        self.tools = tools or None
        special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # What every render sees, merged once: a Jinja render already costs ~30 us per message.
        self.variables = {**special, **(template_kwargs or {})}
        # Longest first, so a cut is moved out of the outermost token that it would split.
        self.special_tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        # A trained turn must end with one of these, or the model never learns to stop.
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        self.end_markers = tuple(
            sorted(
                {t.content for t in decoder.values() if getattr(t, "special", False)}
                | {str(t) for t in tokenizer.all_special_tokens},
                key=len,
                reverse=True,
            )
        )
        self._closer: str | None = None
        self._tokenizer = tokenizer
        # (id of a compiled template, role[, a mapping's shape]) -> it reads content parts, or such a mapping
        self._parts: dict[tuple, bool] = {}
        self._arguments: dict[int, str] = {}  # id of a compiled template -> the form of tool-call arguments it reads
        self._stop_tokens = tuple(sorted(set(stop_tokens), key=len, reverse=True)) if stop_tokens is not None else None
        for name, value, allowed in (
            ("reasoning_when_missing", reasoning_when_missing, REASONING_WHEN_MISSING),
            ("reasoning_when_dropped", reasoning_when_dropped, REASONING_WHEN_DROPPED),
        ):
            if value not in allowed:  # the config checks these too; the renderer is public
                raise DataError(f"unknown {name}", field=name, found=repr(value), expected=f"one of {allowed}")
        self.reasoning_when_missing, self.reasoning_when_dropped = reasoning_when_missing, reasoning_when_dropped

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tools: list | None = None,
        kwargs: dict | None = None,
    ) -> str:
        tools = tools if tools is not None else self.tools
        template = self.tool_template if tools and self.tool_template is not None else self.template
        if any(isinstance(m.get("content"), dict) for m in messages):
            for position, m in enumerate(messages):
                if isinstance(m.get("content"), dict) and not self._reads_mapping(template, m["role"], m["content"]):
                    raise _unread_mapping(position, m["content"])
        if any(isinstance(m.get("content"), list) for m in messages):
            messages = [
                m
                if not isinstance(m.get("content"), list) or self._reads_parts(template, m["role"])
                else _as_string_content(m)
                for m in messages
            ]
        if any("tool_calls" in m for m in messages) and self._arguments_form(template) == "text":
            messages = [_with_text_arguments(m) if "tool_calls" in m else m for m in messages]
        variables = {**self.variables, **kwargs} if kwargs else self.variables
        documents = variables.get("documents")
        if documents is not None:
            variables = {k: v for k, v in variables.items() if k != "documents"}
        try:
            return template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
            # The template's own Python-level failure on this record's data (a string plus the dict of a tool
            # call's arguments, iterating tools that are None): a problem of template and record, not a bug.
            raise TemplateError(f"{type(error).__name__}: {error}") from error

    def _reads_parts(self, template, role: str) -> bool:
        """Whether `template` renders a `role` message whose content is a list of text parts (as serving stacks
        pass it), found once by a probe: the part's text rendered, and no part rendered as a Python dict. Other
        roles (system, tool), and templates that read strings only, get the text parts joined, as vLLM joins them."""
        key = (id(template), role)
        if key not in self._parts:
            parts = [{"type": "text", "text": _PROBE}]
            text = self._probe_render(template, role, parts) if role in ("user", "assistant") else ""
            self._parts[key] = _PROBE in text and "'type'" not in text and '"type"' not in text
        return self._parts[key]

    def _reads_mapping(self, template, role: str, content: dict) -> bool:
        """Whether `template` renders a `role` message whose content is a mapping of `content`'s shape (Apertus:
        {"text"} for a system message, {"parts"} for a user's, {"blocks"} for a reply), found once per role and
        shape by a probe: its text rendered, and no key of it rendered as a Python dict or as JSON."""
        (shape,) = content  # formats.py: one key, one of CONTENT_MAPPINGS
        key = (id(template), role, shape)
        if key not in self._parts:
            value = {
                "text": _PROBE,
                "parts": [{"type": "text", "text": _PROBE}],
                "blocks": [{"type": "response", "text": _PROBE}],
            }[shape]
            text = self._probe_render(template, role, {shape: value})
            self._parts[key] = _PROBE in text and not any(
                quoted in text for name in (shape, "type") for quoted in (repr(name), json.dumps(name))
            )
        return self._parts[key]

    def _probe_render(self, template, role: str, content) -> str:
        """`template`'s render of a short chat (a system message, a user message, a reply) whose `role` message
        has `content`; "" when it fails, as a template that cannot read such content does, in Jinja or in Python."""
        probe = {"system": "x", "user": "x", "assistant": "x", role: content}
        messages = [{"role": r, "content": probe[r]} for r in ("system", "user", "assistant")]
        try:
            return template.render(
                messages=messages if role == "system" else messages[1:],
                tools=None,
                documents=None,
                add_generation_prompt=False,
                **{k: v for k, v in self.variables.items() if k != "documents"},
            )
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError):
            return ""

    def _arguments_form(self, template) -> str:
        """How `template` reads a tool call's arguments: "object" (it writes them with tojson, or item by item, as
        Qwen, Llama and GLM do) or "text" (it joins them as JSON text, as DeepSeek does), found once by rendering a
        probe call both ways. A form works when the probe's key and value are written once each, neither as a
        Python dict nor JSON-encoded twice; "object" is taken when both work, and when both fail (the template's
        own error then names the record), and when the template writes no arguments (both renders alike). A template
        whose renders differ but are wrong both ways (a Python dict, JSON in a JSON string) is refused."""
        key = id(template)
        if key not in self._arguments:
            outcomes, renders = {}, set()
            for form, arguments in (("object", dict(_PROBE_ARGUMENTS)), ("text", json.dumps(_PROBE_ARGUMENTS))):
                call = {"type": "function", "id": "call_0", "function": {"name": "probe", "arguments": arguments}}
                probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
                try:
                    text = template.render(
                        messages=probe,
                        tools=None,
                        documents=None,
                        add_generation_prompt=False,
                        **{k: v for k, v in self.variables.items() if k != "documents"},
                    )
                except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError):
                    outcomes[form] = "fails"  # this form makes the template fail, in Jinja or in Python
                    continue
                renders.add(text)
                ((name, value),) = _PROBE_ARGUMENTS.items()
                once = text.count(name) == 1 and text.count(value) == 1
                garbled = '\\"' + name in text or repr(name) in text  # JSON-encoded twice, or a Python dict
                outcomes[form] = "works" if once and not garbled else f"writes {text[-80:]!r}"
            if "works" in outcomes.values():
                self._arguments[key] = "object" if outcomes["object"] == "works" else "text"
            elif set(outcomes.values()) == {"fails"} or len(renders) == 1 and "fails" not in outcomes.values():
                self._arguments[key] = "object"  # the template's own error names the record; or it writes no arguments
            else:
                self._arguments[key] = (
                    "neither: as an object it " + outcomes["object"] + "; as JSON text it " + outcomes["text"]
                )
        form = self._arguments[key]
        if form.startswith("neither"):
            raise TemplateError(
                "the template renders tool-call arguments neither from an object nor from JSON text "
                f"as JSON once ({form[len('neither: ') :]})"
            )
        return form

    def generation_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the spans inside `{% generation %}` tags (for templates that have them)."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        text, spans = _render_with_assistant_indices(self.template, messages, None, None, False, **self.variables)
        return text, [tuple(s) for s in spans]

    # --- turns as served ----------------------------------------------------------------------

    def conversation_examples(
        self,
        messages: list[dict],
        turns: list[int],
        *,
        tools: list | None = None,
        kwargs: dict | None = None,
        mode: str = AS_SERVED,
        train_reasoning: bool = True,
    ) -> ConversationExamples:
        """The examples that train `turns` (message indices, ascending) as served; with `train_reasoning`
        false, each also lists the reasoning inside its trained spans, which stays context."""
        render = lambda part, prompt=False: self.render(part, prompt, tools, kwargs)  # noqa: E731
        full = render(messages)
        counts: Counter = Counter()
        served: list[Turn] = []
        for k in turns:
            try:
                served.append(self.turn(messages, k, full, render))
            except TurnError:
                if mode != FINAL_RENDER:
                    raise
                counts["turns_not_served"] += 1  # the final render cannot hold a turn that has no served form
        for turn in served:
            counts[f"rule_{turn.rule}"] += 1
            if turn.empty_reasoning or turn.dropped_reasoning:  # rare: most turns pay one test
                counts["turns_empty_reasoning"] += turn.empty_reasoning
                counts["turns_reasoning_dropped"] += turn.dropped_reasoning

        last = served[-1] if served else None
        if (
            last is not None
            and last.index == len(messages) - 1
            and last.tail == ""
            and (last.context + last.text).startswith(full)
            and len(last.context + last.text) > len(full)
        ):
            full = last.context + last.text  # the whole render, closed by the stop token a next message writes (GLM)
        if mode == FINAL_RENDER:
            inside = [t for t in served if t.served_by(full)]
            counts["turns_trained"] += len(inside)
            counts["turns_not_served"] += len(served) - len(inside)
            if not inside:
                return ConversationExamples([], counts)
            return ConversationExamples(
                [(full, [t.span() for t in inside])],
                counts,
                [[t.index for t in inside]],
                [] if train_reasoning else [_reasoning_spans(inside, counts)],
            )
        counts["turns_trained"] += len(served)
        examples, placed_turns, placed_reasoning = [], [], []
        remaining = served
        while remaining:
            # The latest turn not yet placed decides the next example: the whole render when it serves
            # that turn, else the turn's own render. Every remaining turn that example serves goes in it.
            latest = remaining[-1]
            text = full if latest.served_by(full) else latest.context + latest.text + latest.tail
            inside = [t for t in remaining if t.served_by(text)]
            examples.append((text, [t.span() for t in inside]))
            placed_turns.append([t.index for t in inside])
            if not train_reasoning:
                placed_reasoning.append(_reasoning_spans(inside, counts))
            remaining = [t for t in remaining if t.index not in placed_turns[-1]]
        return ConversationExamples(examples, counts, placed_turns, placed_reasoning)

    def turn(self, messages: list[dict], k: int, full: str, render) -> Turn:
        """Turn k's context and trained text (see the module docstring), checked."""
        message = messages[k]
        assistant = message["role"] == "assistant"
        if assistant and isinstance(message.get("content"), dict):
            outputs = [text for what, text in _mapping_pieces(message["content"]) if what == "tool output"]
            if outputs:
                # Served, the tools write their outputs: a trained reply holding them would teach the model to write
                # them itself, after the stop token its call ends with.
                raise TurnError(
                    k,
                    "the reply holds a tool_outputs block: training it would teach the model to write the tools' "
                    "results",
                    found=f"tool output {outputs[0][:40]!r}",
                    fix="end the reply with its tool_calls block and give each result as a tool message after it, "
                    'or mark the message "train": false to keep it as context',
                )
        # A non-assistant turn (train_on_roles, "train": true) has no generation prompt: it is trained
        # from its content to its end marker, after the conversation before it and its header.
        prompt = render(messages[:k], assistant) if k or assistant else ""
        upto = full if k == len(messages) - 1 else render(messages[: k + 1])
        rule, empty = "prefix", False
        if (
            assistant
            and not upto.startswith(prompt)
            and self.reasoning_when_missing == "empty"
            and _lacks_reasoning(message)
        ):
            closed = self._closed_at_once(messages, k, prompt, upto, render)
            if closed is not None:
                (messages, upto), empty = closed, True
                message = messages[k]
        if upto.startswith(prompt):
            raw = upto[len(prompt) :]
            if not assistant:
                start = raw.find(content_text(message).strip()) if content_text(message).strip() else -1
                if start < 0:
                    raise TurnError(
                        k,
                        f"the template does not render this {message['role']} message's content verbatim",
                        fix="train assistant turns only, or use a template that renders the message as written",
                    )
                prompt, raw = prompt + raw[:start], raw[start:]
        elif not assistant:
            raise TurnError(
                k,
                "the template rewrites the conversation before this message",
                found=_divergence(prompt, upto),
                fix="train assistant turns only (train_on_roles: [assistant])",
            )
        else:
            raw, rule = self._rejoin(messages, k, prompt, upto, render)
        end = self._turn_end(raw, message)
        text, tail = raw[:end], raw[end:]
        if assistant and rule != "opened_reply" and not text.endswith(self.stop_tokens):
            # No stop token ends the turn (GLM, Apertus): raw is the end of F_k here, so the turn ends in F_k there.
            closing = self.closing_marker(messages, k, render, upto[: len(upto) - len(raw) + end], text)
            if closing:
                text, tail = text + closing, ""
        turn = Turn(k, prompt, text, tail, rule, empty_reasoning=empty)
        self._check(message, turn)
        return turn

    def _closed_at_once(
        self, messages: list[dict], k: int, prompt: str, upto: str, render
    ) -> tuple[list[dict], str] | None:
        """reasoning_when_missing: empty, for reply k that has no reasoning. When the generation prompt ends in an
        opening that the turn's render does not continue (R1's "<think>\\n"): the messages with turn k's reasoning
        "", and F_k as the model writes it when it closes the opened thinking at once (it starts with P_k). None
        when the generation prompt opens nothing: the other rules apply."""
        history = render(messages[:k])
        if not prompt.startswith(history) or self._shared_prefix(prompt, upto) < len(history):
            return None
        message = messages[k]
        changed = messages[:k] + [{**message, "reasoning_content": "", "thinking": ""}] + messages[k + 1 :]
        rendered = render(changed[: k + 1])
        if rendered.startswith(prompt):  # the template continues its opening for an empty reasoning (Qwen3.6)
            return changed, rendered
        start, reply = self._shared_prefix(prompt, rendered), content_text(message)
        at = rendered.find(reply, start) if reply else -1
        if start >= len(history) and at >= 0 and rendered[start:at].strip():
            # Where the prompt has its opening, the render writes a closing before the reply (DeepSeek-V3.1's
            # "</think>" + answer): the model writes that closing right after the opening.
            return changed, prompt + rendered[start:]
        # A template that writes its think block only for a reasoning that is not empty (MiniMax-M2): the text it
        # writes after a reasoning, when the reasoning comes right after the opening.
        probe = render(messages[:k] + [{**message, "reasoning_content": _PROBE, "thinking": _PROBE}])
        if probe.startswith(prompt + _PROBE):
            return changed, prompt + probe[len(prompt) + len(_PROBE) :]
        opening = prompt[self._shared_prefix(prompt, upto) :]
        raise TurnError(
            k,
            f"the generation prompt ends with {opening!r}, and the template writes no text that "
            "closes it for an empty reasoning (reasoning_when_missing: empty)",
            found=f"the turn renders as {rendered[start:][:60]!r}",
            fix=f"write the reply in content as the model writes it after {opening!r}: an empty reasoning, "
            f"its closing tag, then the answer; or {_TEMPLATE_FIX}",
        )

    def _rejoin(self, messages: list[dict], k: int, prompt: str, upto: str, render) -> tuple[str, str]:
        """Turn k's raw text (trained text and what follows) when F_k does not start with P_k."""
        history = render(messages[:k])
        if not prompt.startswith(history):
            raise TurnError(
                k,
                "the template's generation prompt rewrites the conversation instead of extending it",
                found=_divergence(history, prompt),
                fix=_TEMPLATE_FIX,
            )
        opening = prompt[len(history) :]
        shared = self._shared_prefix(prompt, upto)
        if shared >= len(history):
            return self._opened_reply(messages[k], k, prompt, upto), "opened_reply"
        # The conversation before turn k renders differently once turn k follows (an earlier turn loses
        # its analysis, the system prompt leaves the last user message, a tool result is closed another
        # way). Turn k starts where F_k's longest stretch shared with the end of P_k ends. Candidates:
        # where F_k renders the message turn k answers and the generation prompt as P_k ends; else where
        # F_k has the generation prompt. A tie between candidates is refused.
        answered = content_text(messages[k - 1]).strip() if k else ""
        found = prompt.rfind(answered) if answered else -1
        best, tie = -1, False
        for key in ([prompt[found:]] if found >= 0 else []) + [opening]:
            best, tie = self._rejoin_at(prompt, upto, key, shared)
            if best >= 0:
                break
        if best < 0 or tie:
            raise TurnError(
                k,
                "the template renders this turn's conversation differently from the prompt inference feeds, "
                "and the turn cannot be told apart from the rewritten history",
                found=_divergence(prompt, upto),
                fix=_TEMPLATE_FIX,
            )
        return upto[best:], "rewritten_history"

    @staticmethod
    def _rejoin_at(prompt: str, upto: str, key: str, shared: int) -> tuple[int, bool]:
        """The end of the occurrence of `key` in `upto` (after `shared`) whose text before shares the longest
        stretch with the end of `prompt`, and whether another occurrence shares as much."""
        best, best_length, tie = -1, -1, False
        start = upto.find(key, shared) if key else -1
        while start >= 0:
            x = start + len(key)
            length = _common_suffix(prompt, upto[:x])
            if length > best_length:
                best, best_length, tie = x, length, False
            elif length == best_length:
                tie = True
            start = upto.find(key, start + 1)
        return best, tie

    def _opened_reply(self, message: dict, k: int, prompt: str, upto: str) -> str:
        """The generation prompt ends in text (an opening) that the turn's render does not continue."""
        opening_start = self._shared_prefix(prompt, upto)
        opening, rendered = prompt[opening_start:], upto[opening_start:]
        reply = content_text(message)
        if not opening or not reply.startswith(opening):
            raise TurnError(
                k,
                f"the generation prompt ends with {opening!r}, and the template renders this turn without continuing it",
                found=f"the turn renders as {rendered[:60]!r}",
                fix=f"write the reply in content as the model writes it after {opening!r} (for reasoning: the reasoning, "
                f"its closing tag, then the answer), or {_TEMPLATE_FIX}"
                + (
                    "; or set reasoning_when_missing: empty to train closing the opened thinking at once"
                    if _lacks_reasoning(message)
                    else ""
                ),
            )
        # The rendered turn is text of the template's own ("</think>" in DeepSeek-V3.1), the end of the reply as
        # written, then the end marker. The marker starts at the special token after the LONGEST stretch of the
        # render that ends the reply as written, and that stretch must hold the reply's answer: the empty stretch
        # before a "</think>" the template writes also "ends" every reply, and would train the answer twice.
        answer = _answer(message)
        for token_start in reversed(self._special_starts(rendered)):
            written = rendered[:token_start]
            if reply.endswith(written) and answer in written:
                taken = rendered[token_start:]  # what the template adds to the reply as written: its end marker
                for token in self.special_tokens:
                    taken = taken.replace(token, "")
                if answer and answer in taken:
                    raise TurnError(
                        k,
                        "the template writes this turn's answer again after the reply, so training the "
                        "reply as written would train the answer twice",
                        found=repr(rendered[-60:]),
                        fix=_TEMPLATE_FIX,
                    )
                return reply[len(opening) :] + rendered[token_start:]
        raise TurnError(
            k,
            "cannot find the end of the reply as written in the template's render of the turn, so "
            "its end-of-turn marker cannot be placed",
            found=f"the turn renders as {rendered[-60:]!r}",
            fix=f"write the reply as the template renders its end (same whitespace), or {_TEMPLATE_FIX}",
        )

    def closing_marker(self, messages: list[dict], k: int, render, rendered: str, text: str) -> str:
        """What closes turn k when its own render does not (GLM-4.5 ends a reply where the next <|user|> or
        <|observation|> begins; Apertus writes <|assistant_end|> only when a user message follows): F_k rendered
        with a next message (a probe of the next message's role; for the last turn a user message, or a tool
        result after tool calls), up to the first special token written after the reply. It closes the turn when
        it is a stop token (the tokenizer's eos_token or its generation config's eos_token_id) and only whitespace
        comes before it; a turn already closed by a special token takes the stop token only right after it
        (a GLM tool call's </tool_call><|observation|>). "" when nothing closes the turn so."""
        closed = text.endswith(self.end_markers)
        names = _call_names(messages[k])
        nxt = messages[k + 1]["role"] if k + 1 < len(messages) else "tool" if names else "user"
        probe = {"role": nxt, "content": _PROBE}
        if nxt == "tool":
            call = (messages[k].get("tool_calls") or [{}])[0]
            probe.update(name=(names or [""])[0], tool_call_id=call.get("id", ""))
        try:
            extended = render(messages[: k + 1] + [probe])
        except TemplateError:
            return ""
        limit = extended.find(_PROBE)
        if limit < 0:
            return ""
        if extended.startswith(rendered):
            ends = [len(rendered)]
        elif closed:
            return ""
        else:
            # The template rewrites turn k once a message follows it (GLM drops the reasoning of a turn before
            # the last user message): the turn ends at the last occurrence of its closing text (after its last
            # special token, else its answer) before the probe that only whitespace and a special token follow.
            after_special = max((text.rfind(t) + len(t) for t in self.special_tokens if t in text), default=0)
            ends = []
            for anchor in dict.fromkeys(a for a in (text[after_special:].strip(), _answer(messages[k])) if a):
                start = extended.find(anchor)
                while 0 <= start < limit:
                    ends.append(start + len(anchor))
                    start = extended.find(anchor, start + 1)
                if ends:
                    break
            ends.reverse()
        for x in ends:
            between = extended[x:limit]
            gap = len(between) - len(between.lstrip())
            marker = next((t for t in self.special_tokens if between.startswith(t, gap)), None)
            if marker is None:
                continue
            if marker in self.stop_tokens and not (closed and gap):
                return between[: gap + len(marker)]
            return ""
        return ""

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens that end generation: eos_token and the generation config's eos_token_id (longest first)."""
        if self._stop_tokens is None:  # read once: it may read the generation config from disk
            self._stop_tokens = tuple(sorted(stop_tokens_of(self._tokenizer), key=len, reverse=True))
        return self._stop_tokens

    def _special_starts(self, text: str) -> list[int]:
        starts = set()
        for token in self.special_tokens:
            position = text.find(token)
            while position >= 0:
                starts.add(position)
                position = text.find(token, position + 1)
        return sorted(starts)

    def _turn_end(self, raw: str, message: dict) -> int:
        """Where the generated text ends in `raw`: before the whitespace after the end marker and
        before text the template writes only where a conversation ends; never inside the reply."""
        reply = content_text(message).rstrip()
        found = raw.rfind(reply) if reply else -1
        floor = found + len(reply) if found >= 0 else 0
        end = max(floor, len(raw.rstrip()))
        closer = self.closer
        if closer and end - len(closer) >= floor and raw.startswith(closer, end - len(closer)):
            end = max(floor, len(raw[: end - len(closer)].rstrip()))
        return end

    @property
    def closer(self) -> str:
        """Text the template writes after the last message only when no generation prompt follows (Phi-3's
        eos_token): found once, from a one-message conversation rendered with and without the prompt."""
        if self._closer is None:
            probe = [{"role": "user", "content": "x"}]
            try:
                ended, going_on = self.render(probe), self.render(probe, add_generation_prompt=True)
            except Exception:  # a template that refuses such a probe closes nothing we can see
                ended = going_on = ""
            self._closer = ended[self._shared_prefix(ended, going_on) :].strip()
        return self._closer

    def _shared_prefix(self, a: str, b: str) -> int:
        """Length of the longest common prefix of `a` and `b`, cut between tokens: "</s>" and "<|user|>"
        share a "<" that belongs to neither."""
        end = len(os.path.commonprefix([a, b]))
        moved = end < min(len(a), len(b))
        while moved:
            moved = False
            for text in (a, b):
                for token in self.special_tokens:
                    start = text.find(token, max(0, end - len(token) + 1))
                    if 0 <= start < end:
                        end, moved = start, True
        return end

    def _check(self, message: dict, turn: Turn) -> None:
        """The self-check every trained turn passes: non-empty, holds its reply, ends with a marker."""
        text = turn.text
        if not text.strip():
            raise TurnError(
                turn.index,
                "the turn's trained text is empty",
                found=f"context ends {turn.context[-60:]!r}",
                fix=_TEMPLATE_FIX,
            )
        pieces = _reply_pieces(message)
        for what, piece in pieces:
            if piece not in text:
                if what == "reasoning" and self.reasoning_when_dropped == "as_rendered":
                    turn.dropped_reasoning = True
                    continue
                raise TurnError(
                    turn.index,
                    f"the turn's trained text does not hold its {what}",
                    found=f"{what} {piece[:40]!r}, trained text {text[:80]!r}",
                    fix=f"the template does not render the {what} of a turn as it is served: "
                    f"remove it from the data, or use a template that renders it"
                    + (
                        " (chat_template), or set reasoning_when_dropped: as_rendered to train the "
                        "turn as the template renders it"
                        if what == "reasoning"
                        else ""
                    ),
                )
        # The reasoning's text in the trained turn, found as above (train_on_reasoning: false makes it context).
        cursor, found = 0, []
        for piece in [piece for what, piece in pieces if what == "reasoning" and piece in text]:
            at = text.find(piece, cursor)
            at = text.find(piece) if at < 0 else at
            found.append((at, at + len(piece)))
            cursor = at + len(piece)
        for a, b in sorted(found):  # merged: a reasoning given twice (a part and its field) is one span
            if turn.reasoning and a <= turn.reasoning[-1][1]:
                turn.reasoning[-1] = (turn.reasoning[-1][0], max(b, turn.reasoning[-1][1]))
            else:
                turn.reasoning.append((a, b))
        if not text.endswith(self.end_markers):
            raise TurnError(
                turn.index,
                "the turn's trained text does not end with an end-of-turn token, so the model "
                "would never learn to stop",
                found=f"it ends {text[-40:]!r}",
                fix="use a chat template that ends each turn with a special token such as eos_token; "
                "for a base model whose tokenizer lacks the template's markers (chat_template: chatml "
                "on a base model), set add_chat_tokens: true to add them as tokens; "
                "for a template that ends a reply where the next message begins (GLM), a tokenizer "
                "folder whose generation_config.json lists the token that begins it in eos_token_id",
            )


_TEMPLATE_FIX = "set chat_template to a training template that renders each turn as the model writes it"
_PROBE = "sftlab-probe-message"
_PROBE_ARGUMENTS = {"sftlab_probe_key": "sftlab-probe-value"}


def stop_tokens_of(tokenizer) -> set[str]:
    """The tokens generation stops on: the tokenizer's eos_token, and the eos_token_id (one or a list) of the
    generation_config.json beside its files (a folder, or a hub model already downloaded), as generate() reads it."""
    tokens = {str(tokenizer.eos_token)} if getattr(tokenizer, "eos_token", None) else set()
    path, found = getattr(tokenizer, "name_or_path", "") or "", None
    if path and os.path.isfile(os.path.join(path, "generation_config.json")):
        found = os.path.join(path, "generation_config.json")
    elif path and not os.path.isdir(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "generation_config.json")
            found = cached if isinstance(cached, str) else None
        except (ImportError, ValueError, OSError):  # not a hub name: no generation config to read
            found = None
    if found:
        with open(found, encoding="utf-8") as handle:
            ids = json.load(handle).get("eos_token_id")
        for token_id in ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []:
            token = tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(token, str):
                tokens.add(token)
    return tokens


def _compile(template: str):
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    # Compiled here, not through transformers' lru_cache, so the template and its environment are this
    # renderer's alone. Jinja keeps a template's globals as a ChainMap over the environment's and merges
    # them into a new dict, in Python, on every render: a third of a ChatML render, and a conversation
    # takes ~2 renders per turn. Nothing changes the globals, so merge them once.
    compiled = _cached_compile_jinja_template(template)
    compiled.globals = dict(compiled.globals)
    return compiled


PART_SEPARATOR = "\n"  # between the text parts of a content list, for a template that reads strings (as vLLM)


def content_text(message: dict) -> str:
    """The visible text of a message: its content, its text parts joined, or a mapping's text (a reply's responses)."""
    content = message.get("content")
    if isinstance(content, dict):  # back to back, as the Apertus template writes parts and blocks
        return "".join(text for what, text in _mapping_pieces(content) if what == "content")
    if isinstance(content, list):
        return PART_SEPARATOR.join(p["text"] for p in content if p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _as_string_content(message: dict) -> dict:
    """`message` for a template that reads content as a string: text parts joined; the text of thinking parts
    (Mistral) becomes the message's reasoning, under the names formats.py gives it, unless it has its own."""
    if not isinstance(message.get("content"), list):
        return message
    converted = {**message, "content": content_text(message)}
    thinking = PART_SEPARATOR.join(p["thinking"] for p in message["content"] if p.get("type") == "thinking")
    if thinking and "reasoning_content" not in message:
        converted.update(thinking=thinking, reasoning_content=thinking)
    return converted


def _reasoning_spans(turns: list[Turn], counts: Counter) -> list[tuple[int, int]]:
    """The reasoning in the trained spans of `turns`, which stays context (train_on_reasoning: false); counted."""
    counts["turns_reasoning_context"] += sum(bool(t.reasoning) for t in turns)
    return [span for t in turns for span in t.reasoning_spans()]


def _lacks_reasoning(message: dict) -> bool:
    """The reply gives no reasoning, or an empty one (in a field, inline or in a thinking part)."""
    return not any(what == "reasoning" for what, _ in _reply_pieces(message))


def _answer(message: dict) -> str:
    """The visible answer of a reply: its content after inline reasoning (its last text part), stripped."""
    return ([piece for what, piece in _reply_pieces(message) if what == "content"] or [""])[-1]


def _reply_pieces(message: dict) -> list[tuple[str, str]]:
    """What a trained turn must hold: (what, text) for its visible reply, its reasoning and its tool calls."""
    pieces = []
    content = content_text(message)
    if isinstance(message.get("content"), dict):  # each text is checked; a tool's output is not the model's
        pieces = [(what, text.strip()) for what, text in _mapping_pieces(message["content"]) if text.strip()]
        pieces = [(what, text) for what, text in pieces if what != "tool output"]
        content = ""
    elif isinstance(message.get("content"), list):  # each part is checked: a template may join them its own way
        for part in message["content"]:
            what, text = ("content", part["text"]) if part.get("type") == "text" else ("reasoning", part["thinking"])
            if text.strip():
                pieces.append((what, text.strip()))
        content = ""
    elif message["role"] == "assistant" and "</think>" in content:  # reasoning written inline
        thinking, _, content = content.rpartition("</think>")
        thinking = thinking.split("<think>")[-1].strip()
        if thinking:
            pieces.append(("reasoning", thinking))
    if content.strip():
        pieces.append(("content", content.strip()))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip():
        pieces.append(("reasoning", reasoning.strip()))
    for call in message.get("tool_calls") or ():
        pieces.append(("tool call", call["function"]["name"]))
    return pieces


def _mapping_pieces(content: dict) -> list[tuple[str, str]]:
    """(what, text) of content given as a mapping (formats.py: one key, checked), in order. A reply's blocks mean
    what the Apertus template makes of them: "thoughts" is the reasoning (it writes them in the reply's inner
    section, after <|inner_prefix|>: the thinking that llama.cpp's Apertus parser returns as reasoning_content),
    "response" the answer (after <|inner_suffix|>), a "tool_calls" block one piece per call, its name; the
    outputs of a "tool_outputs" block are the tools' results, not the model's text."""
    ((shape, value),) = content.items()
    if shape == "text":
        return [("content", value)]
    if shape == "parts":
        return [("content", p["text"]) if p["type"] == "text" else ("reasoning", p["thinking"]) for p in value]
    pieces = []
    for block in value:
        if block["type"] in ("thoughts", "response"):
            pieces.append(("reasoning" if block["type"] == "thoughts" else "content", block["text"]))
        elif block["type"] == "tool_calls":
            pieces.extend(("tool call", call["name"]) for call in block["calls"])
        else:
            pieces.extend(("tool output", output["output"]) for output in block["outputs"])
    return pieces


def _call_names(message: dict) -> list[str]:
    """The names of the tools a reply calls: in OpenAI tool_calls, or in tool_calls blocks of its content."""
    names = [call["function"]["name"] for call in message.get("tool_calls") or ()]
    if isinstance(message.get("content"), dict):
        names += [text for what, text in _mapping_pieces(message["content"]) if what == "tool call"]
    return names


def _unread_mapping(position: int, content: dict) -> TurnError:
    (shape,) = content
    return TurnError(
        position,
        f"its content is a mapping ({{{shape!r}: ...}}), and the chat template does not read one",
        found=f"content {str(content)[:60]}",
        fix="give the content as a string (a reply's thoughts as reasoning_content, its tool calls as "
        "tool_calls), or set chat_template to a template that reads such mappings (the model's own, for Apertus)",
        field=f"messages[{position}].content",
    )


def _with_text_arguments(message: dict) -> dict:
    """`message` with its tool calls' arguments as JSON text, for a template that joins them as text."""
    calls = [
        {
            **call,
            "function": {
                **call["function"],
                "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False),
            },
        }
        if not isinstance(call["function"].get("arguments"), str)
        else call
        for call in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _common_suffix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a[::-1], b[::-1]]))


def _divergence(expected: str, got: str) -> str:
    at = len(os.path.commonprefix([expected, got]))
    return f"after {expected[max(0, at - 30) : at]!r} inference has {expected[at : at + 30]!r}, the render has {got[at : at + 30]!r}"
