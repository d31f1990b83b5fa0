"""Checkpoints (every rank, through DeepSpeed), auto-resume, retention, and the Hugging Face export (rank 0)."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Processor

from w2v_dist import dist
from w2v_dist.checkpoint.files import UnsafeCheckpointError, convert_to_universal, safe_load
from w2v_dist.engine import Engine
from w2v_dist.export import write_export
from w2v_dist.faults import pause_point
from w2v_dist.model import describe_identity, identity_mismatch

log = logging.getLogger("w2v_dist.checkpoint")
TAG_PREFIX = "step_"
WORLD_FILE = "world.json"
FULL_DISK_BYTES = 64 * 2**20
"""A failed write with less free space than this is reported as a full disk."""
UNIVERSAL_DIR = "universal"
"""Inside a tag: the same checkpoint re-partitionable for any world size, rewritten by every resume that needs it."""
MANIFEST = "commit_rank{rank}.json"
"""Each rank's record of the files it wrote into a tag: names relative to the tag, sizes in bytes, and each file's
CRC-32 (:func:`file_crc32`; manifests written before checksums were recorded have sizes only)."""
CHECKSUM_CHUNK = 16 * 2**20


class CheckpointWriteError(OSError):
    """A rank could not write its part of a checkpoint (full disk, quota, I/O error); ``latest`` is unchanged."""


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


class IncompleteCheckpointError(RuntimeError):
    """A tag directory whose commit manifests are missing or do not match the files on disk."""


class ResumeError(RuntimeError):
    """The run cannot resume what its output_dir holds: a checkpoint of another model than the config names, or
    ``latest`` naming a checkpoint of which no complete copy is left. Raised before any file is written."""


def file_crc32(path: Path, sync: bool = False) -> int:
    """The CRC-32 of ``path``; with ``sync``, the file is first flushed to the disk (at a save: ``latest`` must never
    name a file that a power loss could still take back) and read back from the page cache.

    CRC-32 rather than SHA-256: the checksum is there to catch accidental damage (bit rot, a zeroed block, a bad
    copy), not an attacker, who could rewrite the manifest as well (safe loading is the defence against a planted
    file). zlib's CRC-32 ran at 2.6 GB/s on this project's CI machine against 1.1 GB/s for SHA-256 (with the CPU's
    SHA instructions; several times slower without), and every rank reads every file it wrote at every save."""
    crc = 0
    with open(path, "rb") as handle:
        if sync:
            os.fsync(handle.fileno())
        while chunk := handle.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_atomically(path: Path, text: str) -> None:
    """Temp file, fsync, rename, fsync of the directory: a reader sees the old content or the new, never half."""
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


def missing_parts(directory: Path, verify: bool = False) -> list[str]:
    """What keeps a tag directory from being a complete checkpoint: absent manifests, files absent or of another
    size than their rank recorded, and with ``verify`` files whose CRC-32 is not the one recorded (empty when it is
    complete). ``verify`` reads every file: resume uses it, the cheap checks of every save do not."""
    if not directory.is_dir():
        return ["no such directory"]
    try:
        world_size = int(json.loads((directory / WORLD_FILE).read_text())["world_size"])
    except (OSError, ValueError, KeyError):
        return [WORLD_FILE]
    problems = []
    for rank in range(world_size):
        try:
            manifest = json.loads((directory / MANIFEST.format(rank=rank)).read_text())
            files, checksums = manifest["files"], manifest.get("crc32", {})
        except (OSError, ValueError, KeyError):
            problems.append(MANIFEST.format(rank=rank))
            continue
        for name, size in files.items():
            path = directory / name
            if not path.is_file():
                problems.append(f"{name} (rank {rank})")
            elif path.stat().st_size != size:
                problems.append(f"{name} (rank {rank}: {path.stat().st_size} bytes, {size} written)")
            elif verify and name in checksums and (crc := file_crc32(path)) != checksums[name]:
                problems.append(f"{name} (rank {rank}: damaged since it was written: CRC-32 {crc:08x}, "
                                f"{checksums[name]:08x} written)")
    return problems


def write_failure(err: Exception, directory: Path) -> str:
    """Why a write failed, in words a user can act on: torch's zip writer reports a full disk as "unexpected
    pos ..." without an errno, so the free space decides."""
    free = shutil.disk_usage(directory).free
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < FULL_DISK_BYTES:
        return f"No space left on device ({free:,} bytes free on {directory}; {err})"
    return f"{err} ({free:,} bytes free on {directory})"


