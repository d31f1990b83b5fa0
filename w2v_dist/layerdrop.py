"""LayerDrop that every rank agrees on: the transformer layers skipped in an update are drawn from
``(seed, update)`` alone, so every rank and data stream skips the same ones.

Hugging Face draws LayerDrop per forward from the global RNG, which w2v-dist seeds per data stream: ranks
then skip different layers, ZeRO-2 reduces gradient buckets of different sizes (gloo aborts, NCCL may hang or
mix gradients) and partitioned ZeRO-3 waits forever for a gather that other ranks never start. fairseq draws
per GPU too and lets DDP reduce the skipped layers' gradients as zeros; ZeRO's bucketed reductions cannot do
that. A draw per update keeps every collective paired and the run independent of the world size (a
micro-step's index depends on it: stream s is micro-step s // world on each rank). The skipped layers'
parameters get zero gradients on every ZeRO stage (DeepSpeed fills missing gradients with zeros), as
fairseq's do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FIRST_DROPPABLE = {"wavlm": 1}
"""Families whose first layer must always run: WavLM's computes the relative position bias the others
reuse."""


class SharedLayerDrop:
    """The skip decisions of one model's transformer layers; :meth:`draw` them before each micro-batch's
    forward. Until the first draw nothing is skipped (the preflight's worst case runs every layer)."""

    def __init__(self, layers: torch.nn.ModuleList, probability: float, first_droppable: int = 0) -> None:
        self.probability, self.first_droppable, self.count = probability, first_droppable, len(layers)
        self.skipped: frozenset[int] = frozenset()
        for index, layer in enumerate(layers):
            layer.__class__ = _droppable_class(type(layer))  # same parameters, names and state dict
            layer.layer_drop = (self, index)  # type: ignore[assignment]

    def draw(self, seed: int, update: int) -> frozenset[int]:
        """Skip each layer in ``update`` with ``probability``, drawn from a generator of its own (the global
        RNG stays as the data stream's seeding left it)."""
        # numpy: no tensor read
        draws = np.random.default_rng(hash((seed, update)) & 0x7FFFFFFF).random(self.count)
        self.skipped = frozenset(i for i, d in enumerate(draws) if i >= self.first_droppable
                                 and d < self.probability)
        return self.skipped


_CLASSES: dict[type, type] = {}


def _droppable_class(base: type) -> type:
    """``base`` with a ``__call__`` that returns its input unchanged when the layer is skipped, outside any
    compiled region (``model.compile`` compiles each layer's forward in place) and before DeepSpeed's
    hooks."""
    if base not in _CLASSES:
        def __call__(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            drop, index = self.layer_drop
            if self.training and index in drop.skipped:
                return (hidden_states if "position_bias" not in kwargs
                        else (hidden_states, kwargs["position_bias"]))
            return base.__call__(self, hidden_states, *args, **kwargs)

        _CLASSES[base] = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})
    return _CLASSES[base]
