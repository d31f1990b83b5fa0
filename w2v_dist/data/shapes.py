"""Bounded batch shapes (``data.shape_quantum_frames``): every training batch is one of a few shapes.

Batches by seconds have a new ``(rows, samples)`` shape nearly every step, and on a GPU every new shape
costs: cuDNN and cuBLAS plan anew, autotuning is never reused, and ``torch.compile`` specialises again. On
the H200 the same batch repeated ran 22-72 % faster than fresh ones (docs/performance.md). Here a batch is
padded to a grid: its length is the fewest samples whose frame count is a multiple of the quantum (32 frames:
10,240 samples + 80 for wav2vec2's encoder) at or above its longest utterance's, and each grid length has one
row count, as many as the batch budget allows. A batch with fewer utterances gets empty rows (no audio, no
labels: they add nothing to the loss, ``w2v_dist/ctc.py``). Utterances are packed by grid cell across a
slot's whole epoch; what is left at the end is packed longest first, so a slot's epoch has at most one batch
that is not full.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

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

    def rows(self, length: int) -> int:
        """The rows of every batch of grid length ``length``: the budget's worth, at least one."""
        return max(1, min(self.max_batch_size, self.max_batch_samples // length))

    def shape(self, batch: Iterable[Utterance]) -> tuple[int, int]:
        """``(rows, samples)`` of a planned batch once padded to the grid."""
        length = self.length(max(u.num_samples for u in batch))
        return self.rows(length), length


def pack_on_grid(utterances: Iterable[Utterance], grid: ShapeGrid, window: int, rng: random.Random | None
                 ) -> list[list[Utterance]]:
    """A slot-epoch's stream of utterances in batches of grid cells, in the order they fill; with ``rng``,
    the order is shuffled among the batches filled during each ``window`` utterances (as :func:`plan_batches`
    shuffles each window's batches)."""
    waiting: dict[int, list[Utterance]] = {}
    batches: list[list[Utterance]] = []
    filled: list[list[Utterance]] = []
    for seen, utt in enumerate(utterances, 1):
        length = grid.length(utt.num_samples)
        cell = waiting.setdefault(length, [])
        cell.append(utt)
        if len(cell) == grid.rows(length):
            filled.append(cell)
            waiting[length] = []
        if seen % window == 0:
            batches += _shuffled(filled, rng)
            filled = []
    # The cells' remainders, longest first: each batch starts with its longest utterance, which sets its
    # shape, and is filled with the next ones (shorter, so they fit), so only the very last batch can be
    # short of rows.
    left = sorted((u for cell in waiting.values() for u in cell), key=lambda u: (-u.num_samples, u.key))
    while left:
        rows = grid.rows(grid.length(left[0].num_samples))
        filled.append(left[:rows])
        left = left[rows:]
    return batches + _shuffled(filled, rng)


def _shuffled(batches: list[list[Utterance]], rng: random.Random | None) -> list[list[Utterance]]:
    if rng is not None:
        rng.shuffle(batches)
    return batches
