"""``w2v-dist bench shard``: sharding throughput next to a raw copy of the same files by as many processes
(the limit of a pass-through sharder), on the LibriSpeech-shaped benchmark corpus.

Both write to a tmpfs (``/dev/shm``) when there is one: on a disk, each pass's speed depends on how much of
the previous passes' output the kernel is still writing back (a copy measured 0.5 s, then 1.8 s, for the same
files), which is the disk's speed, not the sharder's. They are timed in interleaved rounds and compared by
their medians; each starts from a warm page cache and an empty output directory (removing the previous output
is not timed for either).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.corpus import build
from benchmarks.output import emit, interleaved_medians, timed
from w2v_dist.prep.shards import ShardOptions, shard_corpus
from w2v_dist.prep.sources import librispeech_sources

ROUNDS = 3


def _copy_files(files: list[Path], corpus: Path, copy_dir: Path) -> None:
    for path in files:
        target = copy_dir / path.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _copy(files: list[Path], corpus: Path, copy_dir: Path, megabytes: float, workers: int) -> float:
    """The same files copied by as many processes as the sharder uses (started inside the timing, as the
    sharder's are): a like-for-like limit, not one process against several."""
    shutil.rmtree(copy_dir, ignore_errors=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(partial(_copy_files, corpus=corpus, copy_dir=copy_dir),
                      [files[i::workers] for i in range(workers)]))
    seconds = time.perf_counter() - start
    shutil.rmtree(copy_dir)
    emit({"measure": "raw_copy", "mb": megabytes, "workers": workers, "seconds": seconds,
          "mb_per_second": megabytes / seconds})
    return seconds


def _shard(corpus: Path, out: Path, check: str, workers: int,
           megabytes: float) -> tuple[float, dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    options = ShardOptions(shard_size_mb=64, workers=workers, overwrite=True, check_audio=check)
    # Timed from listing the corpus on, as the note says.
    index, seconds = timed(lambda: shard_corpus(librispeech_sources(corpus, ["train-clean-100"]), out,
                                                options, {"subsets": ["bench"]}))
    emit({"measure": "shard", "check_audio": check, "workers": workers, "seconds": seconds,
          "mb_per_second": megabytes / seconds, "audio_hours_per_second": index["totals"]["hours"] / seconds,
          "utterances_per_second": index["totals"]["written"] / seconds})
    return seconds, index


def shard_benchmark(work_dir: Path, utterances: int, workers: int) -> dict[str, Any]:
    corpus = build(work_dir / "corpus", utterances)
    files = sorted(p for p in (corpus / "train-clean-100").rglob("*") if p.is_file())
    for path in files:  # every pass starts from a warm page cache
        path.read_bytes()
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    scratch = Path(tempfile.mkdtemp(prefix="w2v-dist-bench-",
                                    dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        medians = interleaved_medians({
            "copy": partial(_copy, files, corpus, scratch / "copy", megabytes, max(1, workers)),
            "tail": lambda: _shard(corpus, scratch / "sharded", "tail", workers, megabytes)[0]}, ROUNDS)
        full_s, _ = _shard(corpus, scratch / "sharded", "full", workers, megabytes)
        one_worker_s, index = _shard(corpus, scratch / "sharded", "tail", 1, megabytes)  # the rounds' totals
    finally:
        shutil.rmtree(scratch)
    copy_s, tail_s = medians["copy"], medians["tail"]
    return emit({"measure": "summary", "fraction_of_raw_copy": copy_s / tail_s,
                 "raw_copy_mb_per_second": megabytes / copy_s, "shard_mb_per_second": megabytes / tail_s,
                 "audio_hours_per_second": index["totals"]["hours"] / tail_s,
                 "fraction_of_raw_copy_full_decode": copy_s / full_s, "workers": workers,
                 "copy_workers": max(1, workers),
                 "speedup_over_one_worker": one_worker_s / tail_s, "rounds": ROUNDS,
                 "output": "tmpfs" if str(scratch).startswith("/dev/shm") else "disk",
                 "note": "medians of interleaved rounds; sharding includes listing the corpus and starting "
                         "the workers; full decoding is bound by FLAC decode speed"})
