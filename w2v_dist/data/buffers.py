"""Batch buffers in shared memory that a DataLoader worker reuses once the main process has let go of them.

A worker hands each batch to the main process through shared memory. A fresh shared segment per batch pays
its page faults on every batch, before a single sample is decoded; a pool of segments is faulted in once.

Reuse is safe only when the main process holds nothing of a buffer any more, not even a view. So the worker
ships each pooled batch with a small shared array of flags; unpickled in the main process, the batch
registers a finalizer on its storage (PyTorch keeps one Python object per storage, alive as long as any
tensor or view uses it) that marks the slot free. A slot that was never released is never reused; the worker
allocates a new segment instead, so a consumer that keeps batches only costs memory, never correctness.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

FREE, IN_USE = 0, 1


def shared_zeros(rows: int, width: int) -> torch.Tensor:
    """A float32 ``(rows, width)`` tensor in a new shared segment (which reads as zeros)."""
    return _matrix(torch.UntypedStorage._new_shared(max(1, rows * width) * 4), rows, width)


def _matrix(storage: torch.UntypedStorage, rows: int, width: int) -> torch.Tensor:
    """The float32 ``(rows, width)`` tensor at the start of ``storage``."""
    return torch.empty(0).set_(storage, 0, (rows, width), (width, 1))


class BufferPool:
    """Up to ``slots`` shared segments of ``capacity`` float32 samples each, owned by one worker."""

    def __init__(self, capacity: int, slots: int = 6) -> None:
        self.capacity, self.slots = capacity, slots
        self.storages: list[torch.UntypedStorage] = []
        self.flags = torch.zeros(slots, dtype=torch.int8).share_memory_()

    def take(self, rows: int, width: int) -> tuple[torch.Tensor, int]:
        """A ``(rows, width)`` buffer and its slot (-1: not pooled). A reused buffer holds an earlier batch:
        the caller writes every element, padding included."""
        if rows * width <= self.capacity:
            free = [slot for slot in range(len(self.storages)) if self.flags[slot] == FREE]
            if not free and len(self.storages) < self.slots:
                self.storages.append(shared_zeros(1, self.capacity).untyped_storage())
                free = [len(self.storages) - 1]
            if free:
                self.flags[free[0]] = IN_USE
                return _matrix(self.storages[free[0]], rows, width), free[0]
        return shared_zeros(rows, width), -1

    def release(self, slot: int) -> None:
        """Give back a slot whose buffer will not be sent after all."""
        if slot >= 0:
            self.flags[slot] = FREE

    def shipped(self, values: torch.Tensor, slot: int) -> torch.Tensor | _Shipped:
        """What to put in the batch: pickles as ``values`` and frees the slot once the receiver is done."""
        return values if slot < 0 else _Shipped(values, self.flags, slot)


class _Shipped:
    """A pooled batch tensor on its way to the main process; unpickles as the tensor itself."""

    def __init__(self, values: torch.Tensor, flags: torch.Tensor, slot: int) -> None:
        self.values, self.flags, self.slot = values, flags, slot

    def __reduce__(self) -> tuple[Any, ...]:
        return _received, (self.values, self.flags, self.slot)


def _received(values: torch.Tensor, flags: torch.Tensor, slot: int) -> torch.Tensor:
    weakref.finalize(values.untyped_storage(), _free, flags, slot)
    return values


def _free(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = FREE
