"""Sequence parallelism (Ulysses): a group of N processes shares each row, each holding 1/N of its tokens.

    shard_batch     the step's full batch -> this process's contiguous 1/N of every row, with the
                    row's positions whole (`row_position_ids`), so attention knows where examples start
    attention       registered in transformers' attention-function registry under NAME: an all-to-all
                    turns the sequence shards of q, k, v into head shards (every process: all tokens,
                    1/N of the heads), attention runs per example on the whole row, a second
                    all-to-all turns the output back into sequence shards
    SequenceParallel  the checks, then the model's attention implementation set to NAME, its function
                    bound to this process's sequence group

Everything outside attention is per token (embeddings, norms, MLPs, the LM head and the loss), so
each process runs it on its own tokens only: activation memory per process falls by N. Rotary
embeddings use each token's own position id, which travels with its shard.

Why attention per example segment: the model's own mask builder sees only a shard (it would mask the
wrong L/N x L/N square), so NAME has no mask function and attention is computed from the whole row's
positions instead: every run of positions restarting at 0 is one example (a padded row's pads are a
run of their own), and each example attends causally within itself (attention.py's segment_attention,
the kernel sdpa_packed runs too), so no L x L mask ever exists and packed examples cannot see each
other across shard boundaries.

The loss is unchanged: each process sums the loss over its own supervised tokens, the step's count is
summed over every process (step.py), and the gradient all-reduce (DDP or FSDP2 over all processes)
adds the group's partial gradients, including those that flowed back through the all-to-all into the
keys and values another process computed. So N processes equal one, as data parallelism does.
On gloo (CPU) and nccl (GPU) the same `all_to_all_single` runs; it carries gradients backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sftlab.errors import ConfigError, TrainingError
from sftlab.training.attention import example_bounds, segment_attention

NAME = "sftlab_sequence_parallel"


def shard_batch(batch: dict, rank: int, size: int) -> dict:
    """This process's part of a collated batch (padded rows with an attention mask, or packed rows
    with position ids): tokens [rank * L/N, (rank + 1) * L/N) of every row, and the whole row's
    positions. The batch's length must divide by `size` (the collate pads it to a multiple)."""
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    if length % size:
        raise ValueError(f"a row of {length} tokens does not split into {size} equal shards")
    if "position_ids" in batch:
        positions = batch["position_ids"].expand(rows, length)
        real = torch.tensor(batch.get("row_lengths", [length] * rows))
    else:  # right-padded rows: the real tokens count from 0, the pads are a run of their own
        real = batch["attention_mask"].sum(dim=1)
        index = torch.arange(length).expand(rows, length)
        positions = torch.where(index < real[:, None], index, index - real[:, None])
    shard = slice(rank * (length // size), (rank + 1) * (length // size))
    in_shard = (torch.arange(length)[shard][None, :] < real[:, None]).sum()
    return {
        "input_ids": input_ids[:, shard],
        "targets": batch["targets"][:, shard],
        "position_ids": positions[:, shard].contiguous(),
        "row_position_ids": positions.contiguous(),
        "record_index": batch["record_index"],
        "real_tokens": 0 if not batch["record_index"] else int(in_shard),
        # The micro-batch is counted once (empty or not, forwards) by the group's first process.
        "micro_batch_share": 1.0 if rank == 0 else 0.0,
        "empty": bool((batch["targets"] == -100).all()),
    }


def head_counts(heads: int, size: int) -> list[int]:
    """Heads per process: as even as they go (SmolLM2's 9 over 2: 5 and 4)."""
    return [heads // size + (rank < heads % size) for rank in range(size)]


def _to_heads(x: torch.Tensor, size: int, group, rank: int) -> torch.Tensor:
    """[B, H, L/N, D] sequence shard -> [B, h, L, D] head shard (every token of this process's h heads)."""
    from torch.distributed.nn.functional import all_to_all_single

    b, h, s, d = x.shape
    counts = head_counts(h, size)
    mine = counts[rank]
    send = x.transpose(0, 1).contiguous()  # [H, B, L/N, D]: process j gets heads counts[j]
    received = all_to_all_single(send.new_empty(size * mine, b, s, d), send, [mine] * size, counts, group=group)
    # From each process j in turn (sequence order): its tokens of this process's heads.
    return received.reshape(size, mine, b, s, d).permute(2, 1, 0, 3, 4).reshape(b, mine, size * s, d)


def _to_sequence(x: torch.Tensor, size: int, group, heads: int) -> torch.Tensor:
    """[B, h, L, D] head shard -> [B, H, L/N, D] sequence shard (the inverse of _to_heads)."""
    from torch.distributed.nn.functional import all_to_all_single

    b, mine, length, d = x.shape
    s = length // size
    send = x.reshape(b, mine, size, s, d).permute(2, 1, 0, 3, 4).reshape(size * mine, b, s, d)  # chunk j to j
    counts = head_counts(heads, size)
    received = all_to_all_single(send.new_empty(heads, b, s, d), send, counts, [mine] * size, group=group)
    # From each process j in turn (head order): this process's tokens of j's heads.
    return received.transpose(0, 1)


class SequenceParallel:
    """The model's attention routed through `attention` on one sequence group of `size` processes.
    Each process computes H/N of the heads; where N does not divide H, as evenly as they go (9 heads
    over 2 processes: 5 and 4, the step as slow as the process with 5). Fewer heads than N is refused.
    The function is registered under NAME bound to this object (its group); a model's own attention
    (for generation, which has no row shards) comes back inside `model_attention()`."""

    def __init__(self, model: nn.Module, size: int, group):
        from transformers import AttentionInterface

        heads = attention_heads(model)
        if heads < size:
            raise ConfigError(
                f"sequence_parallel_size {size} is more than the model's {heads} attention heads",
                field="sequence_parallel_size",
                found=f"{size}",
                fix=f"choose a sequence_parallel_size of at most {heads} (each process computes whole heads)",
            )
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kinds = set(getattr(text_config, "layer_types", None) or ())
        if kinds - {"full_attention", "sliding_attention"}:
            # Llama 4's chunked attention (and any layer kind the model masks in a way of its own) is
            # set by the mask the model builds, which sequence-parallel attention replaces.
            raise ConfigError(
                f"sequence parallelism computes full and sliding-window attention, and {type(model).__name__} "
                f"has {', '.join(sorted(kinds - {'full_attention', 'sliding_attention'}))} layers",
                field="sequence_parallel_size",
                found=str(size),
                fix="train this model with sequence_parallel_size: 1",
            )
        self.layer_types = getattr(text_config, "layer_types", None)
        self.size, self.group = size, group
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.previous = self.model.config._attn_implementation
        AttentionInterface.register(NAME, self.attention)
        self.model.set_attn_implementation(NAME)

    @contextlib.contextmanager
    def model_attention(self):
        """The model's own attention implementation for the duration (generation: whole sequences,
        no shards). Nothing else may run the model meanwhile: it is one setting of the model."""
        self.model.set_attn_implementation(self.previous)
        try:
            yield
        finally:
            self.model.set_attn_implementation(NAME)

    def attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ):
        """transformers' attention-function interface: q [B, H, L/N, D], k and v [B, Hkv, L/N, D],
        this process's sequence shard; returns ([B, L/N, H, D], None)."""
        row_positions = kwargs.get("row_position_ids")
        if row_positions is None:
            raise TrainingError(
                f"{type(module).__name__} was called without the row's positions that sequence parallelism needs",
                found="the model's layers do not pass their keyword arguments on to the attention function",
                fix="train this model with sequence_parallel_size: 1",
            )
        if kwargs.get("s_aux") is not None:
            raise TrainingError(
                f"{type(module).__name__} has attention sinks, which sequence-parallel attention does not compute",
                fix="train this model with sequence_parallel_size: 1",
            )
        layer = getattr(module, "layer_idx", None)
        if self.layer_types and layer is not None and self.layer_types[layer] == "sliding_attention":
            if kwargs.get("sliding_window") is None:  # the window would be the mask's, which is not built
                raise TrainingError(
                    f"{type(module).__name__} (layer {layer}) is a sliding-window layer that does not pass its window "
                    "to the attention function",
                    fix="train this model with sequence_parallel_size: 1",
                )
        size, group = self.size, self.group
        heads, kv_heads = query.shape[1], key.shape[1]
        if size > 1:
            rank = torch.distributed.get_rank(group)
            if heads % size or kv_heads % size:
                # The key/value heads a process's query heads use are not its own 1/N of them (fewer
                # key/value heads than processes, or heads split unevenly): each gets its copies.
                key = key.repeat_interleave(heads // kv_heads, dim=1)
                value = value.repeat_interleave(heads // kv_heads, dim=1)
            query, key, value = (_to_heads(t, size, group, rank) for t in (query, key, value))
        out = segment_attention(
            query,
            key,
            value,
            example_bounds(row_positions),
            scaling=scaling,
            dropout=dropout if module.training else 0.0,
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
        )
        if size > 1:
            out = _to_sequence(out, size, group, heads)
        return out.transpose(1, 2).contiguous(), None


def attention_heads(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_attention_heads)
