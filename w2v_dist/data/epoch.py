"""The global epoch: every training utterance read exactly once per epoch over all slots, every slot given
the same number of batches, and each worker planning only its own share.

Epoch ``e`` reads, per shard, the rows a mix samples (all of them without one) that pass the filters, at the
lengths speed perturbation draws (:class:`EpochRows`). Each shard's rows are sorted longest first and cut
into batches, each as many utterances as its first (longest) one's shape holds: similar lengths together, so
little padding, and the same cut whichever slot reads the shard. The shards are permuted by ``(seed, e)`` and
their batches laid end to end; slot ``s`` takes batches ``[s K, (s + 1) K)`` of that sequence, with ``K =
ceil(M / slots)`` for ``M`` batches. The ``K slots - M`` batches missing are made by halving batches, the
largest of each shard, in proportion to its batches (:attr:`Epoch.halved`; the grid gives a halved batch
half its shape's rows): no slot reads more than another, so none ever laps another, and every epoch ends at
the same update for all.

A worker needs every shard's batch count (computed once for the run when epochs do not change the rows; per
epoch, vectorised, with a mix or speed perturbation) and the batches of the one or two shards its slot
reads: its plan costs O(shards + its share), and a resume at any update costs the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from w2v_dist.data.audio import perturbed_samples_of
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.plan import Batch, BatchPolicy, Filter, seeded

Kept = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Whether the filters keep each utterance, from arrays of lengths and label lengths."""


class EpochLayoutError(ValueError):
    """An epoch that cannot give every slot the same number of batches."""


@dataclass(frozen=True)
class EpochRows:
    """What one epoch reads, per row of the shard set's columns."""

    sampled: np.ndarray | None
    """Rows the epoch reads before the filters: a mix's fraction of each shard; ``None``: all."""
    read: np.ndarray
    """Sampled rows the filters keep."""
    num_samples: np.ndarray
    """Each row's length this epoch (after speed perturbation)."""
    speeds: np.ndarray | None
    """Each row's speed factor this epoch; ``None``: all 1."""
    cells: np.ndarray | None = None
    """On a shape grid, each row's grid cell this epoch (:meth:`ShapeGrid.cells`)."""

    def per_shard(self, shard_starts: np.ndarray) -> np.ndarray:
        """Rows read in each shard."""
        counts = np.zeros(len(shard_starts) - 1, dtype=np.int64)
        filled = np.diff(shard_starts) > 0  # reduceat would give an empty shard its next row
        counts[filled] = np.add.reduceat(self.read, shard_starts[:-1][filled], dtype=np.int64)
        return counts


