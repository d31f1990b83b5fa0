"""Elastic data order at plan speed: any sequence of world sizes and worker counts reads the batches of the
uninterrupted run, update by update, and every utterance exactly once per epoch."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.support.data import SR, make_shards, shard_set
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import ShardIndexError, ShardSet, Utterance
from w2v_dist.data.loader import TrainStream
from w2v_dist.data.mix import EpochSampler, epoch_samples, mix_shard_sets, part_name
from w2v_dist.data.plan import BatchPolicy, StreamLayout
from w2v_dist.data.preprocess import Preprocess
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.data.slots import TrainPlan

POLICY = BatchPolicy(max_batch_samples=30 * SR, max_batch_size=4, bucket_window=8, shuffle_buffer=6)
Micro = tuple[int, tuple[str, ...]]
"""(epoch, keys) of one micro-batch."""


Shards = ShardSet | list[list[Utterance]]


def as_shard_set(shards: Shards, name: str = "mem") -> ShardSet:
    return shards if isinstance(shards, ShardSet) else shard_set(shards, name)


# Only the filters matter at plan speed: no labeler, no collator.
PREP = Preprocess(labels=None, collator=None, geometry=EncoderGeometry(), min_samples=2 * SR,  # type: ignore
                  max_samples=19 * SR)


def stream_for(shards: Shards, layout: StreamLayout, rank: int, world: int, update: int) -> TrainStream:
    stream = TrainStream(as_shard_set(shards), POLICY, PREP, rank=rank, world_size=world, layout=layout)
    stream.update = update
    return stream


def plan_for(shards: Shards, layout: StreamLayout, rank: int = 0, world: int = 1) -> TrainPlan:
    return TrainPlan(as_shard_set(shards), POLICY, PREP, layout, rank=rank, world_size=world)


def run_era(shards: Shards, layout: StreamLayout, world: int, num_workers: int, start: int,
            end: int) -> dict[int, list[tuple[int, Micro]]]:
    """Per update in [start, end): (stream, micro-batch) as the ranks take them, the DataLoader's order
    included (item i of a rank from worker i % workers)."""
    taken: dict[int, list[tuple[int, Micro]]] = defaultdict(list)
    workers = max(1, layout.workers(world, num_workers))
    for rank in range(world):
        plan = plan_for(shards, layout, rank, world)
        per_worker = [plan.items(start, w, workers, plan.planned) for w in range(workers)]
        rank_order = []
        for item in range((end - start) * plan.per_rank):
            update, stream_id, (epoch, batch) = next(per_worker[item % workers])
            rank_order.append(stream_id)
            taken[update].append((stream_id, (epoch, tuple(u.key for u in batch))))
        expected = [rank + j * world for j in range(plan.per_rank)] * (end - start)
        assert rank_order == expected, "a rank takes its streams in order, update after update"
    return taken


def audit(shards: Shards, layout: StreamLayout, eras: list[tuple[int, int, int]]) -> dict[int, Counter[str]]:
    total = sum(steps for _, _, steps in eras)
    reference = run_era(shards, layout, 1, 1, 0, total)
    start, seen = 0, {}
    for world, workers, steps in eras:
        seen.update(run_era(shards, layout, world, workers, start, start + steps))
        start += steps
    for update in range(total):
        assert sorted(seen[update]) == sorted(reference[update]), \
            f"update {update} differs from the straight run"
        assert sorted(s for s, _ in seen[update]) == list(range(layout.streams)), \
            "one micro-batch per stream"
    per_epoch: dict[int, Counter[str]] = defaultdict(Counter)
    for update in range(total):
        for _, (epoch, keys) in seen[update]:
            per_epoch[epoch].update(keys)
    for epoch, counts in per_epoch.items():
        assert max(counts.values()) == 1, f"epoch {epoch}: an utterance read twice"
    # An epoch that every slot has read to its end holds every utterance the filters keep, exactly once.
    planner = plan_for(shards, layout)
    read = Counter((layout.slot(stream, update), epoch)
                   for update in range(total) for stream, (epoch, _) in seen[update])

    def kept(epoch: int) -> set[str]:
        """What the epoch reads (for a mix, its share of each set) and the filters keep."""
        return set(planner.shards.columns.keys(np.flatnonzero(planner.epoch(epoch).rows.read)))

    complete = [epoch for epoch in per_epoch
                if all(read[(slot, epoch)] == len(planner.slot_epoch(slot, epoch)[0])
                       for slot in range(layout.slots))]
    for epoch in complete:
        assert set(per_epoch[epoch]) == kept(epoch), f"epoch {epoch} is missing utterances"
    if total >= 3 * layout.readers * len(kept(0)):  # long enough that some epoch must have been completed
        assert complete
    return per_epoch


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data(), streams=st.sampled_from([1, 2, 4, 6]), readers=st.integers(1, 3),
       sizes=st.lists(st.integers(3, 30), min_size=1, max_size=6), changes=st.integers(1, 4))
def test_any_sequence_of_world_sizes_reads_the_straight_runs_batches(data: st.DataObject, streams: int,
                                                                      readers: int, sizes: list[int],
                                                                      changes: int) -> None:
    # Fewer, and some slot may get nothing for epochs on end (an error).
    assume(sum(sizes) >= 4 * streams * readers)
    shards = make_shards(sizes, seed=len(sizes))
    layout = StreamLayout(streams, readers, seed=7)
    worlds = [w for w in (1, 2, 3, 4, 6) if streams % w == 0]
    eras = [(data.draw(st.sampled_from(worlds)), data.draw(st.integers(0, 4)), data.draw(st.integers(1, 9)))
            for _ in range(changes)]
    audit(shards, layout, eras)


def test_three_changes_across_several_epochs() -> None:
    shards = make_shards([9, 4, 12, 7])
    audit(shards, StreamLayout(4, 2, seed=3), [(2, 2, 5), (1, 3, 7), (4, 1, 6), (2, 4, 9)])


def test_workers_are_the_most_that_keep_slots_of_their_own() -> None:
    layout = StreamLayout(streams=8, readers=6, seed=1)
    assert [layout.workers(world, 6) for world in (1, 2, 4, 8)] == [6, 6, 6, 6]
    assert StreamLayout(2, 3, 1).workers(2, 2) == 1  # 3 slots per rank: 2 workers would share one
    assert StreamLayout(2, 3, 1).workers(1, 0) == 0
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        layout.workers(3, 6)


def test_a_mix_reads_its_fraction_of_each_set_per_epoch_across_world_size_changes() -> None:
    """``data.train_mix``: set a whole every epoch, a fresh 40 % of set b (per shard, rounded), never an
    utterance twice in an epoch, the straight run's batches whatever the world sizes."""
    a = [[replace(u, key=f"a{u.key}") for u in s] for s in make_shards([9, 4, 12, 7], seed=1)]
    b = [[replace(u, key=f"b{u.key}") for u in s] for s in make_shards([10, 15], seed=2)]
    mix = mix_shard_sets({"a": as_shard_set(a, "a"), "b": as_shard_set(b, "b")}, {"a": 1.0, "b": 0.4})
    assert mix.parts == ("a", "b") and mix.shard_parts == (0, 0, 0, 0, 1, 1)
    assert epoch_samples(mix) == 32 + 4 + 6 and part_name(mix, 5) == "b"
    assert [u.shard for u in mix.utterances[4]] == [4] * 10  # shard numbers follow the mix's order
    per_epoch = audit(mix, StreamLayout(4, 2, seed=3), [(2, 2, 9), (1, 3, 12), (4, 1, 10), (2, 4, 14)])
    b_rows = np.arange(mix.columns.shard_starts[4], mix.columns.rows)
    sampled = EpochSampler(mix, 3)
    b_keys = [set(mix.columns.keys(b_rows[sampled(epoch)[b_rows]])) for epoch in (0, 1, 2)]
    assert [len(k) for k in b_keys] == [10, 10, 10] and len(set(map(frozenset, b_keys))) == 3, "a new subset"
    read_from_b = {k for keys in per_epoch.values() for k in keys if k.startswith("b")}
    assert read_from_b <= {u.key for s in b for u in s}


