"""`sftlab train|prepare|inspect|config|generate|plot`: thin wrappers over the library.

User mistakes (SftlabError) print as one line and exit 2; a run stopped by SIGTERM/SIGUSR1
after its checkpoint exits 75; anything else is a bug and keeps its traceback. `--debug` shows the traceback for user mistakes too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# `sftlab train` stopped by SIGTERM or SIGUSR1 after writing a checkpoint: EX_TEMPFAIL from
# sysexits.h, "try again later": resume_from_checkpoint=auto continues the run.
EXIT_PREEMPTED = 75


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab", description="Supervised fine-tuning of causal language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config (run `sftlab config` for every key)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-4 packing=true")

    prepare = commands.add_parser("prepare", help="tokenize train_data (and eval_data) into the cache ahead of training, and print the statistics")
    prepare.add_argument("config", help="YAML config file (the same one `sftlab train` takes)")
    prepare.add_argument("overrides", nargs="*", help="key=value overrides, e.g. preprocessing_workers=8")
    prepare.add_argument("--json", action="store_true", help="print the statistics as JSON")

    inspect = commands.add_parser("inspect", help="show examples token by token, supervised tokens highlighted, and dataset statistics")
    inspect.add_argument("config")
    inspect.add_argument("overrides", nargs="*")
    inspect.add_argument("-n", "--num-examples", type=int, default=3, help="examples to show")
    inspect.add_argument("--json", action="store_true", help="print tokens and statistics as JSON")
    inspect.add_argument("--html", metavar="FILE", help="write the token view to an HTML page")
    inspect.add_argument("--eval", action="store_true", help="inspect eval_data instead of train_data")

    commands.add_parser("config", help="list every config key with its type, default and description")

    generate = commands.add_parser("generate", help="answer a prompt with a trained model (chat template applied)")
    generate.add_argument("model_dir")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--system", default=None, help="optional system message")

    plot = commands.add_parser("plot", help="plot training/eval loss and learning rate from metrics.jsonl")
    plot.add_argument("output_dir")
    plot.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/loss.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sftlab.errors import SftlabError

    # Before torch loads: OpenMP threads that busy-wait stall badly when anything else shares the
    # CPU (measured on 2 cores: a decoding step 0.3 s -> 5-8 s); passive waiting costs little when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the flags: `sftlab inspect cfg.yaml --json max_length=12`.
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args)
    except SftlabError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `sftlab inspect ... | head`: the reader left early, which is not an error. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args) -> int:
    if args.command == "config":
        from rich.console import Console
        from rich.table import Table

        from sftlab.config import field_help

        table = Table("key", "type", "default", "description", show_lines=False)
        for row in field_help():
            table.add_row(*row)
        Console().print(table)
        return 0
    if args.command == "train":
        from sftlab.config import load_config
        from sftlab.training.loop import train

        result = train(load_config(args.config, args.overrides))
        return EXIT_PREEMPTED if result.stopped_by else 0
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "generate":
        from sftlab.generate import generate

        print(generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system))
        return 0
    if args.command == "plot":
        from sftlab.plot import plot_metrics

        print(plot_metrics(args.output_dir, args.out))
        return 0
    raise AssertionError(args.command)


def _prepare(args) -> int:
    """Build the cache entries `sftlab train` with this config will read: on a CPU node before a
    GPU job, or before a process group starts (long tokenization inside one hits collective
    timeouts). train then finds them and starts at once."""
    from sftlab import inspect as view
    from sftlab.config import load_config
    from sftlab.data.chat_tokens import add_chat_tokens
    from sftlab.data.splits import is_preference_split, prepare_preference_split, prepare_split
    from sftlab.models import load_tokenizer, resolve_model_path

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.tokenizer or resolve_model_path(config.model), config.trust_remote_code)
    add_chat_tokens(tokenizer, chat_template=config.chat_template, add_markers=config.add_chat_tokens,
                    special_tokens=config.special_tokens)  # as train does, so train finds this cache entry

    def prepared(eval: bool) -> dict:
        pairs = is_preference_split(config, eval=eval)  # the first record has chosen/rejected
        return (prepare_preference_split if pairs else prepare_split)(config, tokenizer, eval=eval).stats

    splits = {"train": prepared(False)}
    if config.eval_data is not None:
        splits["eval"] = prepared(True)
    if args.json:
        print(json.dumps(splits, indent=1))
        return 0
    for split, stats in splits.items():
        view.print_stats(stats, title=f"{split} data")
        if stats.get("cache_entry"):
            print(f"cache entry: {stats['cache_entry']}")
    if not config.use_cache:
        print("use_cache is false: nothing was kept, `sftlab train` will prepare the data again")
    return 0


def _inspect(args) -> int:
    from sftlab import inspect as view
    from sftlab.config import load_config
    from sftlab.data.chat_tokens import add_chat_tokens
    from sftlab.data.splits import is_preference_split, prepare_split
    from sftlab.errors import ConfigError
    from sftlab.models import load_tokenizer, resolve_model_path

    config = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(config.tokenizer or resolve_model_path(config.model), config.trust_remote_code)
    added = add_chat_tokens(tokenizer, chat_template=config.chat_template, add_markers=config.add_chat_tokens,
                            special_tokens=config.special_tokens)
    if is_preference_split(config, eval=args.eval):  # the first record has chosen/rejected
        return _inspect_pairs(args, config, tokenizer)
    examples = prepare_split(config, tokenizer, eval=args.eval)
    if args.html:
        try:
            view.write_html(args.html, examples, tokenizer, args.num_examples)
        except OSError as error:
            raise ConfigError("cannot write the HTML page", source=args.html, field="--html",
                              found=error.strerror or str(error), fix="choose a path in a folder you can write to") from None
    if args.json:
        shown = {"examples": view.examples_json(examples, tokenizer, args.num_examples), "stats": examples.stats}
        if added:
            shown["added_tokens"] = dict(zip(added.tokens, added.ids))
        print(json.dumps(shown, indent=1))
    else:
        for line in added.lines() if added else ():
            print(line)
        view.print_examples(examples, tokenizer, args.num_examples)
        view.print_stats(examples.stats)
        if args.html:
            print(f"wrote {args.html}")
    return 0


def _inspect_pairs(args, config, tokenizer) -> int:
    """`sftlab inspect` of preference data: per pair the prompt, the chosen and the rejected reply."""
    from sftlab import inspect as view
    from sftlab.data.splits import prepare_preference_split
    from sftlab.errors import ConfigError

    if args.html:
        raise ConfigError("the HTML view does not show preference pairs yet", field="--html",
                          fix="use the terminal view or --json for preference data")
    pairs = prepare_preference_split(config, tokenizer, eval=args.eval)
    if args.json:
        rows = view.pairs_json(pairs, tokenizer, args.num_examples)
        print(json.dumps({"pairs": rows, "stats": pairs.stats}, indent=1))
    else:
        view.print_pairs(pairs, tokenizer, args.num_examples)
        view.print_stats(pairs.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
