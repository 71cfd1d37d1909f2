"""What the model's architecture allows, decided by probing the model itself at the start of a
run, never by a list of names alone.

    packing_isolation   does a packed row keep its examples apart? Position ids restarting at 0
                        isolate examples in attention layers only; state-space (Mamba2), linear
                        attention (gated delta-net) and convolution layers carry state from one
                        example into the next unless their kernels are given the boundaries.
                        The probe runs two short examples packed into one row and each alone
                        and compares every token's log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Packed and alone compute the same sums in another order: in fp32 the attention-only families
# differ by ~1e-6 in log-probabilities; a layer that carries state across the boundary moves the
# second example's first tokens by 1e-3 and more (measured on tiny Granite 4, Qwen3-Next, LFM2).
ISOLATION_TOLERANCE = 1e-4
PROBE_LENGTHS = (9, 7)


@dataclass
class PackingCheck:
    isolated: bool
    max_difference: float  # largest |log p packed - log p alone| over every token and vocabulary entry
    why: str


@torch.no_grad()
def packing_isolation(model: nn.Module, token_ids: list[int] | None = None) -> PackingCheck:
    """Run two examples packed in one row (position ids restarting at 0, no attention mask, as
    sftlab packs) and each alone; isolated when every log-probability agrees within
    ISOLATION_TOLERANCE. `token_ids`: ids to build the two examples from (e.g. the start of a real
    example); default: ids 1..16 of the vocabulary. Runs in eval mode (no dropout), on the
    model's device, without a process group."""
    first, second = PROBE_LENGTHS
    ids = list(token_ids or [])[: first + second]
    if len(ids) < first + second:
        vocab = model.get_input_embeddings().weight.shape[0]
        ids += [1 + (i % max(1, vocab - 1)) for i in range(first + second - len(ids))]
    device = next(model.parameters()).device
    a = torch.tensor([ids[:first]], device=device)
    b = torch.tensor([ids[first:]], device=device)
    was_training = model.training
    model.eval()
    try:
        row = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(first), torch.arange(second)]).to(device)[None]
        packed = _log_probs(model, row, positions)
        alone = torch.cat([_log_probs(model, x, torch.arange(x.shape[1], device=device)[None]) for x in (a, b)], dim=1)
    finally:
        model.train(was_training)
    difference = float((packed - alone).abs().max())
    if difference <= ISOLATION_TOLERANCE:
        return PackingCheck(True, difference, "each example of a packed row sees only itself")
    layers = sorted(_stateful_layer_kinds(model))
    return PackingCheck(False, difference, f"a packed row of two examples gives the second one other log-probabilities than "
                        f"alone (max difference {difference:.2e})"
                        + (f": its {', '.join(layers)} layers carry state from one example into the next" if layers else ""))


def _log_probs(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits
    return logits.float().log_softmax(dim=-1)


def _stateful_layer_kinds(model: nn.Module) -> set[str]:
    """The kinds of sequence-mixing layers other than attention, by the names transformers gives them (for the message only)."""
    config = getattr(model, "config", None)
    kinds = set(getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or [])
    # Granite 4 names its Mamba2 layers 'linear_attention' too; plain attention kinds are left out.
    attention = {"attention", "full_attention", "sliding_attention", "chunked_attention", "global", "local", "hybrid"}
    return {kind for kind in kinds if kind not in attention and kind not in ("moe", "mlp", "dense", "*")}
