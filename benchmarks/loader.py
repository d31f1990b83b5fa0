"""``w2v-dist bench loader``: our streaming loader against the decode limit and a seed-style pipeline.

All measurements run in one process tree, one after the other, on the same corpus: (1) raw soundfile decode
of the same FLAC bytes on one core (the physical limit), (2) our loader, (3) the seed script's map-style
pipeline (per-file reads, per-sample processor, ``DataLoader(batch_size=2, shuffle=True)``) with the same
worker count; then padding, resume skip rate, worker memory, and shards vs per-file reads over loopback HTTP.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.corpus import librispeech_like_seconds, prepare_shards
from benchmarks.output import SR, emit, timed
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch
from w2v_dist.data.index import ShardSet, Utterance, columns_of, load_shard_set
from w2v_dist.data.loader import TrainStream, make_loader
from w2v_dist.data.plan import BatchPolicy, StreamLayout, padding_fraction
from w2v_dist.data.preprocess import Preprocess, make_preprocess
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.data.slots import TrainPlan
from w2v_dist.prep.sources import librispeech_sources

Metadata = tuple[float, int, int, int]
KEEP_ALL = Preprocess(labels=None, collator=None, geometry=EncoderGeometry(),  # type: ignore[arg-type]
                      min_samples=0, max_samples=0, filtered=False)
"""Plans of lengths alone: no filter, no labeler, no collator."""
"""A batch's real seconds, real samples, padded samples and utterances."""


def raw_decode_rate(files: list[Path]) -> float:
    """Audio-seconds decoded per second on one core, from bytes already in memory."""
    blobs = [f.read_bytes() for f in files]
    seconds, wall = timed(lambda: sum(len(sf.read(io.BytesIO(blob), dtype="float32")[0]) / SR
                                      for blob in blobs))
    return seconds / wall


def _metadata(batch: CTCBatch) -> Metadata:
    """A batch without its tensors of samples: keeping ~1 GB of decoded audio alive, as no trainer does,
    would make every batch land in fresh memory and time page faults instead of the loader."""
    return batch.seconds, int(batch.input_lengths.sum()), batch.input_values.numel(), len(batch)


def padding(batches: list[Metadata]) -> float:
    """The padded share of the batches' samples."""
    return 1 - sum(b[1] for b in batches) / sum(b[2] for b in batches)


def timed_batches(batches: Iterator[CTCBatch], audio_seconds: float, whole: bool = False
                  ) -> tuple[float, list[Metadata]]:
    """Audio-seconds per second over batches until ``audio_seconds`` of real audio went by, and the batches'
    metadata. The first batch is excluded (worker start-up is not throughput) unless ``whole``: an epoch
    timed from its first shard read on, which is how two pipelines reading different files compare fairly."""
    start, seen = time.perf_counter(), 0.0
    kept = [_metadata(next(batches))]
    if whole:
        seen = kept[0][0]
    else:
        start = time.perf_counter()
    for batch in batches:
        kept.append(_metadata(batch))
        seen += kept[-1][0]
        if seen >= audio_seconds:
            break
    return seen / (time.perf_counter() - start), kept


def stream(shard_set: ShardSet, policy: BatchPolicy, prep: Preprocess, workers: int) -> TrainStream:
    """One rank's training stream, one slot per worker."""
    return TrainStream(shard_set, policy, prep, rank=0, world_size=1,
                       layout=StreamLayout(1, max(1, workers), 1))


class SeedStyleDataset(Dataset):  # type: ignore[type-arg]
    """The original script's pipeline: one file read and one processor call per sample, padded by the
    processor (labels are tokenised but not collated)."""

    def __init__(self, items: list[tuple[str, str]], processor: Any, read: Callable[[str], bytes]) -> None:
        self.items, self.processor, self.read = items, processor, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        location, text = self.items[index]
        audio, rate = sf.read(io.BytesIO(self.read(location)), dtype="float32")
        values = self.processor(audio, sampling_rate=rate).input_values[0]
        return {"input_values": values, "labels": self.processor.tokenizer(text).input_ids}

    def collate(self, features: list[dict[str, Any]]) -> CTCBatch:
        batch = self.processor.feature_extractor.pad([{"input_values": f["input_values"]} for f in features],
                                                     return_tensors="pt", return_attention_mask=True)
        lengths = batch["attention_mask"].sum(dim=1)
        return CTCBatch(input_values=batch["input_values"], input_lengths=lengths, labels=torch.empty(0, 0),
                        keys=("",) * len(features), texts=(), seconds=float(lengths.sum()) / SR,
                        normalize=False)


