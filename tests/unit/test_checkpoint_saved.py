"""What a run saves, as one type (:class:`SavedRun`) in the format every w2v-dist has written: a save
writes ``world.json`` and DeepSpeed's client state with the keys they always had, and checkpoints written
before a key existed still read. The data layout a resume takes (the checkpoint's, on any world size)
comes from there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from w2v_dist.checkpoint.commit import Checkpointer
from w2v_dist.checkpoint.resume import data_layout, world_change
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.checkpoint.tags import WORLD_FILE
from w2v_dist.config import load_config
from w2v_dist.data.plan import StreamLayout
from w2v_dist.dist import World

LOADER = {"update": 6, "streams": 4, "readers": 2, "seed": 7, "plan_inputs": {"data.train_mix": {}}}
MODEL = {"name_or_path": "runs/base", "family": "wav2vec2", "architecture": "a1", "vocabulary": "v1"}


class RecordingEngine:
    """DeepSpeed's part of a save: one file; keeps the client state it was given."""

    def __init__(self) -> None:
        self.client_state: dict[str, Any] = {}

    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> list[Path]:
        self.client_state = client_state
        path = root / tag / "mp_rank_00_model_states.pt"
        path.write_bytes(b"w" * 64)
        return [path]


def test_a_save_writes_the_keys_every_w2v_dist_wrote_and_reads_back_the_same_run(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, World(0, 0, 1), keep_last=1, model=MODEL)
    engine = RecordingEngine()
    run = SavedRun(world_size=1, step=6, layout=StreamLayout(4, 2, 7), run={"step": 6, "best_wer": 0.5},
                   loader=LOADER, config="trainer:\n  max_steps: 8\n")
    directory = ckpt.save(engine, run)  # type: ignore[arg-type]
    assert json.loads((directory / WORLD_FILE).read_text()) == {"world_size": 1, "step": 6, "data": LOADER,
                                                               "model": MODEL}
    assert engine.client_state == {"run": {"step": 6, "best_wer": 0.5}, "loader": LOADER,
                                   "config": "trainer:\n  max_steps: 8\n"}
    on_disk = ckpt.saved_run("step_00000006")
    assert (on_disk.world_size, on_disk.step, on_disk.layout, on_disk.model) == \
        (1, 6, StreamLayout(4, 2, 7), MODEL)
    assert on_disk.with_client_state(engine.client_state) == SavedRun(
        world_size=1, step=6, layout=StreamLayout(4, 2, 7), run=run.run, loader=LOADER, config=run.config,
        model=MODEL)


def test_checkpoints_written_before_a_key_existed_still_read(tmp_path: Path) -> None:
    """world.json had only world_size and step before data layouts (then ``data``) and model identities (then
    ``model``) were recorded; the client state had no ``config`` at first."""
    (tmp_path / WORLD_FILE).write_text(json.dumps({"world_size": 2, "step": 4}))
    oldest = SavedRun.read(tmp_path)
    assert (oldest.world_size, oldest.step, oldest.layout, oldest.loader, oldest.model) == \
        (2, 4, None, None, None)
    resumed = oldest.with_client_state({"run": {"step": 4}, "loader": LOADER})
    assert (resumed.run, resumed.config, resumed.layout) == ({"step": 4}, None, StreamLayout(4, 2, 7))
    (tmp_path / WORLD_FILE).write_text(json.dumps({"world_size": 2, "step": 4, "data": LOADER}))
    assert SavedRun.read(tmp_path).layout == StreamLayout(4, 2, 7)


def test_a_resume_takes_the_checkpoints_layout_on_any_world_size() -> None:
    cfg = load_config(None, ["trainer.seed=7", "trainer.grad_accum=1"])
    saved = SavedRun(world_size=4, step=6, layout=StreamLayout(4, 2, 7), loader=LOADER)
    assert data_layout(cfg, 2, 1, None) == StreamLayout(2, 1, 7), "a fresh run: the config's"
    assert data_layout(cfg, 2, 1, SavedRun(world_size=2, step=4, layout=None)) == StreamLayout(2, 1, 7)
    assert data_layout(cfg, 2, 1, saved) == StreamLayout(4, 2, 7)
    assert world_change(saved, 2, StreamLayout(4, 2, 7), 8.0) == \
        "resuming step 6 from 4 rank(s) on 2: grad_accum 1 -> 2, 32 s per update (4 data streams)"
    assert world_change(saved, 4, StreamLayout(4, 2, 7), 8.0) is None
    with pytest.raises(ValueError, match=r"trainer.seed 7 \(checkpoint\) vs 8 \(config\)"):
        data_layout(load_config(None, ["trainer.seed=8"]), 2, 1, saved)