def test_a_mix_reads_the_next_fraction_of_each_shard_each_epoch_and_all_of_it_in_turn() -> None:
    a, b = as_shard_set(make_shards([20, 7], seed=4), "a"), as_shard_set(make_shards([9], seed=5), "b")
    mix = mix_shard_sets({"a": a, "b": b}, {"a": 0.25, "b": 1.0})
    sampled = EpochSampler(mix, seed=1)
    epochs = [sampled(epoch) for epoch in range(8)]
    assert all(mask is not None for mask in epochs)
    assert np.array_equal(epochs[3], EpochSampler(mix, seed=1)(3)), "the same on every worker"
    assert [np.add.reduceat(mask, mix.columns.shard_starts[:-1]).tolist() for mask in epochs[:2]] == \
        [[5, 2, 9]] * 2  # round(0.25 x 20), round(0.25 x 7), all of b
    first = mix.columns.shard_rows(0)
    assert not (epochs[0] & epochs[1])[first.start:first.stop].any(), "a fresh subset"
    assert sum(epochs[:4])[first.start:first.stop].tolist() == [1] * 20, "all of the shard in 4 epochs"
    assert EpochSampler(mix_shard_sets({"a": a, "b": b}, {"a": 1.0, "b": 1.0}), 1)(3) is None


def test_a_mix_refuses_sets_sharded_differently() -> None:
    a = as_shard_set(make_shards([3]), "a")
    b = replace(as_shard_set(make_shards([3]), "b"), sample_rate=8_000)
    with pytest.raises(ShardIndexError, match="sample_rate"):
        mix_shard_sets({"a": a, "b": b}, {"a": 1.0, "b": 1.0})


