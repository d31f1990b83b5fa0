"""Batch plans computed from index metadata alone: which samples each worker slot reads, in which order, in
which batches. Nothing here touches audio, so a plan can be replayed (for exact resume) at metadata speed.

A *slot* is one unit of reading, fixed for the whole run whatever the world size (:class:`StreamLayout`).
Each epoch, shards are permuted by ``(seed, epoch)`` and given to slots so that audio seconds balance; with
more slots than shards, each shard is split into strided *pieces* so that every slot reads something and
every sample is still read exactly once per epoch.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from w2v_dist.data.audio import EncoderGeometry, perturbed_samples
from w2v_dist.data.index import Utterance
from w2v_dist.data.shapes import ShapeGrid, pack_on_grid


@dataclass(frozen=True)
class Piece:
    """Samples ``offset, offset + stride, ...`` (positions inside the tar) of one shard."""

    shard: int
    stride: int = 1
    offset: int = 0

    def select(self, utterances: Sequence[Utterance]) -> list[Utterance]:
        return list(utterances[self.offset::self.stride])


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_samples: int
    """Padded length × batch size limit, in audio samples."""
    max_batch_size: int
    bucket_window: int
    shuffle_buffer: int
    speeds: tuple[float, ...] = ()
    """Training: speed perturbation factors, one drawn per utterance and epoch
    (:func:`speed_perturbation`)."""
    grid: ShapeGrid | None = None
    """Training: pad every batch to one of a few shapes (:mod:`w2v_dist.data.shapes`); ``None``: to its
    longest utterance, as many utterances as the budget allows."""

    @classmethod
    def from_seconds(cls, *, max_batch_seconds: float, sample_rate: int, max_batch_size: int,
                     bucket_window: int, shuffle_buffer: int, speed_perturb: Sequence[float] = (),
                     shape_quantum_frames: int = 0,
                     geometry: EncoderGeometry | None = None) -> BatchPolicy:
        """The policy of the ``data.*`` settings of the same names: a budget of ``max_batch_seconds`` of
        padded audio; with ``shape_quantum_frames``, batches on the grid of the encoder's ``geometry``."""
        budget = int(max_batch_seconds * sample_rate)
        grid = None
        if shape_quantum_frames:
            if geometry is None:
                raise ValueError("shape_quantum_frames needs the encoder's geometry")
            grid = ShapeGrid.for_encoder(shape_quantum_frames, geometry, budget, max_batch_size)
        return cls(budget, max_batch_size, bucket_window, shuffle_buffer, tuple(speed_perturb), grid)


@dataclass(frozen=True)
class StreamLayout:
    """How the training data is dealt out, fixed for a whole run (checkpoints record it) whatever the world
    size.

    Every optimizer update takes one micro-batch from each of ``streams`` data streams; the ranks share the
    streams (rank ``r`` of ``W`` takes streams ``r, r + W, ...``), so gradient accumulation is ``streams /
    W``. Each stream reads ``readers`` slots in turn (slot ``stream * readers + update % readers``): a slot
    is what one loader worker reads, and the plan gives every slot its share of each epoch
    (:func:`~w2v_dist.data.plan.assign_pieces`). A resume on another world size moves whole streams between
    ranks; the batches of every update, and so the trajectory, stay those of the uninterrupted run, and every
    utterance is still read exactly once per epoch.
    """

    streams: int
    readers: int
    seed: int

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> StreamLayout:
        """The layout a training stream's saved state records (``TrainStream.state_dict()``)."""
        return cls(int(state["streams"]), int(state["readers"]), int(state["seed"]))

    @property
    def slots(self) -> int:
        return self.streams * self.readers

    def slot(self, stream: int, update: int) -> int:
        return stream * self.readers + update % self.readers

    def streams_per_rank(self, world_size: int) -> int:
        if self.streams % world_size:
            raise ValueError(f"{self.streams} data streams (micro-batches per update) cannot be shared by "
                             f"{world_size} ranks: use a world size that divides {self.streams}")
        return self.streams // world_size

    def workers(self, world_size: int, num_workers: int) -> int:
        """Loader workers per rank: the most, up to ``num_workers``, that each keep slots of their own (a
        count that divides the rank's slots per ``readers`` updates); 0 stays 0 (decoding in the rank)."""
        per_cycle = self.streams_per_rank(world_size) * self.readers
        return max((n for n in range(1, num_workers + 1) if per_cycle % n == 0), default=0)


Batch = list[Utterance]
Filter = Callable[[Utterance], str | None]
"""Returns a skip reason, or ``None`` to keep the utterance."""


def epoch_rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & 0xFFFFFFFFFFFF)


def piece_strides(shard_sizes: Sequence[int], slots: int) -> list[int]:
    """Into how many pieces each shard is cut: one, unless there are fewer shards than slots; then the shards
    with the most utterances per piece are cut further until there are as many pieces as slots, never into
    more pieces than a shard has utterances (so every slot reads something whenever the corpus has an
    utterance per slot). Ties go to the lower shard index. O((shards + slots) log shards): a heap of the
    shards still to cut."""
    strides = [1] * len(shard_sizes)
    splittable: list[tuple[float, int]] = [(-float(size), shard) for shard, size in enumerate(shard_sizes)
                                           if size > 1]
    heapq.heapify(splittable)
    pieces = len(shard_sizes)
    while pieces < slots and splittable:
        _, shard = heapq.heappop(splittable)
        strides[shard] += 1
        pieces += 1
        if strides[shard] < shard_sizes[shard]:
            heapq.heappush(splittable, (-shard_sizes[shard] / strides[shard], shard))
    return strides


