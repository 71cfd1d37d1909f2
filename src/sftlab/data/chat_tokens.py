"""A base model's tokenizer made ready for a chat template: the markers the template writes become
special tokens (config `add_chat_tokens`, `special_tokens`). The model's side, new embedding and
head rows, is training/setup.py:add_token_rows; this module only changes the tokenizer, so that
`sftlab prepare`, `sftlab inspect` and training all tokenize with the same vocabulary.

Which markers (the rule, in this order, without repeats):
  1. with add_chat_tokens, every literal of the form <|name|> in the template's text (ChatML's
     <|im_start|> and <|im_end|>, Llama 3's <|eot_id|>, Phi-3's <|end|>), in the order they first
     appear; for a template taken from another tokenizer folder, also that tokenizer's special
     tokens that the template's text holds (Gemma's <start_of_turn>, which is not a <|...|> literal);
  2. the config's `special_tokens`, as given.
A marker the tokenizer already has as one token keeps its id and is not added again: only the others
are added, as special tokens (never split, never merged with their neighbours), with ids after every
existing one, so every process and every later run gives each the same id.

With add_chat_tokens the template also sets the tokenizer's roles:
  EOS  the end-of-turn marker: the special token the template writes right after an assistant reply
       (data/special_tokens.py:turn_end_markers), what the model learns to stop on;
  pad  unchanged; a tokenizer without one gets the EOS it had before (pad positions are never targets
       and are masked from attention, so any token serves; an old one leaves the new EOS meaning only
       the end of a turn, for code that strips padding by its id).
The template is stored on the tokenizer, so final/ holds it and serving renders what training did.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from sftlab.data.chat import ChatRenderer, resolve_chat_templates
from sftlab.data.special_tokens import turn_end_markers

# <|im_start|>, <|eot_id|>, <|start_header_id|>: a name between "<|" and "|>", no spaces or markup
# inside, so a Jinja expression such as "'<|' + role + '|>'" is not taken for a token.
_MARKER = re.compile(r"<\|[^\s<>|'\"{}]+\|>")


@dataclass
class AddedChatTokens:
    """What add_chat_tokens did to a tokenizer: the tokens added and their ids, the roles it set."""

    tokens: list[str]  # added, in id order
    ids: list[int]
    vocab_size: int  # len(tokenizer) after adding: the rows the model needs
    kept: list[str] = field(default_factory=list)  # markers the tokenizer already had
    eos_token: str | None = None  # the EOS afterwards
    eos_ids: list[int] = field(default_factory=list)  # what generation stops on: the new EOS, then the old one
    pad_token: str | None = None  # set only where the tokenizer had none

    def lines(self) -> list[str]:
        """What the log and `sftlab inspect` show before training."""
        shown = ", ".join(f"{token} = {i}" for token, i in zip(self.tokens, self.ids)) or "none"
        lines = [f"chat tokens added: {shown} (vocabulary {self.vocab_size})"]
        if self.kept:
            lines.append(f"chat tokens kept (the tokenizer has them): {', '.join(self.kept)}")
        if self.eos_token is not None:
            lines.append(f"eos_token: {self.eos_token} (the template's end-of-turn marker)")
        if self.pad_token is not None:
            lines.append(f"pad_token: {self.pad_token} (the tokenizer had none)")
        return lines


def template_markers(template: str) -> list[str]:
    """The <|...|> literals a template's text holds, in the order they first appear."""
    return list(dict.fromkeys(_MARKER.findall(template)))


def folder_special_tokens(folder: str, template: str) -> list[str]:
    """Special tokens of the tokenizer in `folder` that `template` writes (read from tokenizer.json,
    without loading that tokenizer), in the order they first appear in the template."""
    try:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as handle:
            added = json.load(handle).get("added_tokens", [])
    except (OSError, ValueError):
        return []
    tokens = {t["content"] for t in added if t.get("special") and t.get("content") and t["content"] in template}
    return sorted(tokens, key=template.find)


def add_chat_tokens(tokenizer, *, chat_template: str | None, add_markers: bool,
                    special_tokens: list[str] | None) -> AddedChatTokens | None:
    """Add the chat template's markers (with `add_markers`) and `special_tokens` to `tokenizer`, in
    place, as the module docstring says; None when neither is asked for."""
    if not add_markers and not special_tokens:
        return None
    from tokenizers import AddedToken

    template = resolve_chat_templates(tokenizer, chat_template)[0] if add_markers else None
    wanted = []
    if template is not None:
        wanted += template_markers(template)
        if chat_template and os.path.isdir(chat_template):
            wanted += folder_special_tokens(chat_template, template)
    wanted = list(dict.fromkeys(wanted + list(special_tokens or ())))
    vocab = tokenizer.get_vocab()
    kept = [token for token in wanted if token in vocab]
    new = [token for token in wanted if token not in vocab]
    old_eos = tokenizer.eos_token
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in new], special_tokens=True)
    added = AddedChatTokens(tokens=new, ids=[tokenizer.convert_tokens_to_ids(token) for token in new],
                            vocab_size=len(tokenizer), kept=kept)
    if template is None:
        return added
    tokenizer.chat_template = template
    ends = turn_end_markers(ChatRenderer(tokenizer, template))
    if ends and ends[0] != old_eos:
        tokenizer.eos_token = added.eos_token = ends[0]
    if tokenizer.pad_token is None and old_eos is not None:
        tokenizer.pad_token = added.pad_token = old_eos
    stops = [tokenizer.eos_token] + ([old_eos] if old_eos not in (None, tokenizer.eos_token) else [])
    added.eos_ids = [tokenizer.convert_tokens_to_ids(token) for token in stops if token is not None]
    return added
