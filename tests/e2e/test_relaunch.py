"""Relaunching a finished run: what is refused before any work, what the export keeps, and a disk that fills
up during the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.data import fill_disk, small_filesystem
from tests.support.launch import run_single
from tests.support.runs import check, overrides
from w2v_dist.cli import main

pytestmark = pytest.mark.slow


def test_a_finished_run_relaunched(shard_dirs: dict, tiny_model: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with small_filesystem(tmp_path / "fs", "24m") as fs:
        out = fs / "run"
        args = overrides(shard_dirs, tiny_model, out, **{"trainer.max_steps": 2, "trainer.eval_every": 2,
                                                         "trainer.save_every": 2})
        check(run_single(args))
        card = (out / "final" / "README.md").read_text()
        assert "| dev-clean |" in card, card

        # trainer.max_steps below the checkpoint's step: refused before any work (here by --dump-config,
        # which runs the check every rank runs before its process group: tests/unit/test_inputs.py)
        assert main(["train", "--dump-config", *args, "trainer.max_steps=1"]) == 2
        assert f"trainer.max_steps: 1 is below step 2 of the checkpoint this run would resume " \
               f"({out / 'checkpoints' / 'step_00000002'})" in capsys.readouterr().err

        # the same command again finds the run at max_steps: it evaluates nothing, and the card keeps the dev
        # WER
        check(run_single(args))
        assert (out / "final" / "README.md").read_text() == card

        # a full disk during that export: the path and the cause named, final/ as it was, the space given
        # back
        fill_disk(fs, leave=256 * 1024)
        proc = run_single(args)
        assert proc.returncode != 0
        assert f"writing {out / 'final'}: No space left on device" in proc.stderr, proc.stderr[-3000:]
        assert "checkpoints/latest still names step_00000002" in proc.stderr, proc.stderr[-3000:]
        assert (out / "final" / "README.md").read_text() == card and not (out / "final.partial").exists()