def assign_pieces(shard_seconds: Sequence[float], shard_sizes: Sequence[int], slots: int, seed: int,
                  epoch: int) -> list[list[Piece]]:
    """Pieces per slot for one epoch, balanced by seconds (longest-processing-time first): each piece goes to
    the slot with the fewest seconds so far, then the fewest pieces, then the lowest index. O(pieces log
    slots): a heap of ``(seconds, pieces, slot)``."""
    pieces = [Piece(shard, stride, offset) for shard, stride in enumerate(piece_strides(shard_sizes, slots))
              for offset in range(stride)]
    epoch_rng(seed, epoch).shuffle(pieces)
    # Stable: equal sizes keep the shuffled order.
    pieces.sort(key=lambda p: -shard_seconds[p.shard] / p.stride)
    loads = [(0.0, 0, slot) for slot in range(slots)]  # sorted, so already a heap
    assigned: list[list[Piece]] = [[] for _ in range(slots)]
    for piece in pieces:
        load, count, slot = loads[0]
        assigned[slot].append(piece)
        heapq.heapreplace(loads, (load + shard_seconds[piece.shard] / piece.stride, count + 1, slot))
    for slot_pieces in assigned:
        # One piece has one order: no generator to seed (half the cost at 4,096 slots).
        if len(slot_pieces) > 1:
            epoch_rng(seed, epoch, len(slot_pieces)).shuffle(slot_pieces)
    return assigned


def shuffled(items: Iterable[Utterance], size: int, rng: random.Random) -> Iterator[Utterance]:
    """A bounded shuffle buffer, as webdataset's ``shuffle`` stage does it, but replayable."""
    buffer: list[Utterance] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def pack(window: list[Utterance], policy: BatchPolicy) -> list[Batch]:
    """Sort a window by length and cut it into batches under the padded-samples and size budgets."""
    batches: list[Batch] = []
    current: Batch = []
    for utt in sorted(window, key=lambda u: (u.num_samples, u.key)):
        padded = max(utt.num_samples, current[-1].num_samples if current else 0) * (len(current) + 1)
        if current and (padded > policy.max_batch_samples or len(current) >= policy.max_batch_size):
            batches.append(current)
            current = []
        current.append(utt)
    if current:
        batches.append(current)
    return batches


def plan_batches(pieces: Sequence[Piece], utterances: Sequence[Sequence[Utterance]], policy: BatchPolicy,
                 keep: Filter, rng: random.Random | None,
                 perturb: Callable[[Utterance], Utterance] | None = None
                 ) -> tuple[list[Batch], Counter[str]]:
    """Batches for one slot and epoch, and the load-time skips by reason.

    ``rng`` shuffles (buffer and batch order); ``None`` keeps stream order, as evaluation wants. ``perturb``
    gives an utterance its speed and length for this epoch before the filters and the packing see it.
    """
    skips: Counter[str] = Counter()
    kept: list[Utterance] = []
    for piece in pieces:
        for utt in piece.select(utterances[piece.shard]):
            utt = perturb(utt) if perturb else utt
            reason = keep(utt)
            if reason is None:
                kept.append(utt)
            else:
                skips[reason] += 1
    stream = iter(shuffled(kept, policy.shuffle_buffer, rng) if rng else kept)
    if policy.grid is not None:
        return pack_on_grid(stream, policy.grid, policy.bucket_window, rng), skips
    batches: list[Batch] = []
    while window := list(itertools.islice(stream, policy.bucket_window)):
        packed = pack(window, policy)
        if rng is not None:
            rng.shuffle(packed)
        batches += packed
    return batches, skips


def speed_perturbation(speeds: Sequence[float], seed: int, epoch: int, sample_rate: int
                       ) -> Callable[[Utterance], Utterance] | None:
    """Each utterance's speed for an epoch, drawn uniformly from ``speeds`` by ``(seed, epoch, shard,
    position)`` alone (the same whichever slot reads it); ``None`` when there is nothing to draw."""
    if not speeds or set(speeds) == {1.0}:
        return None

    def perturb(utt: Utterance) -> Utterance:
        speed = speeds[hash((seed, epoch, utt.shard, utt.position)) % len(speeds)]
        if speed == 1.0:
            return utt
        return replace(utt, speed=speed, source_samples=utt.num_samples,
                       num_samples=perturbed_samples(utt.num_samples, speed, sample_rate))

    return perturb


def padding_fraction(batches: Iterable[Batch], grid: ShapeGrid | None = None) -> float:
    """Padded samples / all samples in the batches (0 = no padding), empty rows of a ``grid`` shape
    included."""
    real = padded = 0
    for batch in batches:
        real += sum(u.num_samples for u in batch)
        rows, length = grid.shape(batch) if grid else (len(batch), max(u.num_samples for u in batch))
        padded += rows * length
    return 1.0 - real / padded if padded else 0.0
