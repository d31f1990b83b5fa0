"""What `transcribe` and `evaluate` print, run as a user runs them: JSON lines on stdout without
DS_ACCELERATOR (DeepSpeed warns on stdout as it is imported), and a hub id read from the HF cache with
HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

W2V_DIST = str(Path(sys.executable).with_name("w2v-dist"))
HUB_ID = "test-org/tiny-ctc"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a shell with no DS_ACCELERATOR set (as after `source .venv/bin/activate`)."""
    return {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def hf_home(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF cache holding the tiny model as the hub would leave it after a download of ``HUB_ID``."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_model, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


def test_transcribe_json_is_json_lines_on_stdout_from_a_cached_hub_id(hf_home: Path, corpus: Path) -> None:
    files = [str(p) for p in sorted((corpus / "dev-clean").rglob("*.flac"))[:2]]
    proc = subprocess.run([W2V_DIST, "transcribe", "--json", "--model", HUB_ID, *files], capture_output=True,
                          text=True, timeout=300, env=user_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # every line is JSON (the `python -c` check)
    assert [json.loads(line)["file"] for line in lines] == files
    assert "accelerator" in proc.stderr.lower()  # DeepSpeed did warn: on stderr
    assert "Loading weights" not in proc.stderr  # transformers' per-load bar is off


def test_evaluate_accepts_a_cached_hub_id_offline(hf_home: Path, shard_dirs: dict, tmp_path: Path) -> None:
    proc = subprocess.run([W2V_DIST, "evaluate", "--model", HUB_ID, "--shards", str(shard_dirs["dev-clean"]),
                           "--out", str(tmp_path / "rows.jsonl")], capture_output=True, text=True,
                          timeout=300,
                          env=user_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["model"] == HUB_ID and summary["sets"]["dev-clean"]["utterances"] > 0


def test_a_hub_id_missing_from_the_cache_is_one_line(hf_home: Path, corpus: Path) -> None:
    audio = str(next((corpus / "dev-clean").rglob("*.flac")))
    proc = subprocess.run([W2V_DIST, "transcribe", "--model", "test-org/absent", audio], capture_output=True,
                          text=True, timeout=300, env=user_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
                                                               DS_ACCELERATOR="cpu"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("transcribe: test-org/absent is no local path") and "HF_HUB_OFFLINE" in last
