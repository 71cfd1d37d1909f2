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

Within an example, `segment_attention` (shared with sequence parallelism, sequence.py) runs sdpa with
`is_causal` and no mask; a sliding window shorter than the example gets a banded mask of that
example's length only, and soft-capped attention logits (Gemma 2) are computed in plain torch.
models.py's 'auto' still picks this kernel only for models without sliding-window layers (their
windowed examples build a mask of their own length); naming it works for any.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    if all(len(row) == 1 for row in bounds) and kwargs.get("sliding_window") is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    out = segment_attention(
        query,
        key,
        value,
        bounds,
        scaling=scaling,
        dropout=dropout,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )
    return out.transpose(1, 2).contiguous(), None


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: list[list[tuple[int, int]]],
    *,
    scaling: float | None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention within each (start, end) segment of each row; [B, H, L, D] in and out
    (the key/value heads may be fewer: grouped-query attention). Positions outside every segment
    (none, when the segments cover the row) stay zero."""
    groups = query.shape[1] // key.shape[1]
    length = query.shape[2]
    if softcap is None and (sliding_window is None or length <= sliding_window):
        if all(row == [(0, length)] for row in segments):  # one example per row: one call, no output buffer
            return F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=length > 1, scale=scaling, enable_gqa=groups > 1
            )
    out = query.new_zeros(*query.shape[:3], value.shape[-1])  # value heads may be narrower (DeepSeek's MLA)
    for b, row in enumerate(segments):
        for start, end in row:
            q, k, v = (t[b : b + 1, :, start:end] for t in (query, key, value))
            n = end - start
            band = None
            if sliding_window is not None and n > sliding_window:
                i = torch.arange(n, device=q.device)
                band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            if softcap is not None:
                out[b : b + 1, :, start:end] = _softcapped(q, k, v, scaling, softcap, band, groups, dropout)
                continue
            out[b : b + 1, :, start:end] = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=band,
                dropout_p=dropout,
                is_causal=band is None and n > 1,
                scale=scaling,
                enable_gqa=groups > 1,
            )
    return out


def _softcapped(q, k, v, scaling, softcap, band, groups, dropout):
    """Eager attention with logits soft-capped (cap * tanh(logits / cap)), as Gemma 2 computes it."""
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    n = q.shape[2]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = softcap * torch.tanh(logits / softcap)
    allowed = band if band is not None else torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, v)


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
