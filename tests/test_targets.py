"""Exact input_ids and targets for every non-chat format, truncation, and the targets invariant.

Expected ids are written by hand from the rules of tests/tiny.py: one id per character
(tiny.ids), special tokens by name, and the merges he / ll / hell / ok / " a" by merged_id.
targets[t] is the token at t+1 when that token is supervised, else -100.
"""

from __future__ import annotations

import pytest

from sftlab import DataError, TargetSettings, load_records, prepare_examples
from sftlab.data.container import IGNORE
from sftlab.data.container import Examples
from sftlab.data.examples import ExampleBuilder
from sftlab.data.formats import RecordValidator
from tiny import char_id, char_tokenizer, ids, merged_id, special_id

X = IGNORE
BOS = special_id("<s>")
EOS = special_id("</s>")


def prepare(records, tokenizer=None, **settings):
    tokenizer = tokenizer or char_tokenizer()
    return prepare_examples(records, tokenizer, TargetSettings(**settings), use_cache=False)


def as_lists(examples):
    return [(list(map(int, i)), list(map(int, t))) for i, t in (examples[k] for k in range(len(examples)))]


def only(examples):
    assert len(examples) == 1
    return as_lists(examples)[0]


def test_hand_ids_agree_with_the_tokenizer():
    # The hand rules of tiny.py, checked once against the real tokenizer.
    tokenizer = char_tokenizer()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert (BOS, EOS) == (1, 2)
    assert encode("Q: 1+1=") == ids("Q: 1+1=") == [char_id(c) for c in "Q: 1+1="]
    assert encode("hello ok a") == [merged_id("hell"), char_id("o"), char_id(" "), merged_id("ok"), merged_id(" a")]
    assert encode("x</s>") == [char_id("x"), EOS]


# ---------------------------------------------------------------- text


def test_text_trains_on_every_token_and_appends_eos():
    assert only(prepare([{"text": "abc"}])) == (
        ids("abc") + [EOS],
        ids("bc") + [EOS, X],
    )


def test_text_with_merges():
    hell, o = merged_id("hell"), char_id("o")
    assert only(prepare([{"text": "hello"}])) == ([hell, o, EOS], [o, EOS, X])


def test_text_already_ending_in_eos_gets_no_second_eos():
    assert only(prepare([{"text": "abc</s>"}])) == (ids("abc") + [EOS], ids("bc") + [EOS, X])


def test_text_gets_bos_when_the_tokenizer_adds_one():
    # BOS is context only: nothing predicts it; the model predicts the first character from it.
    assert only(prepare([{"text": "abc"}], char_tokenizer(bos=True))) == (
        [BOS] + ids("abc") + [EOS],
        ids("abc") + [EOS, X],
    )


def test_text_starting_with_bos_gets_no_second_bos():
    assert only(prepare([{"text": "<s>abc"}], char_tokenizer(bos=True))) == (
        [BOS] + ids("abc") + [EOS],
        ids("abc") + [EOS, X],
    )


def test_no_bos_when_the_tokenizer_adds_none():
    input_ids, _ = only(prepare([{"text": "abc"}], char_tokenizer(bos=False)))
    assert BOS not in input_ids


def test_text_field_is_configurable():
    examples = prepare_examples([{"body": "abc"}], char_tokenizer(), TargetSettings(), text_field="body", use_cache=False)
    assert only(examples) == (ids("abc") + [EOS], ids("bc") + [EOS, X])


def test_tokenizer_without_eos_is_an_error_for_text():
    with pytest.raises(DataError, match="the tokenizer has no EOS token"):
        prepare([{"text": "abc"}], char_tokenizer(eos=None))


# ---------------------------------------------------------------- prompt/completion


def test_prompt_completion_trains_on_the_completion_and_eos_only():
    prompt, completion = ids("Q: 1+1="), ids("2")
    assert only(prepare([{"prompt": "Q: 1+1=", "completion": "2"}])) == (
        prompt + completion + [EOS],
        # positions 0..5 predict prompt tokens (-100); position 6 ('=') predicts '2'; '2' predicts EOS.
        [X] * 6 + completion + [EOS, X],
    )


def test_prompt_completion_without_completion_only_loss_trains_on_everything():
    assert only(prepare([{"prompt": "Q: 1+1=", "completion": "2"}], completion_only_loss=False)) == (
        ids("Q: 1+1=2") + [EOS],
        ids(": 1+1=2") + [EOS, X],
    )


def test_prompt_completion_with_bos():
    assert only(prepare([{"prompt": "Q=", "completion": "2"}], char_tokenizer(bos=True))) == (
        [BOS] + ids("Q=2") + [EOS],
        [X, X] + ids("2") + [EOS, X],
    )


