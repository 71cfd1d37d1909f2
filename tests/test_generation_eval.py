"""Evaluation by generation during training (training/evaluation.py, data/prompts.py): the metrics
on hand-made strings, the prompts' token ids against the ids training's examples use as context,
user metrics imported only when named, scores logged at the eval steps, the pairs written, the
plot panel, the model's training state around generation, and 2 processes (DDP, FSDP) scoring
what 1 does. Tiny models and the char tokenizer of tests/tiny.py; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sftlab import train
from sftlab.cli import main
from sftlab.config import make_config
from sftlab.data.chat import CHATML
from sftlab.data.container import IGNORE
from sftlab.data.examples import TargetSettings
from sftlab.data.prepare import prepare_examples
from sftlab.data.prompts import generation_prompts
from sftlab.data.splits import prepare_generation_prompts
from sftlab.errors import ConfigError, TrainingError
from sftlab.generate import generate_replies
from sftlab.plot import generation_scores, plot_metrics, read_metrics
from sftlab.training.distributed import Processes
from sftlab.training.evaluation import GenerationEval, contains, exact_match, json_exact_match, resolve_metrics
from tiny import char_tokenizer, fused_tokenizer, special_id
from tiny_models import tiny_model

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records) -> str:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


def chats(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "json only"},
                {"role": "user", "content": f"n{(i + offset) % 5}"},
                {"role": "assistant", "content": f'{{"v": {(i + offset) % 5}}}'},
            ]
        }
        for i in range(n)
    ]


# --- metrics ----------------------------------------------------------------------------------


def test_exact_match_ignores_only_the_whitespace_at_the_ends():
    assert exact_match("  a b\n", "a b") == 1.0
    assert exact_match("a  b", "a b") == 0.0
    assert exact_match("A b", "a b") == 0.0


def test_json_exact_match_compares_values_not_text():
    assert (
        json_exact_match('{"b": 2, "a": [1, {"c": null}]}', '{"a":[1,{"c":null}],\n "b":2}') == 1.0
    )  # key order, spacing
    assert json_exact_match('{"a": 1}', '{"a": 1.0}') == 1.0  # one JSON number
    assert json_exact_match('{"a": true}', '{"a": 1}') == 0.0  # Python's True == 1 is not JSON's
    assert json_exact_match('{"a": 1}', '{"a": true}') == 0.0
    assert json_exact_match('{"a": "4"}', '{"a": 4}') == 0.0
    assert json_exact_match("[1, 2]", "[2, 1]") == 0.0  # arrays keep their order
    assert json_exact_match('{"a": 1, "b": 2}', '{"a": 1}') == 0.0
    assert json_exact_match('{"a": 1', '{"a": 1}') == 0.0  # not JSON: 0, not an error
    assert json_exact_match('```json\n{"a": 1}\n```', '{"a": 1}') == 0.0
    assert json_exact_match("", "[]") == 0.0


def test_contains_looks_for_the_reference_in_the_reply():
    assert contains("The answer is 42.", " 42 ") == 1.0
    assert contains("The answer is 4 2.", "42") == 0.0


def test_metric_names_are_checked_by_the_config_without_importing(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "t", "eval_generate_metrics": ["exact_match", "exactmatch"]})
    assert error.value.field == "eval_generate_metrics[1]" and "module:function" in error.value.expected
    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "t", "eval_generate_metrics": ["a:exact_match", "exact_match"]})
    assert error.value.field == "eval_generate_metrics[1]" and "eval_generate_exact_match" in error.value.found
    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "t", "eval_generate_metrics": ["mine:seconds"]})
    assert error.value.field == "eval_generate_metrics[0]" and "eval_generate_seconds" in error.value.found
    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "t", "eval_generate_samples": 4, "eval_generate_metrics": []})
    assert error.value.field == "eval_generate_metrics"
    # a module:function is only a name to the config: a module that fails on import is not imported
    (tmp_path / "exploding_metric.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config({"model": "m", "train_data": "t", "eval_generate_metrics": ["exploding_metric:score"]})
    assert config.eval_generate_metrics == ["exploding_metric:score"] and "exploding_metric" not in sys.modules


def test_a_user_metric_is_imported_when_named_and_errors_name_the_field(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(prediction, reference):\n    return len(prediction) / len(reference)\nnot_a_function = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_metrics", raising=False)
    [(name, function)] = resolve_metrics(["my_metrics:length_ratio"])
    assert name == "my_metrics:length_ratio" and function("abcd", "ab") == 2.0 and "my_metrics" in sys.modules
    with pytest.raises(ConfigError) as error:
        resolve_metrics(["exact_match", "no_such_module_13:score"])
    assert error.value.field == "eval_generate_metrics[1]" and "PYTHONPATH" in error.value.fix
    with pytest.raises(ConfigError) as error:
        resolve_metrics(["my_metrics:missing"])
    assert error.value.field == "eval_generate_metrics[0]" and "missing(prediction" in error.value.fix
    with pytest.raises(ConfigError) as error:
        resolve_metrics(["my_metrics:not_a_function"])
    assert "a int" in error.value.found


# --- prompts: exactly the context training's examples use -------------------------------------


def last_turn_context(ids, targets) -> list[int]:
    """The ids before the first target of the example's last trained run of tokens."""
    trained = [t for t, target in enumerate(targets) if target != IGNORE]
    start = trained[-1]
    while start - 1 in trained:
        start -= 1
    return [int(i) for i in ids[: start + 1]]  # targets[t] is the token at t + 1


