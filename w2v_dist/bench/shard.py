"""``w2v-dist bench shard``: sharding throughput next to a raw copy of the same files (the limit of a
pass-through sharder), on the LibriSpeech-shaped benchmark corpus."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from w2v_dist.bench.corpus import build
from w2v_dist.bench.loader import emit
from w2v_dist.data.shards import ShardOptions, shard_corpus
from w2v_dist.data.sources import librispeech_sources


def run(work_dir: Path, utterances: int, workers: int) -> dict[str, Any]:
    corpus = build(work_dir / "corpus", utterances)
    files = sorted(p for p in (corpus / "train-clean-100").rglob("*") if p.is_file())
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    for path in files:  # both passes start from a warm page cache
        path.read_bytes()
    copy_dir = work_dir / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    start = time.perf_counter()
    for path in files:
        target = copy_dir / path.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    copy_s = time.perf_counter() - start
    shutil.rmtree(copy_dir)
    emit({"measure": "raw_copy", "mb": megabytes, "seconds": copy_s, "mb_per_second": megabytes / copy_s})
    seconds = {}
    for check, count in (("full", workers), ("tail", workers), ("tail", 1)):
        start = time.perf_counter()
        index = shard_corpus(librispeech_sources(corpus, ["train-clean-100"]), work_dir / "sharded",
                             ShardOptions(shard_size_mb=64, workers=count, overwrite=True, check_audio=check),
                             {"subsets": ["bench"]})
        seconds[check, count] = shard_s = time.perf_counter() - start
        emit({"measure": "shard", "check_audio": check, "workers": count, "seconds": shard_s,
              "mb_per_second": megabytes / shard_s, "audio_hours_per_second": index["totals"]["hours"] / shard_s,
              "utterances_per_second": index["totals"]["written"] / shard_s,
              "fraction_of_raw_copy": copy_s / shard_s})
    return emit({"measure": "summary", "fraction_of_raw_copy": copy_s / seconds["tail", workers],
                 "fraction_of_raw_copy_full_decode": copy_s / seconds["full", workers], "workers": workers,
                 "speedup_over_one_worker": seconds["tail", 1] / seconds["tail", workers],
                 "note": "includes starting the worker processes; full decoding is bound by FLAC decode speed"})
