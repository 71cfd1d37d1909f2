"""Show what the model will be trained on: examples token by token, and the dataset's statistics.

A token is a *target* when the model is trained to predict it: token t is a target iff
`targets[t - 1] != -100` (the targets are already shifted, see data/examples.py), so token 0 is
never one. The three views (JSON, terminal, HTML) are drawn from the same `examples_json`.

Preference data (records with `chosen` or `rejected`, see data/preference.py) is shown per pair:
the prompt P (context), then the chosen and the rejected reply, every token of which is trained.

Nothing here changes examples; `sftlab inspect` (cli.py) calls these after preparing the data.
"""

from __future__ import annotations

import html

from sftlab.data.container import IGNORE, Examples, Pairs

# Whitespace that would otherwise be invisible or break the layout. A newline keeps its line
# break after the marker so the rendered example keeps its shape.
_VISIBLE = {"\n": "↵\n", "\t": "⇥", "\r": "␍"}
_TARGET_STYLES = ("black on green3", "black on green4")  # alternating, so token boundaries show
_CONTEXT_STYLES = ("grey62", "grey42")


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, decoded on its own (special tokens kept, no clean-up of spaces)."""
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # SentencePiece decoders drop the leading space of the first token, and a token decoded on its
    # own is always the first: "▁world" would show as "world". Put the space back.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [" " + t if p and p.startswith("▁") and not t.startswith(" ") else t for t, p in zip(texts, pieces)]


def target_flags(targets) -> list[bool]:
    """flags[t]: the model is trained to predict token t (i.e. targets[t - 1] is not ignored)."""
    return [False] + [int(t) != IGNORE for t in targets[:-1]] if len(targets) else []


def examples_json(examples: Examples, tokenizer, n: int) -> list[dict]:
    """The first n examples as {"record_index", "tokens": [{"id", "text", "target"}]}: what
    `sftlab inspect --json` prints, and what the terminal and HTML views draw."""
    rows = []
    for i in range(min(n, len(examples))):
        input_ids, targets = examples[i]
        ids = [int(t) for t in input_ids]
        tokens = [
            {"id": token, "text": text, "target": flag}
            for token, text, flag in zip(ids, token_texts(tokenizer, ids), target_flags(targets))
        ]
        rows.append({"record_index": int(examples.record_index[i]), "tokens": tokens})
    return rows


def pairs_json(pairs: Pairs, tokenizer, n: int) -> list[dict]:
    """The first n pairs as {"record_index", "prompt", "chosen", "rejected": [{"id", "text", "target"}],
    "counts": {"prompt", "chosen", "rejected"}}: the prompt is context, every reply token a target."""
    rows = []
    for i in range(min(n, len(pairs))):
        row = {"record_index": int(pairs.record_index[i])}
        for part, part_ids, trained in zip(("prompt", "chosen", "rejected"), pairs[i], (False, True, True)):
            ids = [int(t) for t in part_ids]
            row[part] = [{"id": token, "text": text, "target": trained}
                         for token, text in zip(ids, token_texts(tokenizer, ids))]
        row["counts"] = {part: len(row[part]) for part in ("prompt", "chosen", "rejected")}
        rows.append(row)
    return rows


def visible(text: str) -> str:
    """`text` with whitespace made visible: ↵ newline, ⇥ tab, ␍ carriage return, · for a token of spaces only.

    Spaces inside words stay spaces so that prose stays readable; a token that is only spaces
    (indentation, double spaces) would otherwise be invisible.
    """
    if text and not text.strip(" "):
        return "·" * len(text)
    if not text:
        return "∅"  # a token that decodes to nothing would otherwise vanish from the view
    return "".join(_VISIBLE.get(c, c) for c in text)


def _summary(row: dict) -> str:
    supervised = sum(t["target"] for t in row["tokens"])
    return f"{len(row['tokens'])} tokens, {supervised} targets"


def print_examples(examples: Examples, tokenizer, n: int, console=None) -> None:
    """Print the first n examples token by token: targets on green, context tokens dim."""
    from rich.console import Console
    from rich.rule import Rule
    from rich.text import Text

    console = console or Console()
    rows = examples_json(examples, tokenizer, n)
    legend = Text(f"first {len(rows)} of {len(examples)} examples; ")
    legend.append("target", style=_TARGET_STYLES[0])
    legend.append(" trained to predict, ")
    legend.append("context", style=_CONTEXT_STYLES[0])
    legend.append(" not trained on (↵ newline, ⇥ tab, · space; shades alternate per token)")
    console.print(legend)
    for i, row in enumerate(rows):
        console.print(Rule(f"example {i} (record {row['record_index']}): {_summary(row)}", align="left"))
        text = Text()
        for position, token in enumerate(row["tokens"]):
            styles = _TARGET_STYLES if token["target"] else _CONTEXT_STYLES
            text.append(visible(token["text"]), style=styles[position % 2])
        console.print(text)


def print_pairs(pairs: Pairs, tokenizer, n: int, console=None) -> None:
    """Print the first n pairs: the prompt dim, then each reply with its (trained) tokens highlighted."""
    from rich.console import Console
    from rich.rule import Rule
    from rich.text import Text

    console = console or Console()
    rows = pairs_json(pairs, tokenizer, n)
    legend = Text(f"first {len(rows)} of {len(pairs)} preference pairs; ")
    legend.append("prompt", style=_CONTEXT_STYLES[0])
    legend.append(" read once, ")
    legend.append("reply", style=_TARGET_STYLES[0])
    legend.append(" every token scored (↵ newline, ⇥ tab, · space; shades alternate per token)")
    console.print(legend)
    for i, row in enumerate(rows):
        counts = row["counts"]
        console.print(Rule(f"pair {i} (record {row['record_index']}): prompt {counts['prompt']}, "
                           f"chosen {counts['chosen']}, rejected {counts['rejected']} tokens", align="left"))
        for part in ("prompt", "chosen", "rejected"):
            text = Text(f"{part}: ", style="bold")
            for position, token in enumerate(row[part]):
                styles = _TARGET_STYLES if token["target"] else _CONTEXT_STYLES
                text.append(visible(token["text"]), style=styles[position % 2])
            console.print(text)


def pair_stats_rows(stats: dict) -> list[tuple[str, str]]:
    """(statistic, value) rows of a preference preparation (data/preference.py's stats)."""
    rows: list[tuple[str, str]] = []
    if stats.get("source"):
        rows.append(("source", str(stats["source"])))
    rows.append(("records", str(stats.get("records", 0))))
    for name, count in sorted(stats.get("formats", {}).items()):
        rows.append((f"  format {name}", str(count)))
    skipped = stats.get("skipped_invalid", {})
    rows.append(("skipped invalid records", str(sum(skipped.values()))))
    for reason, count in sorted(skipped.items(), key=lambda item: -item[1]):
        rows.append((f"  {reason}", str(count)))
    for reason, count in sorted(stats.get("skipped_replies", {}).items(), key=lambda item: -item[1]):
        rows.append((f"  a reply: {reason}", str(count)))
    rows.append(("pairs", str(stats.get("pairs", 0))))
    length = stats.get("length", {})
    if length:
        names = {"p0": "min", "p100": "max"}
        rows.append(("row length [P|C|R] (tokens)", " / ".join(f"{names.get(q, q)} {v}" for q, v in length.items())))
    rows.append(("tokens", str(stats.get("tokens", 0))))
    for part in ("prompt", "chosen", "rejected"):
        rows.append((f"  {part} tokens", str(stats.get(f"{part}_tokens", 0))))
    rows.append(("truncated pairs", str(stats.get("truncated", 0))))
    rows.append(("  prompt cut from its start", str(stats.get("truncated_prompt", 0))))
    rows.append(("  replies cut at their end", str(stats.get("truncated_completion", 0))))
    dropped = stats.get("dropped", {})
    rows.append(("dropped", str(sum(dropped.values()))))
    for reason, count in sorted(dropped.items(), key=lambda item: -item[1]):
        rows.append((f"  {reason}", str(count)))
    return rows


def stats_rows(stats: dict) -> list[tuple[str, str]]:
    """(statistic, value) pairs for the statistics table, in reading order."""
    if "pairs" in stats:  # a preference preparation counts pairs, not examples
        return pair_stats_rows(stats)
    rows: list[tuple[str, str]] = []
    if stats.get("source"):
        rows.append(("source", str(stats["source"])))
    for source in stats.get("sources", ()):  # a mixture: what each source gave
        option = next((f", {key} {source[key]}" for key in ("weight", "max_samples", "epochs") if key in source), "")
        rows.append((f"  {source['name']}", f"{source['examples']} of {source['examples_available']} examples{option}; "
                     f"{source['tokens']} tokens, {source['supervised_tokens']} supervised"))
    rows.append(("records", str(stats.get("records", 0))))
    for name, count in sorted(stats.get("formats", {}).items()):
        rows.append((f"  format {name}", str(count)))
    skipped = stats.get("skipped_invalid", {})
    rows.append(("skipped invalid records", str(sum(skipped.values()))))
    for reason, count in sorted(skipped.items(), key=lambda item: -item[1]):
        rows.append((f"  {reason}", str(count)))
    rows.append(("examples", str(stats.get("examples", 0))))
    length = stats.get("length", {})
    if length:
        names = {"p0": "min", "p100": "max"}
        rows.append(("length (tokens)", " / ".join(f"{names.get(q, q)} {value}" for q, value in length.items())))
    rows.append(("tokens", str(stats.get("tokens", 0))))
    rows.append(("supervised tokens", str(stats.get("supervised_tokens", 0))))
    rows.append(("supervised fraction", f"{100 * stats.get('supervised_fraction', 0.0):.1f}%"))
    chat = stats.get("chat")
    if chat:
        rows.append(("conversation turns trained", str(chat.get("turns_trained", 0))))
        rows.append(("  records split to serve every turn", str(chat.get("records_split", 0))))
        rows.append(("  extra examples", str(chat.get("extra_examples", 0))))
        rows.append(("  extra tokens", str(chat.get("extra_tokens", 0))))
        if chat.get("turns_not_served"):
            rows.append(("turns left untrained (chat_examples=final_render)", str(chat["turns_not_served"])))
    rows.append(("truncated", str(stats.get("truncated", 0))))
    dropped = stats.get("dropped", {})
    rows.append(("dropped", str(sum(dropped.values()))))
    for reason, count in sorted(dropped.items(), key=lambda item: -item[1]):
        rows.append((f"  {reason}", str(count)))
    if "cached" in stats:
        how = "loaded from cache" if stats["cached"] else "tokenized"
        rows.append(("prepared", f"{how} in {stats.get('seconds', 0.0):.2f} s"))
    return rows


def print_stats(stats: dict, console=None, title: str = "dataset statistics") -> None:
    """Print the dataset statistics that `prepare_examples` recorded, as a table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table("statistic", "value", title=title, title_justify="left")
    for name, value in stats_rows(stats):
        table.add_row(name, value)
    console.print(table)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.example { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all;
           border: 1px solid #ccc; padding: .6em; margin: .4em 0 1.5em; line-height: 1.6; }
.tok { border-radius: 2px; }
.tok.context { color: #888; }
.tok.context.odd { color: #555; }
.tok.target { background: #9be29b; color: #000; }
.tok.target.odd { background: #6fcf6f; }
.tok:hover { outline: 1px solid #000; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
td.detail { padding-left: 2em; color: #555; }
"""


def render_html(examples: Examples, tokenizer, n: int) -> str:
    """A self-contained HTML page: the first n examples token by token and the statistics."""
    escape = html.escape
    source = examples.stats.get("source")
    title = f"sftlab inspect: {source}" if source else "sftlab inspect"
    rows = examples_json(examples, tokenizer, n)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p>First {len(rows)} of {len(examples)} examples. "
        '<span class="tok target">target</span> = the model is trained to predict this token; '
        '<span class="tok context">context</span> = read, not trained on. '
        "Shades alternate per token; hover a token for its id. ↵ newline, ⇥ tab, · space-only token.</p>",
    ]
    for i, row in enumerate(rows):
        parts.append(f"<h2>example {i} (record {row['record_index']}): {escape(_summary(row))}</h2>")
        spans = []
        for position, token in enumerate(row["tokens"]):
            kind = "target" if token["target"] else "context"
            odd = " odd" if position % 2 else ""
            spans.append(
                f'<span class="tok {kind}{odd}" title="id {token["id"]} ({kind})">{escape(visible(token["text"]))}</span>'
            )
        parts.append('<div class="example">' + "".join(spans) + "</div>")
    parts.append("<h2>dataset statistics</h2><table><tr><th>statistic</th><th>value</th></tr>")
    for name, value in stats_rows(examples.stats):
        indent = ' class="detail"' if name.startswith("  ") else ""
        parts.append(f"<tr><td{indent}>{escape(name.strip())}</td><td>{escape(value)}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: str, examples: Examples, tokenizer, n: int) -> None:
    """Write `render_html` to `path`."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_html(examples, tokenizer, n))
