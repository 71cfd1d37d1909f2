"""Sequence parallelism (training/sequence.py): rows split over a group of processes train like one process.

Unit tests (one process): a batch's shards and row positions by hand; example segments; attention per
example segment equal to the model's own attention on packed and padded rows (sdpa, eager, sliding
window, soft-capped logits); the refusals.
torchrun tests (gloo, CPU): `sftlab train` with sequence_parallel_size 2 on 2 processes gives the losses and
weights of one process (padded and packed rows, full fine-tuning and LoRA); 2 x 2 on 4 processes with FSDP2
the same; a checkpoint resumes across a change of sequence_parallel_size; an example split between two
processes gets the per-token log-probs it gets alone (tests/sequence_checks.py).
"Within 1e-5" compares runs that add the same numbers in another order (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from architectures import ARCHITECTURES, KINDS
from sftlab.config import make_config
from sftlab.errors import ConfigError, TrainingError
from sftlab.training import sequence
from sftlab.training.attention import example_bounds
from test_sharding import (
    addition_run,
    assert_close_weights,
    final,
    losses,
    resume_from,
    succeeded,
    torchrun_checks,
)
from tiny_models import tiny_model

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
CHECKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequence_checks.py")
MAX_STEPS = 4

# --- one process --------------------------------------------------------------------------------


def test_a_padded_batch_is_split_into_equal_shards_with_the_row_positions_whole():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]]),
        "targets": torch.tensor([[-100, 7, 8, -100, -100, -100], [10, 11, 12, 13, 14, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "record_index": [3, 4],
        "real_tokens": 10,
    }
    first, second = (sequence.shard_batch(batch, rank, 2) for rank in (0, 1))
    assert first["input_ids"].tolist() == [[5, 6, 7], [9, 10, 11]]
    assert second["input_ids"].tolist() == [[8, 0, 0], [12, 13, 14]]
    assert second["targets"].tolist() == [[-100, -100, -100], [13, 14, -100]]
    # The real tokens count from 0; row 0's two pads are a run of their own (an example of pads).
    whole = [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert first["row_position_ids"].tolist() == second["row_position_ids"].tolist() == whole
    assert first["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert second["position_ids"].tolist() == [[3, 0, 1], [3, 4, 5]]
    assert "attention_mask" not in first  # attention knows the pads from the row's positions
    assert (first["real_tokens"], second["real_tokens"]) == (6, 4)  # 3 + 3, then 1 + 3
    assert (first["micro_batch_share"], second["micro_batch_share"]) == (1.0, 0.0)
    assert first["empty"] is second["empty"] is False
    with pytest.raises(ValueError, match="6 tokens does not split into 4"):
        sequence.shard_batch(batch, 0, 4)


def test_a_packed_batch_keeps_its_positions_and_counts_only_real_tokens():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 0, 0, 0]]),
        "targets": torch.full((1, 8), -100),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]),  # examples of 3 and 2 tokens, 3 pads
        "record_index": [0, 1],
        "real_tokens": 5,
        "row_lengths": [5],
    }
    shards = [sequence.shard_batch(batch, rank, 4) for rank in range(4)]
    assert [s["position_ids"].tolist() for s in shards] == [[[0, 1]], [[2, 0]], [[1, 0]], [[1, 2]]]
    assert [s["real_tokens"] for s in shards] == [2, 2, 1, 0]
    assert all(s["empty"] for s in shards)  # nothing is supervised anywhere in the batch
    assert example_bounds(batch["position_ids"]) == [[(0, 3), (3, 5), (5, 8)]]


CASES = {
    "llama sdpa": ("llama", "sdpa", {}),
    "llama eager": ("llama", "eager", {}),
    "qwen2 sliding window 5": ("qwen2", "sdpa", dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    "gemma2 soft-capped, sliding window 5": ("gemma2", "eager", dict(sliding_window=5)),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_per_segment_equals_each_example_alone(case):
    arch, attn, overrides = CASES[case]
    model = tiny_model(arch, attn=attn, **overrides)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 24), generator=generator)
    # Row 0: examples of 10 and 14 tokens; row 1: 7, 9 and 8 (longer than the window of 5).
    positions = torch.stack(
        [
            torch.cat([torch.arange(10), torch.arange(14)]),
            torch.cat([torch.arange(7), torch.arange(9), torch.arange(8)]),
        ]
    )
    alone = torch.zeros(2, 24, 128)
    with torch.no_grad():
        whole = model(input_ids=ids).logits  # each row one sequence: the examples see each other
        for row, segments in enumerate(example_bounds(positions)):
            for start, end in segments:
                alone[row, start:end] = model(input_ids=ids[row : row + 1, start:end]).logits[0]
        sequence.SequenceParallel(model, 1, None)  # one process: no all-to-all, the segments alone
        assert model.config._attn_implementation == sequence.NAME
        packed = model(input_ids=ids, position_ids=positions, row_position_ids=positions).logits
    assert float((packed - alone).abs().max()) < 1e-5
    assert float((whole - alone).abs().max()) > 1e-3  # not vacuous: without the segments the examples mix


def test_rows_of_one_example_each_take_one_call_and_equal_the_models_attention():
    model = tiny_model("llama", attn="sdpa")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        sequence.SequenceParallel(model, 1, None)
        positions = torch.arange(12)[None].expand(2, 12)
        got = model(input_ids=ids, position_ids=positions, row_position_ids=positions).logits
    assert float((got - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if KINDS[n] != "hybrid"])
def test_every_attention_family_gets_each_packed_example_alone(name):
    """Each family passes the row's positions (and its sliding window) through to the attention function;
    the ones that cannot be computed so are refused (gpt-oss's sinks, Llama 4's chunked layers)."""
    model = ARCHITECTURES[name]()
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(11), torch.arange(19)])[None]  # longer than the sliding windows of 8
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, :11]).logits, model(input_ids=ids[:, 11:]).logits], dim=1)
        if name == "llama4":
            with pytest.raises(ConfigError, match="chunked_attention layers"):
                sequence.SequenceParallel(model, 1, None)
            return
        sequence.SequenceParallel(model, 1, None)
        if name == "gpt_oss":
            with pytest.raises(TrainingError, match="attention sinks"):
                model(input_ids=ids, position_ids=positions, row_position_ids=positions)
            return
        packed = model(input_ids=ids, position_ids=positions, row_position_ids=positions).logits
    assert float((packed - alone).abs().max()) < 1e-5


def test_the_model_without_row_positions_is_an_error_not_a_silent_full_attention():
    model = tiny_model("llama", attn="sdpa")
    sequence.SequenceParallel(model, 1, None)
    with pytest.raises(TrainingError, match="without the row's positions"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_generation_gets_the_models_own_attention_back():
    model = tiny_model("llama", attn="sdpa")
    sp = sequence.SequenceParallel(model, 1, None)
    with sp.model_attention():
        assert model.config._attn_implementation == "sdpa"
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert model.config._attn_implementation == sequence.NAME


def test_heads_split_as_evenly_as_they_go_and_fewer_heads_than_processes_are_refused():
    assert sequence.head_counts(9, 2) == [5, 4]
    assert sequence.head_counts(4, 2) == [2, 2]
    assert sequence.head_counts(10, 4) == [3, 3, 2, 2]
    model = tiny_model("llama", attn="sdpa", num_attention_heads=4)
    with pytest.raises(ConfigError, match="sequence_parallel_size 8 is more than the model's 4 attention heads"):
        sequence.SequenceParallel(model, 8, None)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"objective": "dpo"}, "objective"),
        ({"neftune_noise_alpha": 5.0}, "neftune_noise_alpha"),
        ({"router_aux_loss_coef": 0.01}, "router_aux_loss_coef"),
        ({"torch_compile": True}, "torch_compile"),
    ],
)
def test_what_a_shard_cannot_compute_is_refused(fields, named):
    with pytest.raises(ConfigError) as error:
        make_config({"model": "m", "train_data": "d.jsonl", "sequence_parallel_size": 2, **fields})
    assert error.value.field == named and "sequence_parallel_size 2 needs" in str(error.value)


# --- several processes (torchrun) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sequence")  # a tied Llama of 4 heads, 2 key/value heads; 4 steps of 4
    evaluation = root / "eval.jsonl"
    with open(evaluation, "w") as handle:
        for i in range(5):  # 3 batches of 2: one process gets one more than the other
            handle.write(json.dumps({"prompt": f"add {i} and 3", "completion": f" {i + 3} ok"}) + "\n")
    return addition_run(root, 16, max_steps=MAX_STEPS, per_device_train_batch_size=4)


def run(setup, name: str, *overrides, processes: int = 1) -> tuple[str, subprocess.CompletedProcess]:
    output_dir = str(setup["root"] / name)
    argv = ["-m", "sftlab.cli", "train", setup["config"], f"output_dir={output_dir}", *overrides]
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    result = subprocess.run([*launcher, *argv], capture_output=True, text=True, timeout=600, env=setup["env"])
    return output_dir, succeeded(result)


def trained(output_dir: str) -> dict[str, torch.Tensor]:
    """The final weights: the model's, or with LoRA the adapter's."""
    adapter = os.path.join(output_dir, "final", "adapter_model.safetensors")
    return load_file(adapter) if os.path.exists(adapter) else final(output_dir)


def assert_same_run(ours: str, theirs: str) -> None:
    assert_close_weights(trained(ours), trained(theirs))
    mine, reference = losses(ours), losses(theirs)
    assert list(mine) == list(reference) == list(range(1, MAX_STEPS + 1))
    assert list(mine.values()) == pytest.approx(list(reference.values()), rel=1e-5)


EVALUATED = [
    "eval_data={eval}",
    "eval_steps=2",
    "per_device_eval_batch_size=2",
    "eval_generate_samples=3",
    "eval_generate_max_new_tokens=4",
    "eval_generate_metrics=[exact_match]",
]
VARIANTS = {
    "padded, evaluated": EVALUATED,
    "packed, gradient checkpointing": ["packing=true", "gradient_checkpointing=true"],
    "lora": ["use_peft=true", "lora_dropout=0", "lora_target_modules=all-linear"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_sequence_parallel_processes_train_like_one(setup, variant):
    overrides = [o.format(eval=setup["root"] / "eval.jsonl") for o in VARIANTS[variant]]
    name = variant.split(",")[0]
    alone, _ = run(setup, f"one-{name}", *overrides)
    split, result = run(setup, f"sp2-{name}", "sequence_parallel_size=2", *overrides, processes=2)
    assert "each row split over 2 processes (1 x 2 mesh, data x sequence)" in result.stdout
    assert_same_run(split, alone)
    # The tokens each process trained add up to the row's: tokens/s is the run's, not twice it.
    tokens = lambda d: [r["tokens"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "tokens" in r]  # noqa: E731
    assert tokens(split) == tokens(alone)
    if "eval_steps=2" in overrides:
        # Evaluation through the shards gives one process's loss; generation runs whole sequences
        # on the model's own attention and replies as one process does.
        records = lambda d: [r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "eval_loss" in r]  # noqa: E731
        ours, theirs = records(split), records(alone)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [2, 4]
        for mine, reference in zip(ours, theirs):
            assert mine["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
            assert mine["eval_supervised_tokens"] == reference["eval_supervised_tokens"] > 0
            assert mine["eval_generate_exact_match"] == reference["eval_generate_exact_match"]


@pytest.mark.slow
def test_fsdp_over_a_2_x_2_mesh_trains_like_one_process_and_resumes_on_another_size(setup):
    alone, _ = run(setup, "one-process")
    # 4 processes: 2 sequence groups of 2, each group 2 of the 4 examples per step.
    mesh, result = run(
        setup,
        "fsdp-2x2",
        "sequence_parallel_size=2",
        "fsdp=true",
        "per_device_train_batch_size=2",
        processes=4,
    )
    assert "(2 x 2 mesh, data x sequence)" in result.stdout
    assert_same_run(mesh, alone)
    # Step 2's checkpoint, written by the 2 x 2 mesh, resumed by 2 sequence-parallel processes (1 x 2).
    resumed = resume_from(setup, mesh, 2, "resumed-1x2")
    _, result = run(
        setup, "resumed-1x2", "resume_from_checkpoint=auto", "sequence_parallel_size=2", "fsdp=true", processes=2
    )
    assert "resumed from" in result.stdout
    assert_close_weights(final(resumed), final(alone))


@pytest.mark.slow
def test_an_example_split_between_processes_gets_the_log_probs_it_gets_alone(setup):
    checks = torchrun_checks(setup, CHECKS)
    for case, worst in checks["worst_log_prob_error"].items():
        assert worst < 1e-5, case
    # The row of the check straddles the shards: the middle example has tokens on both processes.
    assert checks["straddling_example"] == {"start": 5, "end": 14, "shard_boundary": 8}
    for case, worst in checks["worst_grad_error"].items():
        assert worst < 1e-5, case
