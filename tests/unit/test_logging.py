"""Rank 0's logger: what a failing wandb does to the run (nothing but a warning), and the console: a bar on a
terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from w2v_dist.config import WandbConfig
from w2v_dist.logging import MainLogger, Progress, setup_console, step_line


class BrokenRun:
    id = "run0"

    def log_artifact(self, artifact: object, aliases: list[str]) -> None:
        raise ConnectionError("api.wandb.ai unreachable")


def test_a_checkpoint_wandb_cannot_record_leaves_a_warning_not_a_crash(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = MainLogger(tmp_path, config={}, wandb_cfg=WandbConfig(log_checkpoints=True), total_steps=1,
                        start_step=0, progress_bar=False)
    logger.wandb = BrokenRun()
    (tmp_path / "step_1").mkdir()
    logger.saved("checkpoint", tmp_path / "step_1", 1, ["latest"], None)
    assert "wandb could not record" in caplog.text and "unreachable" in caplog.text
    logger.wandb = SimpleNamespace(finish=lambda: None)
    logger.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def console_output(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, steps: int, progress_bar: bool,
                   tmp_path: Path) -> str:
    """What rank 0's console shows for ``steps`` logged steps with a log line in between, on ``stream``."""
    monkeypatch.setattr(sys, "stderr", stream)
    setup_console(0)
    logger = MainLogger(tmp_path, config={}, wandb_cfg=WandbConfig(), total_steps=10, start_step=0,
                        progress_bar=progress_bar)
    for step in range(1, steps + 1):
        logger.progress(step, {"loss": "1.0"}, f"step {step}: the plain line")
        logging.getLogger("w2v_dist.trainer").info("a log line after step %d", step)
    logger.close()
    return stream.getvalue()


def test_outside_a_terminal_each_logged_step_is_one_plain_line_and_no_bar(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """SLURM's log file, ``| tee``: no ``\\r`` redraws, one timestamped line per logged step, bar on or
    off."""
    for progress_bar in (True, False):
        out = console_output(monkeypatch, io.StringIO(), 2, progress_bar, tmp_path)
        assert "\r" not in out
        lines = out.splitlines()
        assert [line.split("] ", 1)[1] for line in lines if "the plain line" in line] == [
            "step 1: the plain line", "step 2: the plain line"]
        assert all(re.match(r"\[\d\d:\d\d:\d\d rank0 w2v_dist\.", line) for line in lines), lines


def test_on_a_terminal_the_bar_stays_and_log_lines_are_never_glued_onto_it(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    out = console_output(monkeypatch, Terminal(), 2, True, tmp_path)
    assert "train:" in out and "loss=1.0" in out and "the plain line" not in out
    for step in (1, 2):  # each log line starts its own line: the bar was lifted first
        [segment] = [s for s in re.split(r"[\r\n]", out) if f"a log line after step {step}" in s]
        assert segment.startswith("["), repr(out)


def test_a_step_line_says_loss_lr_grad_norm_throughput_and_eta() -> None:
    record = {"step": 1200, "loss": 1.23456, "lr": 1e-4, "grad_norm": 3.5,
              "audio_seconds_per_second": 1234.4}
    assert step_line(record, 3725.0) == \
        "step 1,200: loss 1.2346, lr 1.000e-04, grad norm 3.5, 1,234 audio-s/s, ETA 1:02:05"
    skipped = record | {"loss": None, "grad_norm": None, "skipped_cause": "grad_nonfinite"}
    assert step_line(skipped, 0.0).startswith("step 1,200: loss skipped (grad_nonfinite), lr 1.000e-04, "
                                              "grad norm -,")


def test_progress_is_a_few_plain_lines_outside_a_terminal_and_nothing_off_rank_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_console(0)
    progress = Progress("scoring dev-clean", 10, "utterances", show=True, every_s=0.0)
    progress.update(4)
    progress.close()
    Progress("scoring dev-other", 10, "utterances", show=False, every_s=0.0).update(4)
    said = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert said[0] == "scoring dev-clean: 10 utterances" and said[1].startswith("scoring dev-clean: 4 of 10 "
                                                                                "utterances")
    assert len(said) == 2 and "\r" not in stream.getvalue()
