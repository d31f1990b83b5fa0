from __future__ import annotations

import json
from pathlib import Path

from w2v_dist.checkpoint.commit import Checkpointer
from w2v_dist.checkpoint.tags import MANIFEST, WORLD_FILE
from w2v_dist.dist import World


def committed(ckpt: Checkpointer, tag: str, world_size: int = 1) -> Path:
    """A tag directory as a finished save leaves it: world.json, each rank's file and manifest."""
    directory = ckpt.root / tag
    directory.mkdir(parents=True)
    (directory / WORLD_FILE).write_text(json.dumps({"world_size": world_size}))
    for rank in range(world_size):
        (directory / f"part{rank}.pt").write_bytes(b"x" * (10 + rank))
        files = {f"part{rank}.pt": 10 + rank}
        (directory / MANIFEST.format(rank=rank)).write_text(json.dumps({"rank": rank, "files": files}))
    return directory


def test_keeps_the_last_k_and_the_best_k(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=2, keep_best=2)
    scores = {"step_00000010": 0.5, "step_00000020": 0.2, "step_00000030": 0.9, "step_00000040": 0.3}
    for tag in [*scores, "step_00000050", "step_00000060"]:
        committed(ckpt, tag)
    ckpt.scores_file.write_text(json.dumps(scores))
    ckpt._prune("step_00000060", ckpt.scores())
    left = sorted(p.name for p in ckpt.root.iterdir() if p.is_dir())
    assert left == ["step_00000020", "step_00000040", "step_00000050", "step_00000060"]


def test_torn_tags_do_not_count_towards_keep_last_and_are_dropped(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 2), keep_last=1)
    committed(ckpt, "step_00000010", world_size=2)
    torn = committed(ckpt, "step_00000020", world_size=2)
    (torn / MANIFEST.format(rank=1)).unlink()
    committed(ckpt, "step_00000030", world_size=2)
    ckpt._prune("step_00000030", {})
    assert ckpt.tags() == ["step_00000030"]


def test_latest_pointer_is_what_resume_reads(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=1)
    assert ckpt.latest_tag() is None and ckpt.resumable_tag() is None
    committed(ckpt, "step_00000007")
    (ckpt.root / "latest").write_text("step_00000007\n")
    assert ckpt.latest_tag() == "step_00000007" and ckpt.resumable_tag() == "step_00000007"


def test_resume_falls_back_from_a_torn_latest_to_the_newest_complete_tag(tmp_path: Path, caplog) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 2), keep_last=3)
    committed(ckpt, "step_00000003", world_size=2)
    committed(ckpt, "step_00000006", world_size=2)
    torn = committed(ckpt, "step_00000009", world_size=2)
    (torn / "part1.pt").write_bytes(b"x")  # rank 1 died mid-write: size differs from its manifest
    (ckpt.root / "latest").write_text("step_00000009")
    assert ckpt.missing("step_00000009") == ["part1.pt (rank 1: 1 bytes, 11 written)"]
    assert ckpt.resumable_tag() == "step_00000006"
    assert "step_00000009 (named by latest) is incomplete or damaged: part1.pt (rank 1" in caplog.text
    (torn / MANIFEST.format(rank=0)).unlink()
    (ckpt.root / "step_00000006" / "part0.pt").unlink()
    assert ckpt.missing("step_00000006") == ["part0.pt (rank 0)"]
    assert ckpt.resumable_tag() == "step_00000003"


def test_export_without_latest_picks_the_newest_complete_tag(tmp_path: Path) -> None:
    from w2v_dist.export import find_checkpoint

    ckpt = Checkpointer(tmp_path, World(0, 0, 2), keep_last=3)
    committed(ckpt, "step_00000002", world_size=2)
    torn = committed(ckpt, "step_00000004", world_size=2)
    (torn / MANIFEST.format(rank=0)).unlink()
    assert find_checkpoint(tmp_path).tag == "step_00000002"


def test_export_evaluate_and_transcribe_skip_a_torn_latest_as_resume_does(tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    """One "which checkpoint" for resume and the tools: a torn ``latest`` is skipped with the same warning,
    and with nothing complete left the tools refuse, naming what is missing, instead of loading it."""
    import pytest

    from w2v_dist import export
    from w2v_dist.export import ModelSourceError, find_checkpoint, load_for_inference

    ckpt = Checkpointer(tmp_path, World(0, 0, 2), keep_last=3)
    committed(ckpt, "step_00000003", world_size=2)
    torn = committed(ckpt, "step_00000006", world_size=2)
    (torn / "part1.pt").write_bytes(b"x")  # rank 1 died mid-write
    (ckpt.root / "latest").write_text("step_00000006")
    assert ckpt.resumable_tag() == "step_00000003"
    caplog.clear()
    assert find_checkpoint(tmp_path).tag == find_checkpoint(ckpt.root).tag == "step_00000003"
    assert "step_00000006 (named by latest) is incomplete or damaged: part1.pt (rank 1" in caplog.text
    monkeypatch.setattr(export, "model_from_checkpoint", lambda ref: ref)  # evaluate's and transcribe's
    assert load_for_inference(tmp_path).tag == "step_00000003"  # type: ignore[attr-defined]
    assert find_checkpoint(tmp_path, tag="step_00000006").tag == "step_00000006", "--tag is taken as named"
    (ckpt.root / "step_00000003" / "part0.pt").unlink()
    with pytest.raises(ModelSourceError, match=r"latest names step_00000006, but it is incomplete or "
                                               r"damaged \(part1.pt \(rank 1: 1 bytes, 11 written\)\) and "
                                               r"no other complete checkpoint is left"):
        find_checkpoint(tmp_path)
