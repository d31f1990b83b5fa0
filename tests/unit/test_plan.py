"""Batch plans from metadata: coverage, balance and padding, over many world sizes, workers and shard
counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.data import SR, make_shards
from w2v_dist.data.index import Utterance
from w2v_dist.data.plan import (
    BatchPolicy,
    Piece,
    assign_pieces,
    epoch_rng,
    pack,
    padding_fraction,
    piece_strides,
    plan_batches,
)


def keep_all(_: Utterance) -> None:
    return None


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 4), workers=st.integers(0, 3),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=9), epoch=st.integers(0, 3))
def test_every_sample_once_per_epoch_over_all_slots(world: int, workers: int, sizes: list[int],
                                                    epoch: int) -> None:
    shards = make_shards(sizes)
    slots = world * max(1, workers)
    seconds = [sum(u.num_samples for u in s) / SR for s in shards]
    assigned = assign_pieces(seconds, sizes, slots, seed=5, epoch=epoch)
    assert len(assigned) == slots
    seen = Counter((u.shard, u.position)
                   for pieces in assigned for p in pieces for u in p.select(shards[p.shard]))
    assert set(seen) == {(u.shard, u.position) for s in shards for u in s}
    assert set(seen.values()) == {1}
    if sum(sizes) >= slots:
        assert all(p.select(shards[p.shard]) for pieces in assigned for p in pieces), "no empty piece"
        assert all(pieces for pieces in assigned), "an utterance per slot: every slot reads something"
    policy = BatchPolicy(max_batch_samples=60 * SR, max_batch_size=8, bucket_window=16, shuffle_buffer=8)
    planned = Counter()
    for slot, pieces in enumerate(assigned):
        batches, skips = plan_batches(pieces, shards, policy, keep_all, epoch_rng(5, epoch, slot))
        assert not skips
        planned.update(u.key for b in batches for u in b)
        assert all(len(b) <= 8 and (len(b) == 1 or max(u.num_samples for u in b) * len(b) <= 60 * SR)
                   for b in batches)
    assert planned == Counter(u.key for s in shards for u in s)


def reference_strides(shard_sizes: list[int], slots: int) -> list[int]:
    """The definition :func:`piece_strides` computes with a heap: cut the shard with the most utterances per
    piece (the first such) until there are as many pieces as slots."""
    strides = [1] * len(shard_sizes)
    while sum(strides) < slots:
        splittable = [s for s, size in enumerate(shard_sizes) if strides[s] < size]
        if not splittable:
            break
        strides[max(splittable, key=lambda s: shard_sizes[s] / strides[s])] += 1
    return strides


def reference_assignment(seconds: list[float], sizes: list[int], slots: int, seed: int, epoch: int
                         ) -> list[list[Piece]]:
    """The definition :func:`assign_pieces` computes with a heap: each piece, longest first, to the slot with
    the fewest seconds, then the fewest pieces, then the lowest index."""
    pieces = [Piece(shard, stride, offset) for shard, stride in enumerate(reference_strides(sizes, slots))
              for offset in range(stride)]
    epoch_rng(seed, epoch).shuffle(pieces)
    pieces.sort(key=lambda p: -seconds[p.shard] / p.stride)
    load = [0.0] * slots
    assigned: list[list[Piece]] = [[] for _ in range(slots)]
    for piece in pieces:
        slot = min(range(slots), key=lambda s: (load[s], len(assigned[s]), s))
        assigned[slot].append(piece)
        load[slot] += seconds[piece.shard] / piece.stride
    for slot_pieces in assigned:
        epoch_rng(seed, epoch, len(slot_pieces)).shuffle(slot_pieces)
    return assigned


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30), slots=st.integers(1, 200),
       tied=st.booleans(), epoch=st.integers(0, 3))
def test_the_heap_plan_is_the_plan_of_its_definition(sizes: list[int], slots: int, tied: bool,
                                                      epoch: int) -> None:
    """Planning costs O(pieces log slots) rather than pieces x slots, and plans exactly what it planned
    before: a run resumes into the same batches. Ties (equal seconds, equal sizes) are where the two orders
    could part."""
    seconds = [1.5 * (size if not tied else 4) for size in sizes]
    assert piece_strides(sizes, slots) == reference_strides(sizes, slots)
    assert (assign_pieces(seconds, sizes, slots, 7, epoch)
            == reference_assignment(seconds, sizes, slots, 7, epoch))


def test_seconds_are_balanced_across_slots() -> None:
    shards = make_shards([40, 40, 40, 40, 10, 10, 10, 10])
    seconds = [sum(u.num_samples for u in s) / SR for s in shards]
    assigned = assign_pieces(seconds, [len(s) for s in shards], 4, 1, 0)
    loads = [sum(seconds[p.shard] / p.stride for p in pieces) for pieces in assigned]
    assert max(loads) / min(loads) < 1.35


def test_plans_are_deterministic_and_differ_by_epoch() -> None:
    shards = make_shards([30, 30, 30])
    seconds = [1.0, 1.0, 1.0]
    policy = BatchPolicy(30 * SR, 16, 32, 16)

    def keys(epoch: int) -> list[str]:
        pieces = assign_pieces(seconds, [30] * 3, 1, 3, epoch)[0]
        batches = plan_batches(pieces, shards, policy, keep_all, epoch_rng(3, epoch, 0))[0]
        return [u.key for b in batches for u in b]

    assert keys(0) == keys(0) and keys(0) != keys(1)


def test_filters_are_counted_by_reason() -> None:
    shards = make_shards([20])
    policy = BatchPolicy(30 * SR, 16, 32, 16)
    pieces = assign_pieces([1.0], [20], 1, 0, 0)[0]
    batches, skips = plan_batches(pieces, shards, policy,
                                  lambda u: "too_long" if u.num_samples > 10 * SR else None, None)
    kept = sum(len(b) for b in batches)
    assert kept + skips["too_long"] == 20 and skips["too_long"] > 0


def test_bucketing_pads_far_less_than_random_batches() -> None:
    rng = random.Random(0)
    utts = [Utterance(0, i, str(i), int(rng.uniform(1, 35) * SR), 10) for i in range(2000)]
    policy = BatchPolicy(200 * SR, 64, 512, 1)
    bucketed = [b for i in range(0, 2000, 512) for b in pack(utts[i:i + 512], policy)]
    shuffled = list(utts)
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 2000, 8)]
    assert padding_fraction(bucketed) < 0.05 < 0.2 < padding_fraction(random_batches)


def test_speed_perturbation_is_drawn_per_utterance_and_epoch_and_keeps_the_budget() -> None:
    from dataclasses import replace

    from w2v_dist.data.audio import perturbed_samples
    from w2v_dist.data.plan import speed_perturbation

    shards = make_shards([40, 40, 40])
    speeds = (0.9, 1.0, 1.1)
    perturb = speed_perturbation(speeds, seed=3, epoch=0, sample_rate=SR)
    assert perturb is not None and speed_perturbation((1.0,), 3, 0, SR) is None
    drawn = [perturb(u) for s in shards for u in s]
    assert Counter(u.speed for u in drawn).keys() == set(speeds)
    assert min(Counter(u.speed for u in drawn).values()) > 20  # roughly uniform over 120 utterances
    for original, utt in zip((u for s in shards for u in s), drawn):
        assert utt.num_samples == perturbed_samples(original.num_samples, utt.speed, SR)
        assert utt.source_samples in (0, original.num_samples) and utt.label_length == original.label_length
    replayed = [perturb(v) for s in shards for v in s]
    assert [u.speed for u in drawn] == [u.speed for u in replayed], "replayable"
    again = speed_perturbation(speeds, seed=3, epoch=1, sample_rate=SR)
    assert again is not None and [again(u).speed for s in shards for u in s] != [u.speed for u in drawn]

    policy = replace(BatchPolicy(max_batch_samples=40 * SR, max_batch_size=8, bucket_window=16,
                                 shuffle_buffer=8), speeds=speeds)
    too_long = 20 * SR  # the filter sees the perturbed length: slowed-down utterances can cross it
    pieces = [p for ps in assign_pieces([1.0] * 3, [len(s) for s in shards], 1, 3, 0) for p in ps]
    batches, skips = plan_batches(pieces, shards, policy,
                                  lambda u: "too_long" if u.num_samples > too_long else None,
                                  random.Random(0), perturb)
    planned = [u for b in batches for u in b]
    assert all(max(u.num_samples for u in b) * len(b) <= policy.max_batch_samples for b in batches)
    assert all(u.num_samples <= too_long for u in planned) and len(planned) + skips["too_long"] == 120
    assert any(u.speed != 1.0 for u in planned)


def test_a_policy_from_seconds_is_the_budget_in_samples_and_its_grid() -> None:
    from w2v_dist.data.audio import EncoderGeometry
    from w2v_dist.data.shapes import ShapeGrid

    free = BatchPolicy.from_seconds(max_batch_seconds=12.5, sample_rate=SR, max_batch_size=8,
                                    bucket_window=16, shuffle_buffer=4, speed_perturb=[0.9, 1.1])
    assert free == BatchPolicy(200_000, 8, 16, 4, (0.9, 1.1), None)
    gridded = BatchPolicy.from_seconds(max_batch_seconds=12.5, sample_rate=SR, max_batch_size=8,
                                       bucket_window=16, shuffle_buffer=4, shape_quantum_frames=32,
                                       geometry=EncoderGeometry())
    assert gridded.grid == ShapeGrid.for_encoder(32, EncoderGeometry(), 200_000, 8)
    with pytest.raises(ValueError, match="geometry"):
        BatchPolicy.from_seconds(max_batch_seconds=12.5, sample_rate=SR, max_batch_size=8, bucket_window=16,
                                 shuffle_buffer=4, shape_quantum_frames=32)
