"""Activation offloading: the tensors autograd saves for backward wait in pinned host memory.

With gradient checkpointing, what a forward pass keeps for backward is mostly each decoder layer's
input (torch's non-reentrant checkpoint saves it through autograd, so saved-tensor hooks see it):
layers x length x hidden values, which at long lengths is most of the activation memory left on
the GPU. Under `OffloadActivations` (torch.autograd.graph.saved_tensors_hooks, the idea of
torchtune's OffloadActivations and of torch's own save_on_cpu) each such tensor is

- packed in forward: copied to host memory on a side stream (pinned, so the copy is asynchronous)
  while the compute stream goes on with the next layer; the device tensor is kept until its copy is
  done, a few copies at most in flight, and the last ones are let go when the forward ends;
- unpacked in backward: copied back on the side stream into a buffer the compute stream owns, and
  the compute stream waits for that copy only. Backward visits layers in reverse, so on each unpack
  the tensor saved just before it is fetched ahead, overlapping with this layer's recomputation.

Tensors that are small, parameters and other leaves that require gradients (weights saved by
matmuls), views into a larger buffer and tensors on another device stay where they are: moving them
saves nothing or would copy more than the tensor. A tensor saved several times is copied once. The
numbers are the same: a tensor comes back bit for bit.

On the CPU the activations already are in host memory: the loop runs without the hooks and says so.
The class itself takes any device, so its bookkeeping is tested on the CPU (streams and events are
no-ops there) and on a GPU where there is one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque

import torch
from torch.autograd.graph import saved_tensors_hooks

# Below this, a copy's fixed cost outweighs the memory it frees (rotary tables, masks of a few rows).
MIN_BYTES = 1 << 20
# Copies to host allowed in flight in forward before the compute stream waits for the oldest: each
# holds its device tensor alive until done.
IN_FLIGHT = 4


class _Saved:
    """A tensor packed to host memory, and its copy on the way back (prefetched) when there is one."""

    __slots__ = ("host", "device", "index", "incoming", "unpacked", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, index: int):
        self.host, self.device, self.index = host, device, index
        self.incoming = None  # (device tensor, event) while a prefetch is on its way
        self.unpacked = False


class OffloadActivations(saved_tensors_hooks):
    """Context manager for the forward pass: tensors saved for backward on `device` go to host memory.

    Enter it for each forward (its counters restart); backward may run after it is left. Counters
    of the last forward: `moved` (tensors), `moved_bytes`; of its backward: `prefetched` (tensors
    already on their way back when backward asked for them), `unpack_order` (indices, in the order
    backward asked for them)."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        pin_memory: bool = True,
        min_bytes: int = MIN_BYTES,
        in_flight: int = IN_FLIGHT,
    ):
        self.device = torch.device(device)
        self.streams = torch.get_device_module(self.device.type)
        self.copy_stream = self.streams.Stream()
        self.pin_memory, self.min_bytes, self.in_flight = pin_memory, min_bytes, in_flight
        self._outgoing: deque = deque()  # (device tensor, event): alive until copied to host
        self._saved: list[weakref.ref] = []  # every packed handle, in the order saved
        self._packed: dict = {}  # (address, dtype, shape, stride) -> (weakref to the tensor, its handle)
        self._backward_started = False
        self._reset()
        super().__init__(self._pack, self._unpack)

    def _reset(self) -> None:
        self._outgoing.clear()
        self._saved = []
        self._packed = {}
        self._backward_started = False
        self.moved = self.moved_bytes = self.prefetched = 0
        self.unpack_order: list[int] = []

    def __enter__(self):
        self._reset()
        return super().__enter__()

    def __exit__(self, *args):
        # The device tensors still on their way out are dropped now, the compute stream waiting for
        # their copies (on the device): their memory is free for backward.
        self._release_outgoing(self.streams.current_stream(), keep=0)
        return super().__exit__(*args)

    # --- forward -------------------------------------------------------------------------------

    def _worth_moving(self, tensor: torch.Tensor) -> bool:
        if tensor.device != self.device or tensor.layout != torch.strided:
            return False
        if isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
            return False  # a weight: it stays on the device anyway
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes:
            return False
        # Only a tensor that is its whole storage: a view into a larger buffer (or a broadcast) would
        # copy more, or other, memory than the tensor frees.
        return tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == nbytes

    def _pack(self, tensor: torch.Tensor):
        if not self._worth_moving(tensor):
            return tensor
        # A tensor saved twice (a norm's input, read by two of its ops) is copied once. Its address
        # identifies it only while it is alive (freed memory is reused), hence the weak reference.
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        seen = self._packed.get(key)
        if seen is not None and seen[0]() is not None:
            return seen[1]
        compute = self.streams.current_stream()
        self.copy_stream.wait_stream(compute)  # the tensor is complete before it is copied
        with self.streams.stream(self.copy_stream):
            host = torch.empty_strided(
                tensor.size(), tensor.stride(), dtype=tensor.dtype, device="cpu", pin_memory=self.pin_memory
            )
            host.copy_(tensor, non_blocking=self.pin_memory)
            event = self.copy_stream.record_event()
        self._outgoing.append((tensor, event))
        self._release_outgoing(compute, keep=self.in_flight)
        handle = _Saved(host, tensor.device, len(self._saved))
        self._saved.append(weakref.ref(handle))
        self._packed[key] = (weakref.ref(tensor), handle)
        self.moved += 1
        self.moved_bytes += tensor.numel() * tensor.element_size()
        return handle

    def _release_outgoing(self, compute, keep: int) -> None:
        """Drop the device tensors whose copy to host is done; past `keep` in flight, the compute
        stream waits for the oldest copy (on the device, not the host) before its memory is reused."""
        while self._outgoing:
            tensor, event = self._outgoing[0]
            if not (event is None or event.query()) and len(self._outgoing) <= keep:
                break
            if event is not None:
                compute.wait_event(event)
            self._outgoing.popleft()

    # --- backward ------------------------------------------------------------------------------

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        compute = self.streams.current_stream()
        if not self._backward_started:
            self._backward_started = True
            self._release_outgoing(compute, keep=0)
            self._packed = {}  # the handles belong to the graph from here on
            # Prefetches of tensors backward never asks for are waited for before their buffers go.
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if packed.incoming is not None:
            tensor, event = packed.incoming
            packed.incoming = None
            self.prefetched += 1
        else:
            tensor, event = self._fetch(packed, compute)
        if event is not None:
            compute.wait_event(event)
        self.unpack_order.append(packed.index)
        packed.unpacked = True
        self._prefetch_before(packed.index, compute)
        return tensor

    def _fetch(self, handle: _Saved, compute):
        # The buffer is allocated on the compute stream, which owns it from then on: freed after its
        # last use there, its memory is never reused before the copy into it is done.
        buffer = torch.empty_strided(
            handle.host.size(), handle.host.stride(), dtype=handle.host.dtype, device=handle.device
        )
        self.copy_stream.wait_stream(compute)
        with self.streams.stream(self.copy_stream):
            buffer.copy_(handle.host, non_blocking=self.pin_memory)
            event = self.copy_stream.record_event()
        return buffer, event

    def _prefetch_before(self, index: int, compute) -> None:
        """Start bringing back the tensor saved last before `index`, unless one is already on its way."""
        if any(h is not None and h.incoming is not None for h in (ref() for ref in self._saved)):
            return
        for position in range(index - 1, -1, -1):
            handle = self._saved[position]()
            if handle is not None and not handle.unpacked:
                handle.incoming = self._fetch(handle, compute)
                return

    def _end_of_backward(self) -> None:
        compute = self.streams.current_stream()
        for ref in self._saved:
            handle = ref()
            if handle is not None and handle.incoming is not None:
                if handle.incoming[1] is not None:
                    compute.wait_event(handle.incoming[1])
                handle.incoming = None


def saved_activations(device: torch.device, enabled: bool) -> tuple[contextlib.AbstractContextManager, str | None]:
    """(the context each training forward runs in, the log line) for activation_offloading on `device`."""
    if not enabled:
        return contextlib.nullcontext(), None
    if device.type == "cpu":
        return (
            contextlib.nullcontext(),
            "activation_offloading: the model runs on the CPU, whose activations are already in host memory: nothing to move",
        )
    return (
        OffloadActivations(device),
        f"activation_offloading: activations saved for backward move to pinned host memory in forward "
        f"(side stream, {IN_FLIGHT} copies in flight) and come back one ahead in backward",
    )