def seed_style_loader(items: list[tuple[str, str]], processor: Any, workers: int,
                      read: Callable[[str], bytes]) -> Iterator[CTCBatch]:
    dataset = SeedStyleDataset(items, processor, read)
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=workers, collate_fn=dataset.collate)
    return itertools.chain.from_iterable(itertools.repeat(loader))


def worker_uss_mb() -> float:
    """Largest unique (non-shared) memory of a worker: what the shuffle buffer and decoding cost, without the
    copy-on-write pages inherited from the parent."""
    children = psutil.Process().children(recursive=True)
    return max((c.memory_full_info().uss for c in children), default=0) / 2**20


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url) as response:
        return bytes(response.read())


def loader_benchmark(work_dir: Path, utterances: int, workers: int) -> dict[str, Any]:
    from w2v_dist.data.text import librispeech_vocab
    from w2v_dist.model import processor_from_vocab

    corpus, shards = prepare_shards(work_dir, utterances, workers)
    processor = processor_from_vocab(librispeech_vocab())
    files = sorted(corpus.glob("train-clean-100/*/*/*.flac"))
    total_seconds = sum(sf.info(str(f)).frames for f in files) / SR
    shard_set = load_shard_set(str(shards))
    policy = BatchPolicy.from_seconds(max_batch_seconds=200, sample_rate=SR, max_batch_size=64,
                                      bucket_window=512, shuffle_buffer=2000)
    prep = make_preprocess(processor, EncoderGeometry(), shard_set.sample_rate, 0.0, 35.0)
    emit({"measure": "corpus", "utterances": len(files), "audio_hours": total_seconds / 3600,
          "flac_mb": sum(f.stat().st_size for f in files) / 1e6, "shards": len(shard_set.urls)})

    raw = emit({"measure": "raw_decode", "audio_seconds_per_second_per_core": raw_decode_rate(files)})
    running = iter(make_loader(stream(shard_set, policy, prep, workers), workers, 4))
    ours_rate, ours_batches = timed_batches(running, total_seconds)
    uss = worker_uss_mb()
    del running
    ours = emit({"measure": "ours", "workers": workers, "audio_seconds_per_second": ours_rate,
                 "per_worker": ours_rate / max(workers, 1), "worker_uss_mb": uss,
                 "shuffle_buffer": policy.shuffle_buffer, "bucket_window": policy.bucket_window})
    single_rate, _ = timed_batches(iter(make_loader(stream(shard_set, policy, prep, 0), 0, 2)),
                                   total_seconds, whole=True)
    emit({"measure": "ours_in_process", "workers": 0, "audio_seconds_per_second": single_rate,
          "fraction_of_raw_decode": single_rate / raw["audio_seconds_per_second_per_core"],
          "note": "one core, no worker processes, one whole epoch with its shard reads: the pipeline's own "
                  "cost next to bare decoding of bytes already in memory"})
    texts = {s.key: s.text for s in librispeech_sources(corpus, ["train-clean-100"])}
    items = [(str(f), str(texts[f.stem])) for f in files]
    local_files = seed_style_loader(items, processor, workers, lambda p: Path(p).read_bytes())
    seed_rate, seed_batches = timed_batches(local_files, total_seconds)
    emit({"measure": "seed_style", "workers": workers, "audio_seconds_per_second": seed_rate,
          "ours_over_seed": ours_rate / seed_rate})

    utts = [u for shard in shard_set.utterances for u in shard]
    mean_size = int(round(np.mean([b[3] for b in ours_batches])))
    order = np.random.default_rng(0).permutation(len(utts))
    random_batches = [[utts[i] for i in order[j:j + mean_size]] for j in range(0, len(utts), mean_size)]
    planned, planned_shapes = planned_padding(policy)
    grid = ShapeGrid.for_encoder(16, EncoderGeometry(), policy.max_batch_samples, policy.max_batch_size)
    bounded, bounded_shapes = planned_padding(replace(policy, grid=grid))
    pad = emit({"measure": "padding", "ours": padding(ours_batches),
                "random_same_size": padding_fraction(random_batches),
                "seed_style_batch2": padding(seed_batches),
                "mean_batch_size": mean_size, "ours_planned_train_clean_100_scale": planned,
                "ours_planned_shapes_per_epoch": planned_shapes,
                "bounded_16_planned_train_clean_100_scale": bounded,
                "bounded_16_planned_shapes_per_epoch": bounded_shapes})

    skip = emit({"measure": "resume_skip", **resume_skip_rate(shard_set, policy, prep)})
    http = http_comparison(work_dir, policy, prep, items, processor, workers, total_seconds)
    return emit({"measure": "summary", "fraction_of_raw_decode": ours["per_worker"] /
                 raw["audio_seconds_per_second_per_core"], "fraction_of_raw_decode_in_process":
                 single_rate / raw["audio_seconds_per_second_per_core"], "padding_fraction": pad["ours"],
                 "padding_fraction_train_clean_100_scale": pad["ours_planned_train_clean_100_scale"],
                 "batch_shapes_per_epoch": planned_shapes,
                 "batch_shapes_per_epoch_bounded_16": bounded_shapes,
                 "ours_over_seed_style": ours_rate / seed_rate, "resume_skip_samples_per_second":
                 skip["samples_per_second"], "http_shards_over_per_file": http["shards_over_per_file"],
                 "worker_uss_mb": uss, "torch_threads": torch.get_num_threads()})


