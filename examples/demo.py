"""The sftlab demo: fine-tune SmolLM2-135M-Instruct on a CPU and show what it learnt.

    bash scripts/demo.sh                        # sets up .venv, then runs this
    python examples/demo.py [key=value ...]     # overrides go to examples/quickstart.yaml

1. what the model is trained on: the first example token by token, the dataset statistics;
2. the held-out requests answered by the model as it ships (greedy decoding);
3. training with examples/quickstart.yaml through `sftlab.training`, which answers the same
   requests at every evaluation (eval_generate_samples) and logs their exact match;
4. the same requests answered by the fine-tuned model, side by side with the first answers;
5. exact-match and per-field scores before and after, the exact-match curve over the steps of
   training, and the curves (loss.png: loss, generation scores, learning rate).

The held-out requests use names that never occur in the training data (examples/make_data.py),
so the score after training measures what was learnt, not what was memorised.
"""

from __future__ import annotations

import os

# With OpenMP's default busy-waiting, two threads on two cores that are also running anything
# else spin against each other: one decoding step measured 5-8 s instead of 0.3 s on a loaded
# 2-core machine. Passive waiting costs little when the machine is idle. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

# A deprecation inside peft/transformers, printed twice per LoRA run; nothing the reader can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIELDS = ("name", "guests", "day", "time")


def read_heldout(path: str) -> tuple[str, list[str], list[str]]:
    """(system message, user prompts, expected replies) of the held-out conversations."""
    system, prompts, expected = None, [], []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            messages = json.loads(line)["messages"]
            system = messages[0]["content"] if messages[0]["role"] == "system" else None
            prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
            expected.append(next(m["content"] for m in messages if m["role"] == "assistant"))
    return system, prompts, expected


def parsed(reply: str) -> dict:
    """The reply as a JSON object, or {} when it is not one."""
    try:
        value = json.loads(reply)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def scores(replies: list[str], expected: list[str]) -> dict[str, float]:
    """Exact-match rate over whole replies, and for each field the fraction of replies that got
    it right (value and type: "guests": "4" is not 4)."""
    result = {"exact match": sum(r == e for r, e in zip(replies, expected)) / len(expected)}
    for key in FIELDS:
        right = 0
        for reply, want in zip(replies, expected):
            got, want = parsed(reply), json.loads(want)
            right += key in got and got[key] == want[key] and type(got[key]) is type(want[key])
        result[key] = right / len(expected)
    return result


def answer(model_dir: str, prompts: list[str], system: str | None, max_new_tokens: int) -> tuple[list[str], float]:
    from sftlab.generate import chat_template_for, generate_replies, load_for_generation

    started = time.perf_counter()
    model, tokenizer = load_for_generation(model_dir)
    replies = generate_replies(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        system=system,
        template=chat_template_for(model_dir, tokenizer),
        batch_size=len(prompts),
    )
    del model
    gc.collect()
    return replies, time.perf_counter() - started


def side_by_side(
    console, prompts: list[str], before: list[str], after: list[str], expected: list[str], rows: int
) -> None:
    from rich.table import Table
    from rich.text import Text

    def cell(reply: str, right: str) -> Text:
        mark, style = ("✓ ", "green") if reply == right else ("✗ ", "red")
        shown = " ".join(reply.split())  # multi-line replies on one line
        return Text(mark, style=f"bold {style}") + Text(shown[:160] + ("…" if len(shown) > 160 else ""))

    table = Table(
        title=f"held-out requests: the first {min(rows, len(prompts))} of {len(prompts)}",
        show_lines=True,
        title_justify="left",
    )
    table.add_column("request", ratio=3, overflow="fold")
    table.add_column("before fine-tuning", ratio=4, overflow="fold")
    table.add_column("after fine-tuning", ratio=4, overflow="fold")
    for prompt, b, a, e in list(zip(prompts, before, after, expected))[:rows]:
        table.add_row(prompt.split("\n", 1)[-1], cell(b, e), cell(a, e))
    console.print(table)


