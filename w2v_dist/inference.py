"""Transcribing audio files with a trained model through the Hugging Face ASR pipeline.

Any soundfile-readable file is down-mixed and resampled to 16 kHz. Files longer than ``chunk_seconds`` are
cut into overlapping chunks by the pipeline (``chunk_length_s``/``stride_length_s``): each chunk sees
``overlap_seconds`` of its neighbours' audio on each side as context, and the CTC frames from that context
are dropped before the chunks' outputs are joined, so words at the cuts are neither lost nor doubled. Word
timestamps come from the CTC alignment (the frame of each word's first and last character).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf

from w2v_dist.data.audio import SAMPLE_RATE, to_16k_mono


@dataclass
class Transcript:
    path: str
    text: str
    seconds: float
    words: list[dict[str, Any]] = field(default_factory=list)
    """``{"word", "start", "end"}`` in seconds, when word timestamps were asked for."""


def check_chunking(chunk_seconds: float, overlap_seconds: float) -> None:
    """The pipeline needs each chunk to keep some audio of its own between the two context margins."""
    if chunk_seconds <= 0 or overlap_seconds < 0 or chunk_seconds <= 2 * overlap_seconds:
        raise ValueError(f"need chunk_seconds > 2 x overlap_seconds >= 0, got {chunk_seconds} and "
                         f"{overlap_seconds}")


def transcribe(model: str | Path, files: list[str], chunk_seconds: float = 30.0,
               overlap_seconds: float = 2.0,
               word_timestamps: bool = False, config: str | Path | None = None) -> Iterator[Transcript]:
    """One :class:`Transcript` per file, in order; ``model``: an HF export dir or a DeepSpeed checkpoint."""
    from transformers import pipeline

    from w2v_dist.export import load_for_inference
    from w2v_dist.process import device_for

    check_chunking(chunk_seconds, overlap_seconds)
    network, processor = load_for_inference(model, config)
    asr: Any = pipeline("automatic-speech-recognition", model=network, tokenizer=processor.tokenizer,
                        feature_extractor=processor.feature_extractor, device=str(device_for(0)))
    for path in files:
        audio = to_16k_mono(*sf.read(str(path), dtype="float32", always_2d=True))
        options: dict[str, Any] = {}
        if len(audio) > chunk_seconds * SAMPLE_RATE:
            # shorter files in one pass: exactly the model's own output
            options |= {"chunk_length_s": chunk_seconds, "stride_length_s": overlap_seconds}
        if word_timestamps:
            options["return_timestamps"] = "word"
        result = asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, **options)
        words = [{"word": c["text"], "start": round(float(c["timestamp"][0]), 3),
                  "end": round(float(c["timestamp"][1]), 3)} for c in result.get("chunks", [])]
        yield Transcript(str(path), str(result["text"]).strip(), len(audio) / SAMPLE_RATE, words)

