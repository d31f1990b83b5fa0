"""The typed model batch (:class:`CTCBatch`) from the loader to the engine, the scorer and the benchmarks:
padded waveforms, CTC labels and what the run reports about them; and its model inputs on a device."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

LABEL_PAD = -100
"""Label padding ignored by ``Wav2Vec2ForCTC``'s CTC loss."""


@dataclass(frozen=True, kw_only=True)
class CTCBatch:
    """One batch of utterances, as every consumer sees it."""

    input_values: torch.Tensor
    """``[rows, samples]`` float32 waveforms, zero-padded, *not yet* normalised (:meth:`model_inputs` does it
    on the device when ``normalize`` is set). The utterances are the first ``len(batch)`` rows; a batch
    padded to a grid shape has empty rows after them (length 0, no labels)."""
    input_lengths: torch.Tensor
    """``[rows]`` real sample counts."""
    labels: torch.Tensor
    """``[rows, longest label]`` token ids, padded with :data:`LABEL_PAD`."""
    keys: tuple[str, ...]
    texts: tuple[str, ...]
    """The normalised reference transcripts."""
    seconds: float
    """Real (unpadded) audio in the batch."""
    normalize: bool
    """The feature extractor's ``do_normalize``."""
    attention_mask: torch.Tensor | None = None
    """``[batch, samples]``, only for models whose feature extractor asks for one."""
    skips: dict[str, int] = field(default_factory=dict)
    """Utterances the loader skipped since its previous batch, by reason (pooled into ``loader_skips``)."""
    dropped: tuple[tuple[str, str], ...] = ()
    """(key, reason) of utterances planned for this batch that could not be decoded."""
    sources: dict[str, int] = field(default_factory=dict)
    """Training on a mix (``data.train_mix``): utterances of the batch per shard set."""
    update: int = -1
    """Training: the optimizer update this micro-batch belongs to (-1 outside training)."""
    stream: int = -1
    """Training: its data stream (:class:`~w2v_dist.data.plan.StreamLayout`); seeds its dropout and masks."""
    epoch: int = -1
    """Training: the epoch of its slot's plan it comes from."""
    sample_lengths: tuple[int, ...] = field(init=False)
    """``input_lengths`` as host integers."""
    target_lengths: tuple[int, ...] = field(init=False)
    """Each utterance's label count, as host integers."""

    def __post_init__(self) -> None:
        """The lengths the loss needs, computed where the batch is made (a loader worker) with numpy: read in
        the train step from a device tensor, each would be a host sync (``w2v_dist/ctc.py``)."""
        real = self.labels.numpy() >= 0
        object.__setattr__(self, "sample_lengths", tuple(int(n) for n in self.input_lengths.numpy()))
        rows = len(self.sample_lengths)
        object.__setattr__(self, "target_lengths", tuple(int(n) for n in real.sum(axis=1))
                           if real.shape[:1] == (rows,)
                           else (0,) * rows)  # a batch without labels (bench loader)

    @functools.cached_property
    def flat_targets(self) -> torch.Tensor:
        """The labels without their padding, concatenated: what the CTC loss takes. Made with numpy on the
        host, where the batch is used: a tensor more in the batch a worker sends would cost a shared-memory
        segment."""
        labels = self.labels.numpy()
        return torch.from_numpy(np.ascontiguousarray(labels[labels >= 0]))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def targets(self) -> int:
        """CTC target tokens in the batch."""
        return sum(self.target_lengths)

    def model_inputs(self, device: torch.device | str, with_labels: bool = True) -> dict[str, torch.Tensor]:
        """``*ForCTC``'s keyword arguments on ``device``, the waveforms normalised there when asked."""
        inputs = {"input_values": self.input_values.to(device, non_blocking=True)}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask.to(device, non_blocking=True)
        if with_labels:
            inputs["labels"] = self.labels.to(device, non_blocking=True)
        if self.normalize and inputs["input_values"].numel():
            inputs["input_values"] = normalize_batch(inputs["input_values"], self.input_lengths)
        return inputs


@dataclass(frozen=True)
class CTCCollator:
    return_attention_mask: bool
    """True when the feature extractor asks for a mask (large-lv60 does, base does not: its padding is zeros
    after normalisation and it was pre-trained without a mask)."""
    sample_rate: int = 16_000
    normalize: bool = True
    """The feature extractor's ``do_normalize``: :meth:`CTCBatch.model_inputs` applies it on the device."""

    def assemble(self, input_values: np.ndarray | torch.Tensor, lengths: list[int], labels: list[list[int]],
                 keys: list[str], texts: list[str], **reports: Any) -> CTCBatch:
        """The batch from raw waveforms already decoded into their zero-padded rows (the loader decodes
        straight into them: no copy). ``reports``: :class:`CTCBatch`'s ``skips``, ``sources`` and
        ``dropped``."""
        values = torch.as_tensor(input_values)
        # more than the utterances when a grid shape has empty rows (w2v_dist.data.shapes)
        rows = values.shape[0]
        label_values = np.full((rows, max(map(len, labels), default=0)), LABEL_PAD, dtype=np.int64)
        for row, label in enumerate(labels):
            label_values[row, :len(label)] = label
        input_lengths = torch.tensor(lengths + [0] * (rows - len(lengths)), dtype=torch.long)
        mask = None
        if self.return_attention_mask:  # built only when asked: it is as large as the batch itself
            mask = (torch.arange(values.shape[1])[None, :] < input_lengths[:, None]).long()
            mask[len(lengths):] = 1  # an empty row attends to its silence: a row masked whole would be NaN
        return CTCBatch(input_values=values, input_lengths=input_lengths,
                        labels=torch.from_numpy(label_values),
                        keys=tuple(keys), texts=tuple(texts), seconds=sum(lengths) / self.sample_rate,
                        normalize=self.normalize, attention_mask=mask, **reports)


def normalize_batch(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its real samples, padding left at zero: what
    ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does to each input, done for a whole padded batch on the
    device the batch goes to rather than per utterance in a loader worker."""
    values = values.float()
    lengths = lengths.to(values.device, non_blocking=True)
    mask = torch.arange(values.shape[1], device=values.device)[None, :] < lengths[:, None]
    count = lengths.float().clamp(min=1)[:, None]
    centred = (values - values.sum(dim=1, keepdim=True) / count) * mask
    variance = centred.square().sum(dim=1, keepdim=True) / count
    return centred * torch.rsqrt(variance + 1e-7)
