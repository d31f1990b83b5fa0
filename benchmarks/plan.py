"""``w2v-dist bench plan``: what the data plan costs at a cluster's scale, on a synthetic index with no
audio.

The corpus is LibriSpeech-shaped (12.3 s per utterance on average, shards of about 256 MB of FLAC, the
default of ``w2v-dist shard``), with each sample's byte range and the columnar index, as ``w2v-dist shard``
writes them; the layout is one data stream per rank (grad_accum 1) read by ``--workers`` slots each, so a
rank's loader worker reads one slot. Everything timed is the project's own code (:mod:`w2v_dist.data.index`,
:mod:`w2v_dist.data.epoch`, :class:`~w2v_dist.data.slots.TrainPlan`, :mod:`w2v_dist.preflight`), run once
(these runs take minutes, not milliseconds), as CPU time of this process: the machine is shared.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks.output import emit
from w2v_dist.config import Config, DataConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.columns import write_columns
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.mix import epoch_seconds
from w2v_dist.data.plan import BatchPolicy, StreamLayout, padding_fraction
from w2v_dist.data.preprocess import Preprocess
from w2v_dist.data.slots import TrainPlan
from w2v_dist.preflight import worst_case
from w2v_dist.run import load_train_set

SR = 16_000
MEAN_SECONDS = 12.3
"""LibriSpeech 960 h's mean utterance length."""
FLAC_BYTES_PER_SECOND = 18_300  # LibriSpeech: 6.62 GB / 100.6 h
SHARD_BYTES = 256e6  # w2v-dist shard's default --shard-size-mb
MIX_FRACTIONS = (1.0, 0.5, 0.25)
"""``--mix``: the corpus as three equal parts read at these fractions per epoch."""
T = TypeVar("T")


def cpu_timed(work: Callable[[], T]) -> tuple[T, float]:
    """What ``work()`` returns and the CPU seconds it took (single-threaded code, on a shared machine), after
    a garbage collection: one that the work's allocations happen to trigger would walk the whole index
    (``full_gc_s``, reported on its own) and swamp what is measured."""
    gc.collect()
    start = time.process_time()
    return work(), time.process_time() - start


