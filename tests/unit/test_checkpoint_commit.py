"""The commit protocol of ``Checkpointer.save`` on its own: a crash at any moment of writing ``latest``,
``scores.json`` or ``world.json`` leaves the old file whole, and ``latest`` never moves past a manifest
that does not match the disk. DeepSpeed is replaced by a fake engine; rank 1 of a 2-rank world is played
at rank 0's barrier (no process group: ``dist.barrier`` is otherwise a no-op)."""

from __future__ import annotations

import builtins
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from w2v_dist import dist
from w2v_dist.checkpoint.commit import Checkpointer, IncompleteCheckpointError
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import MANIFEST, WORLD_FILE
from w2v_dist.dist import World


def at_step(step: int) -> SavedRun:
    """What the trainer saves, reduced to its step."""
    return SavedRun(world_size=1, step=step, layout=None)


class Crash(BaseException):
    """The process dies here: like a kill, nothing in ``save`` catches it."""


class FakeEngine:
    """DeepSpeed's part of a save: one file, named as DeepSpeed names it."""

    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> list[Path]:
        path = root / tag / "mp_rank_00_model_states.pt"
        path.write_bytes(b"w" * 64)
        return [path]


@contextmanager
def crash_while_writing(name: str) -> Iterator[None]:
    """The process dies half-way through writing any file whose name contains ``name`` (a temp file or the
    file itself): half of the text reaches the disk."""
    real_open = io.open

    class Torn:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Torn:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.handle, attr)

        def write(self, text: str) -> int:
            self.handle.write(text[:len(text) // 2])
            self.handle.flush()
            raise Crash(f"killed while writing {self.handle.name}")

    def torn_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return Torn(handle) if "w" in mode and name in Path(os.fspath(file)).name else handle

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", torn_open)
        patch.setattr(io, "open", torn_open)  # what Path.write_text opens with
        yield


@contextmanager
def crash_before_the_rename(name: str) -> Iterator[None]:
    """The process dies once the new text is written (and synced) but before it is renamed onto ``name``."""
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(os.fspath(dst)).name == name:
            raise Crash(f"killed before renaming {src} onto {dst}")
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        yield


CRASHES: dict[str, Callable[[str], Any]] = {"while-writing": crash_while_writing,
                                            "before-the-rename": crash_before_the_rename}


@pytest.mark.parametrize("moment", CRASHES)
def test_a_crash_while_latest_is_written_leaves_it_naming_the_previous_tag(tmp_path: Path,
                                                                           moment: str) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=2)
    ckpt.save(FakeEngine(), at_step(10))
    with CRASHES[moment]("latest"), pytest.raises(Crash):
        ckpt.save(FakeEngine(), at_step(20))
    assert (ckpt.root / "latest").read_text() == "step_00000010"
    assert ckpt.resumable_tag() == "step_00000010"
    ckpt.save(FakeEngine(), at_step(20))  # the relaunch saves again over what the crash left
    assert ckpt.latest_tag() == "step_00000020" and not ckpt.missing("step_00000020")


@pytest.mark.parametrize("moment", CRASHES)
def test_a_crash_while_scores_are_written_keeps_the_old_scores_readable(tmp_path: Path, moment: str) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=1, keep_best=1)
    ckpt.save(FakeEngine(), at_step(10), score=0.5)
    with CRASHES[moment]("scores.json"), pytest.raises(Crash):
        ckpt.save(FakeEngine(), at_step(20), score=0.4)
    assert ckpt.scores() == {"step_00000010": 0.5}
    ckpt.save(FakeEngine(), at_step(30), score=0.3)  # the relaunch's saves read them
    assert ckpt.scores() == {"step_00000010": 0.5, "step_00000030": 0.3}


@pytest.mark.parametrize("moment", CRASHES)
def test_a_crash_while_world_json_is_written_leaves_none_half_written(tmp_path: Path, moment: str) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=2)
    ckpt.save(FakeEngine(), at_step(10))
    with CRASHES[moment](WORLD_FILE), pytest.raises(Crash):
        ckpt.save(FakeEngine(), at_step(20))
    assert not (ckpt.root / "step_00000020" / WORLD_FILE).exists()
    assert ckpt.missing("step_00000020") == [WORLD_FILE] and ckpt.resumable_tag() == "step_00000010"


LIES: dict[str, tuple[int | None, int]] = {"names-a-missing-file": (None, 32),
                                           "records-another-size": (32, 48)}
"""Rank 1's model file: (bytes on disk, or absent; bytes its manifest records)."""


def play_rank_one(patch: pytest.MonkeyPatch, ckpt: Checkpointer, lie: tuple[int | None, int] | None) -> None:
    """Rank 1 writes its part during save's second barrier (the one after every rank's manifest),
    truthfully or with ``lie``."""
    barriers = 0

    def barrier() -> None:
        nonlocal barriers
        barriers += 1
        if barriers % 2:
            return
        directory = ckpt.root / ckpt.tags()[-1]
        on_disk, recorded = lie or (32, 32)
        if on_disk is not None:
            (directory / "rng_rank1.pt").write_bytes(b"r" * on_disk)
        manifest = {"rank": 1, "files": {"rng_rank1.pt": recorded}}
        (directory / MANIFEST.format(rank=1)).write_text(json.dumps(manifest))

    patch.setattr(dist, "barrier", barrier)


@pytest.mark.parametrize("lie", LIES)
def test_latest_does_not_move_past_a_manifest_that_lies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       lie: str) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 2), keep_last=1, keep_best=1)
    play_rank_one(monkeypatch, ckpt, None)
    ckpt.save(FakeEngine(), at_step(10), score=0.5)
    assert ckpt.latest_tag() == "step_00000010" and not ckpt.missing("step_00000010")
    play_rank_one(monkeypatch, ckpt, LIES[lie])
    with pytest.raises(IncompleteCheckpointError,
                       match=r"step_00000020 is incomplete .*rng_rank1\.pt \(rank 1"):
        ckpt.save(FakeEngine(), at_step(20), score=0.1)
    assert ckpt.latest_tag() == "step_00000010" and ckpt.resumable_tag() == "step_00000010"
    assert ckpt.scores() == {"step_00000010": 0.5} and ckpt.tags() == ["step_00000010", "step_00000020"]
