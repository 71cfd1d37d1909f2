"""What sftlab decides from the model itself at the start of a run: whether packed rows keep
their examples apart (else padded rows), the router load-balancing loss of mixture-of-experts
models (added as the model's own loss adds it), and the attention kernel the model supports."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from sftlab import SFTConfig, train
from sftlab.data.container import IGNORE
from sftlab.errors import ConfigError
from sftlab.models import choose_attention, load_model
from sftlab.training.architecture import packing_isolation
from sftlab.training.loss import SupervisedLoss
from sftlab.training.objectives import SupervisedObjective
from sftlab.training.step import train_step
from sftlab.training.distributed import Processes
from tiny import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(name: str, **overrides):
    configs = {
        "llama": lambda: transformers.LlamaConfig(intermediate_size=128, **SIZES),
        # Granite 4: one Mamba2 layer and one attention layer; Mamba heads x head dim = expand x hidden.
        "granite4": lambda: transformers.GraniteMoeHybridConfig(
            intermediate_size=128, layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_head=16, mamba_expand=2,
            mamba_n_groups=1, mamba_d_state=16, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
            **SIZES),
        "lfm2": lambda: transformers.Lfm2Config(intermediate_size=128, layer_types=["conv", "full_attention"], **SIZES),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=32, num_experts=4,
                                                         num_experts_per_tok=2, head_dim=16, **SIZES),
        "gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                                     head_dim=16, layer_types=["sliding_attention", "full_attention"],
                                                     sliding_window=8, **SIZES),
    }
    config = configs[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.config.use_cache = False
    return model


# --- packing isolation -------------------------------------------------------------------------


def test_the_probe_finds_attention_only_models_isolated():
    check = packing_isolation(build("llama"))
    assert check.isolated and check.max_difference < 1e-5


@pytest.mark.parametrize("name, kind", [("granite4", "linear_attention"), ("lfm2", "conv")])
def test_the_probe_finds_state_carrying_layers_leak(name, kind):
    check = packing_isolation(build(name))
    assert not check.isolated and check.max_difference > 1e-4
    assert f"its {kind} layers carry state from one example into the next" in check.why


def test_the_probe_compares_the_second_example_with_itself_alone():
    """By hand: a row of a's 9 ids then b's 7; b alone in a hybrid model gives other log-probs, and
    the same row with b's positions continuing a's (one example of 16) is not what the probe runs."""
    model = build("granite4")
    ids = list(range(1, 17))
    with torch.no_grad():
        b_alone = model(input_ids=torch.tensor([ids[9:]]), use_cache=False).logits.log_softmax(-1)
        row = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([list(range(9)) + list(range(7))]),
                    use_cache=False).logits.log_softmax(-1)
    expected = float((row[0, 9:] - b_alone[0]).abs().max())
    assert packing_isolation(model, ids).max_difference == pytest.approx(expected, rel=1e-6) and expected > 1e-4


def records(n=12):
    return [{"prompt": f"add {i} and 1", "completion": f" {i + 1}"} for i in range(n)]


def run(model, tmp_path, name, **overrides):
    config = SFTConfig(model="(object)", output_dir=str(tmp_path / name), max_length=32, per_device_train_batch_size=4,
                       max_steps=2, logging_steps=1, learning_rate=1e-3, shuffle=False, use_cache=False, **overrides)
    return train(config, model=model, tokenizer=char_tokenizer(), train_dataset=records())


def test_packing_falls_back_to_padded_rows_where_it_would_leak(tmp_path, capsys):
    tokenizer = char_tokenizer()
    model = build("lfm2", vocab_size=len(tokenizer))
    packed = run(copy.deepcopy(model), tmp_path, "packed", packing=True)
    out = capsys.readouterr().out
    assert "packing: off for this model, padded rows instead" in out and "conv layers" in out
    padded = run(copy.deepcopy(model), tmp_path, "padded")
    losses = [r["loss"] for r in packed.history if r.get("type") == "train"]
    assert losses == [r["loss"] for r in padded.history if r.get("type") == "train"] and len(losses) == 2


def test_packing_stays_on_where_examples_are_isolated(tmp_path, capsys):
    run(build("llama", vocab_size=len(char_tokenizer())), tmp_path, "llama", packing=True)
    assert "packing: checked, each example of a packed row sees only itself" in capsys.readouterr().out


# --- router load-balancing loss ----------------------------------------------------------------


def batch_of(model, lengths=(10, 6)):
    """Two padded rows; targets are the next ids (as sftlab's examples make them), -100 on padding."""
    torch.manual_seed(3)
    width = max(lengths)
    ids = torch.randint(3, 120, (len(lengths), width))
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    targets = torch.full_like(ids, IGNORE)
    for row, n in enumerate(lengths):
        targets[row, : n - 1] = ids[row, 1:n]
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}, labels


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_the_sparse_loss_adds_the_router_loss_as_the_model_does(name):
    model = build(name, output_router_logits=True, router_aux_loss_coef=0.02)
    batch, labels = batch_of(model)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False)
    assert own.aux_loss is not None  # the model's loss = CE mean + 0.02 x aux
    own_grads = torch.autograd.grad(own.loss, [p for p in model.parameters()], allow_unused=True)
    out = SupervisedLoss(model, "sparse")(**batch)
    assert float(out["aux_loss"]) == pytest.approx(0.02 * float(own.aux_loss), rel=1e-6)
    ours = out["loss_sum"] / out["count"] + out["aux_loss"]
    assert float(ours) == pytest.approx(float(own.loss), rel=1e-5)
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters()], allow_unused=True)
    for mine, theirs in zip(ours_grads, own_grads):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    dense = SupervisedLoss(model, "dense")(**batch)
    assert float(dense["aux_loss"]) == pytest.approx(float(out["aux_loss"]), rel=1e-6)


