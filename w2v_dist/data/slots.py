"""A run's training plan over its slots, from index metadata alone: each slot's batches epoch after epoch,
and the order in which a rank's loader workers make them, update after update.

:mod:`w2v_dist.data.plan` makes one slot's batches for one epoch; :class:`TrainPlan` strings those epochs
together for every slot and deals the slots out to ranks and workers
(:class:`~w2v_dist.data.plan.StreamLayout`). No audio, no torch: :class:`~w2v_dist.data.loader.TrainStream`
decodes what this plans, and ``w2v-dist bench plan`` and the elastic tests replay it at metadata speed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.mix import epoch_seconds, epoch_utterances
from w2v_dist.data.plan import (
    Batch,
    BatchPolicy,
    Filter,
    Piece,
    StreamLayout,
    assign_pieces,
    epoch_rng,
    plan_batches,
    speed_perturbation,
)

MAX_EMPTY_EPOCHS = 3
T = TypeVar("T")


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
    update (:class:`~w2v_dist.data.plan.StreamLayout`), each slot's from its epoch's pieces, and ``keep`` the
    filters (a skip reason, or ``None``)."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, keep: Filter, layout: StreamLayout, *,
                 rank: int, world_size: int) -> None:
        self.shards, self.policy, self.keep, self.layout = shards, policy, keep, layout
        self.rank, self.world_size = rank, world_size
        self.per_rank = layout.streams_per_rank(world_size)
        """Micro-batches per update on this rank: its share of the data streams."""
        self._sampled: dict[int, tuple[tuple[Utterance, ...], ...]] = {}
        self._assigned: dict[int, list[list[Piece]]] = {}

    def slot_epoch(self, slot: int, epoch: int) -> tuple[list[Batch], list[Piece], Counter[str]]:
        """One slot's ``epoch``: its batches, the pieces it reads them from, and the load-time skips."""
        layout = self.layout
        utterances = self.epoch_utterances(epoch)
        pieces = self.epoch_pieces(epoch)[slot]
        perturb = speed_perturbation(self.policy.speeds, layout.seed, epoch, self.shards.sample_rate)
        batches, skips = plan_batches(pieces, utterances, self.policy, self.keep,
                                      epoch_rng(layout.seed, epoch, slot), perturb)
        return batches, pieces, skips

    def epoch_pieces(self, epoch: int) -> list[list[Piece]]:
        """Every slot's pieces of ``epoch``: planned once per epoch for all the slots a worker reads, not
        once per slot (:func:`~w2v_dist.data.plan.assign_pieces`)."""
        return recent_epochs(self._assigned, epoch, lambda: assign_pieces(
            epoch_seconds(self.shards), [len(u) for u in self.epoch_utterances(epoch)], self.layout.slots,
            self.layout.seed, epoch))

    def epoch_utterances(self, epoch: int) -> tuple[tuple[Utterance, ...], ...]:
        """Per shard, what ``epoch`` reads: every utterance, or for a mix its fraction of each part
        (:func:`~w2v_dist.data.mix.epoch_utterances`)."""
        return recent_epochs(self._sampled, epoch,
                             lambda: epoch_utterances(self.shards, self.layout.seed, epoch))

    def layout_problem(self) -> str | None:
        """Why this layout cannot train, said at startup: slots that an epoch gives nothing to read (more
        slots than utterances per epoch), which would otherwise stop the run after :data:`MAX_EMPTY_EPOCHS`
        empty epochs."""
        starved = sum(not pieces for pieces in self.epoch_pieces(0))
        if not starved:
            return None
        layout, slots = self.layout, "slot" if starved == 1 else "slots"
        utterances = sum(map(len, self.epoch_utterances(0)))
        return (f"data: {layout.slots:,} data slots ({layout.streams:,} streams x {layout.readers:,} "
                f"readers) but {utterances:,} training utterances per epoch, so {starved:,} {slots} would "
                "read nothing: use fewer slots (trainer.update_seconds or trainer.grad_accum, "
                "data.stream_readers or data.num_workers, fewer ranks) or more data")

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

    def slot_epochs(self, slot: int, first: int
                    ) -> Iterator[tuple[int, list[Batch], list[Piece], Counter[str]]]:
        """A slot's endless plan from its batch number ``first`` on, epoch by epoch: ``(epoch, batches,
        pieces, load-time skips)`` (skips only with an epoch's first batch)."""
        skip, empty_epochs = first, 0
        for epoch in itertools.count():
            batches, pieces, skips = self.slot_epoch(slot, epoch)
            if skip >= len(batches):
                skip -= len(batches)
                empty_epochs = empty_epochs + 1 if not batches else 0
                if empty_epochs >= MAX_EMPTY_EPOCHS:
                    raise RuntimeError(f"data slot {slot} received no usable samples in {empty_epochs} "
                                       "epochs: too few utterances for this many slots (data streams x "
                                       "readers), or all were filtered")
                continue
            yield epoch, batches[skip:], pieces, skips if skip == 0 else Counter()
            skip = 0

    def planned(self, slot: int, first: int) -> Iterator[tuple[int, Batch]]:
        """``(epoch, batch)`` of a slot from its batch number ``first`` on, at plan speed (no audio)."""
        for epoch, batches, _, _ in self.slot_epochs(slot, first):
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
