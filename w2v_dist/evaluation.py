"""``w2v-dist evaluate``: WER/CER of a trained model on shard sets, per utterance and per set, on 1..N ranks.

The scoring itself is :class:`w2v_dist.scoring.Scorer`, the same one the trainer logs its dev WER with: the
WER this command reports for ``final/`` is the one in the run's metrics.jsonl at its last step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from w2v_dist import dist
from w2v_dist.console import emit
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import load_shard_set
from w2v_dist.data.preprocess import make_preprocess
from w2v_dist.data.shard_reader import RetryPolicy
from w2v_dist.decoding import make_decoder
from w2v_dist.scoring import Scorer, scoring_batch_size, scoring_loader, write_rows


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    model: str
    """HF export dir or DeepSpeed checkpoint (run dir, ``checkpoints/`` or a tag dir)."""
    shards: list[str]
    out: str | None = None
    config: str | None = None
    batch_seconds: float = 100.0
    max_batch_size: int = 64
    """At most this many utterances per batch; models whose logits padding changes always take 1
    (:func:`w2v_dist.scoring.scoring_batch_size`)."""
    workers: int = 1
    decoder: str = "greedy"
    lm: str | None = None
    beam_width: int = 100
    alpha: float = 0.5
    beta: float = 1.0
    worst: int = 10
    shard_command: str = ""
    collective_timeout_minutes: float = 30.0


@torch.no_grad()
def evaluate_sets(opts: EvalOptions, world: dist.World, device: torch.device) -> dict[str, Any] | None:
    """Collective: score every set on every rank; rank 0 gets the summary (other ranks ``None``)."""
    from w2v_dist.export import load_for_inference

    # /data/shards/dev-clean → dev-clean
    names = [Path(location.rstrip("/")).name for location in opts.shards]
    if len(set(names)) != len(names):
        raise ValueError(f"shard sets must have distinct directory names, got {names}")
    model, processor = load_for_inference(opts.model, opts.config)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers wraps .to in a decorator mypy misreads
    decoder = make_decoder(opts.decoder, processor.tokenizer, opts.lm, opts.beam_width, opts.alpha,
                           opts.beta)
    geometry = EncoderGeometry.from_model_config(model.config)
    batch_size = scoring_batch_size(model.config, bool(processor.feature_extractor.return_attention_mask),
                                    opts.max_batch_size)
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for name, location in zip(names, opts.shards):
        shards = load_shard_set(location, opts.shard_command)
        prep = make_preprocess(processor, geometry, shards.sample_rate, 0.0, 0.0)
        scorer = Scorer(lambda batch: model(**batch.model_inputs(device, with_labels=False)).logits, decoder,
                        geometry, device=device, sample_rate=shards.sample_rate,
                        text_policy=shards.text_policy)
        loader = scoring_loader(shards, prep, opts.batch_seconds, batch_size, world, workers=opts.workers,
                                retry=RetryPolicy())
        result = scorer.score(name, loader, shards.total_samples)
        all_rows.extend(result.rows)
        summary[name] = {**result.summary(), "indexed": shards.total_samples,
                         "unscored_keys": [{"key": k, "reason": r} for k, r in result.unscored]}
    if not world.is_main:
        return None
    if opts.out:
        write_rows(Path(opts.out), all_rows)
    report_worst(all_rows, opts.worst)
    return {"sets": summary, "model": str(opts.model), "decoder": opts.decoder, "lm": opts.lm,
            "world_size": world.size, "max_batch_size": batch_size, "out": opts.out,
            "elapsed_seconds": round(time.perf_counter() - start, 3)}


def report_worst(rows: list[dict[str, Any]], count: int) -> None:
    """The utterances with the most word errors, on stderr (stdout carries only the JSON summary)."""
    worst = sorted(rows, key=lambda r: (-r["errors"], r["set"], r["key"]))[:count]
    if not worst:
        return
    print(f"worst {len(worst)} utterances by word errors:", file=sys.stderr)
    for r in worst:
        print(f"  {r['set']} {r['key']}: {r['errors']} errors / {r['words']} words\n    REF: "
              f"{r['reference']}\n    HYP: {r['hypothesis']}", file=sys.stderr)


def evaluate_command(opts: EvalOptions, local_rank: int | None = None) -> int:
    """The command: ranks, process group and device set up as for training
    (:func:`w2v_dist.process.start_process`)."""
    # imported under the command's w2v_dist.console.command_stdout: stdout is ours
    from w2v_dist.process import start_process

    world, device = start_process(opts.collective_timeout_minutes, local_rank)
    summary = evaluate_sets(opts, world, device)
    if summary is not None:
        emit(json.dumps(summary))
    return 0
