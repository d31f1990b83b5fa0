"""What a run reads is checked before any work (``w2v_dist/inputs.py``): every problem, one line each, from
``--dump-config`` and from every rank before the process group starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launch import REPO, launch_env
from w2v_dist.cli import main


def fake_shards(directory: Path, utterances: int = 2, shard_file: bool = True) -> Path:
    """A shard set's index.json listing one shard (an empty file: nothing here reads audio)."""
    directory.mkdir(parents=True)
    rows = [[f"utt-{i}", 16_000, 5] for i in range(utterances)]
    index = {"version": 1, "sample_rate": 16_000,
             "shards": [{"name": "shard-000000.tar", "utterances": rows}]}
    (directory / "index.json").write_text(json.dumps(index))
    if shard_file:
        (directory / "shard-000000.tar").write_bytes(b"")
    return directory


def broken_inputs(tmp: Path) -> tuple[list[str], list[str]]:
    """Overrides naming a good training set and four broken dev sets (one remote, not probed), and the lines
    that must report them."""
    train, no_index, empty, lost = (tmp / "train", tmp / "no-index", tmp / "empty", tmp / "lost")
    fake_shards(train)
    no_index.mkdir()
    fake_shards(empty, utterances=0)
    fake_shards(lost, shard_file=False)
    dev = (f"{{missing: {tmp / 'missing'}, no-index: {no_index}, empty: {empty}, lost: {lost}, "
           "remote: 'http://127.0.0.1:9/dev'}")
    expected = [f"  data.dev_shards.missing: {tmp / 'missing'} does not exist",
                f"  data.dev_shards.no-index: no index.json at {no_index / 'index.json'}: run 'w2v-dist "
                "shard' to create shards",
                f"  data.dev_shards.empty: {empty}: the index lists no utterances",
                f"  data.dev_shards.lost: 1 of the 1 shards listed in {lost / 'index.json'} are not "
                "readable here: shard-000000.tar"]
    return [f"data.train_shards={train}", f"data.dev_shards={dev}", f"output_dir={tmp / 'run'}"], expected


def test_dump_config_reports_every_missing_input_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    args, expected = broken_inputs(tmp_path)
    code = main(["train", "--dump-config", *args])
    out, err = capsys.readouterr()
    assert code == 2 and "train_shards: " + str(tmp_path / "train") in out  # the config is still printed
    assert err.splitlines() == ["input error: the run cannot start (4 problems):", *expected]


def test_dump_config_passes_good_inputs_and_names_an_unset_training_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, dev = fake_shards(tmp_path / "train"), fake_shards(tmp_path / "dev")
    assert (main(["train", "--dump-config", f"data.train_shards={train}",
                  f"data.dev_shards={{dev: {dev}}}"]) == 0)
    assert capsys.readouterr().err == ""
    assert main(["train", "--dump-config"]) == 2
    assert "data.train_shards is not set" in capsys.readouterr().err


def test_every_rank_stops_on_missing_inputs_before_its_process_group(tmp_path: Path) -> None:
    args, expected = broken_inputs(tmp_path)
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=launch_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-5:] == ["input error: the run cannot start (4 problems):", *expected]
    # nothing written, nothing started
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
