"""Resume, elastic included: a checkpoint written by any world size resumes on any other that divides its
data streams, with the checkpoint's data layout (:func:`data_layout`) and its optimizer state re-partitioned
through DeepSpeed's universal format (:func:`load_tag`), so the run goes on with the batches of the
uninterrupted one.

Which tag is :func:`~w2v_dist.checkpoint.tags.resumable_tag`'s answer, checksums verified, of this run's
model."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from w2v_dist import dist
from w2v_dist.checkpoint.files import UnsafeCheckpointError, convert_to_universal, safe_load
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import MANIFEST, WORLD_FILE, lost_latest, resumable_tag
from w2v_dist.config import Config
from w2v_dist.data.plan import StreamLayout
from w2v_dist.engine import Engine
from w2v_dist.model import describe_identity, identity_mismatch

log = logging.getLogger("w2v_dist.checkpoint")
UNIVERSAL_DIR = "universal"
"""Inside a tag: the same checkpoint re-partitionable for any world size, rewritten by every resume that
needs it."""


class ResumeError(RuntimeError):
    """The run cannot resume what its output_dir holds: a checkpoint of another model than the config
    names, or ``latest`` naming a checkpoint of which no complete copy is left. Raised before any file is
    written."""


def rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_tag(root: Path, world: dist.World, model: dict[str, str] | None) -> str | None:
    """Collective: the tag a starting run, or a rollback, resumes (``None``: start afresh).

    :func:`~w2v_dist.checkpoint.tags.resumable_tag` with every file's checksum verified, by rank 0 alone (a
    checkpoint is read once, not once per rank) and shared, so that every rank loads the same tag. Raises
    :class:`ResumeError` on every rank when the tag holds another model than ``model`` (this run's), or when
    ``latest`` names a checkpoint but no complete one is left (deleted or damaged): starting again at step 0
    would append a second timeline to metrics.jsonl and overwrite best/.
    """
    choice: tuple[str | None, str | None] = (None, None)
    if world.is_main:
        try:
            choice = (verified_tag(root, model), None)
        except ResumeError as err:
            choice = (None, str(err))
    tag, failure = dist.all_gather_objects(choice)[0]
    if failure is not None:
        raise ResumeError(failure)
    return tag


def verified_tag(root: Path, model: dict[str, str] | None) -> str | None:
    """:func:`resume_tag`'s choice, on one process."""
    tag = resumable_tag(root, verify=True)
    if tag is None and (lost := lost_latest(root, verify=True)):
        raise ResumeError(f"{lost}. Restore the checkpoint, or start afresh: in a new output_dir, or here "
                          "with checkpoint.resume=false (metrics.jsonl then holds both runs)")
    if tag is not None and model is not None:
        check_model(root / tag, model)
    return tag


def check_model(directory: Path, model: dict[str, str]) -> None:
    """Refuse a checkpoint of another model than this run's (:func:`w2v_dist.model.identity_mismatch`)."""
    saved = SavedRun.read(directory).model
    if saved is None:
        log.warning("checkpoint %s records no model identity (written by an older w2v-dist): resuming it as "
                    "%s without checking that it is the same model", directory, model["name_or_path"])
        return
    if differences := identity_mismatch(saved, model):
        raise ResumeError(f"cannot resume {directory}: it holds {describe_identity(saved)}, but this run's "
                          f"model is {describe_identity(model)}; they differ in {', '.join(differences)}. "
                          "Resume with the model the run started from, or train the other one in a new "
                          "output_dir")


def load_tag(engine: Engine, root: Path, tag: str, world: dist.World) -> SavedRun:
    """Collective: load ``root/tag`` into ``engine`` and this rank's RNG states; the run it saved.

    Nothing in the checkpoint is unpickled beyond tensors and DeepSpeed's few classes
    (:data:`~w2v_dist.checkpoint.files.CHECKPOINT_CLASSES`): on the same world size DeepSpeed loads every
    file through :func:`~w2v_dist.checkpoint.files.safe_load`; a checkpoint whose optimizer state was
    partitioned by another world size goes through DeepSpeed's universal format, converted afresh at every
    such resume (:func:`to_universal`)."""
    directory = root / tag
    on_disk = SavedRun.read(directory)
    written_by = on_disk.world_size
    if written_by == world.size or not any(directory.glob("*optim_states.pt")):
        client_state = engine.load(root, tag)
    else:  # the optimizer state is partitioned by rank: re-partition it for this world size
        to_universal(directory, world)
        client_state = engine.load(directory, UNIVERSAL_DIR, universal=True)
    if client_state is None:
        raise RuntimeError(f"checkpoint {directory} could not be loaded")
    rng_file = directory / f"rng_rank{world.rank}.pt"
    if rng_file.is_file():  # a rank the checkpoint did not have starts from its seed; batches reseed anyway
        set_rng_state(safe_load(rng_file))
    saved = on_disk.with_client_state(client_state)
    log.info("resumed from %s at step %s%s", directory, saved.step,
             "" if written_by == world.size else f" (written by {written_by} ranks, now {world.size})")
    return saved


def to_universal(directory: Path, world: dist.World) -> None:
    """Collective: rank 0 writes ``<tag>/universal`` afresh while the others wait; all then load only that.

    DeepSpeed's converter and its universal loader unpickle without restriction, so a ``universal/`` found on
    disk is deleted, never loaded, and every file of the tag but our JSON records is first checked with the
    allowlist (:func:`w2v_dist.checkpoint.files.convert_to_universal`). A refusal (or any failure) on rank 0
    is raised on every rank, naming the file and the class: no rank is left waiting for a conversion that
    never comes."""
    failure: Exception | None = None
    if world.is_main:
        log.info("converting %s to DeepSpeed's universal format for %d ranks", directory, world.size)
        records = {WORLD_FILE, *(p.name for p in directory.glob(MANIFEST.format(rank="*")))}
        try:
            convert_to_universal(directory, directory / UNIVERSAL_DIR, records)
        except Exception as err:  # every rank must hear of it; rank 0 raises it below
            failure = err
    outcome = dist.all_gather_objects(None if failure is None else (type(failure).__name__, str(failure)))[0]
    if failure is not None:
        raise failure
    if outcome is not None:
        kind, message = outcome
        error = UnsafeCheckpointError if kind == UnsafeCheckpointError.__name__ else RuntimeError
        raise error(f"rank 0 could not convert {directory} to DeepSpeed's universal format: {message}")


def data_layout(cfg: Config, world_size: int, workers: int, saved: SavedRun | None) -> StreamLayout:
    """The run's data layout: the checkpoint's when resuming (whatever the world size now), else the
    config's."""
    streams = round(cfg.trainer.update_seconds / cfg.data.max_batch_seconds) if cfg.trainer.update_seconds \
        else cfg.trainer.grad_accum * world_size
    fresh = StreamLayout(streams, cfg.data.stream_readers or max(1, workers), cfg.trainer.seed)
    if saved is None or saved.layout is None:
        return fresh
    layout = saved.layout
    checked = (("trainer.seed", layout.seed, fresh.seed, True),
               ("data streams per update", layout.streams, fresh.streams, bool(cfg.trainer.update_seconds)),
               ("data.stream_readers", layout.readers, fresh.readers, bool(cfg.data.stream_readers)))
    conflicts = [f"{key} {old} (checkpoint) vs {new} (config)" for key, old, new, explicit in checked
                 if explicit and old != new]
    if conflicts:
        raise ValueError(f"cannot resume this run's data order: {'; '.join(conflicts)}. Keep the values the "
                         "run started with, or use a new output_dir")
    return layout


def world_change(saved: SavedRun | None, world_size: int, layout: StreamLayout, max_batch_seconds: float
                 ) -> str | None:
    """What a resume on another world size changes, said at startup (``None``: the same world size)."""
    if saved is None or saved.world_size == world_size:
        return None
    before = saved.world_size
    return (f"resuming step {saved.step:,} from {before} rank(s) on {world_size}: grad_accum "
            f"{layout.streams // before} -> {layout.streams // world_size}, "
            f"{max_batch_seconds * layout.streams:,.0f} s per update ({layout.streams} data streams)")