def contexts_and_prompts(records, tokenizer, settings=TargetSettings(max_length=512), **options):
    examples = prepare_examples(records, tokenizer, settings, use_cache=False, **options)
    prompts = generation_prompts(records, tokenizer, settings, limit=len(records), **options)
    first = {}
    for i in range(len(examples)):  # a record's first example holds its last turn (chat.py)
        first.setdefault(int(examples.record_index[i]), i)
    contexts = [last_turn_context(*examples[first[p.record_index]]) for p in prompts.prompts]
    return contexts, prompts


def test_prompt_completion_prompt_ids_are_the_examples_context_with_bos():
    tokenizer = char_tokenizer(bos=True)
    records = [{"prompt": "say hello", "completion": " hello ok"}, {"prompt": "a b", "completion": "c"}]
    contexts, prompts = contexts_and_prompts(records, tokenizer)
    assert [p.input_ids for p in prompts.prompts] == contexts
    assert prompts.prompts[1].input_ids[0] == special_id("<s>") and [p.reference for p in prompts.prompts] == [
        " hello ok",
        "c",
    ]
    assert prompts.stop_token_ids == [special_id("</s>")]  # what a completion is trained to end with


def test_chat_prompt_ids_are_the_last_turns_context_as_served():
    tokenizer = char_tokenizer(chat_template=CHATML)
    records = [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok"}]},
    ]
    contexts, prompts = contexts_and_prompts(records, tokenizer)
    assert [p.input_ids for p in prompts.prompts] == contexts
    rendered = (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts.prompts[0].input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert [p.reference for p in prompts.prompts] == ["a2", "ok"]
    # chat prompt/completion: the prompt messages, and the completion's messages before its last assistant turn
    split = [
        {
            "prompt": [{"role": "user", "content": "p"}],
            "completion": [
                {"role": "assistant", "content": "c1"},
                {"role": "user", "content": "more"},
                {"role": "assistant", "content": "c2"},
            ],
        }
    ]
    contexts, prompts = contexts_and_prompts(split, tokenizer)
    assert [p.input_ids for p in prompts.prompts] == contexts and prompts.prompts[0].reference == "c2"
    # ChatML ends a turn with <|im_end|>, which is not this tokenizer's EOS (</s>): both stop a reply
    assert prompts.stop_token_ids == sorted([special_id("</s>"), special_id("<|im_end|>")])


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "{% if mode %} mode={{ mode }}{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}call {{ c.function.name }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_with_tools_system_and_template_arguments_prompt_ids_are_the_examples_context():
    tokenizer = fused_tokenizer(chat_template=TOOLS_TEMPLATE)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    records = [
        {
            "messages": [
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": "find x"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]},
                {"role": "tool", "content": "x=1"},
                {"role": "assistant", "content": "x is 1"},
            ],
            "tools": [tool],
            "chat_template_kwargs": {"mode": "fast"},
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},  # the config's tools
    ]
    settings = TargetSettings(
        max_length=512,
        tools=[{"type": "function", "function": {"name": "default"}}],
        chat_template_kwargs={"mode": "slow"},
    )
    contexts, prompts = contexts_and_prompts(records, tokenizer, settings)
    assert [p.input_ids for p in prompts.prompts] == contexts
    decoded = [tokenizer.decode(p.input_ids) for p in prompts.prompts]
    assert decoded[0] == (
        "<|im_start|>system\ntools: lookup mode=fast<|im_end|>\n<|im_start|>system\nbe terse<|im_end|>\n"
        "<|im_start|>user\nfind x<|im_end|>\n<|im_start|>assistant\ncall lookup<|im_end|>\n"
        "<|im_start|>tool\nx=1<|im_end|>\n<|im_start|>assistant\n"
    )
    assert decoded[1] == (
        "<|im_start|>system\ntools: default mode=slow<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    assert [p.reference for p in prompts.prompts] == ["x is 1", "r"]


def test_field_maps_and_the_alpaca_layout_shape_the_prompt_as_they_shape_the_example():
    tokenizer = char_tokenizer(chat_template=CHATML)
    mapped = [{"question": "2+2", "answer": "4"}]
    contexts, prompts = contexts_and_prompts(mapped, tokenizer, fields={"prompt": "question", "completion": "answer"})
    assert [p.input_ids for p in prompts.prompts] == contexts and prompts.prompts[0].reference == "4"
    alpaca = [{"instruction": "add", "input": "2 2", "output": "4"}]
    for layout in ("alpaca", "chat"):
        contexts, prompts = contexts_and_prompts(alpaca, tokenizer, alpaca_layout=layout)
        assert [p.input_ids for p in prompts.prompts] == contexts and prompts.prompts[0].reference == "4"


def test_records_without_a_prompt_reply_pair_are_counted_by_reason():
    tokenizer = char_tokenizer(chat_template=CHATML)
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            ]
        },
        {"messages": [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "r"}]},
        {
            "messages": [{"role": "user", "content": "q"}]
        },  # invalid: no assistant turn (skipped, with skip_invalid_records)
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "r2"}]},
    ]
    prompts = generation_prompts(records, tokenizer, TargetSettings(max_length=40), limit=10, skip_invalid_records=True)
    assert [p.record_index for p in prompts.prompts] == [0, 4] and prompts.records_read == 5 and prompts.usable == 2
    assert dict(prompts.unusable) == {
        "last assistant turn has no text (tool calls only)": 1,
        "prompt of max_length=40 tokens or more": 1,
        "skipped, invalid messages: a conversation needs at least two messages": 1,
    }
    # reading stops at the limit: the same first prompts at every evaluation
    assert [
        p.record_index
        for p in generation_prompts(
            records, tokenizer, TargetSettings(max_length=40), limit=1, skip_invalid_records=True
        ).prompts
    ] == [0]


