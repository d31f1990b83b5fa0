from __future__ import annotations

import pytest
import torch

from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.preflight import PreflightError, WorstCase, preflight, worst_case


def shard_set(lengths: list[tuple[int, int]]) -> ShardSet:
    utts = tuple(Utterance(0, i, f"k{i}", n, lab) for i, (n, lab) in enumerate(lengths))
    return ShardSet("mem", ("mem/shard.tar",), (sum(n for n, _ in lengths) / 16_000,), (utts,), 16_000)


def test_worst_case_is_the_longest_kept_utterance_packed_to_the_budget() -> None:
    shards = shard_set([(16_000, 10), (160_000, 90), (480_000, 300), (48_000, 20)])
    policy = BatchPolicy(max_batch_samples=400_000, max_batch_size=8, bucket_window=8, shuffle_buffer=1)
    too_long = lambda u: "too_long" if u.num_samples > 200_000 else None  # noqa: E731
    assert worst_case(shards, policy, too_long) == WorstCase(2, 160_000, 90)
    assert worst_case(shards, BatchPolicy(10**9, 3, 8, 1), lambda u: None) == WorstCase(3, 480_000, 300)


def test_out_of_memory_becomes_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exploding(torch.nn.Module):
        config = type("C", (), {"vocab_size": 32})()

        def forward(self, **_: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(PreflightError, match="lower data.max_batch_seconds"):
        preflight(Exploding(), torch.device("cpu"), torch.float32, WorstCase(2, 16_000, 5))  # type: ignore[arg-type]
