from __future__ import annotations

import json
from pathlib import Path

from w2v_dist.checkpoint import Checkpointer
from w2v_dist.dist import World


def test_keeps_the_last_k_and_the_best_k(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=2, keep_best=2)
    scores = {"step_00000010": 0.5, "step_00000020": 0.2, "step_00000030": 0.9, "step_00000040": 0.3}
    for tag in [*scores, "step_00000050", "step_00000060"]:
        (ckpt.root / tag).mkdir(parents=True)
    ckpt.scores_file.write_text(json.dumps(scores))
    ckpt._prune("step_00000060", ckpt.scores())
    left = sorted(p.name for p in ckpt.root.iterdir() if p.is_dir())
    assert left == ["step_00000020", "step_00000040", "step_00000050", "step_00000060"]


def test_latest_pointer_is_what_resume_reads(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=1)
    assert ckpt.latest_tag() is None
    ckpt.root.mkdir(parents=True)
    (ckpt.root / "latest").write_text("step_00000007\n")
    assert ckpt.latest_tag() == "step_00000007"
