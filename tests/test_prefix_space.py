"""SentencePiece-style tokenizers prepend "▁" (a space) to every call. Tokenizing a completion or
an assistant segment on its own would then insert a space that is not in the text; sftlab
encodes such segments behind a newline anchor and cuts the anchor's tokens off again."""

from __future__ import annotations

import pytest

from sftlab import TargetSettings, prepare_examples

PIECES = ["<unk>", "</s>", "▁", "\n", "a", "b", "c", "d", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def spm_like():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(PIECES)}, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(["</s>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def ids(*pieces):
    return [PIECES.index(p) for p in pieces]


def test_the_tokenizer_really_prepends_a_space(spm_like):
    assert spm_like("cd", add_special_tokens=False)["input_ids"] == ids("▁", "c", "d")


def test_completion_gets_no_inserted_space(spm_like):
    examples = prepare_examples([{"prompt": "ab", "completion": "cd"}], spm_like, TargetSettings(), use_cache=False)
    input_ids, targets = examples[0]
    # The prompt as inference feeds it (with its leading "▁"), then "cd" exactly, then EOS.
    assert input_ids.tolist() == ids("▁", "a", "b", "c", "d", "</s>")
    assert targets.tolist() == [-100, -100, PIECES.index("c"), PIECES.index("d"), PIECES.index("</s>"), -100]