def planned_padding(policy: BatchPolicy, utterances: int = 28_539, shards: int = 24) -> tuple[float, int]:
    """Padding of one epoch's plan on a train-clean-100-sized index (metadata only: bucketing works on
    lengths), and its distinct batch shapes."""
    lengths = (librispeech_like_seconds(utterances, np.random.default_rng(1)) * SR).astype(int)
    per_shard = [[Utterance(s, p, f"{s}-{p}", int(n), 200) for p, n in enumerate(lengths[s::shards])]
                 for s in range(shards)]
    shard_set = ShardSet("mem", tuple(f"s{s}.tar" for s in range(shards)),
                         tuple(sum(u.num_samples for u in shard) / SR for shard in per_shard),
                         columns_of(tuple(map(tuple, per_shard))), SR)
    plan = TrainPlan(shard_set, policy, KEEP_ALL, StreamLayout(16, 1, 1), rank=0, world_size=1)
    batches = [b for slot in range(16) for b in plan.slot_epoch(slot, 0)[0]]
    grid = policy.grid
    shapes = {grid.shape(b) if grid else (len(b), max(u.num_samples for u in b)) for b in batches}
    return padding_fraction(batches, grid), len(shapes)


def resume_skip_rate(shard_set: ShardSet, policy: BatchPolicy, prep: Preprocess) -> dict[str, float]:
    """Samples per second a resume skips: the plan replay that positions a stream, with no audio read."""
    positioned = stream(shard_set, policy, prep, 0)
    plan = positioned.plan
    skipped, replay = timed(lambda: sum(len(batch) for epoch in range(20)
                                        for batch in plan.slot_epoch(0, epoch)[0]))
    positioned.update = sum(len(plan.slot_epoch(0, epoch)[0]) for epoch in range(20))
    _, first = timed(lambda: next(iter(make_loader(positioned, 0, 2))))
    return {"samples_skipped": skipped, "replay_seconds": replay, "samples_per_second": skipped / replay,
            "first_batch_after_20_epochs_seconds": first}


def http_comparison(work_dir: Path, policy: BatchPolicy, prep: Preprocess, items: list[tuple[str, str]],
                    processor: Any, workers: int, total_seconds: float) -> dict[str, float]:
    """Shards streamed over loopback HTTP vs one HTTP request per FLAC (object storage's shape): one whole
    epoch each, from the first request on."""
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "-d", str(work_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        port = int(server.stdout.readline().split("port ")[1].split()[0])  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        remote = stream(load_shard_set(f"{base}/shards"), policy, prep, workers)
        shards_rate, _ = timed_batches(iter(make_loader(remote, workers, 4)), total_seconds, whole=True)
        urls = [(f"{base}/{Path(p).relative_to(work_dir)}", t) for p, t in items]
        files_rate, _ = timed_batches(seed_style_loader(urls, processor, workers, http_get), total_seconds,
                                      whole=True)
    finally:
        server.terminate()
        server.wait()
    return emit({"measure": "http", "shards_audio_seconds_per_second": shards_rate,
                 "per_file_audio_seconds_per_second": files_rate,
                 "shards_over_per_file": shards_rate / files_rate})