class Checkpointer:
    """Tags ``step_NNNNNNNN`` under ``<output_dir>/checkpoints``; keeps the last k and the best k by dev WER.

    The commit protocol: every rank writes its files (DeepSpeed's and its RNG state), flushes them to the disk,
    then writes a manifest ``commit_rank<r>.json`` naming them with their sizes and checksums; after a barrier
    rank 0 checks all manifests and only then moves ``latest`` (atomically). A save torn by a crash, a kill or a
    full disk is never named by ``latest``, and resume skips it, or a tag damaged since, for the newest complete
    tag.

    ``model``: the identity of the model being trained (:func:`w2v_dist.model.model_identity`), recorded in every
    tag's ``world.json``; resume refuses a checkpoint of another model.
    """

    def __init__(self, output_dir: Path, world: dist.World, *, keep_last: int, keep_best: int = 0,
                 model: dict[str, str] | None = None) -> None:
        self.root = output_dir / "checkpoints"
        self.world, self.keep_last, self.keep_best, self.model = world, keep_last, keep_best, model
        self.scores_file = self.root / "scores.json"

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names (what DeepSpeed's tools read); see :meth:`resumable_tag` for resume."""
        latest = self.root / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def tags(self) -> list[str]:
        return sorted(p.name for p in self.root.glob(f"{TAG_PREFIX}*") if p.is_dir())

    def missing(self, tag: str, verify: bool = False) -> list[str]:
        """What keeps ``tag`` from being a complete checkpoint (empty when it is complete); ``verify``: checksums
        too (:func:`missing_parts`)."""
        return missing_parts(self.root / tag, verify)

    def resumable_tag(self, verify: bool = False) -> str | None:
        """``latest`` when it is complete, else the newest complete tag (with a warning naming what is missing or
        damaged); ``verify``: every file's checksum too."""
        latest = self.latest_tag()
        latest_problems = self.missing(latest, verify) if latest is not None else []
        if latest is not None and not latest_problems:
            return latest
        for tag in reversed(self.tags()):
            if tag == latest:
                continue
            if not (problems := self.missing(tag, verify)):
                if latest is not None:
                    log.warning("checkpoint %s (named by latest) is incomplete or damaged: %s; resuming from %s",
                                latest, ", ".join(latest_problems[:5]), tag)
                return tag
            log.warning("skipping incomplete or damaged checkpoint %s: %s", tag, ", ".join(problems[:5]))
        return None

    def resume_tag(self) -> str | None:
        """Collective: the tag a starting run, or a rollback, resumes (``None``: start afresh).

        :meth:`resumable_tag` with every file's checksum verified, by rank 0 alone (a checkpoint is read once, not
        once per rank) and shared, so that every rank loads the same tag. Raises :class:`ResumeError` on every rank
        when the tag holds another model than this run's, or when ``latest`` names a checkpoint but no complete
        one is left (deleted or damaged): starting again at step 0 would append a second timeline to
        metrics.jsonl and overwrite best/.
        """
        choice: tuple[str | None, str | None] = (None, None)
        if self.world.is_main:
            try:
                choice = (self._verified_tag(), None)
            except ResumeError as err:
                choice = (None, str(err))
        tag, failure = dist.all_gather_objects(choice)[0]
        if failure is not None:
            raise ResumeError(failure)
        return tag

    def _verified_tag(self) -> str | None:
        tag, latest = self.resumable_tag(verify=True), self.latest_tag()
        if tag is None and latest is not None:
            problems = self.missing(latest, verify=True)
            raise ResumeError(f"{self.root / 'latest'} names {latest}, but it is incomplete or damaged "
                              f"({', '.join(problems[:5])}) and no other complete checkpoint is left under "
                              f"{self.root}. Restore the checkpoint, or start afresh: in a new output_dir, or here "
                              "with checkpoint.resume=false (metrics.jsonl then holds both runs)")
        if tag is not None:
            self._check_model(tag)
        return tag

    def _check_model(self, tag: str) -> None:
        """Refuse a checkpoint of another model than this run's (:func:`w2v_dist.model.identity_mismatch`)."""
        if self.model is None:
            return
        saved = self.saved_world(tag).get("model")
        if saved is None:
            log.warning("checkpoint %s records no model identity (written by an older w2v-dist): resuming it as "
                        "%s without checking that it is the same model", self.root / tag, self.model["name_or_path"])
            return
        if differences := identity_mismatch(saved, self.model):
            raise ResumeError(f"cannot resume {self.root / tag}: it holds {describe_identity(saved)}, but this "
                              f"run's model is {describe_identity(self.model)}; they differ in "
                              f"{', '.join(differences)}. Resume with the model the run started from, or train the "
                              "other one in a new output_dir")

    def save(self, engine: Engine, step: int, client_state: dict[str, Any], score: float | None = None) -> Path:
        """Collective: all ranks write their part; ``latest`` moves only once every rank's part is on disk.

        ``score`` (dev WER, lower is better) ranks the checkpoint for ``keep_best``.
        """
        tag = f"{TAG_PREFIX}{step:08d}"
        directory = self.root / tag
        try:
            if self.world.is_main:
                # A tag left by a torn save (then a resume from an older one) must not mix old files with new.
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
                write_atomically(directory / WORLD_FILE, json.dumps({"world_size": self.world.size, "step": step,
                                                                     "data": client_state.get("loader"),
                                                                     "model": self.model}))
            dist.barrier()
            rng_file = directory / f"rng_rank{self.world.rank}.pt"
            torch.save(rng_state(), rng_file)
            written = [rng_file, *engine.save(self.root, tag, client_state)]
            if self.world.is_main:
                written.append(directory / WORLD_FILE)
            pause_point("save", self.world.rank)
            checksums = {str(p.relative_to(directory)): file_crc32(p, sync=True) for p in written}
            manifest = {"rank": self.world.rank, "step": step,
                        "files": {str(p.relative_to(directory)): p.stat().st_size for p in written},
                        "crc32": checksums}
            write_atomically(directory / MANIFEST.format(rank=self.world.rank), json.dumps(manifest, indent=1))
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            if dist.is_collective_failure(err):
                raise
            latest = self.resumable_tag()
            raise CheckpointWriteError(f"rank {self.world.rank}: checkpoint {directory} could not be written: "
                                       f"{write_failure(err, self.root)}. latest still names "
                                       f"{latest or 'no checkpoint'}; free space (or fix the file system) and "
                                       "relaunch the same command to resume") from err
        dist.barrier()
        if self.world.is_main:
            missing = self.missing(tag)
            if missing:
                raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete after every rank saved: "
                                                f"missing {', '.join(missing)}; latest is unchanged")
            write_atomically(self.root / "latest", tag)
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
        """Keep ``latest``, the last k and the best k complete tags; incomplete ones (torn saves) are dropped."""
        complete = [t for t in self.tags() if t == latest or not self.missing(t)]
        best = sorted((t for t in complete if t in scores), key=lambda t: (scores[t], t))[:self.keep_best]
        keep = {latest, *complete[-self.keep_last:], *best}
        for old in self.tags():
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def saved_world(self, tag: str) -> dict[str, Any]:
        """``world.json`` of a complete tag: the world size that wrote it, its step and its data layout."""
        return dict(json.loads((self.root / tag / WORLD_FILE).read_text()))

    def resume(self, engine: Engine, tag: str | None = None) -> dict[str, Any] | None:
        """Load ``tag`` (default: the newest complete checkpoint) into ``engine``; its client state, or ``None``
        to start fresh. Collective.

        Nothing in the checkpoint is unpickled beyond tensors and DeepSpeed's few classes
        (:data:`~w2v_dist.checkpoint.files.CHECKPOINT_CLASSES`): on the same world size DeepSpeed loads every file
        through :func:`~w2v_dist.checkpoint.files.safe_load`; a checkpoint whose optimizer state was partitioned by
        another world size goes through DeepSpeed's universal format, converted afresh at every such resume
        (:meth:`_to_universal`).
        """
        tag = tag or self.resume_tag()
        if tag is None:
            if self.tags():
                log.warning("no complete checkpoint under %s: starting from the beginning", self.root)
            return None
        directory = self.root / tag
        saved = int(self.saved_world(tag)["world_size"])
        if saved == self.world.size or not any(directory.glob("*optim_states.pt")):
            client_state = engine.load(self.root, tag)
        else:  # the optimizer state is partitioned by rank: re-partition it for this world size
            self._to_universal(directory)
            client_state = engine.load(directory, UNIVERSAL_DIR, universal=True)
        if client_state is None:
            raise RuntimeError(f"checkpoint {directory} could not be loaded")
        rng_file = directory / f"rng_rank{self.world.rank}.pt"
        if rng_file.is_file():  # a rank the checkpoint did not have starts from its seed; batches reseed anyway
            set_rng_state(safe_load(rng_file))
        log.info("resumed from %s at step %s%s", directory, client_state["run"]["step"],
                 "" if saved == self.world.size else f" (written by {saved} ranks, now {self.world.size})")
        return client_state

    def _to_universal(self, directory: Path) -> None:
        """Collective: rank 0 writes ``<tag>/universal`` afresh while the others wait; all then load only that.

        DeepSpeed's converter and its universal loader unpickle without restriction, so a ``universal/`` found on
        disk is deleted, never loaded, and every file of the tag but our JSON records is first checked with the
        allowlist (:func:`w2v_dist.checkpoint.files.convert_to_universal`). A refusal (or any failure) on rank 0 is
        raised on every rank, naming the file and the class: no rank is left waiting for a conversion that never comes.
        """
        failure: Exception | None = None
        if self.world.is_main:
            log.info("converting %s to DeepSpeed's universal format for %d ranks", directory, self.world.size)
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


def export_hf(engine: Engine, processor: Wav2Vec2Processor, out_dir: Path, is_main: bool, card: str = "") -> bool:
    """Collective: gather the full fp32 weights (every rank), write the export on rank 0
    (:func:`w2v_dist.export.write_export`); whether it was written (on every rank: refused when the weights, or
    the logits of a probe batch, are not finite)."""
    state = engine.full_state_dict()
    written = write_export(engine.module, processor, out_dir, state, card) if is_main else True
    return bool(dist.all_gather_objects(written)[0])
