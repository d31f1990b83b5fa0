"""``w2v-dist bench loader``: our streaming loader against the decode limit and a seed-style pipeline.

All measurements run in one process tree, one after the other, on the same corpus: (1) raw soundfile decode of
the same FLAC bytes on one core (the physical limit), (2) our loader, (3) the seed script's map-style pipeline
(per-file reads, per-sample processor, ``DataLoader(batch_size=2, shuffle=True)``) with the same worker count;
then padding, resume skip rate, worker memory, and shards vs per-file reads over loopback HTTP.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset

from w2v_dist.bench.corpus import build
from w2v_dist.bench.output import SR, emit
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch
from w2v_dist.data.index import load_shard_set
from w2v_dist.data.loader import TrainStream, make_loader, make_preprocess
from w2v_dist.data.plan import BatchPolicy, StreamLayout, padding_fraction
from w2v_dist.prep.sources import librispeech_sources


def raw_decode_rate(files: list[Path]) -> float:
    """Audio-seconds decoded per second on one core, from bytes already in memory."""
    blobs = [f.read_bytes() for f in files]
    start, seconds = time.perf_counter(), 0.0
    for blob in blobs:
        seconds += len(sf.read(io.BytesIO(blob), dtype="float32")[0]) / SR
    return seconds / (time.perf_counter() - start)


def _metadata(batch: CTCBatch | dict[str, Any]) -> dict[str, Any]:
    """A batch (ours, or the seed-style pipeline's dict) without its tensors of samples: keeping ~1 GB of decoded
    audio alive, as no trainer does, would make every batch land in fresh memory and time page faults instead of
    the loader."""
    if isinstance(batch, CTCBatch):
        return {"seconds": batch.seconds, "numel": batch.input_values.numel(), "input_lengths": batch.input_lengths,
                "keys": batch.keys}
    kept = {k: v for k, v in batch.items() if k not in ("input_values", "labels", "attention_mask")}
    return kept | {"numel": batch["input_values"].numel()}


def timed_batches(batches: Iterator[Any], audio_seconds: float) -> tuple[float, list[dict[str, Any]]]:
    """Audio-seconds per second over batches until ``audio_seconds`` of real audio went by (first batch
    excluded: worker start-up is not throughput); returns the batches' metadata."""
    first = next(batches)
    start, seen, kept = time.perf_counter(), 0.0, [_metadata(first)]
    for batch in batches:
        kept.append(_metadata(batch))
        seen += kept[-1]["seconds"]
        if seen >= audio_seconds:
            break
    return seen / (time.perf_counter() - start), kept


class SeedStyleDataset(Dataset):  # type: ignore[type-arg]
    """The original script's pipeline: one file read and one processor call per sample."""

    def __init__(self, items: list[tuple[str, str]], processor: Any, read: Callable[[str], bytes]) -> None:
        self.items, self.processor, self.read = items, processor, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        location, text = self.items[index]
        audio, rate = sf.read(io.BytesIO(self.read(location)), dtype="float32")
        values = self.processor(audio, sampling_rate=rate).input_values[0]
        return {"input_values": values, "labels": self.processor.tokenizer(text).input_ids}


def seed_collate(processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = processor.feature_extractor.pad([{"input_values": f["input_values"]} for f in features],
                                                return_tensors="pt", return_attention_mask=True)
        mask = batch["attention_mask"]
        return {"input_values": batch["input_values"], "seconds": float(mask.sum()) / SR,
                "padded": mask.numel(), "real": int(mask.sum())}
    return collate


def seed_style_loader(items: list[tuple[str, str]], processor: Any, workers: int,
                      read: Callable[[str], bytes]) -> Iterator[dict[str, Any]]:
    loader = DataLoader(SeedStyleDataset(items, processor, read), batch_size=2, shuffle=True, num_workers=workers,
                        collate_fn=seed_collate(processor))
    return itertools.chain.from_iterable(itertools.repeat(loader))  # type: ignore[arg-type]


def worker_uss_mb() -> float:
    """Largest unique (non-shared) memory of a worker: what the shuffle buffer and decoding cost, without the
    copy-on-write pages inherited from the parent."""
    children = psutil.Process().children(recursive=True)
    return max((c.memory_full_info().uss for c in children), default=0) / 2**20


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url) as response:
        return bytes(response.read())


def prepare_shards(work_dir: Path, utterances: int, workers: int) -> tuple[Path, Path]:
    """The benchmark corpus and its shards under ``work_dir`` (reused when present)."""
    from w2v_dist.prep.shards import ShardOptions, shard_corpus

    corpus = build(work_dir / "corpus", utterances)
    shards = work_dir / "shards"
    if not (shards / "index.json").exists():
        shard_corpus(librispeech_sources(corpus, ["train-clean-100"]), shards,
                     ShardOptions(shard_size_mb=16, workers=workers, overwrite=True), {"subsets": ["bench"]})
    return corpus, shards


def loader_benchmark(work_dir: Path, utterances: int, workers: int) -> dict[str, Any]:
    from w2v_dist.data.text import librispeech_vocab
    from w2v_dist.model import processor_from_vocab

    corpus, shards = prepare_shards(work_dir, utterances, workers)
    processor = processor_from_vocab(librispeech_vocab())
    files = sorted(corpus.glob("train-clean-100/*/*/*.flac"))
    total_seconds = sum(sf.info(str(f)).frames for f in files) / SR
    shard_set = load_shard_set(str(shards))
    policy = BatchPolicy(200 * SR, 64, 512, 2000)
    prep = make_preprocess(processor, EncoderGeometry(), shard_set.sample_rate, 0.0, 35.0)
    emit({"measure": "corpus", "utterances": len(files), "audio_hours": total_seconds / 3600,
          "flac_mb": sum(f.stat().st_size for f in files) / 1e6, "shards": len(shard_set.urls)})

    raw = emit({"measure": "raw_decode", "audio_seconds_per_second_per_core": raw_decode_rate(files)})
    stream = TrainStream(shard_set, policy, prep, rank=0, world_size=1, layout=StreamLayout(1, max(1, workers), 1))
    running = iter(make_loader(stream, workers, 4))
    ours_rate, ours_batches = timed_batches(running, total_seconds)
    uss = worker_uss_mb()
    del running
    ours = emit({"measure": "ours", "workers": workers, "audio_seconds_per_second": ours_rate,
                 "per_worker": ours_rate / max(workers, 1), "worker_uss_mb": uss,
                 "shuffle_buffer": policy.shuffle_buffer, "bucket_window": policy.bucket_window})
    single = TrainStream(shard_set, policy, prep, rank=0, world_size=1, layout=StreamLayout(1, 1, 1))
    single_rate, _ = timed_batches(iter(make_loader(single, 0, 2)), total_seconds / 2)
    emit({"measure": "ours_in_process", "workers": 0, "audio_seconds_per_second": single_rate,
          "fraction_of_raw_decode": single_rate / raw["audio_seconds_per_second_per_core"],
          "note": "one core, no worker processes: the pipeline's own cost next to bare decoding"})
    texts = {s.key: s.text for s in librispeech_sources(corpus, ["train-clean-100"])}
    items = [(str(f), str(texts[f.stem])) for f in files]
    local_files = seed_style_loader(items, processor, workers, lambda p: Path(p).read_bytes())
    seed_rate, seed_batches = timed_batches(local_files, total_seconds)
    emit({"measure": "seed_style", "workers": workers, "audio_seconds_per_second": seed_rate,
          "ours_over_seed": ours_rate / seed_rate})

    ours_padding = 1 - sum(float(b["input_lengths"].sum()) for b in ours_batches) / sum(
        b["numel"] for b in ours_batches)
    utts = [u for shard in shard_set.utterances for u in shard]
    mean_size = int(round(np.mean([len(b["keys"]) for b in ours_batches])))
    order = np.random.default_rng(0).permutation(len(utts))
    random_batches = [[utts[i] for i in order[j:j + mean_size]] for j in range(0, len(utts), mean_size)]
    seed_padding = 1 - sum(b["real"] for b in seed_batches) / sum(b["padded"] for b in seed_batches)
    emit({"measure": "padding", "ours": ours_padding, "random_same_size": padding_fraction(random_batches),
          "seed_style_batch2": seed_padding, "mean_batch_size": mean_size,
          "ours_planned_train_clean_100_scale": planned_padding(policy)})

    skip = resume_skip_rate(shard_set, policy, prep)
    emit({"measure": "resume_skip", **skip})
    http = http_comparison(work_dir, shard_set, policy, prep, items, processor, workers, total_seconds)
    summary = {"measure": "summary", "fraction_of_raw_decode": ours["per_worker"] /
               raw["audio_seconds_per_second_per_core"], "fraction_of_raw_decode_in_process":
               single_rate / raw["audio_seconds_per_second_per_core"], "padding_fraction": ours_padding,
               "padding_fraction_train_clean_100_scale": planned_padding(policy),
               "ours_over_seed_style": ours_rate / seed_rate, "resume_skip_samples_per_second":
               skip["samples_per_second"], "http_shards_over_per_file": http["shards_over_per_file"],
               "worker_uss_mb": uss, "torch_threads": torch.get_num_threads()}
    return emit(summary)


def planned_padding(policy: BatchPolicy, utterances: int = 28_539, shards: int = 24) -> float:
    """Padding of one epoch's plan on a train-clean-100-sized index (metadata only: bucketing works on lengths)."""
    from w2v_dist.bench.corpus import librispeech_like_seconds
    from w2v_dist.data.index import Utterance
    from w2v_dist.data.plan import assign_pieces, epoch_rng, plan_batches

    lengths = (librispeech_like_seconds(utterances, np.random.default_rng(1)) * SR).astype(int)
    per_shard = [[Utterance(s, p, f"{s}-{p}", int(n), 200) for p, n in enumerate(lengths[s::shards])]
                 for s in range(shards)]
    seconds = [sum(u.num_samples for u in shard) / SR for shard in per_shard]
    batches = [b for slot, pieces in enumerate(assign_pieces(seconds, [len(s) for s in per_shard], 16, 1, 0))
               for b in plan_batches(pieces, per_shard, policy, lambda u: None, epoch_rng(1, 0, slot))[0]]
    return padding_fraction(batches)


def resume_skip_rate(shard_set: Any, policy: BatchPolicy, prep: Any) -> dict[str, float]:
    """Samples per second a resume skips: the plan replay that positions a stream, with no audio read."""
    stream = TrainStream(shard_set, policy, prep, rank=0, world_size=1, layout=StreamLayout(1, 1, 1))
    start = time.perf_counter()
    skipped = sum(len(batch) for epoch in range(20) for batch in stream.plan(0, epoch)[0])
    replay = time.perf_counter() - start
    stream.update = sum(len(stream.plan(0, epoch)[0]) for epoch in range(20))
    start = time.perf_counter()
    next(iter(make_loader(stream, 0, 2)))
    return {"samples_skipped": skipped, "replay_seconds": replay, "samples_per_second": skipped / replay,
            "first_batch_after_20_epochs_seconds": time.perf_counter() - start}


def http_comparison(work_dir: Path, shard_set: Any, policy: BatchPolicy, prep: Any, items: list[tuple[str, str]],
                    processor: Any, workers: int, total_seconds: float) -> dict[str, float]:
    """Shards streamed over loopback HTTP vs one HTTP request per FLAC (object storage's shape)."""
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "-d", str(work_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(server.stdout.readline().split("port ")[1].split()[0])  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        remote = load_shard_set(f"{base}/shards")
        stream = TrainStream(remote, policy, prep, rank=0, world_size=1, layout=StreamLayout(1, max(1, workers), 1))
        shards_rate, _ = timed_batches(iter(make_loader(stream, workers, 4)), total_seconds / 2)
        urls = [(f"{base}/{Path(p).relative_to(work_dir)}", t) for p, t in items]
        files_rate, _ = timed_batches(seed_style_loader(urls, processor, workers, http_get), total_seconds / 2)
    finally:
        server.terminate()
        server.wait()
    return emit({"measure": "http", "shards_audio_seconds_per_second": shards_rate,
                 "per_file_audio_seconds_per_second": files_rate, "shards_over_per_file": shards_rate / files_rate})
