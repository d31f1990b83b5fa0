"""CTC padding collator: decoded utterances in, one padded model batch out."""

from __future__ import annotations

from dataclasses import dataclass

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

    def __call__(self, examples: list[Example]) -> dict[str, object]:
        longest = max((len(e.audio) for e in examples), default=0)
        longest_label = max((len(e.labels) for e in examples), default=0)
        input_values = np.zeros((len(examples), longest), dtype=np.float32)
        labels = np.full((len(examples), longest_label), LABEL_PAD, dtype=np.int64)
        for row, example in enumerate(examples):
            input_values[row, :len(example.audio)] = example.audio
            labels[row, :len(example.labels)] = example.labels
        lengths = torch.tensor([len(e.audio) for e in examples], dtype=torch.long)
        mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        batch: dict[str, object] = {"input_values": torch.from_numpy(input_values),
                                    "labels": torch.from_numpy(labels), "keys": [e.key for e in examples],
                                    "texts": [e.text for e in examples],
                                    "seconds": float(lengths.sum()) / self.sample_rate, "input_lengths": lengths}
        if self.return_attention_mask:
            batch["attention_mask"] = mask
        return batch