def test_the_router_loss_is_a_mean_over_the_steps_forwards():
    """Stated normalisation: loss = (CE sum over the step) / (supervised tokens of the step)
    + mean over the step's forward passes of coef x aux. Checked against that formula by autograd."""
    model = build("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.05)
    reference = copy.deepcopy(model)
    first, _ = batch_of(model, (10, 6))
    second, _ = batch_of(model, (4, 9))
    for b, n in ((first, (10, 6)), (second, (4, 9))):
        b["real_tokens"], b["record_index"] = sum(n), [0, 1]
    objective = SupervisedObjective(model, "sparse")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    import contextlib

    result = train_step(objective.module, objective, [first, second], processes=Processes(), optimizer=optimizer,
                        lr_scheduler=scheduler, parameters=list(model.parameters()), max_grad_norm=None,
                        autocast=contextlib.nullcontext())
    loss_module = SupervisedLoss(reference, "sparse")
    outs = [loss_module(**{k: v for k, v in b.items() if torch.is_tensor(v)}) for b in (first, second)]
    tokens = sum(o["count"] for o in outs)
    formula = sum(o["loss_sum"] for o in outs) / tokens + sum(o["aux_loss"] for o in outs) / 2
    formula.backward()
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= p.grad
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)
    assert result.sums["forwards"] == 2.0 and result.sums["aux_loss"] == pytest.approx(float(sum(o["aux_loss"] for o in outs)))


def test_router_aux_loss_coef_turns_the_router_loss_on_and_is_logged(tmp_path):
    tokenizer = char_tokenizer()
    result = run(build("qwen3_moe", vocab_size=len(tokenizer)), tmp_path, "moe", router_aux_loss_coef=0.01)
    logged = [r for r in result.history if r.get("type") == "train"]
    assert all(r["aux_loss"] > 0 for r in logged) and len(logged) == 2


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the model has no router load-balancing loss"):
        run(build("llama", vocab_size=len(char_tokenizer())), tmp_path, "dense", router_aux_loss_coef=0.01)


# --- attention kernel --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    folders = {}
    for name in ("llama", "gpt_oss"):
        folders[name] = str(root / name)
        build(name).save_pretrained(folders[name], safe_serialization=True)
    return folders


def test_auto_attention_is_sdpa_where_supported_else_eager(saved):
    assert choose_attention(saved["llama"])[0] == "sdpa"
    chosen, why = choose_attention(saved["gpt_oss"])
    assert chosen == "eager" and "GptOssForCausalLM supports eager" in why and "sdpa" not in why
    assert load_model(saved["gpt_oss"]).config._attn_implementation == "eager"


def test_an_unsupported_attention_is_an_error_naming_the_supported_ones(saved):
    with pytest.raises(ConfigError) as error:
        load_model(saved["gpt_oss"], attn_implementation="sdpa")
    message = str(error.value)
    assert "GptOssForCausalLM does not support attn_implementation 'sdpa'" in message and "one of eager, flex_attention" in message
    assert "corrupt" not in message
