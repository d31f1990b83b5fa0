"""What a test run trains (the recipe on the test corpus, the fault matrix's schedule) and what it checks in
the result: metrics, the resume it logged, the weights of the uninterrupted run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

RECIPE = {"model.mask_time_prob": 0.3, "model.mask_time_length": 2, "model.layerdrop": 0.1,
          "schedule.name": "tri_stage",
          "deepspeed.extra": "{zero_optimization: {stage3_param_persistence_threshold: 0}}"}
"""What the base recipe does that a toy setting would hide: SpecAugment masks (length 2: the test clips are
short), LayerDrop (with the default seed, update 4 skips a layer of the 2-layer tiny model), the tri-stage
lr, and, under ZeRO-3, every parameter partitioned (DeepSpeed keeps those under 100k elements whole by
default: all of the tiny model's, so no layer would be gathered or released)."""

STEPS = 6
SCHEDULE = {"trainer.max_steps": STEPS, "trainer.eval_every": 3, "trainer.save_every": 2,
            "trainer.log_every": 1, "data.num_workers": 1, "checkpoint.keep_last": 3}
"""The fault matrix's run: saves at steps 2, 4, 6; dev evaluations at 3 and 6; one training loader worker per
rank (dev sets are decoded in the rank)."""


def overrides(shard_dirs: dict, model: Path, out: Path, **extra: object) -> list[str]:
    """``key=value`` arguments for ``configs/debug.yaml`` on the test corpus: small sizes, the
    :data:`RECIPE`'s randomness and schedule; a test that turns one off says why."""
    values = {"output_dir": out, "data.train_shards": shard_dirs["train-clean-100"],
              "data.dev_shards": f"{{dev-clean: {shard_dirs['dev-clean']}}}", "model.name_or_path": model,
              "data.max_batch_seconds": 8.0, "data.bucket_window": 16, "data.shuffle_buffer": 8,
              "data.min_seconds": 0.2, "data.num_workers": 1, **RECIPE, "optim.lr": 1e-3,
              "trainer.max_steps": 6, "trainer.eval_every": 3, "trainer.save_every": 3,
              "trainer.log_every": 1, "logging.progress_bar": False, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def job_args(shard_dirs: dict, model: Path, out: Path, **extra: object) -> list[str]:
    """``train.py``'s arguments for the fault matrix's run (:data:`SCHEDULE`) of ``configs/demo.yaml``."""
    return ["--config", "configs/demo.yaml", *overrides(shard_dirs, model, out, **{**SCHEDULE, **extra})]


def check(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every training line of ``metrics.jsonl`` in the order written (a relaunch
    appends)."""
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def logged_steps(out: Path) -> list[int]:
    """The steps of ``out``'s training lines; none before ``metrics.jsonl`` is written."""
    return [step for step, _ in logged_losses(out)] if (out / "metrics.jsonl").is_file() else []


def assert_resumed_from(output: str, out: Path, step: int) -> None:
    """The relaunch's log names exactly one resume, from ``out``'s checkpoint of ``step``."""
    resumes = re.findall(r"resumed from (\S+) at step (\d+)", output)
    assert resumes == [(str(out / "checkpoints" / f"step_{step:08d}"), str(step))], (resumes, output[-4000:])


def assert_same_weights(reference: Path, out: Path, steps: list[int] | None = None, losses: bool = True,
                        rtol: float = 0.0) -> None:
    """``out`` ends with ``reference``'s weights (atol 1e-6, and ``rtol``), and its ``metrics.jsonl`` logged
    exactly ``steps`` in that order (default: 1 to ``STEPS`` once each; an interrupted run then its relaunch
    log a step twice where the relaunch resumed before the last logged step), each with the uninterrupted
    run's loss at that step. ``losses=False``: the weights only (a run resumed on another world size)."""
    a = load_file(reference / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=1e-6), name
    if not losses:
        return
    expected = dict(logged_losses(reference))
    assert logged_steps(reference) == list(range(1, STEPS + 1)), logged_steps(reference)
    logged = logged_losses(out)
    wanted = list(range(1, STEPS + 1)) if steps is None else steps
    got = [step for step, _ in logged]
    assert got == wanted, f"logged steps {got}, expected {wanted}"
    for step, loss in logged:
        assert abs(loss - expected[step]) <= 1e-5 * abs(expected[step]), (step, loss, expected[step])


def wandb_artifacts(out: Path) -> list[dict]:
    """The artifacts logged by the offline wandb runs under ``out``: reads the runs' record logs (LevelDB's
    log format, 32 KiB blocks of 7-byte-headed fragments, after wandb's 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, record = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if (left := 32768 - pos % 32768) < 7 or data[pos:pos + 7] == bytes(7):  # a block's zero padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            record, pos = record + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last fragment of one
                parsed = wandb_internal_pb2.Record.FromString(record)
                if parsed.WhichOneof("record_type") == "artifact":
                    art = parsed.artifact
                    found.append({"name": art.name, "type": art.type, "aliases": list(art.aliases),
                                  "metadata": json.loads(art.metadata or "{}"),
                                  "refs": [entry.ref for entry in art.manifest.contents]})
                record = b""
    return found