def print_curve(console, evals: list[dict], before: float, requests: int) -> None:
    """Exact match of the replies generated during training (the eval records), step by step."""
    from rich.table import Table

    table = Table(
        title=f"during training: the {evals[0]['eval_generate_samples']} held-out requests answered at each evaluation",
        title_justify="left",
    )
    for column in ("step", "eval loss", "exact match", "JSON exact match", "replies cut at max tokens", "seconds"):
        table.add_column(column, justify="right")
    table.add_row("0", "", f"{before:.0%}", "", "", "", style="dim")  # the model as it ships: section 2's answers
    for r in evals:
        table.add_row(
            str(r["step"]),
            f"{r['eval_loss']:.4f}",
            f"{r.get('eval_generate_exact_match', 0):.0%}",
            f"{r['eval_generate_json_exact_match']:.0%}" if "eval_generate_json_exact_match" in r else "",
            str(r["eval_generate_unfinished"]),
            f"{r['eval_generate_seconds']:.1f}",
        )
    console.print(table)
    seconds = [r["eval_generate_seconds"] for r in evals]
    console.print(
        f"cost: {sum(seconds) / len(seconds):.1f} s per evaluation by generation ({requests} requests, "
        f"{min(seconds):.1f}-{max(seconds):.1f} s), {sum(seconds):.0f} s in all"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune SmolLM2-135M-Instruct on the booking task and compare.")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart config")
    parser.add_argument("--config", default=os.path.join(HERE, "quickstart.yaml"))
    parser.add_argument("--rows", type=int, default=8, help="held-out answers to show side by side")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="the expected replies are at most 28 tokens")
    args = parser.parse_args(argv)
    args.config = os.path.abspath(args.config)

    started = time.perf_counter()
    os.chdir(ROOT)  # the config's paths (and those in overrides) are relative to the repository root
    from rich.console import Console
    from rich.rule import Rule
    from rich.table import Table

    from sftlab import load_config, train
    from sftlab.data.splits import prepare_split
    from sftlab.inspect import print_examples, print_stats
    from sftlab.models import load_tokenizer, resolve_model_path
    from sftlab.plot import plot_metrics

    console = Console()
    config = load_config(args.config, args.overrides)
    console.print(Rule(f"model {config.model}"))
    step = time.perf_counter()
    model_dir = resolve_model_path(config.model)  # the first time: GGUF -> Hugging Face folder (~40 s)
    console.print(f"{model_dir} ({time.perf_counter() - step:.0f} s)")

    console.print(Rule("1. what the model is trained on"))
    tokenizer = load_tokenizer(model_dir)
    examples = prepare_split(config, tokenizer)  # cached: train() below reuses it
    print_examples(examples, tokenizer, 1, console=console)
    print_stats(examples.stats, console=console)

    system, prompts, expected = read_heldout(config.eval_data or os.path.join(HERE, "data", "heldout.jsonl"))
    console.print(Rule(f"2. {len(prompts)} held-out requests, answered by the model as it ships"))
    before, seconds = answer(model_dir, prompts, system, args.max_new_tokens)
    console.print(f"answered in {seconds:.0f} s")

    console.print(Rule(f"3. fine-tuning with {' '.join([os.path.relpath(args.config)] + args.overrides)}"))
    step = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - step

    console.print(Rule("4. the same requests, answered by the fine-tuned model"))
    after, seconds = answer(result.final_dir, prompts, system, args.max_new_tokens)
    console.print(f"answered in {seconds:.0f} s")
    if args.rows > 0:
        side_by_side(console, prompts, before, after, expected, args.rows)

    console.print(Rule("5. scores on the held-out requests"))
    score_before, score_after = scores(before, expected), scores(after, expected)
    table = Table(title=f"{len(prompts)} held-out requests, names unseen in training", title_justify="left")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    for key in score_before:
        table.add_row(
            key if key == "exact match" else f'  field "{key}"',
            f"{score_before[key]:.0%}",
            f"{score_after[key]:.0%}",
            style="bold" if key == "exact match" else None,
        )
    console.print(table)
    evals = [r for r in result.history if r.get("type") == "eval"]
    if evals:
        console.print(f"eval loss after {evals[-1]['step']} steps: {evals[-1]['eval_loss']:.4f}")
    curve = [r for r in evals if "eval_generate_samples" in r]
    if curve:
        print_curve(console, curve, score_before["exact match"], len(prompts))
    console.print(f"curves:       {plot_metrics(config.output_dir)} (loss, generation scores, learning rate)")
    instruction = prompts[0].split("\n", 1)[0]
    console.print(f"model:        {result.final_dir}, try:", soft_wrap=True)
    console.print(
        f"  sftlab generate {result.final_dir} --system '{system}' "
        f"$'{instruction}\\nTable for two at 8pm on Friday, name Ada Lovelace.'",
        soft_wrap=True,
        highlight=False,
    )
    console.print(f"total {time.perf_counter() - started:.0f} s, of which training {train_seconds:.0f} s")
    with open(os.path.join(config.output_dir, "demo_results.json"), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "before": score_before,
                "after": score_after,
                "train_seconds": train_seconds,
                "total_seconds": time.perf_counter() - started,
                "during_training": [
                    {k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in curve
                ],
                "replies": [
                    {"prompt": p, "expected": e, "before": b, "after": a}
                    for p, e, b, a in zip(prompts, expected, before, after)
                ],
            },
            handle,
            indent=1,
        )


if __name__ == "__main__":
    import sys

    from sftlab.errors import SftlabError

    try:
        main()
    except SftlabError as error:  # a missing package or a bad override: one line, as the CLI does
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
