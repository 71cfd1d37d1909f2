"""The token views of `sftlab inspect`: which tokens are targets, and how they are shown.

Token t is a target iff targets[t - 1] != -100. Expected ids come from tiny.char_tokenizer,
whose ids are computable by hand (one per character, plus the merges he, ll, hell, ok, " a").
"""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from rich.console import Console

from sftlab import TargetSettings, prepare_examples
from sftlab.data.chat import CHATML
from sftlab.inspect import examples_json, print_examples, print_stats, render_html, token_texts, visible, write_html
from tiny import char_id, char_tokenizer, merged_id, special_id

EOS = special_id("</s>")
IM_START, IM_END = special_id("<|im_start|>"), special_id("<|im_end|>")


def tok(token_id: int, text: str, target: bool) -> dict:
    return {"id": token_id, "text": text, "target": target}


def prepare(records, tokenizer=None, **settings):
    return prepare_examples(records, tokenizer or char_tokenizer(CHATML), TargetSettings(**settings), use_cache=False)


# --- which tokens are targets -------------------------------------------------------------------


def test_prompt_completion_targets_are_the_completion_and_eos():
    tokenizer = char_tokenizer()
    examples = prepare([{"prompt": "hi", "completion": "ok"}, {"prompt": "a", "completion": "hello"}], tokenizer)
    assert examples_json(examples, tokenizer, 2) == [
        {
            "record_index": 0,
            "tokens": [
                tok(char_id("h"), "h", False),
                tok(char_id("i"), "i", False),
                tok(merged_id("ok"), "ok", True),
                tok(EOS, "</s>", True),
            ],
        },
        {
            "record_index": 1,
            "tokens": [
                tok(char_id("a"), "a", False),
                tok(merged_id("hell"), "hell", True),
                tok(char_id("o"), "o", True),
                tok(EOS, "</s>", True),
            ],
        },
    ]


def test_first_token_is_never_a_target():
    # Text data is supervised everywhere, yet nothing predicts the first token.
    tokenizer = char_tokenizer()
    examples = prepare([{"text": "ok go"}], tokenizer)
    (row,) = examples_json(examples, tokenizer, 1)
    assert [(t["id"], t["target"]) for t in row["tokens"]] == [
        (merged_id("ok"), False),
        (char_id(" "), True),
        (char_id("g"), True),
        (char_id("o"), True),
        (EOS, True),
    ]


def test_chat_targets_are_each_assistant_reply_and_its_end_marker():
    tokenizer = char_tokenizer(CHATML)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "a b"},
    ]
    examples = prepare([{"messages": messages}], tokenizer)
    (row,) = examples_json(examples, tokenizer, 1)
    texts = [t["text"] for t in row["tokens"]]
    assert "".join(texts) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [t["text"] for t in row["tokens"] if t["target"]] == ["ok", "<|im_end|>", "a", " ", "b", "<|im_end|>"]
    # The target flags are the targets array shifted by one.
    input_ids, targets = examples[0]
    flags = [t["target"] for t in row["tokens"]]
    assert flags[0] is False
    assert flags[1:] == [int(t) != -100 for t in targets[:-1]]
    assert [t["id"] for t in row["tokens"]] == input_ids.tolist()
    # "<|im_start|>assistant\n" is context: the reply starts right after it.
    reply = texts.index("ok")
    assert texts[reply - 1] == "\n" and row["tokens"][reply - 1]["target"] is False
    assert row["tokens"][reply + 1] == tok(IM_END, "<|im_end|>", True)
    assert row["tokens"][reply + 2] == tok(char_id("\n"), "\n", False)


def test_record_index_names_the_source_record_and_n_is_capped():
    tokenizer = char_tokenizer()
    records = [{"prompt": "x"}, {"prompt": "hi", "completion": "ok"}]  # the first is invalid
    examples = prepare_examples(records, tokenizer, skip_invalid_records=True, use_cache=False)
    rows = examples_json(examples, tokenizer, 10)
    assert [r["record_index"] for r in rows] == [1]
    assert examples_json(examples, tokenizer, 0) == []


def test_json_round_trips():
    tokenizer = char_tokenizer()
    examples = prepare([{"prompt": "hi", "completion": "ok"}], tokenizer)
    rows = examples_json(examples, tokenizer, 1)
    assert json.loads(json.dumps(rows)) == rows


def test_sentencepiece_tokens_keep_their_leading_space():
    # A Metaspace decoder strips the space of the first token, and a token decoded alone is first.
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer.decode([2]) == "world"
    assert token_texts(tokenizer, [1, 2, 3, 0]) == [" hello", " world", "!", "<unk>"]


# --- terminal view -----------------------------------------------------------------------------


def test_visible_whitespace():
    assert visible("\n") == "↵\n"
    assert visible("a\tb\r\n") == "a⇥b␍↵\n"
    assert visible("  ") == "··"
    assert visible(" world") == " world"  # spaces inside text stay spaces
    assert visible("") == "∅"


def recording_console() -> Console:
    return Console(file=io.StringIO(), record=True, width=80, force_terminal=True, color_system="truecolor")