def test_completion_already_ending_in_eos():
    assert only(prepare([{"prompt": "Q=", "completion": "2</s>"}])) == (ids("Q=2") + [EOS], [X] + ids("2") + [EOS, X])


def test_bpe_merge_across_the_boundary_keeps_the_prompt_tokens_of_the_prompt_alone():
    tokenizer = char_tokenizer()
    he, ll, hell, o = merged_id("he"), merged_id("ll"), merged_id("hell"), char_id("o")
    # Joined, the text would merge across the boundary: "hello" -> hell + o.
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == [hell, o]
    # What inference feeds for the prompt "he" is the prompt tokenized alone.
    assert tokenizer("he", add_special_tokens=False)["input_ids"] == [he]
    assert only(prepare([{"prompt": "he", "completion": "llo"}], tokenizer)) == (
        [he, ll, o, EOS],
        [ll, o, EOS, X],
    )


def test_prompt_ending_in_a_space():
    # " a" is a merge; the prompt's trailing space stays its own token, as inference would feed it.
    space, a = char_id(" "), char_id("a")
    assert only(prepare([{"prompt": "Q: ", "completion": "abc"}])) == (
        [char_id("Q"), char_id(":"), space, a, char_id("b"), char_id("c"), EOS],
        [X, X, a, char_id("b"), char_id("c"), EOS, X],
    )
    assert char_tokenizer()("Q: abc", add_special_tokens=False)["input_ids"][2] == merged_id(" a")


# ---------------------------------------------------------------- pre-tokenized


def test_pretokenized_labels_are_honoured_and_shifted():
    record = {"input_ids": [20, 21, 22, 23], "labels": [X, X, 22, 23]}
    assert only(prepare([record])) == ([20, 21, 22, 23], [X, 22, 23, X])


def test_pretokenized_completion_mask():
    record = {"input_ids": [20, 21, 22, 23], "completion_mask": [0, 0, 1, 1]}
    assert only(prepare([record])) == ([20, 21, 22, 23], [X, 22, 23, X])


def test_pretokenized_without_labels_trains_on_everything():
    assert only(prepare([{"input_ids": [20, 21, 22, 23]}])) == ([20, 21, 22, 23], [21, 22, 23, X])


def test_pretokenized_ids_are_used_as_given():
    # No BOS, no EOS: the user's tokens are the example.
    assert only(prepare([{"input_ids": [20, 21, 22]}], char_tokenizer(bos=True))) == ([20, 21, 22], [21, 22, X])


def test_pretokenized_labels_win_over_completion_mask():
    record = {"input_ids": [20, 21, 22], "labels": [X, 21, 22], "completion_mask": [0, 0, 1]}
    assert only(prepare([record])) == ([20, 21, 22], [21, 22, X])


# ---------------------------------------------------------------- truncation and dropping


def test_truncation_right_cuts_and_counts():
    examples = prepare([{"text": "abcdefgh"}, {"text": "ab"}, {"text": "abc"}], max_length=4)
    assert as_lists(examples) == [
        (ids("abcd"), ids("bcd") + [X]),  # the cut-off 'e' is not a target
        (ids("ab") + [EOS], ids("b") + [EOS, X]),
        (ids("abc") + [EOS], ids("bc") + [EOS, X]),  # exactly max_length: untouched
    ]
    assert examples.stats["truncated"] == 1
    assert examples.stats["dropped"] == {}


def test_truncation_drop_drops_and_counts():
    examples = prepare([{"text": "abcdefgh"}, {"text": "ab"}, {"text": "abcde"}], max_length=4, truncation="drop")
    assert as_lists(examples) == [(ids("ab") + [EOS], ids("b") + [EOS, X])]
    assert examples.record_index.tolist() == [1]
    assert examples.stats["dropped"] == {"longer than max_length=4": 2}
    assert examples.stats["truncated"] == 0


def test_no_max_length_keeps_everything():
    text = "abcdefgh" * 10
    assert only(prepare([{"text": text}], max_length=None))[0] == ids(text) + [EOS]


def test_truncation_that_cuts_the_whole_completion_drops_the_example():
    examples = prepare([{"prompt": "abcdef", "completion": "g"}, {"prompt": "a", "completion": "b"}], max_length=4)
    # the first record, cut to a b c d, has no completion token left; the second is whole: a b EOS
    assert as_lists(examples) == [(ids("ab") + [EOS], ids("b") + [EOS, X])]
    assert examples.record_index.tolist() == [1]
    assert examples.stats["dropped"] == {"no supervised tokens left after truncation": 1}
    assert examples.stats["truncated"] == 0  # counted once, under its drop reason


