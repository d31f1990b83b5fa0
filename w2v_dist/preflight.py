"""Run the worst-case micro-batch forward and backward once before step 1 (icefall's
``scan_pessimistic_batches_for_oom``), so an out-of-memory shows in seconds, with advice, not after hours."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from w2v_dist.data.audio import perturbed_samples_of
from w2v_dist.data.index import ShardSet
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.data.preprocess import Preprocess

log = logging.getLogger("w2v_dist.preflight")


class PreflightError(RuntimeError):
    """The worst-case batch does not fit; the message says which knobs to turn."""


@dataclass(frozen=True)
class WorstCase:
    batch_size: int
    num_samples: int
    label_length: int


def worst_case(shards: ShardSet, policy: BatchPolicy, prep: Preprocess) -> WorstCase:
    """The largest micro-batch the plan can form: the longest kept utterance (at any speed perturbation's
    length; on a shape grid, its grid length), as many as the budget allows. Vectorised: every rank computes
    it at startup, over every utterance and speed (15 s at 10,000 h as a loop over utterances), reading the
    index's columns."""
    source = shards.columns.num_samples.astype(np.int64)
    labels = shards.columns.label_length.astype(np.int64)
    longest, label_length = 0, 0
    for speed in policy.speeds or (1.0,):
        lengths = perturbed_samples_of(source, speed, shards.sample_rate)
        kept = prep.kept(lengths, labels)
        if kept.any():
            longest = max(longest, int(lengths[kept].max()))
            label_length = max(label_length, int(labels[kept].max()))
    if not longest:
        raise ValueError(f"no training utterance in {shards.location} passes data.min_seconds/max_seconds "
                         f"and the CTC length check")
    if policy.grid is not None:  # padded to its grid length, with that length's rows
        longest = policy.grid.length(longest)
        return WorstCase(policy.grid.rows(longest), longest, label_length)
    return WorstCase(max(1, min(policy.max_batch_size, policy.max_batch_samples // longest)), longest,
                     label_length)


def preflight(model: PreTrainedModel, device: torch.device, dtype: torch.dtype, case: WorstCase) -> None:
    """Forward + backward of ``case`` on random input; gradients are dropped afterwards."""
    model.to(device)  # type: ignore[arg-type]
    model.train()
    inputs = torch.randn(case.batch_size, case.num_samples, device=device)
    labels = torch.randint(5, int(model.config.vocab_size or 32), (case.batch_size, case.label_length),
                           device=device)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_values=inputs, labels=labels).loss
        loss.backward()
    except torch.OutOfMemoryError as err:
        raise PreflightError(
            f"the worst-case micro-batch ({case.batch_size} x {case.num_samples / 16_000:.1f} s = "
            f"{case.batch_size * case.num_samples / 16_000:.0f} s of padded audio) does not fit in memory: "
            f"lower data.max_batch_seconds or data.max_seconds, or set model.gradient_checkpointing=true "
            f"({err})") from None
    finally:
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    log.info("preflight: worst-case micro-batch %d x %.1f s fits (%.1f s%s)", case.batch_size,
             case.num_samples / 16_000, time.perf_counter() - start,
             f", peak {peak:.1f} GiB before optimizer state" if peak is not None else "")
    if device.type == "cuda":
        torch.cuda.empty_cache()
