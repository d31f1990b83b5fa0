"""A run's training plan over its slots, from index metadata alone: each slot's batches epoch after epoch,
and the order in which a rank's loader workers make them, update after update.

:mod:`w2v_dist.data.epoch` makes every slot's batches for one epoch; :class:`TrainPlan` strings those
epochs together, finds the epoch of any update (a resume replays none), and deals the slots out to ranks and
workers (:class:`~w2v_dist.data.plan.StreamLayout`). No audio, no torch:
:class:`~w2v_dist.data.loader.TrainStream` decodes what this plans, and ``w2v-dist bench plan`` and the
elastic tests replay it at metadata speed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import numpy as np

from w2v_dist.data.epoch import Epoch, EpochLayoutError, EpochPlanner
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.mix import EpochSampler
from w2v_dist.data.plan import Batch, BatchPolicy, StreamLayout

T = TypeVar("T")


class Filters(Protocol):
    """The training filters (:class:`~w2v_dist.data.preprocess.Preprocess`): per utterance, and
    vectorised."""

    def skip_reason(self, utt: Utterance) -> str | None: ...

    def kept(self, num_samples: np.ndarray, label_length: np.ndarray) -> np.ndarray: ...


def recent_epochs(cache: dict[int, T], epoch: int, make: Callable[[], T]) -> T:
    """``cache[epoch]``, made on first use; the 4 most recent epochs are kept (a worker's slots are at most
    an epoch apart)."""
    if epoch not in cache:
        if len(cache) >= 4:
            cache.pop(min(cache))
        cache[epoch] = make()
    return cache[epoch]


class TrainPlan:
    """Endless, deterministic training batches for one rank, as metadata: the micro-batches of update after
    update (:class:`~w2v_dist.data.plan.StreamLayout`), each slot's from its share of every global epoch
    (:mod:`w2v_dist.data.epoch`)."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, filters: Filters, layout: StreamLayout, *,
                 rank: int, world_size: int) -> None:
        self.shards, self.policy, self.layout = shards, policy, layout
        self.rank, self.world_size = rank, world_size
        self.per_rank = layout.streams_per_rank(world_size)
        """Micro-batches per update on this rank: its share of the data streams."""
        self.planner = EpochPlanner(shards, policy, filters.kept, filters.skip_reason, layout.slots,
                                    layout.seed, EpochSampler(shards, layout.seed))
        self._epochs: dict[int, Epoch] = {}
        self._firsts = [0]
        """``_firsts[e]``: a slot's batches before epoch ``e`` (every slot reads as many per epoch)."""

    def epoch(self, number: int) -> Epoch:
        try:
            return recent_epochs(self._epochs, number, lambda: self.planner.epoch(number))
        except EpochLayoutError as err:
            raise RuntimeError(f"data: {err}") from None

    def slot_epoch(self, slot: int, epoch: int) -> tuple[list[Batch], Counter[str]]:
        """One slot's ``epoch``: its batches in reading order, and the filtered utterances it reports."""
        return self.planner.slot_batches(self.epoch(epoch), slot)

    def first_batch(self, epoch: int) -> int:
        """A slot's batches before ``epoch``: O(1) when epochs do not change (every one has as many batches),
        else one plan per epoch not yet known (:meth:`load_epoch_batches` restores them on resume)."""
        if not self.planner.changing:
            return epoch * self.epoch(0).per_slot
        while len(self._firsts) <= epoch:
            self._firsts.append(self._firsts[-1] + self.epoch(len(self._firsts) - 1).per_slot)
        return self._firsts[epoch]

    def locate(self, batch: int) -> tuple[int, int]:
        """``(epoch, index in it)`` of a slot's batch number ``batch``."""
        if not self.planner.changing:
            return divmod(batch, self.epoch(0).per_slot)
        epoch = 0
        while self.first_batch(epoch + 1) <= batch:
            epoch += 1
        return epoch, batch - self.first_batch(epoch)

    def epoch_batches(self, batches: int) -> list[int]:
        """Batches per slot of every epoch a slot has started by its batch number ``batches``: what a resume
        needs to find its epoch without planning the ones before (empty when epochs do not change)."""
        if not self.planner.changing:
            return []
        epoch, _ = self.locate(batches)
        return [self.first_batch(e + 1) - self.first_batch(e) for e in range(epoch + 1)]

    def load_epoch_batches(self, per_epoch: list[int]) -> None:
        self._firsts = list(itertools.accumulate(per_epoch, initial=0))

    def saw(self, epoch: int, update: int) -> None:
        """A micro-batch of ``epoch`` taken at ``update``, in update order: the first of an epoch says where
        it began (at ``first_batch(epoch) * readers``), so a rank learns what :meth:`epoch_batches` saves
        from the batches it takes, without planning them itself."""
        if self.planner.changing and epoch == len(self._firsts):
            self._firsts.append(update // self.layout.readers)

    def layout_problem(self) -> str | None:
        """Why this layout cannot train, said at startup: an epoch that cannot give every slot a batch."""
        try:
            self.planner.epoch(0)
        except EpochLayoutError as err:
            layout = self.layout
            return (f"data: {layout.slots:,} data slots ({layout.streams:,} streams x {layout.readers:,} "
                    f"readers) cannot all read: {err}: use fewer slots (trainer.update_seconds or "
                    "trainer.grad_accum, data.stream_readers or data.num_workers, fewer ranks) or more data")
        return None

    def schedule(self, start: int, worker: int, workers: int) -> Iterator[tuple[int, int, int]]:
        """``(update, stream, slot)`` of each micro-batch a worker makes from update ``start`` on, in the
        order the rank takes them: the DataLoader hands the rank item ``i`` from worker ``i % workers``."""
        if (self.per_rank * self.layout.readers) % max(workers, 1):
            raise ValueError(f"{workers} loader workers cannot each keep slots of their own "
                             f"({self.per_rank * self.layout.readers} per rank): see StreamLayout.workers")
        for item in itertools.count(worker, max(workers, 1)):
            update, index = start + item // self.per_rank, item % self.per_rank
            stream = self.rank + index * self.world_size
            yield update, stream, self.layout.slot(stream, update)

    def slot_epochs(self, slot: int, first: int) -> Iterator[tuple[int, list[Batch], Counter[str]]]:
        """A slot's endless plan from its batch number ``first`` on, epoch by epoch: ``(epoch, batches,
        filtered)`` (the filtered counts only with an epoch's first batch)."""
        epoch, skip = self.locate(first)
        for number in itertools.count(epoch):
            batches, skips = self.slot_epoch(slot, number)
            yield number, batches[skip:], skips if skip == 0 else Counter()
            skip = 0

    def planned(self, slot: int, first: int) -> Iterator[tuple[int, Batch]]:
        """``(epoch, batch)`` of a slot from its batch number ``first`` on, at plan speed (no audio)."""
        for epoch, batches, _ in self.slot_epochs(slot, first):
            for batch in batches:
                yield epoch, batch
    def items(self, start: int, worker: int, workers: int, source: Callable[[int, int], Iterator[T]]
              ) -> Iterator[tuple[int, int, T]]:
        """``(update, stream, item)`` for :meth:`schedule`, each item the next of its slot's ``source(slot,
        first batch number)``: decoded batches when iterating, :meth:`planned` ones to audit the order at
        plan speed."""
        sources: dict[int, Iterator[T]] = {}
        for update, stream, slot in self.schedule(start, worker, workers):
            if slot not in sources:  # a slot gives one batch each time its stream comes back to it
                sources[slot] = source(slot, update // self.layout.readers)
            yield update, stream, next(sources[slot])