def test_truncation_keeping_the_completion_start():
    # prompt "ab" + completion "cdef" + EOS = 7 tokens; max_length 4 keeps a b c d.
    examples = prepare([{"prompt": "ab", "completion": "cdef"}], max_length=4)
    assert only(examples) == (ids("abcd"), [X, char_id("c"), char_id("d"), X])
    assert examples.stats["truncated"] == 1


def test_examples_without_supervised_tokens_are_dropped_with_reason():
    examples = prepare(
        [
            {"input_ids": [20, 21, 22], "labels": [X, X, X]},  # nothing to learn
            {"input_ids": [20, 21, 22], "labels": [20, X, X]},  # only the first token: nothing predicts it
            {"input_ids": [20]},  # one token has no next token
            {"input_ids": [20, 21], "completion_mask": [0, 1]},
        ]
    )
    assert as_lists(examples) == [([20, 21], [21, X])]
    assert examples.record_index.tolist() == [3]
    assert examples.stats["dropped"] == {"no supervised tokens": 3}


def test_unknown_truncation_policy():
    with pytest.raises(DataError, match="unknown truncation policy") as error:
        prepare([{"text": "abc"}], truncation="left")
    assert "one of ('right', 'drop')" in str(error.value)


# ---------------------------------------------------------------- invariant, chunking, statistics


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DATASETS = {
    "text": [{"text": "hello world"}, {"text": "ok</s>"}, {"text": "a b c d e f g h i j"}],
    "prompt_completion": [{"prompt": "he", "completion": "llo"}, {"prompt": "Q: ", "completion": "abc"}],
    "chat": [
        {"messages": [{"role": "user", "content": "he"}, {"role": "assistant", "content": "llo"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
    ],
    "pretokenized": [{"input_ids": [20, 21, 22, 23], "labels": [X, 21, X, 23]}, {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}],
}


# Cuts every dataset's longest example but leaves each example something to learn.
SHORT = {"text": 7, "prompt_completion": 5, "chat": 34, "pretokenized": 3}


@pytest.mark.parametrize("kind", list(DATASETS))
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("bos", [False, True])
def test_targets_are_the_next_token_or_ignored(kind, cut, bos):
    max_length = SHORT[kind] if cut else None
    examples = prepare(DATASETS[kind], char_tokenizer(chat_template=CHATML, bos=bos), max_length=max_length)
    assert len(examples) == len(DATASETS[kind])
    assert (examples.stats["truncated"] > 0) == cut
    for input_ids, targets in as_lists(examples):
        assert len(input_ids) == len(targets) > 0
        if max_length is not None:
            assert len(input_ids) <= max_length
        assert targets[-1] == X  # so packed examples never pass loss to one another
        for t in range(len(targets) - 1):
            assert targets[t] in (X, input_ids[t + 1])
        assert any(t != X for t in targets)


def test_chunking_does_not_change_the_examples():
    records = RecordValidator().validate(load_records([{"prompt": "Q" * (i + 1), "completion": "ab" * (i + 1)} for i in range(5)]))
    settings = TargetSettings()
    one_chunk = Examples.concatenate(list(ExampleBuilder(char_tokenizer(), settings).build([records])))
    chunks_of_two = Examples.concatenate(list(ExampleBuilder(char_tokenizer(), settings).build(
        [records[i : i + 2] for i in range(0, len(records), 2)])))
    assert as_lists(chunks_of_two) == as_lists(one_chunk)
    assert one_chunk.record_index.tolist() == chunks_of_two.record_index.tolist() == [0, 1, 2, 3, 4]
    # example 3: prompt QQQQ, completion abababab
    assert as_lists(one_chunk)[3] == (ids("QQQQabababab") + [EOS], [X, X, X] + ids("abababab") + [EOS, X])


def test_statistics():
    # a b c EOS  -> targets X c EOS X     (2 supervised of 4)
    # d e f g EOS -> targets e f g EOS X  (4 supervised of 5)
    examples = prepare([{"prompt": "ab", "completion": "c"}, {"prompt": "d", "completion": "efg"}])
    assert examples.lengths.tolist() == [4, 5]
    assert [int((examples[i][1] != X).sum()) for i in range(len(examples))] == [2, 4]
    stats = examples.stats
    assert stats["records"] == 2
    assert stats["examples"] == 2
    assert stats["formats"] == {"prompt_completion": 2}
    assert stats["tokens"] == 9
    assert stats["supervised_tokens"] == 6
    assert stats["supervised_fraction"] == pytest.approx(6 / 9)
    assert stats["length"]["p0"] == 4 and stats["length"]["p100"] == 5
    assert stats["truncated"] == 0 and stats["dropped"] == {} and stats["skipped_invalid"] == {}
