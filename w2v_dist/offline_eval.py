"""``w2v-dist evaluate``: WER/CER of a trained model on shard sets, per utterance and per set, on 1..N ranks.

Each rank scores its stripe of every set (:class:`~w2v_dist.data.loader.EvalStream`: each utterance exactly once
over all ranks); edit and length counts are summed over ranks before any division, and the per-utterance lines
are gathered to rank 0, which writes the JSONL file and prints the summary.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from transformers import Wav2Vec2ForCTC

from w2v_dist import dist
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import model_inputs
from w2v_dist.data.index import Utterance, load_shard_set
from w2v_dist.data.loader import EvalStream, Preprocess, make_loader, make_preprocess
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.data.text import TranscriptError, normalize
from w2v_dist.decoding import CTCDecoder, make_decoder
from w2v_dist.metrics import ErrorCounts

log = logging.getLogger("w2v_dist.offline_eval")
NO_LIMIT = 1e9
"""Seconds: no utterance is too long to score (the model's memory is the only limit)."""


@dataclass
class EvalOptions:
    model: str
    """HF export dir or DeepSpeed checkpoint (run dir, ``checkpoints/`` or a tag dir)."""
    shards: list[str]
    out: str | None = None
    config: str | None = None
    batch_seconds: float = 100.0
    max_batch_size: int = 0
    """0 = automatic: 1 for group-norm encoders without an attention mask (padding changes their outputs)."""
    workers: int = 1
    decoder: str = "greedy"
    lm: str | None = None
    beam_width: int = 100
    alpha: float = 0.5
    beta: float = 1.0
    worst: int = 10
    shard_command: str = ""


class EvalPreprocess(Preprocess):
    """Score every utterance: only audio too short for a single encoder frame is skipped (and counted).

    Training's length and CTC-feasibility filters would silently drop dev utterances and bias the WER.
    """

    def skip_reason(self, utt: Utterance) -> str | None:
        return "too_short" if utt.num_samples < self.geometry.receptive_field else None


def set_name(location: str) -> str:
    """A set's name in the results: its directory's basename (``/data/shards/dev-clean`` → ``dev-clean``)."""
    return Path(location.rstrip("/")).name


def normalized(text: str) -> str:
    """The shards' transcript policy applied to a hypothesis; what the policy rejects scores as empty."""
    try:
        return normalize(text)
    except TranscriptError:
        return ""


def auto_batch_size(model: Wav2Vec2ForCTC, return_attention_mask: bool) -> int:
    """Group-norm feature encoders (wav2vec2-base) normalise over padding too, so padded batches change each
    utterance's logits and the WER would depend on batch composition, i.e. on the number of ranks."""
    return 1 if model.config.feat_extract_norm == "group" and not return_attention_mask else 64


def score_set(model: Wav2Vec2ForCTC, decoder: CTCDecoder, loader: Any, name: str, device: torch.device,
              sample_rate: int) -> tuple[list[dict[str, Any]], Counter[str]]:
    """This rank's per-utterance result lines for one set, and the loader's skips by reason."""
    rows: list[dict[str, Any]] = []
    skips: Counter[str] = Counter()
    for batch in loader:
        skips.update(batch["skips"])
        if not batch["keys"]:
            continue
        logits = model(**model_inputs(batch, device, with_labels=False)).logits
        frames = model._get_feat_extract_output_lengths(batch["input_lengths"])
        for key, ref, hyp, samples in zip(batch["keys"], batch["texts"], decoder(logits, frames),
                                          batch["input_lengths"].tolist()):
            counts = ErrorCounts()
            hyp = normalized(hyp)
            counts.add([key], [ref], [hyp])
            rows.append({"set": name, "key": key, "reference": ref, "hypothesis": hyp, "errors": counts.word_edits,
                         "words": counts.words, "char_errors": counts.char_edits, "chars": counts.chars,
                         "seconds": samples / sample_rate})
    return rows, skips


def _rate(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN (an empty set) is not valid JSON


@torch.no_grad()
def evaluate_sets(opts: EvalOptions, world: dist.World) -> dict[str, Any] | None:
    """Collective: score every set on every rank; rank 0 gets the summary (other ranks ``None``)."""
    from w2v_dist.export import load_for_inference

    names = [set_name(location) for location in opts.shards]
    if len(set(names)) != len(names):
        raise ValueError(f"shard sets must have distinct directory names, got {names}")
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model, processor = load_for_inference(opts.model, opts.config)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers wraps .to in a decorator mypy misreads
    decoder = make_decoder(opts.decoder, processor.tokenizer, opts.lm, opts.beam_width, opts.alpha, opts.beta)
    with_mask = bool(processor.feature_extractor.return_attention_mask)
    batch_size = opts.max_batch_size or auto_batch_size(model, with_mask)
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    all_rows: list[dict[str, Any]] = []
    for name, location in zip(names, opts.shards):
        shards = load_shard_set(location, opts.shard_command)
        rate = shards.sample_rate
        base = make_preprocess(processor, EncoderGeometry.from_model_config(model.config), rate, 0.0, NO_LIMIT)
        prep = EvalPreprocess(**{f.name: getattr(base, f.name) for f in fields(base)})
        policy = BatchPolicy(int(opts.batch_seconds * rate), batch_size, bucket_window=512, shuffle_buffer=1)
        loader = make_loader(EvalStream(shards, policy, prep, world.rank, world.size), opts.workers, 2)
        rows, skips = score_set(model, decoder, loader, name, device, rate)
        local = ErrorCounts(sum(r["errors"] for r in rows), sum(r["words"] for r in rows),
                            sum(r["char_errors"] for r in rows), sum(r["chars"] for r in rows), len(rows))
        pooled = ErrorCounts.from_list(dist.all_reduce_sum(local.as_list(), device))
        pooled_skips = sum((Counter(s) for s in dist.all_gather_objects(dict(skips))), Counter())
        all_rows.extend(r for part in dist.all_gather_objects(rows) for r in part)
        summary[name] = {"wer": _rate(pooled.wer), "cer": _rate(pooled.cer), "utterances": pooled.utterances,
                         "words": pooled.words, "word_errors": pooled.word_edits, "chars": pooled.chars,
                         "char_errors": pooled.char_edits, "indexed": shards.total_samples,
                         "skipped": dict(pooled_skips)}
        if pooled.utterances != shards.total_samples:
            log.warning("%s: scored %d of %d indexed utterances (skipped: %s)", name, pooled.utterances,
                        shards.total_samples, dict(pooled_skips))
    if not world.is_main:
        return None
    all_rows.sort(key=lambda r: (names.index(r["set"]), r["key"]))  # same file whatever the number of ranks
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.out, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in all_rows)
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
        print(f"  {r['set']} {r['key']}: {r['errors']} errors / {r['words']} words\n    REF: {r['reference']}\n"
              f"    HYP: {r['hypothesis']}", file=sys.stderr)


def run(opts: EvalOptions, local_rank: int | None = None) -> int:
    """The command: ranks from the launcher's environment (or one process), a process group when >1 rank."""
    from w2v_dist.logging import setup_console

    world = dist.world_from_env(local_rank)
    setup_console(world.rank)
    started_group = False
    if world.size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                      timeout=datetime.timedelta(minutes=30))
        started_group = True
    try:
        summary = evaluate_sets(opts, world)
    finally:
        if started_group:
            torch_dist.destroy_process_group()
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0
