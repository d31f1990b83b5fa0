"""Compute nodes without the hub: an unreachable hub stops a run in seconds with one line, and a model
fetched beforehand (``w2v-dist fetch-model``, here a hand-made cache) trains with ``HF_HUB_OFFLINE=1``,
logging a plain line every ``trainer.log_every`` steps as it does in any log file."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.data import hub_cache
from tests.support.launch import free_port, run_single
from tests.support.runs import check, metrics, overrides

pytestmark = pytest.mark.slow


def test_an_unreachable_hub_stops_the_run_in_seconds_with_one_line(shard_dirs: dict, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    home = tmp_path / "hf_home"
    env = {"HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"}
    start = time.monotonic()
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, tmp_path / "run", **{"model.name_or_path": "facebook/wav2vec2-base"})],
                      env=env)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert elapsed < 30, elapsed
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if "facebook/wav2vec2-base" in line]
    assert (line.startswith("train: model facebook/wav2vec2-base: the hub (http://127.0.0.1:")
            and "unreachable" in line)
    assert f"HF_HOME={home}" in line and "HF_HUB_OFFLINE=1" in line and "fetch-model" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    hub_cache(home, "w2v-dist-test/tiny", tiny_model)  # what 'w2v-dist fetch-model' leaves on a login node
    out = tmp_path / "offline"
    # The same run shows the console of a log file (stderr is a pipe here), with the bar asked for.
    proc = run_single(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, tiny_model, out, **{"model.name_or_path": "w2v-dist-test/tiny", "trainer.max_steps": 4,
                                        "trainer.log_every": 2, "logging.progress_bar": True,
                                        "trainer.eval_every": 0, "trainer.save_every": 0})],
        env=dict(env, HF_HUB_OFFLINE="1"))
    check(proc)
    assert [r["step"] for r in metrics(out) if "loss" in r] == [2, 4]
    assert "name_or_path: w2v-dist-test/tiny" in (out / "config.yaml").read_text()
    assert "\r" not in proc.stderr, "a progress bar in a log file"
    steps = [line for line in proc.stderr.splitlines() if re.search(r"\] step \d+: loss", line)]
    assert ([re.search(r"step (\d+):", line).group(1)  # type: ignore[union-attr]
             for line in steps] == ["2", "4"]), steps
    for line in steps:
        assert re.match(r"\[\d\d:\d\d:\d\d rank0 w2v_dist\.progress\] step \d: loss \d+\.\d{4}, lr \S+, "
                        r"grad norm \d\S*, \d+ audio-s/s, ETA \d+:\d\d:\d\d$", line), line
    assert "w2v_dist.progress] scoring dev-clean: " in proc.stderr  # the final evaluation's progress
