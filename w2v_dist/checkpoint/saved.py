"""What a run saves besides weights, optimizer and RNG states: :class:`SavedRun`, one type for the trainer,
resume and the tools, and its two places on disk (the tag's ``world.json`` and DeepSpeed's client state)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from w2v_dist.checkpoint.tags import WORLD_FILE
from w2v_dist.data.plan import StreamLayout


@dataclass(frozen=True, kw_only=True)
class SavedRun:
    """A checkpoint's run: where it stood and how its data was dealt out.

    On disk in two places, in the format every w2v-dist has written: the tag's ``world.json``
    (``world_size``, ``step``, ``data``: the loader state, ``model``), readable before any engine exists (the
    data layout sizes the engine's gradient accumulation); and DeepSpeed's client state (``run``, ``loader``,
    ``config``), which comes back when the engine loads the tag. Keys an older w2v-dist did not write read as
    ``None`` (or empty)."""

    world_size: int
    """Ranks that wrote the checkpoint (the world size may differ now: :mod:`w2v_dist.checkpoint.resume`)."""
    step: int
    """Optimizer updates done."""
    layout: StreamLayout | None
    """How the training data is dealt out, fixed for the run by its first launch; ``None``: written before
    data layouts were recorded."""
    run: dict[str, Any] = field(default_factory=dict)
    """The trainer's counters (``RunState.state_dict()``); empty when read from ``world.json`` alone
    (:meth:`read`), before the engine loads the tag."""
    loader: dict[str, Any] | None = None
    """The training stream's position (``TrainStream.state_dict()``): its update, layout and plan inputs."""
    config: str | None = None
    """The run's config as YAML; ``None`` in ``world.json`` alone, and in checkpoints written before it was
    stored."""
    model: dict[str, str] | None = None
    """The identity of the model trained (:func:`w2v_dist.model.model_identity`); ``None``: written by an
    older w2v-dist, or not yet given (:meth:`~w2v_dist.checkpoint.commit.Checkpointer.save` adds it)."""

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed stores with the weights."""
        return {"run": self.run, "loader": self.loader, "config": self.config}

    def record(self) -> dict[str, Any]:
        """``world.json``."""
        return {"world_size": self.world_size, "step": self.step, "data": self.loader, "model": self.model}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SavedRun:
        """From ``world.json``'s ``record``."""
        loader = record.get("data")
        return cls(world_size=int(record["world_size"]), step=int(record["step"]),
                   layout=saved_layout(loader), loader=loader, model=record.get("model"))

    def with_client_state(self, client_state: dict[str, Any]) -> SavedRun:
        """With what DeepSpeed gave back when the engine loaded the tag (its loader state is the one
        ``world.json`` records as ``data``)."""
        loader = client_state.get("loader", self.loader)
        return replace(self, run=dict(client_state.get("run") or {}), loader=loader,
                       layout=saved_layout(loader), config=client_state.get("config"))

    @classmethod
    def read(cls, directory: Path) -> SavedRun:
        """A tag's ``world.json`` (no weights loaded): world size, step, data layout and model identity."""
        return cls.from_record(json.loads((directory / WORLD_FILE).read_text()))


def saved_layout(loader: dict[str, Any] | None) -> StreamLayout | None:
    """The data layout a loader state records (``None`` for a checkpoint older than data layouts)."""
    return StreamLayout.of_state(loader) if loader else None
