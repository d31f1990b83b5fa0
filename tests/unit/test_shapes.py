"""Bounded batch shapes (w2v_dist/data/shapes.py): grid lengths, a full and a half row count per length, and
padding within 5 % on a train-clean-100-sized plan."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.corpus import librispeech_like_seconds
from tests.support.data import shard_set
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import Utterance
from w2v_dist.data.plan import BatchPolicy, StreamLayout, padding_fraction
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.data.slots import TrainPlan

SR = 16_000
WAV2VEC2 = EncoderGeometry()


def grid(quantum: int = 32, seconds: float = 200.0, rows: int = 64) -> ShapeGrid:
    return ShapeGrid.for_encoder(quantum, WAV2VEC2, int(seconds * SR), rows)


def test_grid_lengths_are_the_fewest_samples_of_a_multiple_of_the_quantum() -> None:
    shapes = grid(32)
    assert shapes.length(1) == shapes.length(10_320) == 10_320  # 32 frames: 10,240 samples + 80
    assert shapes.length(10_321) == 20_560
    rng = random.Random(0)
    for n in [rng.randint(1, 40 * SR) for _ in range(2000)]:
        length = shapes.length(n)
        assert length >= n and WAV2VEC2.frames(length) % 32 == 0
        assert length == 10_320 or length - 32 * 320 < n  # the grid length before it is too short
        # the fewest samples of that frame count
        assert WAV2VEC2.frames(length - 1) < WAV2VEC2.frames(length)
    assert shapes.rows(10_320) == 64 and shapes.rows(shapes.length(16 * SR)) == 200 * SR // 256_080
    assert grid(32, seconds=1.0).rows(20_560) == 1  # a longer utterance than the budget still trains alone


def utterances(seconds: list[float]) -> list[Utterance]:
    return [Utterance(0, i, f"u{i}", int(s * SR), 10) for i, s in enumerate(seconds)]


@settings(max_examples=80, deadline=None)
@given(seconds=st.lists(st.floats(0.0, 40.0), min_size=1, max_size=50),
       quantum=st.sampled_from([1, 8, 16, 32]))
def test_grid_lengths_of_many_are_each_ones(seconds: list[float], quantum: int) -> None:
    shapes = grid(quantum)
    samples = [int(s * SR) for s in seconds]
    assert shapes.lengths(np.array(samples)).tolist() == [shapes.length(n) for n in samples]


def test_a_train_clean_100_sized_plan_pads_at_most_5_percent_and_has_few_shapes() -> None:
    """28,539 utterances in 26 shards over the base recipe's 48 slots (8 streams x 6 loader workers), the
    recipe's 200 s micro-batches and quantum (16 frames): each shard's utterances sorted longest first fill
    grid cells, so only a shard's last batch and a halved batch of an odd row count lack rows."""
    rng = np.random.default_rng(0)
    seconds = librispeech_like_seconds(28_539, rng)
    shards = [[Utterance(s, p, f"{s}-{p}", int(x * SR), 10) for p, x in enumerate(part)]
              for s, part in enumerate(np.array_split(seconds, 26))]
    shapes = grid(16)
    policy = BatchPolicy(200 * SR, 64, 512, 2000, grid=shapes)
    plan = TrainPlan(shard_set(shards), policy, KEEP_ALL, StreamLayout(48, 1, 1), rank=0, world_size=1)
    planned = [b for slot in range(48) for b in plan.slot_epoch(slot, 0)[0]]
    assert sum(len(b) for b in planned) == 28_539
    padding = padding_fraction(planned, shapes)
    print(f"padding {padding:.3f} on the grid; {len({shapes.shape(b) for b in planned})} shapes")
    assert padding <= 0.05
    assert len({shapes.shape(b) for b in planned}) <= 2 * len({shapes.length(u.num_samples) for s in shards
                                                               for u in s})
    assert sum(len(b) < shapes.shape(b)[0] for b in planned) <= 26 + int(plan.epoch(0).halved.sum())


class KeepAll:
    def skip_reason(self, utt: Utterance) -> None:
        return None

    def kept(self, num_samples: np.ndarray, label_length: np.ndarray) -> np.ndarray:
        return np.ones(len(num_samples), dtype=bool)


KEEP_ALL = KeepAll()


def test_padding_fraction_counts_empty_rows() -> None:
    shapes = grid(32, seconds=10320 * 4 / SR, rows=4)
    batch = utterances([10_320 / SR] * 3)
    assert shapes.shape(batch) == (4, 10_320)
    assert padding_fraction([batch], shapes) == pytest.approx(0.25)
    assert padding_fraction([batch]) == 0.0
    assert shapes.shape(batch[:2]) == (2, 10_320), "a batch that fits in half the rows: half the rows"
    assert padding_fraction([batch[:1]], shapes) == pytest.approx(0.5)


@pytest.mark.parametrize("masked", [False, True])
def test_empty_rows_add_nothing_to_the_loss_or_the_gradients(masked: bool) -> None:
    """The same utterances with and without a grid shape's empty rows (same width: a base model's loss counts
    its padded frames, as transformers computes it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCTC

    from w2v_dist.ctc import ctc_loss_sum
    from w2v_dist.data.collate import CTCCollator
    from w2v_dist.model import TINY

    torch.manual_seed(0)
    config = AutoConfig.for_model("wav2vec2", vocab_size=12, pad_token_id=0, ctc_zero_infinity=True,
                                  layerdrop=0.0, mask_time_prob=0.0, hidden_dropout=0.0,
                                  attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                                  final_dropout=0.0,
                                  **{**TINY, "feat_extract_norm": "layer" if masked else "group"})
    model = AutoModelForCTC.from_config(config).train()
    rng = np.random.default_rng(0)
    lengths, labels = [8000, 5000, 6400], [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    values = np.zeros((5, 8000), dtype=np.float32)
    for row, n in enumerate(lengths):
        values[row, :n] = rng.standard_normal(n)
    collator = CTCCollator(return_attention_mask=masked)
    results = []
    for rows in (3, 5):
        batch = collator.assemble(values[:rows].copy(), lengths, labels, ["a", "b", "c"], ["", "", ""])
        assert len(batch) == 3 and batch.input_values.shape[0] == rows and batch.targets == 9
        model.zero_grad()
        loss = ctc_loss_sum(model(**batch.model_inputs("cpu", with_labels=False)).logits, batch,
                            model.config)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss3, grads3), (loss5, grads5) = results
    torch.testing.assert_close(loss5, loss3, rtol=1e-5, atol=0.0)
    for with_empty, without in zip(grads5, grads3, strict=True):
        torch.testing.assert_close(with_empty, without, rtol=1e-4, atol=1e-6)
