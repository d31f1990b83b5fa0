"""A LibriSpeech-shaped benchmark corpus (train-clean-100's duration histogram, speech-like FLAC sizes), its
shards and a randomly initialised model: the inputs the benchmarks share, reused when present.

espeak-ng is too slow to speak an hour of 12-16 s utterances, and decode speed depends on the signal, not on
the words: filtered noise under a syllable-rate envelope compresses like speech (~20 kB per second of FLAC).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from benchmarks.output import SR

CHARS_PER_SECOND = 14.6
"""LibriSpeech's letters per audio-second (DeepLearningExamples' token rate)."""


def librispeech_like_seconds(count: int, rng: np.random.Generator) -> np.ndarray:
    """Durations like train-clean-100: 1-35 s, three quarters between 12 and 16.5 s."""
    kind = rng.random(count)
    short = rng.uniform(1.0, 12.0, count)
    typical = rng.uniform(12.0, 16.5, count)
    long = rng.uniform(16.5, 35.0, count)
    return np.where(kind < 0.2, short, np.where(kind < 0.95, typical, long))


def speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * SR)
    noise = np.convolve(rng.normal(0, 1, n + 15), np.hanning(16), mode="valid")[:n]
    envelope = np.abs(np.sin(np.arange(n) * np.pi * 4.0 / SR)) ** 2
    return (0.08 * noise / noise.std() * envelope).astype(np.float32)


def build(root: Path, utterances: int, seed: int = 0) -> Path:
    """Write ``root/LibriSpeech/train-clean-100`` (reused when complete); returns the LibriSpeech dir."""
    base = root / "LibriSpeech"
    marker = root / "COMPLETE.json"
    if marker.exists() and json.loads(marker.read_text()) == {"utterances": utterances, "seed": seed}:
        return base
    rng = np.random.default_rng(seed)
    lines: dict[Path, list[str]] = {}
    for n, seconds in enumerate(librispeech_like_seconds(utterances, rng)):
        speaker, chapter = 1000 + n % 20, 5000 + n % 20
        chapter_dir = base / "train-clean-100" / str(speaker) / str(chapter)
        chapter_dir.mkdir(parents=True, exist_ok=True)
        key = f"{speaker}-{chapter}-{n:04d}"
        sf.write(chapter_dir / f"{key}.flac", speech_like(float(seconds), rng), SR, format="FLAC",
                 subtype="PCM_16")
        words = " ".join("SPEECH" for _ in range(max(1, int(seconds * CHARS_PER_SECOND / 7))))
        lines.setdefault(chapter_dir / f"{speaker}-{chapter}.trans.txt", []).append(f"{key} {words}")
    for path, content in lines.items():
        path.write_text("\n".join(content) + "\n")
    marker.write_text(json.dumps({"utterances": utterances, "seed": seed}))
    return base


def prepare_shards(work_dir: Path, utterances: int, workers: int) -> tuple[Path, Path]:
    """The benchmark corpus and its shards under ``work_dir``."""
    from w2v_dist.prep.shards import ShardOptions, shard_corpus
    from w2v_dist.prep.sources import librispeech_sources

    corpus = build(work_dir / "corpus", utterances)
    shards = work_dir / "shards"
    if not (shards / "index.json").exists():
        shard_corpus(librispeech_sources(corpus, ["train-clean-100"]), shards,
                     ShardOptions(shard_size_mb=16, workers=workers, overwrite=True), {"subsets": ["bench"]})
    return corpus, shards


def prepared_model(work_dir: Path, size: str) -> Path:
    """``work_dir/model-{size}``, randomly initialised (``tiny`` or ``base`` geometry)."""
    from w2v_dist.model import init_model

    model_dir = work_dir / f"model-{size}"
    return model_dir if (model_dir / "config.json").exists() else init_model(model_dir, size)