def test_a_changed_mix_resumes_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    a, b = as_shard_set(make_shards([6]), "a"), as_shard_set(make_shards([6]), "b")
    layout = StreamLayout(1, 1, seed=3)
    before = stream_for(mix_shard_sets({"a": a, "b": b}, {"a": 1.0, "b": 0.5}), layout, 0, 1, 5)
    after = stream_for(mix_shard_sets({"a": a, "b": b}, {"a": 1.0, "b": 1.0}), layout, 0, 1, 0)
    assert before.state_dict()["plan_inputs"]["data.train_mix"] == {"a": 1.0, "b": 0.5}
    after.load_state_dict(before.state_dict())
    assert after.update == 5 and "data.train_mix changed since the checkpoint" in caplog.text


@pytest.mark.parametrize("change, named", [
    (lambda s: setattr(s, "policy", replace(POLICY, shuffle_buffer=3)),
     "data.max_batch_seconds/max_batch_size"),
    (lambda s: setattr(s, "prep", replace(s.prep, max_samples=10 * SR)), "data.min_seconds/max_seconds"),
    (lambda s: setattr(s, "shards", as_shard_set(make_shards([4, 5], seed=9))),
     "the training shards' contents"),
    (lambda s: setattr(s, "policy", replace(POLICY, grid=ShapeGrid.for_encoder(16, EncoderGeometry(),
                                                                              POLICY.max_batch_samples, 4))),
     "data.shape_quantum_frames"),
])
def test_a_resume_onto_other_batches_says_which_input_changed(change, named: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    layout = StreamLayout(1, 1, seed=3)
    before = stream_for(make_shards([4, 5]), layout, 0, 1, 7)
    moved = stream_for(make_shards([4, 5]), layout, 0, 1, 0)
    moved.shards = replace(moved.shards, location="elsewhere", urls=("elsewhere/s0.tar", "elsewhere/s1.tar"))
    moved.load_state_dict(before.state_dict())
    assert moved.update == 7 and "changed since the checkpoint" not in caplog.text, \
        "same shards, another place"
    after = stream_for(make_shards([4, 5]), layout, 0, 1, 0)
    change(after)
    after.load_state_dict(before.state_dict())
    assert after.update == 7 and f"{named}" in caplog.text and "changed since the checkpoint" in caplog.text
    assert caplog.text.count("changed since the checkpoint") == 1, "one warning, naming only what changed"


def test_a_checkpoint_from_before_bounded_shapes_had_free_length_batches(
        caplog: pytest.LogCaptureFixture) -> None:
    layout = StreamLayout(1, 1, seed=3)
    saved = stream_for(make_shards([4, 5]), layout, 0, 1, 7).state_dict()
    del saved["plan_inputs"]["data.shape_quantum_frames"]  # what an older version wrote
    free = stream_for(make_shards([4, 5]), layout, 0, 1, 0)
    free.load_state_dict(saved)
    assert "changed since the checkpoint" not in caplog.text
    bounded = stream_for(make_shards([4, 5]), layout, 0, 1, 0)
    bounded.policy = replace(POLICY, grid=ShapeGrid.for_encoder(16, EncoderGeometry(),
                                                                POLICY.max_batch_samples, 4))
    bounded.load_state_dict(saved)
    assert "data.shape_quantum_frames changed since the checkpoint" in caplog.text


def test_a_layout_with_more_slots_than_utterances_is_refused_with_its_numbers() -> None:
    """100 h on 4,096 ranks x 8 workers would leave thousands of slots nothing to read, and the run would
    stop after three empty epochs: the startup refuses it, naming the counts (``run.build_run`` raises it as
    an input error)."""
    shards = make_shards([3, 2, 2])  # 2 of them too short or too long for PREP's filters
    assert plan_for(shards, StreamLayout(5, 1, 0)).layout_problem() is None
    problem = plan_for(shards, StreamLayout(4, 2, 0), world=2).layout_problem()
    assert problem == ("data: 8 data slots (4 streams x 2 readers) cannot all read: epoch 0 reads 5 "
                       "utterances (4 batches), too few to give 8 data slots the same number of batches (1 "
                       "each): use fewer slots (trainer.update_seconds or trainer.grad_accum, "
                       "data.stream_readers or data.num_workers, fewer ranks) or more data")


def test_a_checkpoint_from_the_shard_piece_plan_resumes_saying_its_batches_differ(
        caplog: pytest.LogCaptureFixture) -> None:
    layout = StreamLayout(1, 1, seed=3)
    saved = stream_for(make_shards([4, 5]), layout, 0, 1, 7).state_dict()
    del saved["plan_inputs"]["the data plan"]  # what a version before the global epoch wrote
    resumed = stream_for(make_shards([4, 5]), layout, 0, 1, 0)
    resumed.load_state_dict(saved)
    assert resumed.update == 7 and "the data plan changed since the checkpoint" in caplog.text
