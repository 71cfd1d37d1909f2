"""Token ids with a role outside the text: what ends a reply.
"""

from __future__ import annotations

from jinja2 import TemplateError

from sftlab.data.chat import ChatRenderer


def reply_stop_ids(tokenizer, renderer: ChatRenderer | None) -> list[int]:
    """Token ids that end a reply: EOS (what a completion is trained to end with), and for chats the
    special token the template writes right after an assistant reply (found by rendering one)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if renderer is not None:
        marker = turn_end_marker(renderer)
        if marker is not None:
            token = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token, int) and token != tokenizer.unk_token_id:
                ids.add(token)
    return sorted(ids)


def turn_end_marker(renderer: ChatRenderer) -> str | None:
    """The first special token after the reply in a rendered user/assistant exchange, or None."""
    reply = "sftlab-probe-reply"
    try:
        text = renderer.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}])
    except TemplateError:
        return None
    after = text.find(reply)
    if after < 0:
        return None
    after += len(reply)
    # The earliest marker, the longest at one position: "<|im_end|>" rather than a "<|" it starts with.
    found = [(text.find(token, after), -len(token), token) for token in renderer.end_markers if text.find(token, after) >= 0]
    return min(found)[2] if found else None
