"""Checkpoints (every rank, through DeepSpeed), auto-resume, retention, and the Hugging Face export (rank 0)."""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

from w2v_dist import dist
from w2v_dist.engine import Engine

log = logging.getLogger("w2v_dist.checkpoint")
TAG_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    """RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Tags ``step_NNNNNNNN`` under ``<output_dir>/checkpoints``; keeps the last k and the best k by dev WER."""

    def __init__(self, output_dir: Path, world: dist.World, keep_last: int, keep_best: int = 0) -> None:
        self.root = output_dir / "checkpoints"
        self.world, self.keep_last, self.keep_best = world, keep_last, keep_best
        self.scores_file = self.root / "scores.json"

    def latest_tag(self) -> str | None:
        latest = self.root / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def save(self, engine: Engine, step: int, client_state: dict[str, Any], score: float | None = None) -> Path:
        """Collective: all ranks write their part; ``latest`` moves only once the save is complete.

        ``score`` (dev WER, lower is better) ranks the checkpoint for ``keep_best``.
        """
        tag = f"{TAG_PREFIX}{step:08d}"
        directory = self.root / tag
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), directory / f"rng_rank{self.world.rank}.pt")
        if self.world.is_main:
            (directory / "world.json").write_text(json.dumps({"world_size": self.world.size, "step": step}))
        dist.barrier()
        engine.save(self.root, tag, client_state)
        dist.barrier()
        if self.world.is_main:
            scores = self.scores()
            if score is not None:
                scores[tag] = score
                self.scores_file.write_text(json.dumps(scores, indent=1))
            self._prune(tag, scores)
        log.info("saved checkpoint %s", directory)
        return directory

    def scores(self) -> dict[str, float]:
        return json.loads(self.scores_file.read_text()) if self.scores_file.is_file() else {}

    def _prune(self, latest: str, scores: dict[str, float]) -> None:
        tags = sorted(p.name for p in self.root.glob(f"{TAG_PREFIX}*") if p.is_dir())
        best = sorted((t for t in tags if t in scores), key=lambda t: (scores[t], t))[:self.keep_best]
        keep = {latest, *tags[-self.keep_last:], *best}
        for old in tags:
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def resume(self, engine: Engine) -> dict[str, Any] | None:
        """Load the latest complete checkpoint into ``engine``; its client state, or ``None`` to start fresh."""
        tag = self.latest_tag()
        if tag is None:
            return None
        saved = json.loads((self.root / tag / "world.json").read_text())["world_size"]
        if saved != self.world.size:
            raise RuntimeError(f"checkpoint {self.root / tag} was written by {saved} ranks but this run has "
                               f"{self.world.size}: relaunch with {saved} ranks (the data position and ZeRO "
                               "partitions are per rank; elastic resume is not supported), or use a new output_dir")
        client_state = engine.load(self.root, tag)
        if client_state is None:
            raise RuntimeError(f"checkpoint {self.root / tag} could not be loaded")
        rng_file = self.root / tag / f"rng_rank{self.world.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s at step %s", self.root / tag, client_state["run"]["step"])
        return client_state


def export_hf(engine: Engine, processor: Wav2Vec2Processor, out_dir: Path, is_main: bool) -> bool:
    """Collective: write a ``save_pretrained`` (safetensors) export on rank 0, only from finite weights."""
    state = engine.full_state_dict()
    if not is_main:
        dist.barrier()
        return True
    finite = all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    if finite:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model: Wav2Vec2ForCTC = engine.module
        model.save_pretrained(tmp, state_dict={k: v.float() for k, v in state.items()}, safe_serialization=True)
        config = copy.deepcopy(model.config)
        config.dtype = "float32"  # save_pretrained records the 16-bit module's dtype; the weights written are fp32
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        log.info("exported Hugging Face model to %s", out_dir)
    else:
        log.error("not exporting %s: the weights contain NaN or Inf", out_dir)
    dist.barrier()
    return finite
