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
        input_values = np.zeros((len(examples), longest), dtype=np.float32)
        for row, example in enumerate(examples):
            input_values[row, :len(example.audio)] = example.audio
        return self.assemble(input_values, [len(e.audio) for e in examples], [e.labels for e in examples],
                             [e.key for e in examples], [e.text for e in examples])

    def assemble(self, input_values: np.ndarray, lengths: list[int], labels: list[list[int]], keys: list[str],
                 texts: list[str]) -> dict[str, object]:
        """The batch from audio already decoded into its zero-padded rows (the loader's path: no copy)."""
        label_values = np.full((len(labels), max(map(len, labels), default=0)), LABEL_PAD, dtype=np.int64)
        for row, label in enumerate(labels):
            label_values[row, :len(label)] = label
        input_lengths = torch.tensor(lengths, dtype=torch.long)
        batch: dict[str, object] = {"input_values": torch.from_numpy(input_values),
                                    "labels": torch.from_numpy(label_values), "keys": keys, "texts": texts,
                                    "seconds": sum(lengths) / self.sample_rate, "input_lengths": input_lengths}
        if self.return_attention_mask:  # built only when asked: it is as large as the batch itself
            positions = torch.arange(input_values.shape[1])
            batch["attention_mask"] = (positions[None, :] < input_lengths[:, None]).long()
        return batch