def test_the_sources_of_an_eval_mixture_take_turns_each_with_its_own_field_map(tmp_path):
    tokenizer = char_tokenizer(chat_template=CHATML)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    talks = write_jsonl(tmp_path / "c.jsonl", chats(2))
    config = make_config(
        {
            "model": "m",
            "train_data": "t",
            "eval_generate_samples": 4,
            "eval_data": [
                {"path": questions, "name": "qa", "fields": {"prompt": "question", "completion": "answer"}},
                {"path": talks, "name": "chat"},
            ],
        }
    )
    prompts = prepare_generation_prompts(config, tokenizer)
    assert [(p.source, p.record_index, p.reference) for p in prompts.prompts] == [
        ("qa", 0, "a0"),
        ("chat", 0, '{"v": 0}'),
        ("qa", 1, "a1"),
        ("chat", 1, '{"v": 1}'),
    ]
    assert prompts.records_read == 5 and prompts.usable == 5
    assert prompts.prompts[0].input_ids == tokenizer("q0", add_special_tokens=False)["input_ids"]


def test_text_only_eval_data_is_a_config_error(tmp_path):
    tokenizer = char_tokenizer()
    config = make_config(
        {
            "model": "m",
            "train_data": "t",
            "eval_data": write_jsonl(tmp_path / "e.jsonl", [{"text": "abc"}] * 3),
            "eval_generate_samples": 2,
        }
    )
    with pytest.raises(ConfigError) as error:
        prepare_generation_prompts(config, tokenizer)
    assert (
        error.value.field == "eval_generate_samples"
        and "text record" in error.value.found
        and "eval_generate_samples: 0" in error.value.fix
    )
    no_eval = make_config({"model": "m", "train_data": "t", "eval_generate_samples": 2})
    with pytest.raises(ConfigError) as error:
        prepare_generation_prompts(no_eval, tokenizer)
    assert error.value.field == "eval_generate_samples" and "eval_data" in error.value.fix


