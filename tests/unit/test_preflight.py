from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w2v_dist.data.audio import EncoderGeometry, perturbed_samples, perturbed_samples_of
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.data.preprocess import Preprocess
from w2v_dist.preflight import PreflightError, WorstCase, preflight, worst_case


def shard_set(lengths: list[tuple[int, int]]) -> ShardSet:
    utts = tuple(Utterance(0, i, f"k{i}", n, lab) for i, (n, lab) in enumerate(lengths))
    return ShardSet("mem", ("mem/shard.tar",), (sum(n for n, _ in lengths) / 16_000,), (utts,), 16_000)


def filters(min_samples: int = 0, max_samples: int = 10**9, filtered: bool = True) -> Preprocess:
    return Preprocess(labels=None, collator=None,  # type: ignore[arg-type]
                      geometry=EncoderGeometry(), min_samples=min_samples, max_samples=max_samples,
                      filtered=filtered)


def test_worst_case_is_the_longest_kept_utterance_packed_to_the_budget() -> None:
    shards = shard_set([(16_000, 10), (160_000, 90), (480_000, 300), (48_000, 20)])
    policy = BatchPolicy(max_batch_samples=400_000, max_batch_size=8, bucket_window=8, shuffle_buffer=1)
    assert worst_case(shards, policy, filters(max_samples=200_000)) == WorstCase(2, 160_000, 90)
    assert worst_case(shards, BatchPolicy(10**9, 3, 8, 1), filters(filtered=False)) == \
        WorstCase(3, 480_000, 300)
    with pytest.raises(ValueError, match="no training utterance in mem passes"):
        worst_case(shards, policy, filters(max_samples=1_000))


edges = [399, 400, 401, 7_999, 8_000, 200_000, 200_001, 560_000, 560_001]
lengths = st.one_of(st.integers(0, 700_000), st.sampled_from(edges))
label_lengths = st.one_of(st.integers(0, 400), st.sampled_from([0, 1]))  # 400 samples make 1 frame


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(lengths, label_lengths), min_size=1, max_size=40),
       low=st.sampled_from([0, 399, 400, 401, 8_000]), high=st.sampled_from([400, 200_000, 560_000]),
       speeds=st.sampled_from([(), (0.9, 1.0, 1.1), (0.95, 1.05)]), quantum=st.sampled_from([0, 1, 16, 32]))
def test_the_vectorised_worst_case_is_its_definition(rows: list[tuple[int, int]], low: int, high: int,
                                                     speeds: tuple[float, ...], quantum: int) -> None:
    """The filters, the perturbed lengths and the worst case, computed on arrays, equal their per-utterance
    definitions (``Preprocess.skip_reason``, ``perturbed_samples``, and the loop the preflight ran
    before)."""
    prep = filters(low, high)
    source = np.array([n for n, _ in rows], dtype=np.int64)
    labels = np.array([lab for _, lab in rows], dtype=np.int64)
    for speed in speeds or (1.0,):
        assert perturbed_samples_of(source, speed, 16_000).tolist() == [perturbed_samples(n, speed, 16_000)
                                                                        for n in source.tolist()]
    assert prep.kept(source, labels).tolist() == [prep.skip_reason(u) is None
                                                  for u in shard_set(rows).utterances[0]]
    policy = BatchPolicy.from_seconds(max_batch_seconds=400, sample_rate=16_000, max_batch_size=64,
                                      bucket_window=8, shuffle_buffer=1, speed_perturb=speeds,
                                      shape_quantum_frames=quantum, geometry=EncoderGeometry())
    budget, grid = policy.max_batch_samples, policy.grid
    kept = [p for u in shard_set(rows).utterances[0] for speed in speeds or (1.0,)
            if prep.skip_reason(p := replace(u, num_samples=perturbed_samples(u.num_samples, speed, 16_000)))
            is None]
    if not kept:
        with pytest.raises(ValueError):
            worst_case(shard_set(rows), policy, prep)
        return
    longest, label = max(u.num_samples for u in kept), max(u.label_length for u in kept)
    expected = (WorstCase(grid.rows(grid.length(longest)), grid.length(longest), label) if grid else
                WorstCase(max(1, min(64, budget // longest)), longest, label))
    assert worst_case(shard_set(rows), policy, prep) == expected


def test_out_of_memory_becomes_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding(torch.nn.Module):
        config = type("C", (), {"vocab_size": 32})()

        def forward(self, **_: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(PreflightError, match="lower data.max_batch_seconds"):
        preflight(Exploding(), torch.device("cpu"),  # type: ignore[arg-type]
                  torch.float32, WorstCase(2, 16_000, 5))
