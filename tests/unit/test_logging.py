"""Rank 0's logger: what a failing wandb does to the run (nothing but a warning)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from w2v_dist.config import WandbConfig
from w2v_dist.logging import MainLogger


class BrokenRun:
    id = "run0"

    def log_artifact(self, artifact: object, aliases: list[str]) -> None:
        raise ConnectionError("api.wandb.ai unreachable")


def test_a_checkpoint_wandb_cannot_record_leaves_a_warning_not_a_crash(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    logger = MainLogger(tmp_path, config={}, wandb_cfg=WandbConfig(log_checkpoints=True), total_steps=1,
                        start_step=0, progress_bar=False)
    logger.wandb = BrokenRun()
    (tmp_path / "step_1").mkdir()
    logger.saved("checkpoint", tmp_path / "step_1", 1, ["latest"], None)
    assert "wandb could not record" in caplog.text and "unreachable" in caplog.text
    logger.wandb = SimpleNamespace(finish=lambda: None)
    logger.close()
