"""The main job, `w2v-dist demo`, end to end on a small corpus: it prints the loss, WERs, a transcription
next to its reference, and where everything went; a second run reuses the corpus, shards and model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import REPO

pytestmark = pytest.mark.slow


def test_demo_command_runs_the_whole_path(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    args = [sys.executable, "-m", "w2v_dist", "demo", "--work-dir", str(work), "--utterances", "24",
            "--dev-utterances", "6", f"output_dir={work}/run",
            f"data.train_shards={work}/shards/train-clean-100",
            f"data.dev_shards={{dev-clean: {work}/shards/dev-clean}}",
            f"model.name_or_path={work}/model-init", "trainer.max_steps=4", "trainer.eval_every=2",
            "trainer.save_every=4", "logging.progress_bar=false"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[demo] synthesising 24 + 6 utterances" in first.stdout
    assert "reference:" in first.stdout and "hypothesis:" in first.stdout
    assert "dev WER by step: 2:" in first.stdout and (work / "run" / "final" / "model.safetensors").is_file()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "synthesising" not in second.stdout and "starting a fresh run" in second.stdout
