"""Mixing corpora (``data.train_mix``): one training shard set out of several, each part read at its own
fraction per epoch.

A mix is a :class:`~w2v_dist.data.index.ShardSet` whose shards are its parts' shards one after the other; its
``parts``, ``shard_parts`` and ``fractions`` say which part each shard comes from and what fraction of that
part an epoch reads. Everything that reads them is here: what an epoch reads (a fresh ``fraction`` of every
shard of a part, :func:`epoch_sample`, drawn by ``(seed, epoch, shard)`` alone, so the plan stays replayable
from metadata and no utterance is read twice in an epoch), how much that is, and which part a batch drew on.
"""

from __future__ import annotations

from dataclasses import replace

from w2v_dist.data.index import ShardIndexError, ShardSet, Utterance
from w2v_dist.data.plan import epoch_rng
from w2v_dist.redact import redact


def mix_shard_sets(sets: dict[str, ShardSet], fractions: dict[str, float]) -> ShardSet:
    """One shard set out of several (``data.train_mix``): their shards one after the other, each remembering
    its part and the fraction of that part read per epoch. The parts must agree on sample rate and text
    policy."""
    first = next(iter(sets.values()))
    urls: list[str] = []
    seconds: list[float] = []
    utterances: list[tuple[Utterance, ...]] = []
    shard_parts: list[int] = []
    for part, (location, shards) in enumerate(sets.items()):
        for attribute in ("sample_rate", "text_policy"):
            if getattr(shards, attribute) != getattr(first, attribute):
                raise ShardIndexError(
                    f"{redact(location)}: its {attribute} ({getattr(shards, attribute)}) differs from "
                    f"{redact(first.location)}'s ({getattr(first, attribute)}): shard the corpora of one "
                    "mix with the same options")
        offset = len(urls)
        urls += shards.urls
        seconds += shards.seconds
        utterances += (shards.utterances if offset == 0 else  # the first part's shard numbers stand
                       [tuple(replace(u, shard=u.shard + offset) for u in utts)
                        for utts in shards.utterances])
        shard_parts += [part] * len(shards.urls)
    return ShardSet("+".join(sets), tuple(urls), tuple(seconds), tuple(utterances), first.sample_rate,
                    first.text_policy, tuple(sets), tuple(shard_parts),
                    tuple(fractions[location] for location in sets))


def shard_fraction(shards: ShardSet, shard: int) -> float:
    """The fraction of a shard an epoch reads: all of it, unless a mix says less."""
    return shards.fractions[shards.shard_parts[shard]] if shards.parts else 1.0


def part_name(shards: ShardSet, shard: int) -> str:
    """The (redacted) location of the mix's part a shard comes from; empty for one set."""
    return redact(shards.parts[shards.shard_parts[shard]]) if shards.parts else ""


def mix_setting(shards: ShardSet) -> dict[str, float]:
    """``data.train_mix`` as a checkpoint records it (locations redacted); empty for one set."""
    return {redact(part): fraction for part, fraction in zip(shards.parts, shards.fractions)}


def epoch_seconds(shards: ShardSet) -> tuple[float, ...]:
    """Per shard, the audio seconds an epoch reads: all, or for a mix its fraction."""
    return tuple(total * shard_fraction(shards, s) for s, total in enumerate(shards.seconds))


def epoch_samples(shards: ShardSet) -> int:
    """Utterances read per epoch: all of them, or the mix's fraction of each part (per shard, rounded)."""
    return sum(round(len(u) * shard_fraction(shards, s)) for s, u in enumerate(shards.utterances))


def epoch_sample(utterances: tuple[Utterance, ...], fraction: float, seed: int, epoch: int, shard: int
                 ) -> tuple[Utterance, ...]:
    """A fresh ``fraction`` of a shard's utterances each epoch (``round(fraction * n)`` of them, in tar
    order): how a mix reads part of a corpus per epoch without ever reading an utterance twice."""
    if fraction >= 1.0:
        return utterances
    count = round(fraction * len(utterances))
    picked = sorted(epoch_rng(seed, epoch, shard, -1).sample(range(len(utterances)), count))
    return tuple(utterances[i] for i in picked)


def epoch_utterances(shards: ShardSet, seed: int, epoch: int) -> tuple[tuple[Utterance, ...], ...]:
    """Per shard, what ``epoch`` reads: every utterance, or for a mix its fraction of each part."""
    if not shards.parts:
        return shards.utterances
    return tuple(epoch_sample(u, shard_fraction(shards, s), seed, epoch, s)
                 for s, u in enumerate(shards.utterances))
