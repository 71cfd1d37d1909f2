"""Run by test_sequence_parallel.py under `torchrun --nproc_per_node 2`: a packed row whose middle
example straddles the two processes' shards, through sequence-parallel attention, against each
example alone on one process. Writes JSON (rank 0): the worst per-token log-prob error and the
worst gradient error (the loss summed over both shards vs the whole row's) for each model."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sftlab.training import sequence  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

MODELS = {
    "llama, 4 heads, 2 key/value heads": ("llama", "sdpa", {}),
    "llama, 1 key/value head (copied to each process)": ("llama", "sdpa", {"num_key_value_heads": 1}),
    "gemma2, soft-capped, sliding window 4": ("gemma2", "eager", {"sliding_window": 4}),
    # SmolLM2's shape: 9 heads, 3 key/value heads, split 5 and 4 over 2 processes.
    "llama, 9 heads, 3 key/value heads (split 5 and 4)": (
        "llama",
        "sdpa",
        {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 8},
    ),
}
# Examples of 5, 9 and 2 tokens in a row of 16: the shards are [0, 8) and [8, 16).
LENGTHS = (5, 9, 2)


def log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token within the row (the last position's is 0)."""
    scores = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([scores, torch.zeros(scores.shape[0], 1)], dim=1)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    starts = [0, 5, 14]
    last = torch.ones(1, sum(LENGTHS), dtype=torch.bool)  # an example's last token predicts nothing of it
    for start, n in zip(starts, LENGTHS):
        last[0, start + n - 1] = False
    weights = torch.rand(1, sum(LENGTHS), generator=torch.Generator().manual_seed(5)) * last
    report = {"worst_log_prob_error": {}, "worst_grad_error": {}}
    for name, (arch, attn, overrides) in MODELS.items():
        alone_model = tiny_model(arch, attn=attn, **overrides)
        expected = torch.zeros(1, sum(LENGTHS))
        for start, n in zip(starts, LENGTHS):
            piece = ids[:, start : start + n]
            expected[:, start : start + n] = log_probs(alone_model(input_ids=piece).logits, piece)
        (expected * weights).sum().backward()
        reference = {k: p.grad.clone() for k, p in alone_model.named_parameters()}

        model = tiny_model(arch, attn=attn, **overrides)
        sequence.SequenceParallel(model, world, dist.group.WORLD)
        shard = slice(rank * 8, (rank + 1) * 8)
        logits = model(input_ids=ids[:, shard], position_ids=positions[:, shard], row_position_ids=positions).logits
        # Next-token log-probs need the following token, which may be the other shard's first: use the whole row's ids.
        scores = torch.log_softmax(logits.float(), dim=-1)
        following = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, shard]
        mine = scores.gather(-1, following[..., None]).squeeze(-1) * last[:, shard]
        (mine * weights[:, shard]).sum().backward()
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine.detach())
        got = torch.cat(gathered, dim=1)
        report["worst_log_prob_error"][name] = float((got - expected * last).abs().max())
        worst = 0.0
        for key, param in model.named_parameters():
            grad = param.grad.clone()
            dist.all_reduce(grad)  # what DDP's all-reduce adds up (before its division by the processes)
            worst = max(worst, float((grad - reference[key]).abs().max() / reference[key].abs().max().clamp(min=1e-12)))
        report["worst_grad_error"][name] = worst
    report["straddling_example"] = {"start": 5, "end": 14, "shard_boundary": 8}
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(report, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
