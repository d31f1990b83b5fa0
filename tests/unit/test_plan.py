"""The global epoch from metadata: every utterance once per epoch over 1 to 4,096 slots, every slot the same
number of batches within the budget, resumable anywhere in O(1), filters counted once, speed perturbation
drawn per utterance and epoch; and evaluation's packing."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.data import SR, make_shards, shard_set
from w2v_dist.data.audio import EncoderGeometry, perturbed_samples
from w2v_dist.data.epoch import ShardSorter, cut, halve
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.plan import BatchPolicy, StreamLayout, pack, padding_fraction
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.data.slots import TrainPlan

FREE = BatchPolicy(30 * SR, 4, 8, 6)
GRID = replace(FREE, grid=ShapeGrid.for_encoder(8, EncoderGeometry(), 30 * SR, 4))


class Filters:
    """Utterances longer than ``longest`` samples are dropped as too long."""

    def __init__(self, longest: int = 10**9) -> None:
        self.longest = longest

    def skip_reason(self, utt: Utterance) -> str | None:
        return "too_long" if utt.num_samples > self.longest else None

    def kept(self, num_samples: np.ndarray, label_length: np.ndarray) -> np.ndarray:
        return np.asarray(num_samples) <= self.longest


def plan_of(shards: ShardSet, slots: int, policy: BatchPolicy = FREE, filters: Filters | None = None,
            seed: int = 5) -> TrainPlan:
    return TrainPlan(shards, policy, filters or Filters(), StreamLayout(slots, 1, seed), rank=0,
                     world_size=1)


def fits(batch: list[Utterance], policy: BatchPolicy) -> bool:
    rows, length = (policy.grid.shape(batch) if policy.grid else
                    (len(batch), max(u.num_samples for u in batch)))
    return len(batch) <= rows and rows * length <= max(policy.max_batch_samples, length)


@settings(max_examples=60, deadline=None, database=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
       slots=st.sampled_from([1, 2, 3, 5, 8, 16, 64, 512, 4096]), gridded=st.booleans(),
       epoch=st.integers(0, 3))
def test_every_utterance_once_per_epoch_and_every_slot_as_many_batches(sizes: list[int], slots: int,
                                                                        gridded: bool, epoch: int) -> None:
    shards = shard_set(make_shards(sizes, seed=len(sizes)))
    policy = GRID if gridded else FREE
    plan = plan_of(shards, slots, policy)
    natural = int(plan.planner.sorter.counts(plan.planner.rows(epoch)).sum())
    if sum(sizes) < -(-natural // slots) * slots:  # too few to halve into as many batches for every slot
        assert "data slots" in (plan.layout_problem() or "")
        return
    assert plan.layout_problem() is None
    per_slot = [plan.slot_epoch(slot, epoch)[0] for slot in range(slots)]
    assert len({len(batches) for batches in per_slot}) == 1, "every slot reads as many batches"
    read = Counter(u.key for batches in per_slot for batch in batches for u in batch)
    assert read == Counter(u.key for shard in shards.utterances for u in shard), "each once"
    assert all(batch and fits(batch, policy) for batches in per_slot for batch in batches)


def test_slots_read_similar_lengths_together_and_pad_little() -> None:
    rng = random.Random(0)
    lengths = [int(rng.choice([rng.uniform(1, 12), rng.uniform(12, 16.5), rng.uniform(16.5, 35)]) * SR)
               for _ in range(4000)]
    shards = shard_set([[Utterance(s, p, f"{s}-{p}", n, 10) for p, n in enumerate(lengths[s::8])]
                        for s in range(8)])
    recipe = BatchPolicy.from_seconds(max_batch_seconds=200, sample_rate=SR, max_batch_size=64,
                                      bucket_window=512, shuffle_buffer=1, shape_quantum_frames=16,
                                      geometry=EncoderGeometry())
    plan = plan_of(shards, 48, recipe)
    batches = [b for slot in range(48) for b in plan.slot_epoch(slot, 0)[0]]
    assert padding_fraction(batches, recipe.grid) < 0.05
    random_order = [lengths[i:i + 8] for i in range(0, 4000, 8)]
    assert 1 - sum(lengths) / sum(max(b) * len(b) for b in random_order) > 0.2


@settings(max_examples=30, deadline=None, database=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8), gridded=st.booleans())
def test_the_vectorised_batch_counts_are_those_of_the_cut(sizes: list[int], gridded: bool) -> None:
    shards = shard_set(make_shards(sizes, seed=sum(sizes)))
    plan = plan_of(shards, 1, GRID if gridded else FREE)
    rows = plan.planner.rows(0)
    sorter = ShardSorter(shards, GRID if gridded else FREE)
    assert sorter.counts(rows).tolist() == [len(sorter.shard(j, rows)[1]) - 1 for j in range(len(sizes))]


def test_halving_cuts_the_largest_batch_first_and_the_grid_gives_it_half_rows() -> None:
    assert cut([3, 3, 3, 2, 2, 2, 2]) == [0, 3, 5, 7]
    assert halve([0, 3, 5, 7], 2) == [0, 2, 3, 4, 5, 7] and halve([0, 1], 0) == [0, 1]
    grid = GRID.grid
    assert grid is not None
    long = Utterance(0, 0, "a", 9 * SR, 1)
    rows, length = grid.shape([long] * 3)
    assert grid.shape([long] * 2) == (-(-rows // 2), length) and grid.shape([long] * 4) == (rows, length)


def test_resume_at_any_batch_replays_nothing_and_continues_the_same_sequence() -> None:
    shards = shard_set(make_shards([30, 17, 25], seed=2))
    plan = plan_of(shards, 4)
    straight = [[u.key for u in batch] for _, (_, batch) in zip(range(40), plan.planned(2, 0))]
    for first in (0, 1, 7, 13, 29):
        fresh = plan_of(shards, 4)
        resumed = [[u.key for u in batch]
                   for _, (_, batch) in zip(range(40 - first), fresh.planned(2, first))]
        assert resumed == straight[first:]
        assert len(fresh._epochs) <= 4, "only the epochs from the resume point on are planned"
    assert plan.locate(9) == divmod(9, plan.epoch(0).per_slot)


def test_epochs_differ_in_order_and_are_deterministic() -> None:
    shards = shard_set(make_shards([30, 30, 30]))

    def keys(epoch: int, slot: int = 0) -> list[str]:
        return [u.key for batch in plan_of(shards, 3).slot_epoch(slot, epoch)[0] for u in batch]

    assert keys(0) == keys(0) and keys(0) != keys(1)


def test_filtered_utterances_are_counted_once_per_epoch_over_all_slots() -> None:
    shards = shard_set(make_shards([20, 20, 5, 30]))
    longest = 10 * SR
    plan = plan_of(shards, 7, filters=Filters(longest))
    for epoch in (0, 1):
        planned = [plan.slot_epoch(slot, epoch) for slot in range(7)]
        skipped = sum((skips for _, skips in planned), Counter())
        kept = sum(len(b) for batches, _ in planned for b in batches)
        too_long = sum(u.num_samples > longest for s in shards.utterances for u in s)
        assert skipped == Counter(too_long=too_long) and kept + too_long == 75


def test_speed_perturbation_is_drawn_per_utterance_and_epoch_whoever_reads_it() -> None:
    shards = shard_set(make_shards([40, 40, 40]))
    policy = replace(FREE, max_batch_samples=40 * SR, speeds=(0.9, 1.0, 1.1))
    longest = 20 * SR  # the filter sees the perturbed length: slowed-down utterances can cross it

    def drawn(slots: int, epoch: int) -> dict[str, Utterance]:
        plan = plan_of(shards, slots, policy, Filters(longest))
        return {u.key: u for slot in range(slots) for b in plan.slot_epoch(slot, epoch)[0] for u in b}

    one, four = drawn(1, 0), drawn(4, 0)
    assert one == four, "the same speed and length whichever slot reads it"
    assert Counter(u.speed for u in one.values()).keys() == {0.9, 1.0, 1.1}
    source = {u.key: u for s in shards.utterances for u in s}
    for key, utt in one.items():
        assert utt.num_samples == perturbed_samples(source[key].num_samples, utt.speed, SR) <= longest
        assert utt.source_samples == (0 if utt.speed == 1.0 else source[key].num_samples)
    assert [u.speed for u in drawn(1, 1).values()] != [u.speed for u in one.values()]
    plan = plan_of(shards, 3, policy, Filters(longest))
    later = plan.epoch_batches(3 * plan.epoch(0).per_slot + 1)
    resumed = plan_of(shards, 3, policy, Filters(longest))
    resumed.load_epoch_batches(later)
    assert resumed.locate(sum(later) - 1) == (len(later) - 1, later[-1] - 1)


def test_a_layout_with_more_slots_than_utterances_is_refused_with_its_numbers() -> None:
    plan = plan_of(shard_set(make_shards([3, 2])), 8)
    assert plan.layout_problem() == (
        "data: 8 data slots (8 streams x 1 readers) cannot all read: epoch 0 reads 5 utterances "
        "(4 batches), too few to give 8 data slots the same number of batches (1 each): use fewer slots "
        "(trainer.update_seconds or trainer.grad_accum, data.stream_readers or data.num_workers, fewer "
        "ranks) or more data")


def test_evaluation_bucketing_pads_far_less_than_random_batches() -> None:
    rng = random.Random(0)
    utts = [Utterance(0, i, str(i), int(rng.uniform(1, 35) * SR), 10) for i in range(2000)]
    policy = BatchPolicy(200 * SR, 64, 512, 1)
    bucketed = [b for i in range(0, 2000, 512) for b in pack(utts[i:i + 512], policy)]
    shuffled = list(utts)
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 8] for i in range(0, 2000, 8)]
    assert padding_fraction(bucketed) < 0.05 < 0.2 < padding_fraction(random_batches)


def test_a_policy_from_seconds_is_the_budget_in_samples_and_its_grid() -> None:
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


def test_a_rank_learns_where_epochs_began_from_the_batches_it_takes_without_planning_them() -> None:
    shards = shard_set(make_shards([40, 40, 40]))
    policy = replace(FREE, max_batch_samples=40 * SR, speeds=(0.9, 1.0, 1.1))
    layout = StreamLayout(2, 2, 5)
    planner, taker = (TrainPlan(shards, policy, Filters(), layout, rank=0, world_size=1) for _ in range(2))
    items = 2 * layout.readers * 4 * planner.epoch(0).per_slot
    for _, (update, _, (epoch, _)) in zip(range(items), planner.items(0, 0, 1, planner.planned)):
        taker.saw(epoch, update)
    assert len(taker._firsts) >= 4 and not taker._epochs
    assert taker._firsts == [planner.first_batch(epoch) for epoch in range(len(taker._firsts))]
