"""Batches leave the loader's workers through reused shared memory, and are normalised on the device exactly
as the feature extractor would have done it in the worker."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Wav2Vec2FeatureExtractor

from w2v_dist.data.buffers import BufferPool
from w2v_dist.data.collate import CTCCollator, normalize_batch

BATCHES = 24


class _Numbered(IterableDataset):  # type: ignore[type-arg]
    """Batch i is filled with i, from a pool of 3 slots."""

    def __iter__(self) -> Iterator[dict[str, object]]:
        pool = BufferPool(capacity=2 * 1000, slots=3)
        for number in range(BATCHES):
            values, slot = pool.take(2, 1000 - number)
            values.fill_(number)
            yield {"values": pool.shipped(values, slot), "number": number, "slot": slot,
                   "segments": len(pool.storages)}


def _loader() -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(_Numbered(), batch_size=None, num_workers=1, prefetch_factor=2,
                      multiprocessing_context="fork")


def test_released_buffers_are_reused_and_every_batch_arrives_intact() -> None:
    slots, segments = [], []
    for batch in _loader():
        assert isinstance(batch["values"], torch.Tensor)
        assert batch["values"].shape == (2, 1000 - batch["number"])
        assert bool((batch["values"] == batch["number"]).all())
        slots.append(batch["slot"])
        segments.append(batch["segments"])
    assert max(segments) <= 3
    assert slots.count(-1) < BATCHES // 2  # mostly served from the pool: released slots came back


def _alias(values: torch.Tensor) -> torch.Tensor:
    """A tensor on the same memory that does not keep ``values`` alive (a view would, through ``_base``)."""
    return torch.empty(0).set_(values.untyped_storage(), 0, (10,), (1,))


def test_a_buffer_the_consumer_still_uses_is_never_overwritten() -> None:
    views = [(batch["number"], batch["values"][1, :10]) for batch in _loader()]
    aliases = [(batch["number"], _alias(batch["values"])) for batch in _loader()]
    for number, kept in views + aliases:  # each outlived its batch
        assert bool((kept == number).all()), number


def test_normalisation_on_the_device_matches_the_feature_extractor() -> None:
    rng = np.random.default_rng(0)
    waves = [(0.3 * rng.standard_normal(n) + 0.05).astype(np.float32) for n in (16_000, 9_000, 401)]
    collator = CTCCollator(return_attention_mask=False, normalize=True)
    values = np.zeros((3, 16_000), dtype=np.float32)
    for row, wave in enumerate(waves):
        values[row, :len(wave)] = wave
    batch = collator.assemble(values, [len(w) for w in waves], [[1], [2], [3]], ["a", "b", "c"],
                              ["", "", ""])
    normalised = batch.model_inputs("cpu")["input_values"]
    mask = np.zeros((3, 16_000), dtype=np.int32)
    for row, wave in enumerate(waves):
        mask[row, :len(wave)] = 1
    expected = Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm(list(values), mask, padding_value=0.0)
    np.testing.assert_allclose(normalised.numpy(), np.stack(expected), atol=2e-5)
    unnormalised = CTCCollator(return_attention_mask=False, normalize=False).assemble(
        values, [len(w) for w in waves], [[1], [2], [3]], ["a", "b", "c"], ["", "", ""])
    assert torch.equal(unnormalised.model_inputs("cpu")["input_values"], torch.from_numpy(values))
    assert normalize_batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)).shape == (0, 0)


class _MaskAtStart(IterableDataset):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield sorted(int(s) for s in _INHERITED)


_INHERITED: set[int] = set()


def _record_mask(worker_id: int) -> None:
    _INHERITED.update(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_workers_are_forked_with_the_stop_signals_blocked() -> None:
    """Between fork and the worker's own set-up, a SIGTERM sent to every process of the job must not kill
    it."""
    from w2v_dist.preemption import STOP_SIGNALS, start_workers

    loader = DataLoader(_MaskAtStart(), batch_size=None, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=_record_mask)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    inherited = next(start_workers(loader))
    assert {int(s) for s in STOP_SIGNALS} <= set(inherited)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the rank's own mask is restored
