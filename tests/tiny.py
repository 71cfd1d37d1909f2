"""Tokenizers the tests build themselves (no download, ids computable by hand), and the records
the training tests share.

`char_tokenizer()` is a BPE over single characters with a few explicit merges and no
pre-tokenizer, so merges can cross spaces and prompt/completion boundaries:
  id of a character c (printable ASCII or "\\n") = CHARS.index(c) + FIRST_CHAR_ID
  merges (in priority order): "h"+"e" -> "he", "l"+"l" -> "ll", "he"+"ll" -> "hell",
                              "o"+"k" -> "ok", " "+"a" -> " a"
"""

from __future__ import annotations

import re
import string

SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",  # ChatML
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",  # Llama 3
    "[INST]",
    "[/INST]",  # Mistral
    "<start_of_turn>",
    "<end_of_turn>",  # Gemma
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",  # Phi-3
]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and "\n"
FIRST_CHAR_ID = len(SPECIALS)
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("o", "k"), (" ", "a")]
MERGED = ["he", "ll", "hell", "ok", " a"]
# Tokens of reasoning and tool-using templates, for char_tokenizer(chat_tokens=True). Their ids come
# after every id above, so the tokenizer everyone else uses (and the pinned losses) is unchanged.
CHAT_SPECIALS = [
    "<|start|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",  # harmony (with <|end|>)
    "<|User|>",
    "<|Assistant|>",
]  # DeepSeek-R1
CHAT_ADDED = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]  # Qwen: not special
# Turn tokens of templates that write no end-of-turn marker after the last reply (special; ids after all above).
TURN_SPECIALS = [
    "<|observation|>",  # GLM-4.5 (with <|user|>)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|inner_prefix|>",
    "<|inner_suffix|>",
    "<|tools_prefix|>",
    "<|tools_suffix|>",
]  # Apertus


def special_id(token: str) -> int:
    return SPECIALS.index(token)


def char_id(c: str) -> int:
    return FIRST_CHAR_ID + CHARS.index(c)


def merged_id(piece: str) -> int:
    return FIRST_CHAR_ID + len(CHARS) + MERGED.index(piece)


def chat_token_id(token: str) -> int:
    """Id of a CHAT_SPECIALS or CHAT_ADDED token in char_tokenizer(chat_tokens=True)."""
    return FIRST_CHAR_ID + len(CHARS) + len(MERGED) + (CHAT_SPECIALS + CHAT_ADDED + TURN_SPECIALS).index(token)


def char_tokenizer(
    chat_template: str | None = None, bos: bool = False, pad: bool = True, eos: str = "</s>", chat_tokens: bool = False
):
    """A fast tokenizer whose ids the tests can compute by hand (see module docstring); with
    `chat_tokens`, also the harmony / R1 / GLM / Apertus special tokens and Qwen's added (not special) tokens."""
    from tokenizers import AddedToken, Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    for piece in MERGED:
        vocab[piece] = len(vocab)
    if chat_tokens:
        for token in CHAT_SPECIALS + CHAT_ADDED + TURN_SPECIALS:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS + (CHAT_SPECIALS + TURN_SPECIALS if chat_tokens else []))
    if chat_tokens:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in CHAT_ADDED])
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


def fused_tokenizer(**kwargs):
    """char_tokenizer(**kwargs) with a decoder that joins tokens as they are (its bare BPE decoder would
    put a space between every two, "hell o"), so decoded replies read as the text they encode."""
    from tokenizers import decoders

    tokenizer = char_tokenizer(**kwargs)
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    return tokenizer


def qa_records(n: int = 16, exclaim=lambda i: 0) -> list[dict]:
    """The training tests' prompt/completion records: record i has the prompt "Q{i}: " and 1 to 12 letters
    of "xyz", the completion " hello ok" 1 to 3 times then exclaim(i) "!". Their lengths vary with i, so
    padding, packing and the normalisation by supervised tokens all have work to do."""
    return [
        {
            "prompt": f"Q{i}: " + "xyz"[: 1 + i % 3] * (1 + i % 4),
            "completion": " hello ok" * (1 + i % 3) + "!" * exclaim(i),
        }
        for i in range(n)
    ]


def ids(text: str) -> list[int]:
    """Hand encoding for texts without merges: one id per character."""
    return [char_id(c) for c in text]


def hand_ids(text: str, chat_tokens: bool = False) -> list[int]:
    """tiny.py's rules for text without merges: a special (or added) token is one id, any other
    character is one id. Text that would merge is refused: write its ids out instead."""
    tokens = SPECIALS + (CHAT_SPECIALS + CHAT_ADDED + TURN_SPECIALS if chat_tokens else [])
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")
    result = []
    for piece in pattern.split(text):
        if piece in SPECIALS:
            result.append(special_id(piece))
        elif piece in tokens:
            result.append(chat_token_id(piece))
        else:
            assert not any(a + b in piece for a, b in MERGES), f"{piece!r} would merge; write its ids out"
            result.extend(ids(piece))
    return result


def marked(text: str, chat_tokens: bool = False) -> tuple[str, list[int], list[int], list[tuple[int, int]]]:
    """(text, input_ids, targets, trained character spans) of an example written with its trained
    text between ⟦ and ⟧: targets are the ids shifted by one, -100 where not trained."""
    plain, input_ids, labels, spans = "", [], [], []
    for position, part in enumerate(re.split("[⟦⟧]", text)):
        trained = position % 2 == 1
        if trained:
            spans.append((len(plain), len(plain) + len(part)))
        plain += part
        part_ids = hand_ids(part, chat_tokens)
        input_ids += part_ids
        labels += part_ids if trained else [-100] * len(part_ids)
    return plain, input_ids, labels[1:] + [-100], spans
