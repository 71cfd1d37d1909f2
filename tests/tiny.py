"""Tokenizers and models the tests build themselves: no download, ids computable by hand.

`char_tokenizer()` is a BPE over single characters with a few explicit merges and no
pre-tokenizer, so merges can cross spaces and prompt/completion boundaries:
  id of a character c (printable ASCII or "\\n") = CHARS.index(c) + FIRST_CHAR_ID
  merges (in priority order): "h"+"e" -> "he", "l"+"l" -> "ll", "he"+"ll" -> "hell",
                              "o"+"k" -> "ok", " "+"a" -> " a"
"""

from __future__ import annotations

import string

SPECIALS = [
    "<pad>", "<s>", "</s>", "<unk>",
    "<|im_start|>", "<|im_end|>",                                   # ChatML
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama 3
    "[INST]", "[/INST]",                                            # Mistral
    "<start_of_turn>", "<end_of_turn>",                             # Gemma
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",          # Phi-3
]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and "\n"
FIRST_CHAR_ID = len(SPECIALS)
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("o", "k"), (" ", "a")]
MERGED = ["he", "ll", "hell", "ok", " a"]


def special_id(token: str) -> int:
    return SPECIALS.index(token)


def char_id(c: str) -> int:
    return FIRST_CHAR_ID + CHARS.index(c)


def merged_id(piece: str) -> int:
    return FIRST_CHAR_ID + len(CHARS) + MERGED.index(piece)


def char_tokenizer(chat_template: str | None = None, bos: bool = False, pad: bool = True, eos: str = "</s>"):
    """A fast tokenizer whose ids the tests can compute by hand (see module docstring)."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    for piece in MERGED:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def ids(text: str) -> list[int]:
    """Hand encoding for texts without merges: one id per character."""
    return [char_id(c) for c in text]
