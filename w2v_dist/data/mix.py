"""Mixing corpora (``data.train_mix``): one training shard set out of several, each part read at its own
fraction per epoch.

A mix is a :class:`~w2v_dist.data.index.ShardSet` whose shards are its parts' shards one after the other; its
``parts``, ``shard_parts`` and ``fractions`` say which part each shard comes from and what fraction of that
part an epoch reads. Everything that reads them is here: what an epoch reads (a fresh ``fraction`` of every
shard of a part, :class:`EpochSampler`, by ``(seed, epoch)`` alone, so the plan stays replayable from
metadata and no utterance is read twice in an epoch), how much that is, and which part a batch drew on.
"""

from __future__ import annotations

import numpy as np

from w2v_dist.data.columns import Columns
from w2v_dist.data.index import ShardIndexError, ShardSet
from w2v_dist.data.plan import seeded
from w2v_dist.redact import redact


def mix_shard_sets(sets: dict[str, ShardSet], fractions: dict[str, float]) -> ShardSet:
    """One shard set out of several (``data.train_mix``): their shards one after the other, each remembering
    its part and the fraction of that part read per epoch. The parts must agree on sample rate and text
    policy."""
    first = next(iter(sets.values()))
    urls: list[str] = []
    seconds: list[float] = []
    columns: list[Columns] = []
    shard_parts: list[int] = []
    for part, (location, shards) in enumerate(sets.items()):
        for attribute in ("sample_rate", "text_policy"):
            if getattr(shards, attribute) != getattr(first, attribute):
                raise ShardIndexError(
                    f"{redact(location)}: its {attribute} ({getattr(shards, attribute)}) differs from "
                    f"{redact(first.location)}'s ({getattr(first, attribute)}): shard the corpora of one "
                    "mix with the same options")
        urls += shards.urls
        seconds += shards.seconds
        columns.append(shards.columns)  # shard numbers are places: a part's shard j becomes offset + j
        shard_parts += [part] * len(shards.urls)
    return ShardSet("+".join(sets), tuple(urls), tuple(seconds), Columns.concat(columns), first.sample_rate,
                    first.text_policy, tuple(sets), tuple(shard_parts),
                    tuple(fractions[location] for location in sets))


def part_name(shards: ShardSet, shard: int) -> str:
    """The (redacted) location of the mix's part a shard comes from; empty for one set."""
    return redact(shards.parts[shards.shard_parts[shard]]) if shards.parts else ""


def mix_setting(shards: ShardSet) -> dict[str, float]:
    """``data.train_mix`` as a checkpoint records it (locations redacted); empty for one set."""
    return {redact(part): fraction for part, fraction in zip(shards.parts, shards.fractions)}


def shard_fractions(shards: ShardSet) -> np.ndarray:
    """Per shard, the fraction of it an epoch reads: all, unless a mix says less."""
    if not shards.parts:
        return np.ones(len(shards.urls))
    return np.asarray(shards.fractions, dtype=np.float64)[np.asarray(shards.shard_parts)]


def epoch_seconds(shards: ShardSet) -> float:
    """The audio seconds an epoch reads: all, or for a mix its fraction of each part."""
    return float(np.dot(np.asarray(shards.seconds, dtype=np.float64), shard_fractions(shards)))


def epoch_counts(shards: ShardSet) -> np.ndarray:
    """Per shard, the utterances an epoch reads: all, or ``round(fraction x n)`` for a mix's part."""
    sizes = np.diff(shards.columns.shard_starts)
    return np.round(shard_fractions(shards) * sizes).astype(np.int64)


def epoch_samples(shards: ShardSet) -> int:
    """Utterances read per epoch: all of them, or the mix's fraction of each part (per shard, rounded)."""
    return int(epoch_counts(shards).sum())


class EpochSampler:
    """Which rows each epoch reads (``None``: all, without a mix). Each shard of a part read at fraction
    ``f`` is put once in a random order, by ``seed`` alone, and epoch ``e`` reads its next
    :func:`epoch_counts` rows in that order (from ``e x count``, wrapping around): never an utterance twice
    in an epoch, a fresh subset every epoch, the whole shard every ``1 / f`` epochs, and the same on every
    worker."""

    def __init__(self, shards: ShardSet, seed: int) -> None:
        self.shards, self.seed = shards, seed
        self.partial = bool(shards.parts) and any(fraction < 1.0 for fraction in shards.fractions)
        self._places: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def places(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: its place in its shard's order, its shard's size, and its shard's count per epoch."""
        if self._places is None:
            starts = np.asarray(self.shards.columns.shard_starts, dtype=np.int64)
            sizes = np.diff(starts)
            shard = np.repeat(np.arange(len(sizes)), sizes)
            order = np.lexsort((seeded(self.seed, 4).random(len(shard)), shard))
            place = np.empty(len(order), dtype=np.int64)
            place[order] = np.arange(len(order)) - starts[shard[order]]
            self._places = place, sizes[shard], epoch_counts(self.shards)[shard]
        return self._places

    def __call__(self, epoch: int) -> np.ndarray | None:
        if not self.partial:
            return None
        place, size, count = self.places()
        return (place - epoch * count) % size < count
