"""Render conversations with a chat template and find, in characters, what each assistant turn wrote.

Works with ANY template, with or without `{% generation %}` tags: an assistant turn's span
runs from the end of the generation prompt (the text inference would feed, rendered from the
turns before it with add_generation_prompt=True) to the end of the conversation rendered up
to and including that turn. So the span holds the reply and the end-of-turn marker that makes
the model stop, and nothing the model will be given at inference. Whitespace the template
writes after the end-of-turn marker (ChatML's "\\n") is left out: generation stops at the
marker and never produces it. So is text a template writes only where the conversation ends
(Phi-3 appends eos_token): a turn ends where its render and the render of the conversation
going on differ.

Templates run in transformers' sandboxed Jinja environment (no file or attribute access).
"""

from __future__ import annotations

import os

from sftlab.errors import DataError

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


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    """The template to use: the configured one (a built-in name, a file, or Jinja text), else the tokenizer's."""
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[chat_template]
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as handle:
                return handle.read()
        if "{%" in chat_template or "{{" in chat_template:
            return chat_template
        raise DataError(
            "chat_template is neither a built-in name, a file nor a Jinja template",
            field="chat_template",
            found=repr(chat_template[:60]),
            expected=f"one of {sorted(BUILTIN_TEMPLATES)}, a path to a .jinja file, or the template text",
        )
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered",
            field="chat_template",
            found=f"{type(tokenizer).__name__} without chat_template",
            fix="set chat_template: chatml (built in) or a path to a Jinja template file",
        )
    return template


class ChatRenderer:
    """Renders messages to text with one template and the tokenizer's special tokens."""

    def __init__(self, tokenizer, template: str):
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template

        # Compiled here, not through transformers' lru_cache, so the template and its environment are
        # this renderer's alone. Jinja keeps a template's globals as a ChainMap over the environment's
        # and merges them into a new dict, in Python, on every render: a third of a ChatML render, and
        # assistant_spans renders 2-3 times per turn. Nothing changes the globals, so merge them once.
        self.template = _cached_compile_jinja_template(template)
        self.template.globals = dict(self.template.globals)
        self.variables = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # Longest first, so a cut is moved out of the outermost token that it would split.
        self.special_tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.variables
        )

    def generation_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the spans inside `{% generation %}` tags (for templates that have them)."""
        from transformers.utils.chat_template_utils import _render_with_assistant_indices

        text, spans = _render_with_assistant_indices(self.template, messages, None, None, False, **self.variables)
        return text, [tuple(s) for s in spans]

    def assistant_spans(self, messages: list[dict], turns: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text, and for each message index in `turns` its (start, end) in characters."""
        full = self.render(messages)
        spans = []
        for turn in turns:
            prompt = self.render(messages[:turn], add_generation_prompt=True)
            last = turn == len(messages) - 1
            upto = full if last else self.render(messages[: turn + 1])  # same arguments, same text: one render saved
            # What follows the turn when the conversation goes on: the next messages, or, after the
            # last one, a generation prompt. Text of `upto` missing from it closed the conversation.
            going_on = self.render(messages, add_generation_prompt=True) if last else full
            end = self._stable_end(upto, going_on)
            content = (messages[turn].get("content") or "").rstrip()
            # Keep the reply itself whole even if it ends in whitespace; trim only what follows the marker.
            floor = len(prompt) + len(content) if upto.startswith(content, len(prompt)) else len(prompt)
            if not upto.startswith(prompt) or end < floor:
                spans.append(self._span_by_content(full, messages, turn, spans))
                continue
            while end > floor and upto[end - 1].isspace():
                end -= 1
            spans.append((len(prompt), end))
        return full, spans

    def _stable_end(self, upto: str, going_on: str) -> int:
        """Length of the longest prefix of `upto` that `going_on` shares, cut between tokens: "</s>"
        and "<|user|>" share a "<" that belongs to neither turn."""
        if going_on.startswith(upto):
            return len(upto)  # the usual case, settled in C: commonprefix compares in a Python loop
        end = len(os.path.commonprefix([upto, going_on]))
        moved = end < len(upto)
        while moved:
            moved = False
            for token in self.special_tokens:
                start = upto.find(token, max(0, end - len(token) + 1))
                if 0 <= start < end:
                    end, moved = start, True
        return end

    def _span_by_content(self, full: str, messages: list[dict], turn: int, earlier: list[tuple[int, int]]) -> tuple[int, int]:
        """Fallback for templates whose renders are not prefixes of one another (e.g. ones that rewrite
        earlier turns): locate the reply's text in the full render and extend it over the end-of-turn
        marker the template writes after a reply."""
        content = (messages[turn].get("content") or "").strip()
        cursor = earlier[-1][1] if earlier else 0
        # Search after the message the reply answers, so a reply that repeats the user's words
        # ("Say yes" -> "yes") is not found inside the user's turn.
        before = (messages[turn - 1].get("content") or "").strip() if turn > 0 else ""
        found = full.find(before, cursor) if before else -1
        if found >= 0:
            cursor = found + len(before)
        start = full.find(content, cursor) if content else -1
        if start < 0:
            raise DataError(
                "cannot locate an assistant reply in the rendered conversation",
                field=f"messages[{turn}].content",
                found="a chat template that rewrites assistant text",
                fix="use a template that renders replies verbatim, or set assistant_only_loss=false",
            )
        end = start + len(content)
        return start, end + len(self._end_marker(full, end))

    def _end_marker(self, full: str, end: int) -> str:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        rendered = self.render(probe)
        rendered = rendered[: self._stable_end(rendered, self.render(probe, add_generation_prompt=True))]
        tail = rendered[rendered.rfind("y") + 1 :].rstrip()
        return tail if full.startswith(tail, end) else ""