def batch_rows(policy: BatchPolicy, lengths: np.ndarray) -> np.ndarray:
    """For each length, the utterances a batch holds whose longest utterance has it: the rows of its grid
    shape, or as many as the padded budget and the size limit allow."""
    padded = policy.grid.lengths(lengths) if policy.grid is not None else np.maximum(lengths, 1)
    return np.clip(policy.max_batch_samples // padded, 1, policy.max_batch_size)


def cut(capacity: list[int]) -> list[int]:
    """Batch boundaries over rows sorted longest first: a batch takes its first row's ``capacity``."""
    bounds, position, end = [0], 0, len(capacity)
    while position < end:
        position = min(end, position + capacity[position])
        bounds.append(position)
    return bounds


def sorted_batches(utterances: Sequence[Utterance], policy: BatchPolicy) -> list[Batch]:
    """``utterances`` cut into batches as an epoch cuts a shard: longest first (ties in the given order),
    each batch as many as its first one's shape holds."""
    ordered = sorted(utterances, key=lambda utt: -utt.num_samples)
    bounds = cut(batch_rows(policy, np.array([utt.num_samples for utt in ordered], dtype=np.int64)).tolist())
    return [ordered[start:stop] for start, stop in zip(bounds, bounds[1:])]


def halve(bounds: list[int], times: int) -> list[int]:
    """``times`` more batches: the ``times`` batches with the most utterances (the first of equals) are each
    cut in two halves, the first one the larger; more than there are batches to halve starts over on what
    that leaves."""
    while times > 0:
        sizes = np.diff(bounds)
        splittable = int(np.count_nonzero(sizes >= 2))
        if not splittable:
            raise EpochLayoutError("no batch left to halve")
        chosen = set(np.argsort(-sizes, kind="stable")[:min(times, splittable)].tolist())
        halves = [bounds[i] + (int(sizes[i]) + 1) // 2 for i in sorted(chosen)]
        bounds = sorted(bounds + halves)
        times -= len(chosen)
    return bounds


class ShardSorter:
    """Each shard's rows of an epoch, longest first (ties in tar order), and their batch boundaries."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy) -> None:
        self.starts, self.policy = np.asarray(shards.columns.shard_starts, dtype=np.int64), policy

    def shard(self, shard: int, rows: EpochRows) -> tuple[np.ndarray, list[int]]:
        """Shard ``shard``'s rows read this epoch, longest first, and their batch boundaries."""
        start, stop = self.starts[shard], self.starts[shard + 1]
        picked = start + np.flatnonzero(rows.read[start:stop])
        ordered = picked[np.argsort(-rows.num_samples[picked].astype(np.int64), kind="stable")]
        return ordered, cut(batch_rows(self.policy, rows.num_samples[ordered]).tolist())

    def counts(self, rows: EpochRows) -> np.ndarray:
        """Every shard's batch count (before halving), as :meth:`shard` cuts it."""
        per_shard = rows.per_shard(self.starts)
        shard = np.repeat(np.arange(len(per_shard)), per_shard)
        every = rows.read.all()
        if rows.cells is not None:
            return self._grid_counts(shard, rows.cells if every else rows.cells[rows.read])
        lengths = rows.num_samples if every else rows.num_samples[rows.read]
        lengths = lengths.astype(np.int64)
        capacity = batch_rows(self.policy, lengths[np.lexsort((-lengths, shard))]).tolist()
        ends = np.cumsum(per_shard).tolist()
        return np.array([len(cut(capacity[begin:end])) - 1 for begin, end in zip([0, *ends], ends)],
                        dtype=np.int64)

    def _grid_counts(self, shard: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """:meth:`counts` on a shape grid, without sorting: per shard, how many rows fall in each grid cell
        (longest first), and the batches that longest-first cutting makes of them, every shard at once. A
        batch begun in one cell keeps taking rows from the next ones while it has room."""
        grid, top = self.policy.grid, int(cells.max(initial=0)) + 1
        assert grid is not None
        per_cell = np.bincount(shard * top + cells, minlength=(len(self.starts) - 1) * top).reshape(-1, top)
        counts = np.zeros(len(per_cell), dtype=np.int64)
        room = np.zeros(len(per_cell), dtype=np.int64)
        for cell in range(top - 1, 0, -1):
            rows = grid.rows(int(grid.cell_length(cell)))
            left = per_cell[:, cell] - np.minimum(room, per_cell[:, cell])
            room -= per_cell[:, cell] - left
            started = -(-left // rows)
            counts += started
            room = np.where(started > 0, started * rows - left, room)
        return counts


@dataclass(frozen=True)
class Epoch:
    """One epoch's batch sequence over the slots: which shards, in which order, how many batches each."""

    number: int
    rows: EpochRows
    order: np.ndarray
    """Shard numbers in reading order."""
    starts: np.ndarray
    """``starts[i]``: the first batch of the shard at ``order[i]`` in the sequence; one more than shards."""
    halved: np.ndarray
    """Per position in ``order``: how many extra batches halving made in that shard."""
    per_slot: int
    """Batches each slot reads this epoch."""

    @classmethod
    def plan(cls, number: int, rows: EpochRows, read_per_shard: np.ndarray, counts: np.ndarray, slots: int,
             seed: int) -> Epoch:
        """The epoch's sequence from every shard's rows read and batch count (:meth:`ShardSorter.counts`)."""
        order = seeded(seed, number, 1).permutation(len(counts))
        natural = int(counts.sum())
        per_slot = -(-natural // slots)
        missing = per_slot * slots - natural
        spare = (read_per_shard - counts)[order]  # halving can go on until every batch holds one utterance
        if natural == 0 or int(spare.sum()) < missing:
            raise EpochLayoutError(
                f"epoch {number} reads {int(read_per_shard.sum()):,} utterances ({natural:,} batches), too "
                f"few to give {slots:,} data slots the same number of batches ({per_slot:,} each)")
        # Halvings in proportion to each shard's batches (so that a batch is halved at most once), the few
        # left over to the first shards in the order that have room.
        halved = np.minimum(missing * counts[order] // max(natural, 1), spare)
        room, left = spare - halved, missing - int(halved.sum())
        halved += np.clip(left - (np.cumsum(room) - room), 0, room)
        starts = np.concatenate(([0], np.cumsum(counts[order] + halved)))
        return cls(number, rows, order, starts, halved, per_slot)

    def positions(self, first: int, stop: int) -> range:
        """Positions in :attr:`order` of the shards holding batches ``[first, stop)`` of the sequence."""
        return range(int(np.searchsorted(self.starts, first, side="right")) - 1,
                     int(np.searchsorted(self.starts, stop, side="left")))


class EpochPlanner:
    """The slots' batches, epoch after epoch, for one shard set, policy and seed; ``sampled(epoch)``: the
    rows a mix reads that epoch (``None``: all)."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, kept: Kept, keep: Filter, slots: int,
                 seed: int, sampled: Callable[[int], np.ndarray | None]) -> None:
        self.shards, self.policy, self.kept, self.keep = shards, policy, kept, keep
        self.slots, self.seed, self.sampled = slots, seed, sampled
        self.sorter = ShardSorter(shards, policy)
        self.changing = bool(shards.parts) or any(speed != 1.0 for speed in policy.speeds)
        """Whether epochs differ in what they read and at which lengths (a mix, speed perturbation)."""
        self._steady: tuple[EpochRows, np.ndarray, np.ndarray] | None = None
        self._unperturbed: tuple[np.ndarray, np.ndarray | None] | None = None

    def rows(self, epoch: int) -> EpochRows:
        columns, grid = self.shards.columns, self.policy.grid
        sampled = self.sampled(epoch)
        if any(speed != 1.0 for speed in self.policy.speeds):
            factors = np.asarray(self.policy.speeds, dtype=np.float64)
            speeds = factors[seeded(self.seed, epoch, 2).integers(len(factors), size=columns.rows)]
            lengths = columns.num_samples.astype(np.int64)
            for speed in set(self.policy.speeds) - {1.0}:
                lengths = np.where(speeds == speed,
                                   perturbed_samples_of(lengths, speed, self.shards.sample_rate), lengths)
            kept = self.kept(lengths, np.asarray(columns.label_length))
            cells = grid.cells(lengths) if grid else None
        else:  # the same lengths every epoch: filtered and put in grid cells once
            if self._unperturbed is None:
                self._unperturbed = (self.kept(columns.num_samples, np.asarray(columns.label_length)),
                                     grid.cells(columns.num_samples) if grid else None)
            speeds, lengths, (kept, cells) = None, columns.num_samples, self._unperturbed
        read = kept if sampled is None else kept & sampled
        return EpochRows(sampled, read, lengths, speeds, cells)

    def epoch(self, number: int) -> Epoch:
        if self._steady is not None:
            rows, read_per_shard, counts = self._steady
        else:
            rows = self.rows(number)
            read_per_shard, counts = rows.per_shard(self.sorter.starts), self.sorter.counts(rows)
            if not self.changing:
                self._steady = rows, read_per_shard, counts
        return Epoch.plan(number, rows, read_per_shard, counts, self.slots, self.seed)

    def slot_batches(self, epoch: Epoch, slot: int) -> tuple[list[Batch], Counter[str]]:
        """Slot ``slot``'s batches of ``epoch`` in the order it reads them, and the filtered rows it reports:
        those of the shards whose first batch it holds (for a shard with none, the next one's)."""
        first, stop = slot * epoch.per_slot, (slot + 1) * epoch.per_slot
        batches: list[Batch] = []
        for position in epoch.positions(first, stop):
            shard = int(epoch.order[position])
            ordered, bounds = self.sorter.shard(shard, epoch.rows)
            bounds = halve(bounds, int(epoch.halved[position]))
            offset = int(epoch.starts[position])
            for index in range(max(first, offset), min(stop, int(epoch.starts[position + 1]))):
                rows = ordered[bounds[index - offset]:bounds[index - offset + 1]]
                batches.append(self.utterances(shard, rows, epoch.rows))
        owners = np.minimum(epoch.starts[:-1], epoch.starts[-1] - 1)
        skips: Counter[str] = Counter()
        for position in np.flatnonzero((owners >= first) & (owners < stop)).tolist():
            skips += self.filtered(int(epoch.order[position]), epoch.rows)
        seeded(self.seed, epoch.number, 3, slot).shuffle(batches)  # type: ignore[arg-type]
        return batches, skips

    def utterances(self, shard: int, rows: np.ndarray, epoch_rows: EpochRows) -> Batch:
        """The :class:`Utterance` of each of ``rows`` (of ``shard``) as this epoch reads it."""
        columns, start = self.shards.columns, int(self.sorter.starts[shard])
        batch = []
        for row in rows.tolist():
            length, source = int(epoch_rows.num_samples[row]), int(columns.num_samples[row])
            speed = 1.0 if epoch_rows.speeds is None else float(epoch_rows.speeds[row])
            batch.append(Utterance(shard, row - start, columns.key(row), length,
                                   int(columns.label_length[row]), speed, source if speed != 1.0 else 0))
        return batch

    def filtered(self, shard: int, rows: EpochRows) -> Counter[str]:
        """Why each row of ``shard`` that the epoch samples was filtered out, by reason."""
        start, stop = self.sorter.starts[shard], self.sorter.starts[shard + 1]
        sampled = np.ones(stop - start, dtype=bool) if rows.sampled is None else rows.sampled[start:stop]
        dropped = start + np.flatnonzero(sampled & ~rows.read[start:stop])
        return Counter(self.keep(utt) or "filtered" for utt in self.utterances(shard, dropped, rows))
