"""Audio decoding and the wav2vec 2.0 feature-encoder geometry (frames per input length)."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_error(err: Exception) -> str:
    """A decoding failure in words that are the same on every run: libsndfile's messages carry the repr of
    the in-memory file (``Error opening <_io.BytesIO object at 0x7f...>: ...``), which names nothing a user
    can find and differs between runs. Callers add the file or sample key."""
    if isinstance(err, sf.LibsndfileError):
        return f"audio decoder error: {err.error_string.removeprefix('Error : ').strip()}"
    return _OBJECT_REPR.sub("<in-memory audio>", str(err))


@dataclass(frozen=True)
class EncoderGeometry:
    """Kernel sizes and strides of the convolutional feature encoder (wav2vec2-base defaults)."""

    kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)

    @property
    def receptive_field(self) -> int:
        """Fewest input samples that give one output frame (400 for wav2vec2)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.kernels, self.strides):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    @property
    def inputs_to_logits_ratio(self) -> int:
        return math.prod(self.strides)

    def frames(self, num_samples: int) -> int:
        """Output frames for ``num_samples`` inputs, exactly as the conv stack computes them."""
        length = num_samples
        for kernel, stride in zip(self.kernels, self.strides):
            length = (length - kernel) // stride + 1
            if length <= 0:
                return 0
        return length

    def frames_of(self, num_samples: np.ndarray) -> np.ndarray:
        """:meth:`frames` of many lengths at once (a length that reaches 0 stays at or below it, layer by
        layer)."""
        length = num_samples
        for kernel, stride in zip(self.kernels, self.strides):
            length = (length - kernel) // stride + 1
        return np.maximum(length, 0)

    @classmethod
    def from_model_config(cls, config: object) -> EncoderGeometry:
        return cls(tuple(config.conv_kernel), tuple(config.conv_stride))  # type: ignore[attr-defined]


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode audio bytes to float32 ``(samples, channels)`` and the sample rate."""
    return sf.read(io.BytesIO(data), dtype="float32", always_2d=True)


def to_16k_mono(audio: np.ndarray, rate: int) -> np.ndarray:
    """Down-mix to mono and resample to 16 kHz with torchaudio."""
    mono = audio.mean(axis=1) if audio.ndim == 2 else audio
    if rate == SAMPLE_RATE:
        return mono.astype(np.float32)
    import torch
    import torchaudio.functional as F

    return F.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, SAMPLE_RATE).numpy()


def speed_rates(speed: float, sample_rate: int) -> tuple[int, int]:
    """Speed perturbation as resampling (Kaldi's ``speed`` effect, tempo and pitch together): the audio is
    read as if recorded at ``sample_rate * speed`` and resampled to ``sample_rate``; (from, to), reduced."""
    source = round(sample_rate * speed)
    common = math.gcd(source, sample_rate)
    return source // common, sample_rate // common


def perturbed_samples(num_samples: int, speed: float, sample_rate: int) -> int:
    """Length after :func:`speed_perturb`, exactly as torchaudio's resampler computes it."""
    source, target = speed_rates(speed, sample_rate)
    return int(math.ceil(target * num_samples / source))


def perturbed_samples_of(num_samples: np.ndarray, speed: float, sample_rate: int) -> np.ndarray:
    """:func:`perturbed_samples` of many lengths at once, to the sample (the products stay far below 2**53,
    so the float division rounds as Python's does)."""
    source, target = speed_rates(speed, sample_rate)
    return np.ceil(target * num_samples / source).astype(np.int64)


def speed_perturb(audio: np.ndarray, speed: float, sample_rate: int) -> np.ndarray:
    """``audio`` played ``speed`` times faster (shorter for speed > 1), resampled with torchaudio."""
    import torch
    import torchaudio.functional as F

    source, target = speed_rates(speed, sample_rate)
    return F.resample(torch.from_numpy(np.ascontiguousarray(audio)), source, target).numpy()


def encode_flac(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