def test_print_examples_text_and_highlight():
    tokenizer = char_tokenizer(CHATML)
    examples = prepare(
        [
            {"messages": [{"role": "user", "content": "hi  x"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
        tokenizer,
    )
    console = recording_console()
    print_examples(examples, tokenizer, 1, console=console)
    lines = console.export_text(clear=False).splitlines()
    html = console.export_html(inline_styles=True)
    assert lines[0] == "first 1 of 2 examples; target trained to predict, context not trained on (↵ "
    assert lines[1] == "newline, ⇥ tab, · space; shades alternate per token)"
    assert lines[2].startswith("example 0 (record 0): 27 tokens, 2 targets ──")
    assert lines[3:] == [
        "<|im_start|>user↵",
        "hi··x<|im_end|>↵",  # two " " tokens, each shown as "·"
        "<|im_start|>assistant↵",
        "ok<|im_end|>↵",
        "",
    ]
    # Targets are on a green background, context tokens are grey text without one.
    assert re.search(r'<span style="[^"]*background-color: #00d700[^"]*">ok</span>', html)
    assert re.search(r'<span style="[^"]*background-color: #008700[^"]*">&lt;\|im_end\|&gt;</span>', html)
    user = re.search(r'<span style="([^"]*)">u</span>', html)
    assert user and "background" not in user.group(1)


# --- statistics --------------------------------------------------------------------------------


def table_rows(text: str) -> list[tuple[str, str]]:
    """(statistic, value) for each body row of a rich table, in order."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 4:
            rows.append((cells[1], cells[2]))
    return rows


def test_print_stats_shows_every_count_and_reason():
    stats = {
        "records": 7,
        "formats": {"prompt_completion": 5},
        "examples": 3,
        "skipped_invalid": {"invalid completion: must be a string": 2},
        "truncated": 1,
        "dropped": {"no supervised tokens left after truncation": 1, "longer than max_length=8": 1},
        "tokens": 20,
        "supervised_tokens": 5,
        "supervised_fraction": 0.25,
        "length": {"p0": 4, "p50": 8, "p90": 8, "p99": 8, "p100": 8},
        "source": "data.jsonl",
        "seconds": 0.0412,
        "cached": True,
    }
    console = Console(file=io.StringIO(), record=True, width=120)
    print_stats(stats, console=console)
    text = console.export_text()
    assert text.splitlines()[0].strip() == "dataset statistics"
    assert "┃ statistic" in text
    assert table_rows(text) == [
        ("source", "data.jsonl"),
        ("records", "7"),
        ("format prompt_completion", "5"),
        ("skipped invalid records", "2"),
        ("invalid completion: must be a string", "2"),
        ("examples", "3"),
        ("length (tokens)", "min 4 / p50 8 / p90 8 / p99 8 / max 8"),
        ("tokens", "20"),
        ("supervised tokens", "5"),
        ("supervised fraction", "25.0%"),
        ("truncated", "1"),
        ("dropped", "2"),
        ("no supervised tokens left after truncation", "1"),
        ("longer than max_length=8", "1"),
        ("prepared", "loaded from cache in 0.04 s"),
    ]


def test_print_stats_of_prepared_data_counts_truncation_and_cache(tmp_path):
    tokenizer = char_tokenizer()
    records = [
        {"prompt": "hi", "completion": "ok"},  # h i ok </s>
        {"prompt": "abcdef", "completion": "ok"},  # cut to "abcd": nothing left to train on, dropped
        {"prompt": "a", "completion": "hello ok"},  # a hell o " " ok </s>, cut to 4 tokens and kept
        {"prompt": "x", "completion": 3},  # invalid
    ]
    settings = TargetSettings(max_length=4)
    kwargs = dict(skip_invalid_records=True, cache_dir=str(tmp_path))
    first = prepare_examples(records, tokenizer, settings, **kwargs)
    second = prepare_examples(records, tokenizer, settings, **kwargs)
    for examples, how in ((first, "tokenized"), (second, "loaded from cache")):
        console = Console(file=io.StringIO(), record=True, width=120)
        print_stats(examples.stats, console=console)
        rows = dict(table_rows(console.export_text()))
        assert rows["records"] == "4"
        assert rows["format prompt_completion"] == "3"
        assert rows["skipped invalid records"] == "1"
        assert rows["invalid completion: must be a string"] == "1"
        assert rows["examples"] == "2"
        assert rows["truncated"] == "1"
        assert rows["dropped"] == "1"
        assert rows["no supervised tokens left after truncation"] == "1"
        assert rows["supervised fraction"] == "62.5%"  # ok </s> + hell o " ": 5 of 8 tokens
        assert rows["prepared"].startswith(how + " in ")


# --- HTML --------------------------------------------------------------------------------------


def test_html_escapes_tokens_and_marks_targets(tmp_path):
    tokenizer = char_tokenizer(CHATML)
    messages = [{"role": "user", "content": '<b>&"x"'}, {"role": "assistant", "content": "ok"}]
    examples = prepare([{"messages": messages}], tokenizer)
    path = tmp_path / "view.html"
    write_html(str(path), examples, tokenizer, 3)
    page = path.read_text(encoding="utf-8")
    assert page == render_html(examples, tokenizer, 3)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page and "http" not in page  # self-contained
    spans = re.findall(
        r'<span class="tok (target|context)( odd)?" title="id (\d+) \((target|context)\)">(.*?)</span>', page, re.S
    )
    assert len(spans) == len(examples[0][0])
    assert [(kind, int(token_id), text) for kind, _, token_id, _, text in spans if kind == "target"] == [
        ("target", merged_id("ok"), "ok"),
        ("target", IM_END, "&lt;|im_end|&gt;"),
    ]
    texts = [text for *_, text in spans]
    assert texts[:2] == ["&lt;|im_start|&gt;", "u"]
    assert ["&lt;", "b", "&gt;", "&amp;", "&quot;", "x", "&quot;"] == texts[6:13]
    assert "<|im_start|>" not in page and "<b>&" not in page
    assert texts[5] == "↵\n"  # newline shown, line break kept
    assert all(kind == title_kind for kind, _, _, title_kind, _ in spans)
    assert [odd for _, odd, *_ in spans[:3]] == ["", " odd", ""]
    assert "<td>supervised fraction</td><td>" in page
    assert '<td class="detail">format conversational</td><td>1</td>' in page


def test_html_escapes_statistics(tmp_path):
    tokenizer = char_tokenizer()
    examples = prepare_examples(
        [{"prompt": "a<b", "completion": "ok"}, {"prompt": "<x>"}],
        tokenizer,
        skip_invalid_records=True,
        use_cache=False,
    )
    page = render_html(examples, tokenizer, 1)
    assert "invalid prompt: record fits no known format (a &#x27;prompt&#x27; without a &#x27;completion&#x27;)" in page
    assert ">&lt;</span>" in page and "a<b" not in page
    assert "<td>skipped invalid records</td><td>1</td>" in page


# --- the command -------------------------------------------------------------------------------


@pytest.fixture
def inspect_config(tmp_path):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    tokenizer = char_tokenizer(CHATML)
    tokenizer.save_pretrained(model)
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(model)
    data = tmp_path / "train.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {
            "messages": [
                {"role": "system", "content": "be"},
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": "hello"},
            ]
        },
        {"messages": [{"role": "user", "content": "x"}]},  # invalid: ends on a user turn
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"model: {model}\ntrain_data: {data}\ncache_dir: {tmp_path / 'cache'}\nskip_invalid_records: true\n"
    )
    return config


def test_cli_inspect_json(inspect_config, capsys):
    from sftlab.cli import main

    assert main(["inspect", str(inspect_config), "--json", "-n", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["examples"]
    assert row["record_index"] == 0
    assert [t["id"] for t in row["tokens"]][:2] == [IM_START, char_id("u")]
    assert [(t["id"], t["text"]) for t in row["tokens"] if t["target"]] == [
        (merged_id("ok"), "ok"),
        (IM_END, "<|im_end|>"),
    ]
    stats = out["stats"]
    assert stats["records"] == 3
    assert stats["examples"] == 2
    assert stats["formats"] == {"conversational": 2}
    assert stats["skipped_invalid"] == {"invalid messages: a conversation needs at least two messages": 1}
    assert stats["supervised_tokens"] == 2 + len(["hell", "o", "<|im_end|>"])
    assert stats["cached"] is False

    # The second run comes from the cache; overrides reach the data settings.
    assert main(["inspect", str(inspect_config), "max_length=12", "truncation=drop", "--json", "-n", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["dropped"] == {"longer than max_length=12": 2}
    assert out["examples"] == []
    # Overrides may also come after the flags.
    assert main(["inspect", str(inspect_config), "--json", "-n", "5", "max_length=12", "truncation=drop"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["dropped"] == {"longer than max_length=12": 2}


def test_cli_inspect_terminal_and_html(inspect_config, tmp_path, capsys):
    from sftlab.cli import main

    page = tmp_path / "view.html"
    assert main(["inspect", str(inspect_config), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "first 2 of 2 examples" in out
    assert "example 1 (record 1): " in out
    assert "dataset statistics" in out
    assert out.rstrip().endswith(f"wrote {page}")
    assert page.read_text(encoding="utf-8").count('(target)">') == 2 + 3


def test_the_docs_token_views_still_render():
    # docs/render_examples.py writes the token views in docs/concepts.md (with SmolLM2's tokenizer,
    # not installed in CI); here it runs on the tiny tokenizer so a renamed sftlab API breaks a test
    # instead of the docs script.
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "render_examples.py")
    spec = importlib.util.spec_from_file_location("render_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHATML
    blocks = module.render(tokenizer)
    assert sorted(blocks) == ["as_served_harmony", "as_served_qwen3", "conversation", "packing", "prompt_completion"]
    assert all("targets" in block or "trained" in block for block in blocks.values())
    assert (
        "# example 1: trains messages [3, 5]" in blocks["as_served_harmony"]
    )  # the tool call rides with the final answer
    assert "# example 2: trains messages [1]" in blocks["as_served_qwen3"]
