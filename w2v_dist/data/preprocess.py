"""Turning a sample's tar members into model inputs, in the loader workers: the training filters (per
utterance, and vectorised for the plan) and decoding straight into a batch row."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from w2v_dist.data.audio import EncoderGeometry, speed_perturb
from w2v_dist.data.collate import CTCCollator
from w2v_dist.data.index import Utterance
from w2v_dist.data.text import CharLabeler


@dataclass(frozen=True)
class Preprocess:
    """Everything a worker needs to turn tar members into model inputs (picklable)."""

    labels: CharLabeler
    collator: CTCCollator
    geometry: EncoderGeometry
    min_samples: int
    max_samples: int
    filtered: bool = True
    """False when scoring: every utterance is planned (:mod:`w2v_dist.scoring`), none is filtered."""

    def skip_reason(self, utt: Utterance) -> str | None:
        if not self.filtered:
            return None
        if utt.label_length == 0:
            return "empty_label"
        if utt.num_samples < max(self.min_samples, self.geometry.receptive_field):
            return "too_short"
        if utt.num_samples > self.max_samples:
            return "too_long"
        if self.geometry.frames(utt.num_samples) < utt.label_length:
            return "ctc_infeasible"
        return None

    def kept(self, num_samples: np.ndarray, label_length: np.ndarray) -> np.ndarray:
        """Whether :meth:`skip_reason` keeps each utterance, for arrays of lengths at once."""
        if not self.filtered:
            return np.ones(len(num_samples), dtype=bool)
        return ((label_length > 0) & (num_samples >= max(self.min_samples, self.geometry.receptive_field))
                & (num_samples <= self.max_samples) & (self.geometry.frames_of(num_samples) >= label_length))

    def decode_into(self, members: dict[str, bytes], row: np.ndarray, sample_rate: int, utt: Utterance
                    ) -> tuple[list[int], str]:
        """Decode one sample straight into its batch row (already zero-padded to the batch width); return its
        labels and transcript. The row's length is the sample count the plan promised (the index's, or after
        ``utt.speed``'s perturbation). Normalisation happens later, on the training device
        (:meth:`~w2v_dist.data.collate.CTCBatch.model_inputs`)."""
        text = json.loads(members["json"])["text"]
        stored = utt.source_samples or len(row)
        with sf.SoundFile(io.BytesIO(members["flac"])) as audio:
            if audio.samplerate != sample_rate or audio.channels != 1:
                raise ValueError(f"expected {sample_rate} Hz mono, got {audio.samplerate} Hz with "
                                 f"{audio.channels} channels")
            if audio.frames != stored:
                raise ValueError(f"the index says {stored} samples, the audio has {audio.frames}")
            target = row if utt.speed == 1.0 else np.empty(stored, dtype=np.float32)
            if len(audio.read(stored, dtype="float32", out=target)) != stored:
                raise ValueError("the audio ends early (truncated FLAC)")
        if utt.speed != 1.0:
            row[:] = speed_perturb(target, utt.speed, sample_rate)  # the plan computed this length exactly
        return self.labels(text), text


def make_preprocess(processor: Any, geometry: EncoderGeometry, sample_rate: int, min_seconds: float,
                    max_seconds: float) -> Preprocess:
    """The worker-side preprocessing the model's processor implies."""
    extractor = processor.feature_extractor
    return Preprocess(labels=CharLabeler(processor.tokenizer),
                      collator=CTCCollator(bool(extractor.return_attention_mask), sample_rate,
                                           bool(extractor.do_normalize)), geometry=geometry,
                      min_samples=int(min_seconds * sample_rate), max_samples=int(max_seconds * sample_rate))
