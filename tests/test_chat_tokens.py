"""A base model becomes a chat model (add_chat_tokens): the template's markers are added as special
tokens with exact ids, the model gets rows for them at the mean of the existing rows, training moves
the rows it should (full: every row the data reaches; LoRA: only the new rows of the base embedding
and head, through PEFT's trainable tokens), every ChatML turn is trained through the new <|im_end|>,
and the saved model loads in transformers and stops there. Resume and two processes see the same
resized vocabulary.

The base tokenizer here is tiny.py's character BPE without its chat specials: four specials
(<pad> <s> </s> <unk> = 0..3), then the characters (id 4 + index in CHARS), then the merges, 105 ids in
all; so ChatML's markers are added as 105 and 106.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import sftlab.training.progress
from sftlab import SFTConfig, train
from sftlab.cli import EXIT_PREEMPTED, main
from sftlab.data.chat_tokens import add_chat_tokens, template_markers
from sftlab.data.examples import TargetSettings
from sftlab.data.prepare import prepare_examples
from sftlab.errors import DataError
from sftlab.training.setup import add_token_rows
from tiny import CHARS, MERGED, MERGES, SPECIALS
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BASE_SIZE = 4 + len(CHARS) + len(MERGED)  # 105
IM_START, IM_END = BASE_SIZE, BASE_SIZE + 1
EOS = 2  # </s>
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def base_tokenizer():
    """tiny.py's character BPE with only <pad> <s> </s> <unk>: a base model's tokenizer, no chat markers, no pad
    set, a decoder that joins tokens as they are (so replies decode to their text)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS[:4])}
    for piece in CHARS + MERGED:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS[:4])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def char(c: str) -> int:
    return 4 + CHARS.index(c)


def chars(text: str) -> list[int]:
    return [char(c) for c in text]


