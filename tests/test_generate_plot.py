"""`sftlab generate` and `sftlab plot` on things the tests make: a tiny Llama taught one reply, a
hand-written metrics.jsonl. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml

from sftlab.data.chat import CHATML, ChatRenderer
from sftlab.cli import main
from sftlab.errors import DataError, SftlabError
from sftlab.generate import generate, generate_replies, load_for_generation, render_prompts
from sftlab.plot import PlotError, plot_metrics, read_metrics
from tiny import char_tokenizer
from tiny import fused_tokenizer as _tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYSTEM = "be brief"
# Two prompts, two replies: greedy decoding of the taught model must give exactly these back.
TAUGHT = {"hi": "hello", "ok?": "ok!"}


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def taught_dir(tmp_path_factory):
    """A tiny Llama overfitted on two ChatML conversations, saved like `sftlab train` saves a model:
    the tokenizer has no chat template of its own, sftlab_config.yaml says `chat_template: chatml`,
    and use_cache is off in its config (as training leaves it)."""
    folder = str(tmp_path_factory.mktemp("taught"))
    tokenizer = _tokenizer()
    model = _tiny_llama(len(tokenizer))
    renderer = ChatRenderer(tokenizer, CHATML)
    rows = []
    for prompt, reply in TAUGHT.items():
        head = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        context = tokenizer(renderer.render(head, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        answer = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((context, answer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = 0.0
        for context, answer in rows:
            ids = torch.tensor([context + answer])
            labels = torch.tensor([[-100] * len(context) + answer])
            loss = loss + model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss.detach()) < 0.05, "the tiny model did not learn its two replies"
    model.config.use_cache = False
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "sftlab_config.yaml"), "w") as handle:
        yaml.safe_dump({"chat_template": "chatml"}, handle)
    return folder


# --- generate ---------------------------------------------------------------------------------


def test_generate_returns_the_taught_reply_and_stops_at_end_of_turn(taught_dir):
    # The reply ends with <|im_end|>, which is not the tokenizer's EOS (</s>): generation must stop
    # there, and the marker must not be part of the text.
    assert generate(taught_dir, "hi", max_new_tokens=20, system=SYSTEM) == "hello"
    assert generate(taught_dir, "ok?", max_new_tokens=20, system=SYSTEM) == "ok!"


def test_batched_replies_equal_one_at_a_time(taught_dir):
    # Left padding must not change what a prompt gets: "hi" is padded to the length of "ok?".
    model, tokenizer = load_for_generation(taught_dir)
    prompts = ["hi", "ok?", "hi"]
    together = generate_replies(model, tokenizer, prompts, max_new_tokens=20, system=SYSTEM, template=CHATML, batch_size=3)
    alone = [generate_replies(model, tokenizer, [p], max_new_tokens=20, system=SYSTEM, template=CHATML)[0] for p in prompts]
    assert together == alone == ["hello", "ok!", "hello"]


def test_max_new_tokens_bounds_the_reply(taught_dir):
    # "hello" is two tokens of the char tokenizer: the merge "hell", then "o".
    assert generate(taught_dir, "hi", max_new_tokens=1, system=SYSTEM) == "hell"


def test_prompt_is_rendered_with_the_system_message_and_generation_prompt():
    tokenizer = char_tokenizer()
    assert render_prompts(tokenizer, CHATML, ["hi"], system="sys") == [
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert render_prompts(tokenizer, CHATML, ["hi"]) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    # template arguments a run was trained with shape the served prompt too
    thinking_off = "{{ messages[0].content }}{% if add_generation_prompt and not enable_thinking %}<think></think>{% endif %}"
    assert render_prompts(tokenizer, thinking_off, ["hi"], template_kwargs={"enable_thinking": False}) == ["hi<think></think>"]
    assert render_prompts(tokenizer, thinking_off, ["hi"], template_kwargs={"enable_thinking": True}) == ["hi"]


def test_lora_adapter_folder_loads_its_base_model(taught_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model, _ = load_for_generation(taught_dir)
    # A fresh adapter (B = 0) leaves the model's function unchanged, so the taught reply survives.
    adapter = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    adapter.save_pretrained(str(tmp_path))
    _tokenizer(chat_template=CHATML).save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "adapter_config.json"))["base_model_name_or_path"] == taught_dir
    assert generate(str(tmp_path), "hi", max_new_tokens=20, system=SYSTEM) == "hello"


def test_lora_adapter_whose_base_folder_is_gone_falls_back_to_the_training_config(taught_dir, tmp_path):
    # A base converted from a GGUF lives in a cache that may be cleared; sftlab_config.yaml names the source.
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model, _ = load_for_generation(taught_dir)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(str(tmp_path))
    _tokenizer(chat_template=CHATML).save_pretrained(str(tmp_path))
    adapter_config = json.load(open(tmp_path / "adapter_config.json"))
    adapter_config["base_model_name_or_path"] = str(tmp_path / "cleared-cache")
    json.dump(adapter_config, open(tmp_path / "adapter_config.json", "w"))
    with open(tmp_path / "sftlab_config.yaml", "w") as handle:
        yaml.safe_dump({"model": taught_dir}, handle)
    assert generate(str(tmp_path), "ok?", max_new_tokens=20, system=SYSTEM) == "ok!"


def test_folder_without_any_chat_template_is_a_clear_error(tmp_path):
    tokenizer = _tokenizer()
    _tiny_llama(len(tokenizer)).save_pretrained(str(tmp_path), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(DataError, match="no chat template"):
        generate(str(tmp_path), "hi", max_new_tokens=2)


def test_cli_generate_prints_the_reply(taught_dir, capsys):
    assert main(["generate", taught_dir, "hi", "--system", SYSTEM, "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == "hello\n"


def test_cli_generate_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# --- plot -------------------------------------------------------------------------------------


def _write_metrics(folder, lines: list) -> None:
    with open(os.path.join(folder, "metrics.jsonl"), "w") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _train(step, loss, lr=1e-4):
    return {"type": "train", "step": step, "loss": loss, "learning_rate": lr}


def test_read_metrics_keeps_the_last_record_of_a_step_and_skips_a_cut_line(tmp_path):
    # A resumed run appends to the log and logs its first steps again; a killed run may leave half a line.
    _write_metrics(tmp_path, [
        {"type": "data", "split": "train", "records": 3},
        _train(1, 2.0), _train(2, 1.5),
        {"type": "eval", "step": 2, "eval_loss": 1.7},
        _train(2, 1.4), _train(3, 1.0),
        '{"type": "train", "step": 4, "lo',
    ])
    train, evals = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in train] == [(1, 2.0), (2, 1.4), (3, 1.0)]
    assert [(r["step"], r["eval_loss"]) for r in evals] == [(2, 1.7)]


def test_plot_writes_a_png_next_to_the_metrics(tmp_path):
    _write_metrics(tmp_path, [_train(s, 2.0 / s, 1e-4 * s / 10) for s in range(1, 11)]
                   + [{"type": "eval", "step": 5, "eval_loss": 0.5}, {"type": "eval", "step": 10, "eval_loss": 0.3}])
    path = plot_metrics(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "loss.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC


def test_plot_to_a_chosen_path_and_without_eval_records(tmp_path):
    _write_metrics(tmp_path, [_train(1, 2.0), _train(2, 1.0)])
    out = str(tmp_path / "plots" / "curve.png")
    assert plot_metrics(str(tmp_path), out) == out
    assert open(out, "rb").read(8) == PNG_MAGIC


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(PlotError, match="no metrics.jsonl"):
        plot_metrics(str(tmp_path))
    assert issubclass(PlotError, SftlabError)


def test_plot_of_a_log_without_steps_is_a_clear_error(tmp_path):
    _write_metrics(tmp_path, [{"type": "data", "split": "train", "records": 3}])
    with pytest.raises(PlotError, match="no train or eval records"):
        plot_metrics(str(tmp_path))


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    _write_metrics(tmp_path, [_train(1, 2.0)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(PlotError, match=r"sftlab\[plot\]"):
        plot_metrics(str(tmp_path))


def test_cli_plot_prints_the_png_path(tmp_path, capsys):
    _write_metrics(tmp_path, [_train(1, 2.0), _train(2, 1.0)])
    assert main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(str(tmp_path), "loss.png")
    assert main(["plot", str(tmp_path / "missing")]) == 2
