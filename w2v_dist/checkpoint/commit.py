"""The commit protocol: every rank's part of a checkpoint written and checksummed, then ``latest`` moved
once, and retention (keep the last k and the best k). :class:`Checkpointer` is what the trainer holds for
everything a run saves: it commits here and resumes through :mod:`w2v_dist.checkpoint.resume`."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from w2v_dist import dist
from w2v_dist.checkpoint import resume, tags
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import LATEST, MANIFEST, WORLD_FILE, file_crc32, missing_parts, tag_name
from w2v_dist.engine import Engine
from w2v_dist.faults import pause_point

log = logging.getLogger("w2v_dist.checkpoint")
FULL_DISK_BYTES = 64 * 2**20
"""A failed write with less free space than this is reported as a full disk."""


class CheckpointWriteError(OSError):
    """A rank could not write its part of a checkpoint (full disk, quota, I/O error); ``latest`` is
    unchanged."""


class IncompleteCheckpointError(RuntimeError):
    """A tag directory whose commit manifests are missing or do not match the files on disk."""


def write_atomically(path: Path, text: str) -> None:
    """Temp file, fsync, rename, fsync of the directory: a reader sees the old content or the new, never
    half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_failure(err: Exception, directory: Path) -> str:
    """Why a write failed, in words a user can act on: torch's zip writer reports a full disk as "unexpected
    pos ..." without an errno, so the free space decides."""
    free = shutil.disk_usage(directory).free
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < FULL_DISK_BYTES:
        return f"No space left on device ({free:,} bytes free on {directory}; {err})"
    return f"{err} ({free:,} bytes free on {directory})"


class Checkpointer:
    """Tags ``step_NNNNNNNN`` under ``<output_dir>/checkpoints``; keeps the last k and the best k by dev WER.

    The commit protocol: every rank writes its files (DeepSpeed's and its RNG state), flushes them to the
    disk, then writes a manifest ``commit_rank<r>.json`` naming them with their sizes and checksums; after a
    barrier rank 0 checks all manifests and only then moves ``latest`` (atomically). A save torn by a crash,
    a kill or a full disk is never named by ``latest``, and resume skips it, or a tag damaged since, for the
    newest complete tag (:func:`~w2v_dist.checkpoint.tags.resumable_tag`).

    ``model``: the identity of the model being trained (:func:`w2v_dist.model.model_identity`), recorded in
    every tag's ``world.json``; resume refuses a checkpoint of another model.
"""

    def __init__(self, output_dir: Path, world: dist.World, *, keep_last: int, keep_best: int = 0,
                 model: dict[str, str] | None = None) -> None:
        self.root = output_dir / "checkpoints"
        self.world, self.keep_last, self.keep_best, self.model = world, keep_last, keep_best, model
        self.scores_file = self.root / "scores.json"

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names (what DeepSpeed's tools read); see :meth:`resumable_tag` for resume."""
        return tags.latest_tag(self.root)

    def tags(self) -> list[str]:
        return tags.tag_names(self.root)

    def missing(self, tag: str, verify: bool = False) -> list[str]:
        """What keeps ``tag`` from being a complete checkpoint (empty when it is complete); ``verify``:
        checksums too (:func:`~w2v_dist.checkpoint.tags.missing_parts`)."""
        return missing_parts(self.root / tag, verify)

    def resumable_tag(self, verify: bool = False) -> str | None:
        """:func:`w2v_dist.checkpoint.tags.resumable_tag`: ``latest`` when complete, else the newest complete
        tag."""
        return tags.resumable_tag(self.root, verify)

    def resume_tag(self) -> str | None:
        """Collective: the tag a starting run, or a rollback, resumes; ``None``: start afresh
        (:func:`w2v_dist.checkpoint.resume.resume_tag`: checksums verified, of this run's model)."""
        return resume.resume_tag(self.root, self.world, self.model)

    def saved_run(self, tag: str) -> SavedRun:
        """The run ``tag`` saved, from its ``world.json`` alone (no weights loaded)."""
        return SavedRun.read(self.root / tag)

    def resume(self, engine: Engine, tag: str | None = None) -> SavedRun | None:
        """Collective: load ``tag`` (default: :meth:`resume_tag`) into ``engine``, on this world size
        whatever the one that wrote it (:func:`w2v_dist.checkpoint.resume.load_tag`); the run it saved, or
        ``None`` to start fresh."""
        tag = tag or self.resume_tag()
        if tag is None:
            if self.tags():
                log.warning("no complete checkpoint under %s: starting from the beginning", self.root)
            return None
        return resume.load_tag(engine, self.root, tag, self.world)

    def save(self, engine: Engine, saved: SavedRun, score: float | None = None) -> Path:
        """Collective: all ranks write their part of ``saved`` at its step, recorded with this world's size
        and this run's model identity; ``latest`` moves only once every rank's part is on disk.

        ``score`` (dev WER, lower is better) ranks the checkpoint for ``keep_best``.
        """
        saved = replace(saved, world_size=self.world.size, model=self.model)
        step = saved.step
        tag = tag_name(step)
        directory = self.root / tag
        try:
            if self.world.is_main:
                # A tag left by a torn save (then a resume from an older one) must not mix old files with
                # new.
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
                write_atomically(directory / WORLD_FILE, json.dumps(saved.record()))
            dist.barrier()
            rng_file = directory / f"rng_rank{self.world.rank}.pt"
            torch.save(resume.rng_state(), rng_file)
            written = [rng_file, *engine.save(self.root, tag, saved.client_state())]
            if self.world.is_main:
                written.append(directory / WORLD_FILE)
            pause_point("save", self.world.rank)
            checksums = {str(p.relative_to(directory)): file_crc32(p, sync=True) for p in written}
            manifest = {"rank": self.world.rank, "step": step,
                        "files": {str(p.relative_to(directory)): p.stat().st_size for p in written},
                        "crc32": checksums}
            write_atomically(directory / MANIFEST.format(rank=self.world.rank),
                             json.dumps(manifest, indent=1))
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            if dist.is_collective_failure(err):
                raise
            latest = self.resumable_tag()
            raise CheckpointWriteError(
                f"rank {self.world.rank}: checkpoint {directory} could not be written: "
                f"{write_failure(err, self.root)}. latest still names {latest or 'no checkpoint'}; free "
                "space (or fix the file system) and relaunch the same command to resume") from err
        dist.barrier()
        if self.world.is_main:
            missing = self.missing(tag)
            if missing:
                raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete after every rank "
                                                f"saved: missing {', '.join(missing)}; latest is unchanged")
            write_atomically(self.root / LATEST, tag)
            scores = self.scores()
            if score is not None:
                scores[tag] = score
                write_atomically(self.scores_file, json.dumps(scores, indent=1))
            self._prune(tag, scores)
        log.info("saved checkpoint %s", directory)
        return directory

    def scores(self) -> dict[str, float]:
        return json.loads(self.scores_file.read_text()) if self.scores_file.is_file() else {}

    def _prune(self, latest: str, scores: dict[str, float]) -> None:
        """Keep ``latest``, the last k and the best k complete tags; incomplete ones (torn saves) are
        dropped."""
        complete = [t for t in self.tags() if t == latest or not self.missing(t)]
        best = sorted((t for t in complete if t in scores), key=lambda t: (scores[t], t))[:self.keep_best]
        keep = {latest, *complete[-self.keep_last:], *best}
        for old in self.tags():
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