def chats(n: int = 8) -> list[dict]:
    """Conversations the tiny model can learn in a few dozen steps: "hi" -> "yes", "no?" -> "no"."""
    return [{"messages": [{"role": "user", "content": "hi" if i % 2 == 0 else "no?"},
                          {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]} for i in range(n)]


def save_base(folder: str, tie: bool = False) -> str:
    tokenizer = base_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=0, attn="sdpa", tie=tie)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny untied Llama with the base tokenizer, saved: the base model."""
    return save_base(str(tmp_path_factory.mktemp("base")))


def run_config(base_dir, output_dir, **fields) -> SFTConfig:
    values = dict(chat_template="chatml", add_chat_tokens=True, max_length=64, per_device_train_batch_size=4,
                  learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler_type="constant", logging_steps=1, seed=3,
                  max_steps=1, use_cache=False)
    return SFTConfig(model=base_dir, output_dir=str(output_dir), **{**values, **fields})


def resized_base(base_dir):
    """The base model as the run starts it: resized by add_token_rows for the ChatML markers."""
    from transformers import AutoModelForCausalLM

    tokenizer = base_tokenizer()
    added = add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=None)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    add_token_rows(model, added)
    return model


# --- the tokenizer -----------------------------------------------------------------------------------


def test_chatml_markers_are_added_with_exact_ids_and_roles():
    tokenizer = base_tokenizer()
    assert len(tokenizer) == BASE_SIZE and tokenizer.pad_token is None
    added = add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=["<tool>"])
    assert added.tokens == ["<|im_start|>", "<|im_end|>", "<tool>"] and added.ids == [105, 106, 107]
    assert added.vocab_size == len(tokenizer) == 108 and added.kept == []
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == IM_END
    assert tokenizer.pad_token == "</s>" and added.eos_ids == [IM_END, EOS]
    # One token each, never split, in running text.
    assert tokenizer("<|im_start|>hi<|im_end|>")["input_ids"] == [IM_START, *chars("hi"), IM_END]
    assert tokenizer.decode([char("h"), IM_END], skip_special_tokens=True) == "h"
    assert "chat tokens added: <|im_start|> = 105, <|im_end|> = 106, <tool> = 107 (vocabulary 108)" in added.lines()
    # Again on the same tokenizer (a resumed run, `sftlab prepare` then train): nothing new, the same ids.
    again = add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=["<tool>"])
    assert again.tokens == [] and again.kept == ["<|im_start|>", "<|im_end|>", "<tool>"] and len(tokenizer) == 108


def test_markers_are_the_templates_bar_literals_and_a_folders_special_tokens(tmp_path):
    llama3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role']"
              " + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{{ '<|' + 'x' + '|>' }}")
    assert template_markers(llama3) == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    # A Gemma-style template in another tokenizer's folder: its markers are that tokenizer's special tokens.
    from tiny import char_tokenizer

    gemma = ("{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}")
    char_tokenizer(chat_template=gemma).save_pretrained(str(tmp_path / "gemma"))
    tokenizer = base_tokenizer()
    added = add_chat_tokens(tokenizer, chat_template=str(tmp_path / "gemma"), add_markers=True, special_tokens=None)
    assert added.tokens == ["<start_of_turn>", "<end_of_turn>"] and added.ids == [105, 106]
    assert tokenizer.eos_token == "<end_of_turn>" and tokenizer.chat_template == gemma


def test_without_the_option_the_refusal_names_it(base_dir, tmp_path):
    with pytest.raises(DataError) as refused:
        train(run_config(base_dir, tmp_path / "run", add_chat_tokens=False), train_dataset=chats())
    message = str(refused.value)
    assert "does not end with an end-of-turn token" in message and "set add_chat_tokens: true" in message


def test_each_chatml_turn_is_trained_through_the_new_im_end():
    tokenizer = base_tokenizer()
    add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=None)
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                           {"role": "user", "content": "no?"}, {"role": "assistant", "content": "no"}]}
    examples = prepare_examples([record], tokenizer, TargetSettings(chat_template="chatml"), use_cache=False)
    input_ids, targets = (list(map(int, a)) for a in examples[0])
    turn = lambda role, text: [IM_START, *chars(role + "\n"), *chars(text), IM_END, char("\n")]  # noqa: E731
    assert input_ids == turn("user", "hi") + turn("assistant", "yes") + turn("user", "no?") + turn("assistant", "no")
    # Trained: each reply and its <|im_end|> (targets shifted by one), nothing else.
    expected = [-100] * len(input_ids)
    opening = [IM_START, *chars("assistant\n")]
    first = len(turn("user", "hi")) + len(opening)
    second = len(turn("user", "hi") + turn("assistant", "yes") + turn("user", "no?")) + len(opening)
    for start in (first, second):
        reply_end = input_ids.index(IM_END, start)
        for t in range(start - 1, reply_end):
            expected[t] = input_ids[t + 1]
    assert targets == expected
    assert [t for t in targets if t != -100] == [*chars("yes"), IM_END, *chars("no"), IM_END]


# --- the model's rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_are_the_mean_of_the_old_rows(tie):
    tokenizer = base_tokenizer()
    added = add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=None)
    model = tiny_model("llama", vocab_size=BASE_SIZE, seed=1, tie=tie)
    before = {"embed": model.get_input_embeddings().weight.detach().clone(),
              "head": model.get_output_embeddings().weight.detach().clone()}
    add_token_rows(model, added)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape == head.shape == (107, 64) and model.config.vocab_size == 107
    assert (head is embed) == tie
    for name, weight in (("embed", embed), ("head", head)):
        assert torch.equal(weight[:BASE_SIZE], before[name])
        mean = before[name].double().mean(0).float()
        assert torch.equal(weight[IM_START], mean) and torch.equal(weight[IM_END], mean)
    assert model.config.eos_token_id == IM_END and model.generation_config.eos_token_id == [IM_END, EOS]


def test_a_model_with_spare_rows_uses_them_without_growing():
    tokenizer = base_tokenizer()
    added = add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=None)
    model = tiny_model("llama", vocab_size=128, seed=1)  # rows 105..127 belong to no token of the base tokenizer
    before = model.get_input_embeddings().weight.detach().clone()
    add_token_rows(model, added)
    embed = model.get_input_embeddings().weight
    assert embed.shape == (128, 64) and torch.equal(embed[107:], before[107:])
    assert torch.equal(embed[IM_START], before[:BASE_SIZE].double().mean(0).float())


def test_full_fine_tuning_trains_the_new_rows_and_the_old_ones_the_data_reaches(base_dir, tmp_path):
    records = chats()
    train(run_config(base_dir, tmp_path / "full", per_device_train_batch_size=8), train_dataset=records)
    start = resized_base(base_dir).state_dict()
    final = load_file(os.path.join(tmp_path / "full", "final", "model.safetensors"))
    embed, head = final["model.embed_tokens.weight"], final["lm_head.weight"]
    assert embed.shape == (107, 64)
    moved = (embed - start["model.embed_tokens.weight"]).abs().amax(1) > 0
    tokenizer = base_tokenizer()
    add_chat_tokens(tokenizer, chat_template="chatml", add_markers=True, special_tokens=None)
    read = {i for r in records
            for i in tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]}
    # AdamW (no weight decay) moves exactly the embedding rows with a gradient: the tokens the one step read.
    assert {IM_START, IM_END} <= read and set(torch.nonzero(moved).flatten().tolist()) == read
    assert bool(((head - start["lm_head.weight"]).abs().amax(1) > 0).all())  # softmax reaches every head row


def test_lora_trains_only_the_new_rows_of_the_base_embedding_and_head(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(run_config(base_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0),
          train_dataset=chats())
    # The adapter holds the new rows as trainable tokens (2 rows per layer), not whole embedding matrices.
    saved = load_file(os.path.join(tmp_path / "lora", "final", "adapter_model.safetensors"))
    tokens = {key: value.shape for key, value in saved.items() if "trainable_tokens" in key}
    assert sorted(tokens.values()) == [(2, 64), (2, 64)] and {"embed_tokens" in k for k in tokens} == {True, False}
    assert not any(key.endswith(("embed_tokens.weight", "lm_head.weight")) for key in saved)
    # As documented: the original base, resized to the tokenizer saved in final/, then the adapter.
    final = os.path.join(tmp_path / "lora", "final")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(base_tokenizer()) + 2, mean_resizing=False)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    start = resized_base(base_dir)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        ours, theirs = getattr(merged, get)().weight, getattr(start, get)().weight
        assert torch.equal(ours[:BASE_SIZE], theirs[:BASE_SIZE]), get  # the old rows: not trained
        assert bool(((ours[BASE_SIZE:] - theirs[BASE_SIZE:]).abs().amax(1) > 0).all()), get  # both new rows moved


def test_lora_with_tied_embeddings_trains_the_new_rows_once(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = save_base(str(tmp_path / "tied"), tie=True)
    train(run_config(base_dir, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0),
          train_dataset=chats())
    saved = load_file(os.path.join(tmp_path / "lora", "final", "adapter_model.safetensors"))
    tokens = {key: value.shape for key, value in saved.items() if "trainable_tokens" in key}
    # One tensor, the embedding's: the tied head follows it.
    assert list(tokens.values()) == [(2, 64)] and "embed_tokens" in next(iter(tokens))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(BASE_SIZE + 2, mean_resizing=False)
    merged = PeftModel.from_pretrained(base, os.path.join(tmp_path / "lora", "final")).merge_and_unload()
    start = resized_base(base_dir).get_input_embeddings().weight
    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert torch.equal(embed, head)
    assert torch.equal(embed[:BASE_SIZE], start[:BASE_SIZE])
    assert bool(((embed[BASE_SIZE:] - start[BASE_SIZE:]).abs().amax(1) > 0).all())


def test_inspect_shows_the_added_tokens_and_their_ids(base_dir, tmp_path, capsys):
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(chats(2)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(model=base_dir, train_data=str(data), chat_template="chatml",
                                          add_chat_tokens=True, use_cache=False)))
    assert main(["inspect", str(config), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "chat tokens added: <|im_start|> = 105, <|im_end|> = 106 (vocabulary 107)" in shown
    assert "eos_token: <|im_end|>" in shown
    assert main(["inspect", str(config), "--json", "-n", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["added_tokens"] == {"<|im_start|>": IM_START, "<|im_end|>": IM_END}
    assert [t["id"] for t in shown["examples"][0]["tokens"]][:1] == [IM_START]


def test_the_saved_model_loads_in_transformers_and_generation_stops_at_im_end(base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.generate import generate_batch, load_for_generation

    output = tmp_path / "chat"
    train(run_config(base_dir, output, max_steps=40, learning_rate=3e-3, seed=0), train_dataset=chats())
    final = str(output / "final")
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert len(tokenizer) == 107 and tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert model.get_input_embeddings().weight.shape[0] == 107
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert out == [*chars("yes"), IM_END]  # transformers stops on the saved eos
    model, tokenizer = load_for_generation(final)
    [reply] = generate_batch(model, [prompt["input_ids"][0].tolist()], stop_ids=[IM_END], pad_id=EOS, max_new_tokens=10)
    assert reply.stopped and reply.token_ids == chars("yes")
    capsys.readouterr()
    assert main(["generate", final, "no?", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == "no"  # stopped at <|im_end|>, not run on to 10 tokens


# --- resume and processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.json"
    path.write_text(json.dumps(chats(16)))
    return str(path)


@pytest.fixture(scope="module")
def chat_config(base_dir, chat_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "config.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=base_dir, train_data=chat_file, chat_template="chatml", add_chat_tokens=True, max_length=64,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=1, max_steps=4,
        save_steps=2, logging_steps=1, seed=7, use_cache=False)))
    return str(path)


def cli_args(config, output_dir, *extra):
    return ["train", config, f"output_dir={output_dir}", *extra]


@pytest.mark.parametrize("lora", [False, True])
def test_a_preempted_run_resumes_exactly_after_the_resize(chat_config, tmp_path, monkeypatch, lora):
    extra = ["use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0"] if lora else []
    weights_file = "adapter_model.safetensors" if lora else "model.safetensors"
    clean = str(tmp_path / "clean")
    assert main(cli_args(chat_config, clean, *extra)) == 0
    stopped = str(tmp_path / "stopped")
    real_advance = sftlab.training.progress.Reporter.advance

    def advance(self, done):
        real_advance(self, done)
        if done == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    with monkeypatch.context() as patch:
        patch.setattr(sftlab.training.progress.Reporter, "advance", advance)
        assert main(cli_args(chat_config, stopped, *extra)) == EXIT_PREEMPTED
    assert main(cli_args(chat_config, stopped, *extra, "resume_from_checkpoint=auto")) == 0
    ours = load_file(os.path.join(stopped, "final", weights_file))
    theirs = load_file(os.path.join(clean, "final", weights_file))
    assert ours.keys() == theirs.keys()
    assert any("embed_tokens" in key for key in theirs)  # the new rows (LoRA: the trainable tokens) are in it
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,lora", [(False, False), (True, False), (True, True)])
def test_two_processes_equal_one_after_the_resize(base_dir, chat_file, tmp_path, fsdp, lora):
    """2 processes x batch 2 == 1 process x batch 4, with the sparse head on the resized vocabulary
    (LoRA: the adapter and the trainable tokens, under FSDP2)."""
    script = os.path.join(os.path.dirname(__file__), "run_training.py")
    pairs = ["chat_template=chatml", "add_chat_tokens=true", "max_length=64", "max_steps=2", "learning_rate=1e-2",
             "lr_scheduler_type=constant", "warmup_ratio=0", "logging_steps=1", "seed=5", "loss_implementation=sparse",
             f"fsdp={str(fsdp).lower()}"]
    pairs += ["use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0"] if lora else []
    weights_file = "adapter_model.safetensors" if lora else "model.safetensors"
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, script, base_dir, chat_file, str(one), *pairs,
                           "per_device_train_batch_size=4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = tmp_path / "two"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", script, base_dir, chat_file, str(two),
                           *pairs, "per_device_train_batch_size=2"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours = load_file(os.path.join(two, "final", weights_file))
    theirs = load_file(os.path.join(one, "final", weights_file))
    assert ours.keys() == theirs.keys()
    for key in theirs:  # as tests/test_sharding.py: AdamW turns summation-order ulps of tiny gradients into 1e-5s
        assert float((ours[key] - theirs[key]).norm() / theirs[key].norm()) < 1e-5, key
    start = resized_base(base_dir).state_dict()
    if lora:  # the new rows, as trainable tokens of the embedding and the untied head, trained
        tokens = [key for key in theirs if "trainable_tokens_delta" in key]
        assert len(tokens) == 2
        for key in tokens:
            layer = "model.embed_tokens.weight" if "embed_tokens" in key else "lm_head.weight"
            assert bool((theirs[key] != start[layer][BASE_SIZE:]).all())
    else:
        assert ours["model.embed_tokens.weight"].shape == (107, 64)
        embed = "model.embed_tokens.weight"
        assert bool((theirs[embed][BASE_SIZE:] != start[embed][BASE_SIZE:]).all())


# --- the config ------------------------------------------------------------------------------------------


def test_the_config_checks_the_new_settings():
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="special_tokens.*without surrounding spaces"):
        load_config(None, {"model": "m", "special_tokens": ["<a>", " <b>"]})
    with pytest.raises(ConfigError, match="add_chat_tokens is not available with load_in_4bit"):
        load_config(None, {"model": "m", "add_chat_tokens": True, "use_peft": True, "load_in_4bit": True})
    assert load_config(None, {"model": "m", "special_tokens": ["<a>", "<a>"]}).special_tokens == ["<a>"]
    from sftlab.training.identity import RESUME_SETTINGS

    assert {"add_chat_tokens", "special_tokens"} <= set(RESUME_SETTINGS)
