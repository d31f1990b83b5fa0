"""Transcribing audio files with an exported model through the Hugging Face ASR pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import soundfile as sf

from w2v_dist.data.audio import SAMPLE_RATE, to_16k_mono


def transcribe_files(model_dir: str | Path, files: list[str]) -> Iterator[tuple[str, str]]:
    """(file, text) per file: any soundfile-readable audio, down-mixed and resampled to 16 kHz."""
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
    for path in files:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        result = asr({"raw": to_16k_mono(audio, rate), "sampling_rate": SAMPLE_RATE})
        yield path, str(result["text"]).strip()
