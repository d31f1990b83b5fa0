"""The vocabulary of batch plans, computed from index metadata alone: the batch policy, the stream layout
(how training data is dealt out to ranks and worker *slots*), and the evaluation plan (strided *pieces*,
windows sorted by length). Nothing here touches audio, so a plan can be replayed at metadata speed; the
training plan, a global epoch over all slots, is :mod:`w2v_dist.data.epoch`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import Utterance
from w2v_dist.data.shapes import ShapeGrid


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
    (:meth:`~w2v_dist.data.epoch.EpochPlanner.rows`)."""
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
    (:mod:`~w2v_dist.data.epoch`). A resume on another world size moves whole streams between
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


def seeded(*parts: int) -> np.random.Generator:
    """numpy's generator for a tuple of integers (seed, epoch, ...): the same on every rank and worker."""
    return np.random.default_rng([part & 0xFFFFFFFF for part in parts])


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
                 keep: Filter) -> tuple[list[Batch], Counter[str]]:
    """Evaluation batches of ``pieces``, in stream order, each ``bucket_window`` of utterances sorted by
    length before packing; and the load-time skips by reason."""
    skips: Counter[str] = Counter()
    kept: list[Utterance] = []
    for piece in pieces:
        for utt in piece.select(utterances[piece.shard]):
            reason = keep(utt)
            if reason is None:
                kept.append(utt)
            else:
                skips[reason] += 1
    return [batch for start in range(0, len(kept), policy.bucket_window)
            for batch in pack(kept[start:start + policy.bucket_window], policy)], skips


def padding_fraction(batches: Iterable[Batch], grid: ShapeGrid | None = None) -> float:
    """Padded samples / all samples in the batches (0 = no padding), empty rows of a ``grid`` shape
    included."""
    real = padded = 0
    for batch in batches:
        real += sum(u.num_samples for u in batch)
        rows, length = grid.shape(batch) if grid else (len(batch), max(u.num_samples for u in batch))
        padded += rows * length
    return 1.0 - real / padded if padded else 0.0
