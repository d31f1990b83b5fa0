"""Bounded batch shapes (``data.shape_quantum_frames``): every training batch is one of a few shapes.

Batches by seconds have a new ``(rows, samples)`` shape nearly every step, and on a GPU every new shape
costs: cuDNN and cuBLAS plan anew, autotuning is never reused, and ``torch.compile`` specialises again. On
the H200 the same batch repeated ran 22-72 % faster than fresh ones (docs/performance.md). Here a batch is
padded to a grid: its length is the fewest samples whose frame count is a multiple of the quantum (32 frames:
10,240 samples + 80 for wav2vec2's encoder) at or above its longest utterance's, and each grid length has one
row count, as many as the batch budget allows, and half of it for a batch that fits in half (the global
epoch halves a few batches so that every slot reads as many: :mod:`w2v_dist.data.epoch`). A batch with fewer
utterances gets empty rows (no audio, no labels: they add nothing to the loss, ``w2v_dist/ctc.py``). The
epoch cuts each shard's utterances longest first, a batch holding its first one's rows, so only a shard's
last batch is short of rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import Utterance


@dataclass(frozen=True)
class ShapeGrid:
    quantum_frames: int
    """Padded frame counts are multiples of this."""
    receptive_field: int
    """Samples for the encoder's first frame."""
    frame_step: int
    """Samples per further frame (``inputs_to_logits_ratio``)."""
    max_batch_samples: int
    max_batch_size: int

    @classmethod
    def for_encoder(cls, quantum_frames: int, geometry: EncoderGeometry, max_batch_samples: int,
                    max_batch_size: int) -> ShapeGrid:
        return cls(quantum_frames, geometry.receptive_field, geometry.inputs_to_logits_ratio,
                   max_batch_samples, max_batch_size)

    def length(self, num_samples: int) -> int:
        """The grid length an utterance of ``num_samples`` is padded to (at least ``num_samples``)."""
        frames = 1 + max(0, -(-(num_samples - self.receptive_field) // self.frame_step))
        cells = -(-frames // self.quantum_frames)
        return self.receptive_field + (cells * self.quantum_frames - 1) * self.frame_step

    def cells(self, num_samples: np.ndarray) -> np.ndarray:
        """The grid cell of each utterance: its grid length is :meth:`cell_length` of it (1, 2, ...)."""
        above = np.asarray(num_samples) - self.receptive_field + self.frame_step - 1
        steps = np.maximum(above, 0) // self.frame_step
        return (steps + self.quantum_frames) // self.quantum_frames

    def cell_length(self, cells: np.ndarray | int) -> np.ndarray | int:
        return self.receptive_field + (cells * self.quantum_frames - 1) * self.frame_step

    def lengths(self, num_samples: np.ndarray) -> np.ndarray:
        """:meth:`length` of many utterances at once."""
        return np.asarray(self.cell_length(self.cells(num_samples)))

    def rows(self, length: int) -> int:
        """The rows of a full batch of grid length ``length``: the budget's worth, at least one."""
        return max(1, min(self.max_batch_size, self.max_batch_samples // length))

    def shape(self, batch: Sequence[Utterance]) -> tuple[int, int]:
        """``(rows, samples)`` of a planned batch once padded to the grid: a full batch's rows, or half of
        them (rounded up) for a batch that fits in half, as the global epoch's halved batches do
        (:mod:`w2v_dist.data.epoch`): two shapes per grid length."""
        length = self.length(max(u.num_samples for u in batch))
        rows = self.rows(length)
        half = -(-rows // 2)
        return (half if len(batch) <= half else rows), length
