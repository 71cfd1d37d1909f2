"""Checks that need FSDP2 really sharding over 2 processes; run by test_sharding.py as

    torchrun --standalone --nproc_per_node 2 tests/fsdp_checks.py OUT.json

Each process compares what sftlab's sharded model computes with a whole, unsharded copy of the
same seeded tiny model built in the same process. Rank 0 writes the measured figures to OUT.json
and the test asserts on them:

- shards: every weight of every decoder layer and of the root is a DTensor whose local piece is
  this process's half (rows), and the halves put together are the original weights;
- heads: the sparse LM head under FSDP with TIED embeddings (plain, with gradient checkpointing,
  with LoRA on q/v and on the head itself) against the dense reference loss of the whole batch:
  loss and every gradient, the batch split over the two processes as training splits it;
- bf16: the bf16 mixed-precision policy runs on gloo, with fp32 shards and fp32 gradients;
- export: the final folder saved from the sharded model is byte for byte the one an unsharded
  copy saves.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import tiny_model  # noqa: E402

from sftlab.data.container import IGNORE  # noqa: E402
from sftlab.training import distributed, parallelize  # noqa: E402
from sftlab.training.loss import SupervisedLoss  # noqa: E402

VOCAB = 96


def batch(seed: int = 0) -> dict:
    """Four rows with unsupervised prompts of different lengths; rank r trains on rows 2r, 2r+1."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (4, 24), generator=g)
    targets = torch.full_like(input_ids, IGNORE)
    for row, prompt in enumerate([3, 0, 11, 6]):
        targets[row, prompt:-1] = input_ids[row, prompt + 1 :]
    return {"input_ids": input_ids, "targets": targets}


def build(variant: str):
    model = tiny_model("llama", vocab_size=VOCAB, tie=True, seed=3, attn="sdpa")
    if variant == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "v_proj"] + (["lm_head"] if variant == "lora-head" else [])
        torch.manual_seed(11)  # init_lora_weights=False: random A and B, so every adapter gets a gradient
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.train()
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_heads(processes, variant: str) -> dict:
    data = batch()
    reference = build(variant)
    dense = SupervisedLoss(reference, "dense")(**data)
    total = float(dense["count"])
    (dense["loss_sum"] / total).backward()

    model = build(variant)
    sharded = parallelize.shard_model(SupervisedLoss(model, "sparse"), processes, reshard_after_forward=True, cpu_offload=False, bf16=False)
    rows = slice(2 * processes.rank, 2 * processes.rank + 2)
    out = sharded(input_ids=data["input_ids"][rows], targets=data["targets"][rows])
    # As the loop does: divided by the step's count over both processes, times the world (FSDP averages).
    (out["loss_sum"] / (total / processes.world)).backward()
    loss = float(processes.sum(out["loss_sum"].detach().double().reshape(1))[0])

    grads, worst, moved = {}, 0.0, 0
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{variant}: no gradient reached the shard of {name}"
        assert type(p.grad).__name__ == "DTensor", f"{variant}: {name} gradient is not sharded"
        full = p.grad.full_tensor()
        error = relative_error(full, expected[name])
        grads[name] = error
        worst = max(worst, error)
        moved += int(torch.count_nonzero(expected[name]) > 0)
    return {"loss": loss, "dense_loss": dense["loss_sum"].item(), "worst_grad_error": worst, "grads": len(grads),
            "nonzero_reference_grads": moved, "trained": sorted(grads)}


def check_bf16(processes) -> dict:
    """FSDP2's bf16 policy on gloo: bf16 weights gathered for compute, fp32 shards and fp32 gradients."""
    data = batch()
    reference = SupervisedLoss(build("plain"), "dense")(**data)
    model = build("plain")
    sharded = parallelize.shard_model(SupervisedLoss(model, "sparse"), processes, reshard_after_forward=True, cpu_offload=False, bf16=True)
    rows = slice(2 * processes.rank, 2 * processes.rank + 2)
    out = sharded(input_ids=data["input_ids"][rows], targets=data["targets"][rows])
    out["loss_sum"].backward()
    grads = [p.grad for p in model.parameters()]
    return {"loss": float(processes.sum(out["loss_sum"].detach().double().reshape(1))[0]), "fp32_loss": reference["loss_sum"].item(),
            "shard_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "grad_dtypes": sorted({str(g.dtype) for g in grads}),
            "grads_finite": all(bool(torch.isfinite(g.full_tensor()).all()) for g in grads)}


def check_shards(processes) -> dict:
    model = tiny_model("llama", vocab_size=VOCAB, tie=True, seed=3)
    whole = {name: p.detach().clone() for name, p in model.named_parameters()}
    parallelize.shard_model(SupervisedLoss(model, "sparse"), processes, reshard_after_forward=True, cpu_offload=False, bf16=False)
    shapes = {}
    for name, p in model.named_parameters():
        assert type(p).__name__ == "DTensor", f"{name} is not sharded"
        local = p.to_local()
        half = (whole[name].shape[0] + processes.world - 1) // processes.world
        assert local.shape[0] == half and local.shape[1:] == whole[name].shape[1:], (name, tuple(local.shape))
        assert torch.equal(local, whole[name][processes.rank * half : (processes.rank + 1) * half]), name
        assert torch.equal(p.full_tensor(), whole[name]), name
        shapes[name] = [list(whole[name].shape), list(local.shape)]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {"shapes": shapes, "tied_after_sharding": tied}


def check_export(processes, folder: str) -> dict:
    reference = tiny_model("llama", vocab_size=VOCAB, tie=True, seed=3)
    model = tiny_model("llama", vocab_size=VOCAB, tie=True, seed=3)
    parallelize.shard_model(SupervisedLoss(model, "sparse"), processes, reshard_after_forward=True, cpu_offload=False, bf16=False)
    state = parallelize.full_state_dict(model, processes)
    same = None
    if processes.is_main:
        model.save_pretrained(os.path.join(folder, "sharded"), state_dict=state, safe_serialization=True)
        reference.save_pretrained(os.path.join(folder, "whole"), safe_serialization=True)
        same = {name: open(os.path.join(folder, "sharded", name), "rb").read() == open(os.path.join(folder, "whole", name), "rb").read()
                for name in sorted(os.listdir(os.path.join(folder, "whole")))}
    processes.barrier()
    return {"same_files": same}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    processes = distributed.start_processes(fsdp=True)
    assert processes.world == 2, "run under torchrun --nproc_per_node 2"
    results = {"shards": check_shards(processes)}
    results["bf16"] = check_bf16(processes)
    results["heads"] = {variant: check_heads(processes, variant) for variant in ("plain", "checkpointing", "lora", "lora-head")}
    with tempfile.TemporaryDirectory() as folder:
        results["export"] = check_export(processes, folder)
    if processes.is_main:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
