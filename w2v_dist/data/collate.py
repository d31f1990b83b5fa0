"""CTC padding collator: decoded utterances in, one padded model batch out; and that batch's model inputs on a
device (normalised there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LABEL_PAD = -100
"""Label padding ignored by ``Wav2Vec2ForCTC``'s CTC loss."""


@dataclass(frozen=True)
class Example:
    key: str
    audio: np.ndarray
    """Normalised 16 kHz mono float32 waveform."""
    labels: list[int]
    text: str


@dataclass(frozen=True)
class CTCCollator:
    return_attention_mask: bool
    """True when the feature extractor asks for a mask (large-lv60 does, base does not: its padding is zeros
    after normalisation and it was pre-trained without a mask)."""
    sample_rate: int = 16_000
    normalize: bool = True
    """The feature extractor's ``do_normalize``: :func:`model_inputs` applies it on the device."""

    def __call__(self, examples: list[Example]) -> dict[str, object]:
        longest = max((len(e.audio) for e in examples), default=0)
        input_values = np.zeros((len(examples), longest), dtype=np.float32)
        for row, example in enumerate(examples):
            input_values[row, :len(example.audio)] = example.audio
        return self.assemble(input_values, [len(e.audio) for e in examples], [e.labels for e in examples],
                             [e.key for e in examples], [e.text for e in examples])

    def assemble(self, input_values: np.ndarray | torch.Tensor, lengths: list[int], labels: list[list[int]],
                 keys: list[str], texts: list[str]) -> dict[str, object]:
        """The batch from waveforms already decoded into their zero-padded rows (the loader's path: no copy)."""
        label_values = np.full((len(labels), max(map(len, labels), default=0)), LABEL_PAD, dtype=np.int64)
        for row, label in enumerate(labels):
            label_values[row, :len(label)] = label
        input_lengths = torch.tensor(lengths, dtype=torch.long)
        batch: dict[str, object] = {"input_values": torch.as_tensor(input_values),
                                    "labels": torch.from_numpy(label_values), "keys": keys, "texts": texts,
                                    "seconds": sum(lengths) / self.sample_rate, "input_lengths": input_lengths,
                                    "normalize": self.normalize}
        if self.return_attention_mask:  # built only when asked: it is as large as the batch itself
            positions = torch.arange(input_values.shape[1])
            batch["attention_mask"] = (positions[None, :] < input_lengths[:, None]).long()
        return batch


def model_inputs(batch: dict[str, Any], device: torch.device | str, with_labels: bool = True
                 ) -> dict[str, torch.Tensor]:
    """``Wav2Vec2ForCTC``'s keyword arguments on ``device``, the waveforms normalised there when asked."""
    names = ("input_values", "attention_mask", "labels") if with_labels else ("input_values", "attention_mask")
    inputs = {k: batch[k].to(device, non_blocking=True) for k in names if k in batch}
    if batch.get("normalize") and inputs["input_values"].numel():
        inputs["input_values"] = normalize_batch(inputs["input_values"], batch["input_lengths"])
    return inputs


def normalize_batch(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its real samples, padding left at zero: what
    ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does to each input, done for a whole padded batch where the
    batch already is (on a GPU, microseconds; in a loader worker it cost a tenth of the worker's core)."""
    values = values.float()
    lengths = lengths.to(values.device, non_blocking=True)
    mask = torch.arange(values.shape[1], device=values.device)[None, :] < lengths[:, None]
    count = lengths.float().clamp(min=1)[:, None]
    centred = (values - values.sum(dim=1, keepdim=True) / count) * mask
    variance = centred.square().sum(dim=1, keepdim=True) / count
    return centred * torch.rsqrt(variance + 1e-7)
