"""`sdpa_packed`: sdpa run once per packed example, so a packed row never builds an L x L mask.

transformers keeps the examples of a packed row apart (position ids restarting at 0, no attention
mask) by materialising a block-diagonal boolean mask of batch x L x L for sdpa and eager. At long
lengths that mask, and sdpa's masked kernel, dominate: one step of a tiny model on a 32k-token row
of four packed examples peaked at 5.8 GB where the same row as one example took 0.8 GB, and ran 4x
slower (docs/benchmarks.md, "Long sequences"). Within one example a packed row is plain causal
attention, so this kernel splits each row at its position resets (where the next position is not
the previous one plus 1, transformers' own rule in find_packed_sequence_indices) and runs
transformers' sdpa on each example with `is_causal` and no mask: the memory-efficient (flash)
path sdpa takes for a lone example, and the same numbers the masked kernel gives (tested to 1e-5).

Both halves go through transformers' registries, with no model code patched:
- the attention function (`AttentionInterface`): a row without resets, any call with a mask, and
  any call whose queries are not its keys (generation with a cache) go to transformers' sdpa as
  they are;
- the mask function (`AttentionMaskInterface`): no mask when nothing is padded and queries are
  keys (a training row, packed or not); otherwise transformers' sdpa mask, so padded batches and
  generation are masked exactly as under `sdpa`.

It is for decoders whose attention is causal within an example: a sliding window shorter than an
example would need a mask this kernel does not build, so such a call is refused (models.py's 'auto'
picks this kernel only for models without sliding-window layers).
"""

from __future__ import annotations

import torch

NAME = "sdpa_packed"


def example_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """For each row of `position_ids` [batch, length], the (start, end) of each example: a new
    example starts wherever a position is not the previous one plus 1 (a packed row's reset to 0)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = torch.diff(position_ids, dim=-1) != 1
    length = position_ids.shape[1]
    bounds = []
    for row in starts.cpu():
        at = row.nonzero().flatten().tolist()
        bounds.append(list(zip(at, at[1:] + [length])))
    return bounds


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [batch, heads, L, dim], key and value
    [batch, kv heads, L, dim]; returns ([batch, L, heads, dim], None) as sdpa_attention_forward does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        attention_mask is not None
        or query.shape[2] != key.shape[2]
        or query.shape[2] < 2
        or not getattr(module, "is_causal", True)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    length = query.shape[2]
    bounds = [[(0, length)]] * query.shape[0]
    if position_ids is not None:
        bounds = example_bounds(position_ids.expand(query.shape[0], -1))
    # The mask function built no mask, so a sliding window would not be applied: refused where it
    # would cut an example (shorter examples see the same tokens with or without it).
    window = kwargs.get("sliding_window")
    longest = max(end - start for row in bounds for start, end in row)
    if window is not None and longest > window:
        raise ValueError(
            f"attn_implementation {NAME} runs plain causal attention per example, but this layer has a sliding "
            f"window of {window} tokens and an example of {longest}: use attn_implementation sdpa"
        )
    if all(len(row) == 1 for row in bounds):
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    rows = []
    for b, row in enumerate(bounds):
        parts = [
            sdpa_attention_forward(
                module,
                query[b : b + 1, :, start:end],
                key[b : b + 1, :, start:end],
                value[b : b + 1, :, start:end],
                None,
                dropout,
                scaling,
                **kwargs,
            )[0]
            for start, end in row
        ]
        rows.append(torch.cat(parts, dim=1))  # each part [1, n, heads, dim]
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask-function signature. No mask where nothing is padded and the queries are
    the keys (the attention function splits packed rows itself); else transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs.get("q_length", args[1] if len(args) > 1 else None)
    kv_length = kwargs.get("kv_length", args[2] if len(args) > 2 else None)
    offsets = (kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0))
    if attention_mask is None and q_length == kv_length and all(isinstance(o, int) and o == 0 for o in offsets):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `sdpa_packed` an attention implementation transformers can load a model with; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME
