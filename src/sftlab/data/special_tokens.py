"""Token ids with a role outside the text: what ends a reply, and what fills a pad. One rule for
`sftlab generate` (generate.py), evaluation by generation during training (data/prompts.py gives
training/evaluation.py its stops) and the training loop's padding:

    reply_stop_ids(tokenizer, renderer)  EOS (what text and completions are trained to end with), and for
                                         chats the special token the template writes right after an
                                         assistant reply and right after an assistant tool call
    pad_token_id(tokenizer)              the pad token, else EOS, else 0

The stops are read off the template, not off a list of known markers: the template is what the model
was trained on, so its markers are what the model learned to end a turn with (gpt-oss's <|return|>
and <|call|>, DeepSeek's end of sentence, Command-R's and Granite's end-of-turn tokens).

Harmony (gpt-oss) with a flat stop list: one reply is
`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`.
The template writes <|end|> after the analysis channel, and after a final answer only once that answer
is history; the turn a model writes ends with <|return|> (an answer) or <|call|> (a tool call), as the
template renders a conversation's last turn and as sftlab trains every turn (as served). So the rule
gives <|return|> and <|call|>, never <|end|>, and a reply runs through its analysis to its final answer.
"""

from __future__ import annotations

from jinja2 import TemplateError

from sftlab.data.chat import ChatRenderer

_PROBE = "sftlab-probe-reply"
# A user/assistant exchange ending in a reply, and one ending in a tool call, in the normal form that
# validated records are rendered in (formats.py: "type" set, arguments as an object, content "").
_PROBES = (
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "sftlab_probe", "arguments": {"probe": _PROBE}}}]}],
)


def reply_stop_ids(tokenizer, renderer: ChatRenderer | None) -> list[int]:
    """Token ids that end a reply, ascending: EOS, and with a chat template (`renderer`) the end-of-turn
    markers it writes after a reply and after a tool call."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for marker in turn_end_markers(renderer) if renderer is not None else ():
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return sorted(ids)


def turn_end_markers(renderer: ChatRenderer) -> list[str]:
    """The special token right after the assistant's text in each probe exchange (a reply, a tool
    call), without repeats; a template that refuses a probe, or does not render its text, adds none."""
    markers = []
    for messages in _PROBES:
        marker = _marker_after_probe(renderer, messages)
        if marker is not None and marker not in markers:
            markers.append(marker)
    return markers


def _marker_after_probe(renderer: ChatRenderer, messages: list[dict]) -> str | None:
    try:
        text = renderer.render(messages)
    except TemplateError:
        return None
    after = text.rfind(_PROBE)
    if after < 0:
        return None
    after += len(_PROBE)
    # The earliest marker, the longest at one position: "<|im_end|>" rather than a "<|" it starts with.
    found = [(text.find(token, after), -len(token), token) for token in renderer.end_markers]
    found = [candidate for candidate in found if candidate[0] >= 0]
    if found:
        return min(found)[2]
    # A template that writes no marker after the last reply (GLM, Apertus): the stop token the next
    # message begins with, found as training finds it (ChatRenderer.closing_marker).
    reply_at = text.rfind(_PROBE)
    closing = renderer.closing_marker(messages, len(messages) - 1, renderer.render, text, text[reply_at:])
    return closing.strip() or None


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions: the pad token, else EOS, else 0. Pads are never attended to
    (the attention mask hides them) and never targets, and a generated reply is cut at its first stop
    token, before the pads that fill a finished row: any id works where the tokenizer has no pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