# --- generation and scoring -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny tied Llama whose weights are drawn wide enough (initializer_range 0.2) that its greedy
    replies vary from prompt to prompt and in length; at the default 0.02 it writes "\n" for ever."""
    folder = str(tmp_path_factory.mktemp("model"))
    tokenizer = fused_tokenizer(chat_template=CHATML)
    tiny_model(
        "llama", vocab_size=len(tokenizer), seed=0, attn="sdpa", tie=True, initializer_range=0.2
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def own_replies(model_dir, users: list[str], max_new_tokens: int) -> list[str]:
    """The untrained model's greedy replies, through `sftlab generate`'s path (render_prompts, tokenizer())."""
    from sftlab.generate import load_for_generation

    model, tokenizer = load_for_generation(model_dir)
    return generate_replies(model, tokenizer, users, max_new_tokens=max_new_tokens, system="json only", template=CHATML)


def test_scores_are_exact_on_a_model_whose_replies_are_known(model_dir, tmp_path):
    # References set to the model's own replies (through another code path) score 1, a wrong one 0:
    # 3 of 4 right is 0.75 exactly, for exact_match and contains alike.
    users = ["n0", "n1", "n2", "n3"]
    replies = own_replies(model_dir, users, max_new_tokens=6)
    references = replies[:3] + [replies[3] + "!"]
    records = [
        {
            "messages": [
                {"role": "system", "content": "json only"},
                {"role": "user", "content": u},
                {"role": "assistant", "content": r},
            ]
        }
        for u, r in zip(users, references)
    ]
    from sftlab.generate import load_for_generation

    model, tokenizer = load_for_generation(model_dir)
    prompts = generation_prompts(records, tokenizer, TargetSettings(), limit=4)
    evaluation = GenerationEval(
        prompts,
        tokenizer,
        resolve_metrics(["exact_match", "contains"]),
        max_new_tokens=6,
        batch_size=3,
        log_samples=4,
        output_dir=str(tmp_path),
        sharded=False,
    )
    model.train()
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    record = evaluation.run(model, None, Processes(), torch.autocast("cpu", enabled=False), step=7)
    hook.remove()
    assert record["eval_generate_exact_match"] == 0.75 and record["eval_generate_contains"] == 0.75
    assert record["eval_generate_samples"] == 4 and record["eval_generate_seconds"] > 0
    # eval mode (no dropout, no NEFTune noise) and no autograd graph during generation; training mode after
    assert seen and set(seen) == {(False, False)} and model.training
    assert all(p.grad is None for p in model.parameters())
    pairs = [json.loads(line) for line in open(tmp_path / "generations.jsonl")]
    assert [(p["step"], p["record"], p["prediction"], p["reference"], p["exact_match"]) for p in pairs] == [
        (7, i, replies[i], references[i], float(i < 3)) for i in range(4)
    ]


def test_a_metric_that_fails_or_returns_no_number_names_itself_and_the_record(model_dir, tmp_path):
    from sftlab.generate import load_for_generation

    model, tokenizer = load_for_generation(model_dir)
    prompts = generation_prompts(chats(2), tokenizer, TargetSettings(), limit=2)
    for function, problem in ((lambda p, r: 1 / 0, "failed"), (lambda p, r: "yes", "did not return a finite number")):
        evaluation = GenerationEval(
            prompts,
            tokenizer,
            [("m:f", function)],
            max_new_tokens=2,
            batch_size=2,
            log_samples=0,
            output_dir=str(tmp_path),
            sharded=False,
        )
        with pytest.raises(TrainingError) as error:
            evaluation.run(model, None, Processes(), torch.autocast("cpu", enabled=False), step=1)
        assert problem in error.value.problem and "m:f" in error.value.problem and error.value.index == 0
    with pytest.raises(
        ConfigError
    ) as error:  # json_exact_match on references that are not JSON: said before the first step
        GenerationEval(
            generation_prompts([{"prompt": "a", "completion": "b"}], tokenizer, limit=1),
            tokenizer,
            resolve_metrics(["json_exact_match"]),
            max_new_tokens=2,
            batch_size=1,
            log_samples=0,
            output_dir=str(tmp_path),
            sharded=False,
        )
    assert error.value.index == 0 and "exact_match" in error.value.fix


# --- in training: CLI and Python API ----------------------------------------------------------


def run_config(model_dir, tmp_path, **overrides) -> dict:
    return {
        "model": model_dir,
        "train_data": write_jsonl(tmp_path / "train.jsonl", chats(8)),
        "eval_data": write_jsonl(tmp_path / "eval.jsonl", chats(5, offset=1)),
        "chat_template": "chatml",
        "max_steps": 4,
        "eval_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 3e-3,
        "use_cache": False,
        "eval_generate_samples": 5,
        "eval_generate_max_new_tokens": 8,
        "eval_generate_log_samples": 5,
        "output_dir": str(tmp_path / "run"),
        **overrides,
    }


def generation_records(output_dir) -> list[dict]:
    _, evals = read_metrics(os.path.join(output_dir, "metrics.jsonl"))
    return [
        {k: v for k, v in r.items() if k.startswith("eval_generate_") and k != "eval_generate_seconds"}
        | {"step": r["step"]}
        for r in evals
    ]


def test_sftlab_train_logs_generation_scores_at_the_eval_steps_writes_pairs_and_plots_them(
    model_dir, tmp_path, monkeypatch, capsys
):
    (tmp_path / "lengths.py").write_text(
        "def reply_length(prediction, reference):\n    return float(len(prediction))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    values = run_config(
        model_dir, tmp_path, eval_generate_metrics=["exact_match", "json_exact_match", "lengths:reply_length"]
    )
    config_path = tmp_path / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump({k: v for k, v in values.items() if k != "eval_generate_metrics"}))
    assert (
        main(["train", str(config_path), "eval_generate_metrics=[exact_match, json_exact_match, lengths:reply_length]"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "eval generation: 5 prompts, the first of 5 usable in the first 5 eval records" in out
        and "every record usable" in out
    )
    assert out.count("|  generated 5: exact_match") == 2
    run = values["output_dir"]
    records = generation_records(run)
    assert [r["step"] for r in records] == [2, 4]
    assert all(
        set(r)
        == {
            "step",
            "eval_generate_exact_match",
            "eval_generate_json_exact_match",
            "eval_generate_reply_length",
            "eval_generate_samples",
            "eval_generate_unfinished",
            "eval_generate_new_tokens",
        }
        for r in records
    )
    pairs = [json.loads(line) for line in open(os.path.join(run, "generations.jsonl"))]
    assert [p["step"] for p in pairs] == [2] * 5 + [4] * 5
    for r in records:  # the logged means are the means of the pairs written (all 5 of them)
        mine = [p for p in pairs if p["step"] == r["step"]]
        assert r["eval_generate_exact_match"] == sum(p["prediction"] == p["reference"] for p in mine) / 5
        assert r["eval_generate_reply_length"] == sum(len(p["prediction"]) for p in mine) / 5
        assert r["eval_generate_unfinished"] == sum(not p["stopped"] for p in mine)
    assert {p["reference"] for p in pairs} == {f'{{"v": {i}}}' for i in range(5)}
    # the plot gets a third panel: 800 px high instead of 600 (8 in against 6 in at 100 dpi)
    assert set(generation_scores(read_metrics(os.path.join(run, "metrics.jsonl"))[1])) == {
        "eval_generate_exact_match",
        "eval_generate_json_exact_match",
        "eval_generate_reply_length",
    }
    assert png_height(plot_metrics(run)) == 800
    assert main(["train", str(config_path), f"output_dir={tmp_path / 'off'}", "eval_generate_samples=0"]) == 0
    assert png_height(plot_metrics(str(tmp_path / "off"))) == 600 and not os.path.exists(
        tmp_path / "off" / "generations.jsonl"
    )


def test_a_resumed_run_keeps_the_pairs_up_to_its_checkpoint(tmp_path):
    from sftlab.training.evaluation import _start_samples

    path = tmp_path / "generations.jsonl"
    path.write_text("".join(json.dumps({"step": step, "prediction": str(step)}) + "\n" for step in (2, 4, 6)))
    _start_samples(str(path), append=True, resumed_at=4)  # the killed run wrote step 6 after its checkpoint at 4
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4]
    _start_samples(str(path), append=False, resumed_at=0)  # a fresh run starts a fresh file
    assert path.read_text() == ""


def png_height(path: str) -> int:
    with open(path, "rb") as handle:
        header = handle.read(24)
    return int.from_bytes(header[20:24], "big")


def test_python_api_with_datasets_passed_in_and_a_model_that_does_not_learn(model_dir, tmp_path):
    # SGD with lr 0 leaves the weights as saved: the model answers as before training, at every step.
    users = ["n1", "n2", "n3", "n4"]
    replies = own_replies(model_dir, users, max_new_tokens=6)
    evals = [
        {
            "messages": [
                {"role": "system", "content": "json only"},
                {"role": "user", "content": u},
                {"role": "assistant", "content": r},
            ]
        }
        for u, r in zip(users, replies[:2] + ["x", "y"])
    ]
    values = run_config(model_dir, tmp_path, eval_generate_max_new_tokens=6, eval_generate_samples=4)
    values.pop("eval_data")
    result = train(
        make_config(values),
        train_dataset=chats(8),
        eval_dataset=evals,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),
    )
    scores = [(r["step"], r["eval_generate_exact_match"]) for r in result.history if r.get("type") == "eval"]
    assert scores == [(2, 0.5), (4, 0.5)]


def test_lora_with_dropout_answers_at_the_last_evaluation_as_the_exported_model_does(model_dir, tmp_path):
    # LoRA dropout 0.5 would change the replies if it acted during generation; the last evaluation
    # runs on the final weights, so its replies are those of final/ loaded for inference (merged).
    from sftlab.generate import generate_batch, load_for_generation

    values = run_config(
        model_dir,
        tmp_path,
        use_peft=True,
        lora_r=4,
        lora_dropout=0.5,
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=1e-2,
    )
    result = train(make_config(values))
    last = [json.loads(line) for line in open(os.path.join(values["output_dir"], "generations.jsonl"))][-5:]
    model, tokenizer = load_for_generation(result.final_dir)
    prompts = generation_prompts(values["eval_data"], tokenizer, limit=5)
    replies = generate_batch(
        model, [p.input_ids for p in prompts.prompts], stop_ids=prompts.stop_token_ids, pad_id=0, max_new_tokens=8
    )
    assert [p["prediction"] for p in last] == [
        tokenizer.decode(r.token_ids, skip_special_tokens=True).strip() for r in replies
    ]
    assert [p["step"] for p in last] == [4] * 5


# --- several processes ------------------------------------------------------------------------


def varied_chats(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"n{(i + offset) % 5}"},
                {"role": "assistant", "content": "y" * (1 + 2 * ((i + offset) % 5))},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def half_taught_dir(model_dir, tmp_path_factory):
    """model_dir after 24 steps on replies of 1 to 9 "y"s: its replies stop, at lengths that differ
    from prompt to prompt (measured: 7, 6, 7, 9 and 8 tokens for the 5 eval prompts)."""
    root = tmp_path_factory.mktemp("half_taught")
    values = run_config(model_dir, root, max_steps=24, eval_steps=None, eval_generate_samples=0, eval_data=None)
    values["train_data"] = write_jsonl(root / "train.jsonl", varied_chats(10))
    return train(make_config(values)).final_dir


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_score_what_one_does(half_taught_dir, tmp_path, engine):
    # 5 prompts in batches of 2: process 0 answers batches 0 and 2, process 1 batch 1 and, under
    # FSDP, a one-prompt stand-in. Replies stop at different lengths, so the processes run different
    # numbers of decoding steps (asserted below): under FSDP the one done first must go on running
    # forwards while the other decodes. Gathered, the scores and replies are those of one process.
    import yaml

    # A learning rate this small keeps the weights of runs that split the steps differently (equal
    # within 1e-5 at 3e-3) far from any greedy tie, so the replies compare exactly.
    values = run_config(
        half_taught_dir,
        tmp_path,
        fsdp=engine == "fsdp",
        per_device_train_batch_size=1,
        learning_rate=1e-6,
        eval_generate_max_new_tokens=12,
        eval_generate_metrics=["exact_match", "contains"],
    )
    values["eval_data"] = write_jsonl(tmp_path / "eval.jsonl", varied_chats(5, offset=1))
    one = {**values, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 2, "fsdp": False}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**values, "output_dir": str(tmp_path / "two")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert main(["train", str(tmp_path / "one.yaml")]) == 0
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sftlab.cli", "train", str(tmp_path / "two.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pairs = {
        name: [json.loads(line) for line in open(tmp_path / name / "generations.jsonl")] for name in ("one", "two")
    }
    assert pairs["two"] == pairs["one"]
    assert generation_records(tmp_path / "two") == generation_records(tmp_path / "one")
    assert {p["stopped"] for p in pairs["one"]} == {True}

    def steps(rows):  # decoding steps of a batch: its longest reply and the stop token after it
        return max(min(p["new_tokens"] + p["stopped"], 12) for p in rows)

    final = [p for p in pairs["one"] if p["step"] == 4]  # records 0-4, all of the same prompt length
    process_0 = steps(final[0:2]) + steps(final[4:5])
    process_1 = steps(final[2:4]) + steps(final[0:1])  # the stand-in answers prompt 0 alone
    assert process_0 != process_1


# --- preference runs: the eval pairs' prompts ------------------------------------------------------


def test_pair_prompts_are_the_pairs_p_and_the_chosen_completions_text():
    from sftlab.data.preference import prepare_pairs, prepare_unpaired
    from sftlab.data.prompts import pair_prompts
    from tiny import ids

    tokenizer = char_tokenizer(CHATML)
    eos, im_end = special_id("</s>"), special_id("<|im_end|>")
    records = [
        {
            "prompt": [{"role": "user", "content": "Q1"}],
            "chosen": [{"role": "assistant", "content": " A1 "}],
            "rejected": [{"role": "assistant", "content": "B"}],
        },
        {
            "prompt": [{"role": "user", "content": "Q2"}],
            "chosen": [{"role": "assistant", "content": "A2" * 9}],
            "rejected": [{"role": "assistant", "content": "B"}],
        },
        {
            "prompt": [{"role": "user", "content": "Q3"}],
            "chosen": [{"role": "assistant", "content": "A3"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        },
    ]
    # max_length 30: record 1's chosen (18 characters) is cut, so it has no end marker.
    pairs = prepare_pairs(records, tokenizer, TargetSettings(max_length=30), use_cache=False)
    assert pairs.stats["truncated_completion"] == 1
    prompts = pair_prompts(pairs, tokenizer, TargetSettings(max_length=30), limit=5)

    def served(q):
        return (
            [special_id("<|im_start|>")]
            + ids(f"user\n{q}")
            + [im_end]
            + ids("\n")
            + [special_id("<|im_start|>")]
            + ids("assistant\n")
        )

    # The reference: C's tokens by hand, decoded as a generated reply is (special tokens skipped,
    # the ends stripped; this tokenizer's decoder puts a space between characters).
    reply = lambda text: tokenizer.decode(ids(text) + [im_end], skip_special_tokens=True).strip()  # noqa: E731
    assert reply(" A1 ") == "A 1"
    assert [(p.record_index, p.input_ids, p.reference) for p in prompts.prompts] == [
        (0, served("Q1"), reply(" A1 ")),
        (2, served("Q3"), reply("A3")),
    ]
    assert (prompts.records_read, prompts.usable, dict(prompts.unusable)) == (
        3,
        2,
        {"chosen completion cut by max_length": 1},
    )
    assert eos in prompts.stop_token_ids and im_end in prompts.stop_token_ids
    assert [p.input_ids for p in pair_prompts(pairs, tokenizer, limit=1).prompts] == [served("Q1")]
    unpaired = [{"prompt": f"q{i}", "completion": f" c{i}", "label": i != 1} for i in range(3)]
    kto = prepare_unpaired(unpaired, char_tokenizer(), use_cache=False)
    found = pair_prompts(kto, char_tokenizer(), limit=5)
    decoded = lambda text: char_tokenizer().decode(ids(text) + [eos], skip_special_tokens=True).strip()  # noqa: E731
    assert [(p.input_ids, p.reference) for p in found.prompts] == [
        (ids("q0"), decoded(" c0")),
        (ids("q2"), decoded(" c2")),
    ]
    assert dict(found.unusable) == {"undesirable completion (kto)": 1}


def test_a_dpo_run_scores_generations_from_its_eval_pairs_against_the_chosen_completions(model_dir, tmp_path):
    # SGD with lr 0 leaves the weights as saved: the model answers as before training. Two of four
    # chosen completions are its own replies (through `sftlab generate`'s path), so exact match is 0.5
    # at every evaluation; the prompts are the pairs' P, the references their chosen completions.
    users = ["n1", "n2", "n3", "n4"]
    replies = own_replies(model_dir, users, max_new_tokens=6)
    assert all(r.strip() for r in replies)

    def pair(user, chosen):
        return {
            "prompt": [{"role": "system", "content": "json only"}, {"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": "zz"}],
        }

    evals = [pair(u, c) for u, c in zip(users, replies[:2] + ["x", "y"])]
    train_a = write_jsonl(tmp_path / "a.jsonl", [pair(f"n{i}", f'{{"v": {i}}}') for i in range(4)])
    train_b = write_jsonl(tmp_path / "b.jsonl", [pair(f"m{i}", "ok") for i in range(4)])
    values = run_config(
        model_dir,
        tmp_path,
        objective="dpo",
        train_data=[{"path": train_a, "weight": 1}, {"path": train_b, "weight": 1}],
        eval_data=write_jsonl(tmp_path / "eval_pairs.jsonl", evals),
        eval_generate_max_new_tokens=6,
        eval_generate_samples=4,
        eval_generate_log_samples=4,
    )
    result = train(make_config(values), optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    records = [r for r in result.history if r.get("type") == "eval"]
    scores = [(r["step"], r.get("eval_generate_exact_match"), r.get("eval_generate_samples")) for r in records]
    assert scores == [(0, None, None), (2, 0.5, 4), (4, 0.5, 4)]  # step 0: the reference accuracy only
    assert "eval_reference_accuracy" in records[0]
    written = [json.loads(line) for line in open(os.path.join(values["output_dir"], "generations.jsonl"))]
    assert [(w["step"], w["record"], w["prediction"], w["reference"], w["exact_match"]) for w in written] == [
        (step, i, replies[i], (replies[:2] + ["x", "y"])[i], float(i < 2)) for step in (2, 4) for i in range(4)
    ]
