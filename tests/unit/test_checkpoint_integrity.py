"""What resume checks of what it resumes: each file's checksum (recorded and flushed to the disk before
``latest`` moves), that ``latest`` still names something, and that the checkpoint holds the model this run
trains. DeepSpeed is replaced by a fake engine that writes one file of random bytes; one process, so the
collective choice of ``resume_tag`` is rank 0's own."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest

from w2v_dist.checkpoint.commit import Checkpointer
from w2v_dist.checkpoint.resume import ResumeError
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import MANIFEST, WORLD_FILE
from w2v_dist.dist import World

MODEL_FILE = "mp_rank_00_model_states.pt"
MODEL = {"name_or_path": "runs/base", "family": "wav2vec2", "architecture": "a1", "vocabulary": "v1"}


def at_step(step: int) -> SavedRun:
    """What the trainer saves, reduced to its step."""
    return SavedRun(world_size=1, step=step, layout=None)


class FakeEngine:
    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> list[Path]:
        path = root / tag / MODEL_FILE
        path.write_bytes(os.urandom(64 * 1024))
        return [path]


def saved(tmp_path: Path, *steps: int, model: dict[str, str] | None = MODEL) -> Checkpointer:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=3, model=model)
    for step in steps:
        ckpt.save(FakeEngine(), at_step(step))
    return ckpt


def test_every_file_is_flushed_and_checksummed_before_latest_moves(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {os.fspath(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = saved(tmp_path, 10)
    directory = ckpt.root / "step_00000010"
    manifest = json.loads((directory / MANIFEST.format(rank=0)).read_text())
    assert (sorted(manifest["crc32"]) == sorted(manifest["files"]) == sorted([MODEL_FILE, "rng_rank0.pt",
                                                                              WORLD_FILE]))
    moved = events.index(f"replace {ckpt.root / 'latest'}")
    for name, crc in manifest["crc32"].items():
        assert crc == zlib.crc32((directory / name).read_bytes()), name
        assert f"fsync {directory / name}" in events[:moved], f"{name} was not flushed before latest moved"


def test_a_file_damaged_at_the_same_size_falls_back_to_the_previous_tag(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = saved(tmp_path, 10, 20)
    model_file = ckpt.root / "step_00000020" / MODEL_FILE
    with open(model_file, "r+b") as handle:  # 8 KB zeroed inside the file: bit rot, the size unchanged
        handle.seek(16 * 1024)
        handle.write(bytes(8 * 1024))
    assert ckpt.missing("step_00000020") == [], "sizes alone cannot see it"
    assert ckpt.resume_tag() == "step_00000010"
    assert (f"step_00000020 (named by latest) is incomplete or damaged: {MODEL_FILE} (rank 0: damaged"
            in caplog.text)


def test_latest_over_an_empty_checkpoints_dir_stops_instead_of_starting_again(tmp_path: Path) -> None:
    ckpt = saved(tmp_path, 10, 20)
    for tag in ckpt.tags():
        shutil.rmtree(ckpt.root / tag)
    with pytest.raises(ResumeError, match=r"latest names step_00000020, but it is incomplete or damaged "
                                          r"\(no such directory\) and no other complete checkpoint is left"):
        ckpt.resume_tag()
    assert saved(tmp_path / "fresh").resume_tag() is None, "a new output_dir starts afresh"


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    saved(tmp_path, 10)
    assert saved(tmp_path).resume_tag() == "step_00000010"
    other = MODEL | {"name_or_path": "runs/other"}  # same family and shape: only its name tells
    with pytest.raises(ResumeError, match=r"it holds runs/base \(wav2vec2.*this run's model is runs/other "
                                          r"\(wav2vec2.*differ in name_or_path\."):
        saved(tmp_path, model=other).resume_tag()
    with pytest.raises(ResumeError, match=r"differ in architecture, vocabulary"):
        saved(tmp_path, model=MODEL | {"architecture": "a2", "vocabulary": "v2"}).resume_tag()
    old = saved(tmp_path / "old", 10, model=None)  # as an older w2v-dist wrote it: no identity recorded
    assert json.loads((old.root / "step_00000010" / WORLD_FILE).read_text())["model"] is None
    assert saved(tmp_path / "old", model=other).resume_tag() == "step_00000010"
    assert "records no model identity" in caplog.text


def test_model_identity_tells_models_apart_by_name_architecture_and_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    from w2v_dist.data.text import librispeech_vocab
    from w2v_dist.model import identity_mismatch, init_model, model_identity, processor_from_vocab

    def identity(name: str, **init: Any) -> dict[str, str]:
        path = init_model(tmp_path / name, "tiny", **init)
        return model_identity(path, AutoModelForCTC.from_pretrained(path),
                              Wav2Vec2Processor.from_pretrained(path))

    base = identity("base")
    assert identity_mismatch(base, identity("base")) == []
    # same shapes, other weights
    assert identity_mismatch(base, identity("reseeded", seed=1)) == ["name_or_path"]
    assert identity_mismatch(base, identity("large", large_style=True)) == ["name_or_path", "architecture"]
    vocab = librispeech_vocab()
    other = processor_from_vocab({**{k: v for k, v in vocab.items() if k != "Q"}, "É": vocab["Q"]})
    path = tmp_path / "base"
    assert identity_mismatch(base, model_identity(path, AutoModelForCTC.from_pretrained(path), other)) == \
        ["vocabulary"]


def test_export_skips_a_latest_damaged_at_the_same_size_as_resume_does(tmp_path: Path) -> None:
    from w2v_dist.export import find_checkpoint

    ckpt = saved(tmp_path, 10, 20)
    with open(ckpt.root / "step_00000020" / MODEL_FILE, "r+b") as handle:  # bit rot, the size unchanged
        handle.seek(1024)
        handle.write(bytes(1024))
    assert find_checkpoint(tmp_path).tag == ckpt.resume_tag() == "step_00000010"