def synthetic_index(hours: float, seed: int) -> dict[str, Any]:
    """An ``index.json`` body as ``w2v-dist shard`` writes it: lengths drawn 1-12 / 12-16.5 / 16.5-35 s
    uniformly (32/63/5 %, mean 12.3 s), in random order, as many per shard as 256 MB of FLAC holds on
    average."""
    rng = np.random.default_rng(seed)
    count = round(hours * 3600 / MEAN_SECONDS)
    kind = rng.random(count)
    seconds = np.where(kind < 0.32, rng.uniform(1.0, 12.0, count),
                       np.where(kind < 0.95, rng.uniform(12.0, 16.5, count), rng.uniform(16.5, 35.0, count)))
    samples = (seconds * SR).astype(np.int64)
    # A sample's bytes in its tar: FLAC and JSON members, each a 512-byte header and data padded to 512.
    sizes = 1024 + -(-(seconds * FLAC_BYTES_PER_SECOND).astype(np.int64) // 512) * 512 + 512
    per_shard = int(SHARD_BYTES / FLAC_BYTES_PER_SECOND / MEAN_SECONDS)
    shards = []
    for number, start in enumerate(range(0, count, per_shard)):
        end = min(start + per_shard, count)
        offsets = np.concatenate(([0], np.cumsum(sizes[start:end])))
        rows = [[f"{seed}-{i // 120}-{i % 120:04d}", int(samples[i]), int(samples[i] * 14.6 / SR),
                 int(offsets[i - start]), int(sizes[i])] for i in range(start, end)]
        shards.append({"name": f"shard-{number:06d}.tar", "samples": len(rows), "utterances": rows,
                       "seconds": round(int(samples[start:end].sum()) / SR, 3)})
    return {"format": "w2v-dist-shards", "version": 1, "sample_rate": SR, "shards": shards,
            "text_policy": {"alphabet": "latin", "case": "upper", "unicode": "NFKC", "punctuation": "strip",
                            "digits": "reject"}}


def write_indexes(root: Path, hours: float, mix: bool) -> list[str]:
    """One index directory, or three (a mix's parts), each with its columns as ``w2v-dist shard`` writes
    them; the index dicts are dropped before anything is measured."""
    parts = len(MIX_FRACTIONS) if mix else 1
    locations = []
    for part in range(parts):
        location = root / f"part{part}"
        location.mkdir(parents=True)
        index = synthetic_index(hours / parts, seed=part)
        (location / "index.json").write_text(json.dumps(index))
        write_columns(location, index)
        locations.append(str(location))
        del index
    gc.collect()
    return locations


def recipe_policy(data: DataConfig, speed_perturb: bool) -> tuple[BatchPolicy, Preprocess]:
    """The run's batch policy for ``data`` (with speed perturbation 0.9/1.0/1.1 if asked and none is set),
    and its filters: at plan speed only the lengths matter (no labeler, no collator)."""
    if speed_perturb and not data.speed_perturb:
        data = replace(data, speed_perturb=[0.9, 1.0, 1.1])
    prep = Preprocess(labels=None, collator=None, geometry=EncoderGeometry(),  # type: ignore[arg-type]
                      min_samples=int(data.min_seconds * SR), max_samples=int(data.max_seconds * SR))
    policy = BatchPolicy.from_seconds(
        max_batch_seconds=data.max_batch_seconds, sample_rate=SR, max_batch_size=data.max_batch_size,
        bucket_window=data.bucket_window, shuffle_buffer=data.shuffle_buffer,
        speed_perturb=data.speed_perturb, shape_quantum_frames=data.shape_quantum_frames,
        geometry=EncoderGeometry())
    return policy, prep


def index_bytes(shards: ShardSet) -> float:
    """What a rank holds per utterance of the index: its columns (memory-mapped, so shared by the rank's
    workers and the node's ranks)."""
    columns = shards.columns
    return sum(getattr(columns, name).nbytes for name in vars(columns)) / columns.rows


def read_counts(plan: TrainPlan, updates: int) -> np.ndarray:
    """How often each utterance (row) is read in ``updates`` updates: every slot's batches, as the run takes
    them."""
    starts = plan.shards.columns.shard_starts
    reads = np.zeros(plan.shards.columns.rows, dtype=np.int32)
    readers = plan.layout.readers
    for slot in range(plan.layout.slots):
        batches = len(range(slot % readers, updates, readers))  # the updates that take this slot
        for _, (_, batch) in zip(range(batches), plan.planned(slot, 0)):
            reads[[starts[utt.shard] + utt.position for utt in batch]] += 1
    return reads


def bytes_streamed(plan: TrainPlan, epoch: int) -> tuple[list[list[Utterance]], float, float]:
    """Every slot's batches of ``epoch``, the bytes their reads request (each sample's byte range, as the
    index records), and those a reader streams without offsets (every shard it touches, whole)."""
    columns, starts = plan.shards.columns, plan.shards.columns.shard_starts
    shard_bytes = np.add.reduceat(columns.byte_size, starts[:-1])
    batches, ranged, whole = [], 0.0, 0.0
    for slot in range(plan.layout.slots):
        slot_batches = plan.slot_epoch(slot, epoch)[0]
        batches += slot_batches
        rows = [starts[u.shard] + u.position for batch in slot_batches for u in batch]
        ranged += float(columns.byte_size[rows].sum())
        whole += float(shard_bytes[sorted({u.shard for batch in slot_batches for u in batch})].sum())
    return batches, ranged, whole


def plan_benchmark(cfg: Config, hours: float, ranks: int, workers: int, mix: bool, speed_perturb: bool,
                   audio_s_per_gpu: float, resume_updates: int, epochs: int) -> dict[str, Any]:
    policy, prep = recipe_policy(cfg.data, speed_perturb)
    layout = StreamLayout(ranks, workers, cfg.trainer.seed)

    def plan_of(shards: ShardSet) -> TrainPlan:
        return TrainPlan(shards, policy, prep, layout, rank=0, world_size=ranks)

    with tempfile.TemporaryDirectory(prefix="w2v-dist-bench-plan-") as tmp:
        locations = write_indexes(Path(tmp), hours, mix)
        data = (replace(cfg.data, train_mix=dict(zip(locations, MIX_FRACTIONS))) if mix else
                replace(cfg.data, train_shards=locations[0]))
        (shards, _), load_s = cpu_timed(lambda: load_train_set(data))
    utterances = shards.total_samples
    _, full_gc_s = cpu_timed(gc.collect)
    _, digest_s = cpu_timed(lambda: shards.contents_digest)
    _, worst_s = cpu_timed(lambda: worst_case(shards, policy, prep))
    problem, check_s = cpu_timed(lambda: plan_of(shards).layout_problem())
    record: dict[str, Any] = {
        "measure": "plan", "hours": round(shards.total_seconds / 3600, 1), "ranks": ranks,
        "workers": workers,
        "slots": layout.slots, "shards": len(shards.urls), "utterances": utterances, "mix": mix,
        "speeds": list(policy.speeds), "shape_quantum_frames": cfg.data.shape_quantum_frames,
        "index_bytes_per_utt": round(index_bytes(shards), 1), "full_gc_s": round(full_gc_s, 3),
        "rank_start_s": round(load_s + digest_s + worst_s + check_s, 3),
        "rank_start_parts_s": {"load_index": round(load_s, 3), "contents_digest": round(digest_s, 3),
                               "preflight_worst_case": round(worst_s, 3),
                               "first_epoch_plan": round(check_s, 3)},
        "refused": problem}
    if problem:
        return emit(record)
    # A worker's planning for one epoch, its slot's batches (epoch 1: what the start planned is not reused,
    # except what every epoch shares when epochs do not change).
    plan = plan_of(shards)
    plan.epoch(0)
    _, plan_s = cpu_timed(lambda: plan.slot_epoch(layout.slot(0, 0), 1))
    epoch_s = epoch_seconds(shards) / (ranks * audio_s_per_gpu)
    # One pass over every slot's first epoch: batches, padding, and the bytes a reader requests against the
    # bytes of the utterances it keeps.
    first_epoch, ranged, whole = bytes_streamed(plan, 0)
    kept = float(sum(shards.columns.byte_size[shards.columns.shard_starts[u.shard] + u.position]
                     for batch in first_epoch for u in batch))
    per_slot = plan.epoch(0).per_slot
    updates = plan.first_batch(epochs) * layout.readers
    reads, reads_s = cpu_timed(lambda: read_counts(plan_of(shards), updates))
    # What the plan says those epochs read: each utterance once per epoch whose sample (a mix) and filters
    # (at its perturbed length) take it.
    planned = sum(plan.epoch(epoch).rows.read.astype(np.int32) for epoch in range(epochs))
    # A resume as a checkpoint makes it: with a mix or speed perturbation, the epoch lengths it records.
    saved = plan_of(shards).epoch_batches(resume_updates // layout.readers + 1)
    resumed = plan_of(shards)

    def resume() -> None:
        resumed.load_epoch_batches(saved)
        next(resumed.items(resume_updates, 0, workers, resumed.planned))

    _, resume_s = cpu_timed(resume)
    record |= {
        "plan_s_per_worker_epoch": round(plan_s, 4), "epoch_s": round(epoch_s, 3),
        "plan_share_of_epoch": round(plan_s / epoch_s, 4), "audio_s_per_gpu": audio_s_per_gpu,
        "padding": round(padding_fraction(first_epoch, policy.grid), 4),
        "read_amplification": round(ranged / max(kept, 1e-9), 3),
        "read_amplification_without_offsets": round(whole / max(kept, 1e-9), 3),
        "batches_per_slot_epoch": per_slot, "halved_batches": int(plan.epoch(0).halved.sum()),
        "batch_seconds_mean": round(sum(u.num_samples for b in first_epoch for u in b) / SR
                                    / len(first_epoch), 1),
        "updates_per_epoch": per_slot * layout.readers, "read_updates": updates,
        "reads_min": int(reads.min()), "reads_max": int(reads.max()),
        "reads_share_at_min": round(float(np.mean(reads == reads.min())), 4),
        "reads_share_at_max": round(float(np.mean(reads == reads.max())), 4),
        "reads_not_as_planned": int(np.count_nonzero(reads != planned)),
        "read_in_every_epoch": round(float(np.mean(planned == epochs)), 4),
        "resume_updates": resume_updates, "resume_s": round(resume_s, 3), "reads_pass_s": round(reads_s, 1)}
    return emit(record)
