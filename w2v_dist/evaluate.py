"""Dev-set evaluation during training: greedy CTC decoding, error counts pooled over ranks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Wav2Vec2Processor

from w2v_dist import dist
from w2v_dist.decoding import GreedyDecoder
from w2v_dist.engine import Engine
from w2v_dist.faults import pause_point
from w2v_dist.metrics import ErrorCounts


@dataclass
class DevSet:
    name: str
    loader: Iterable[dict[str, Any]]


@torch.no_grad()
def evaluate(engine: Engine, processor: Wav2Vec2Processor, dev_sets: list[DevSet], keep_samples: int
             ) -> dict[str, ErrorCounts]:
    """Collective: every rank evaluates its share of each dev set; counts are summed before any division."""
    engine.eval()
    results: dict[str, ErrorCounts] = {}
    model = engine.module
    decode = GreedyDecoder(processor.tokenizer)  # the same decoding as `w2v-dist evaluate`
    for dev in dev_sets:
        counts = ErrorCounts()
        done = 0
        for batch in dev.loader:
            done += 1
            if not batch["keys"]:
                engine.dummy_forward()
                continue
            _, logits = engine.forward(batch, with_labels=False)
            frames = model._get_feat_extract_output_lengths(batch["input_lengths"])
            hypotheses = decode(logits.float(), frames)
            counts.add(batch["keys"], batch["texts"], hypotheses, keep_samples)
            pause_point("eval", dist.global_rank())
        # Ranks may hold different numbers of batches; matching forward counts keeps ZeRO-3's gathers paired.
        most = int(dist.all_reduce_max([done], engine.device)[0])
        for _ in range(most - done):
            engine.dummy_forward()
        pooled = ErrorCounts.from_list(dist.all_reduce_sum(counts.as_list(), engine.device))
        pooled.samples = [s for rank_samples in dist.all_gather_objects(counts.samples) for s in rank_samples]
        pooled.samples = pooled.samples[:keep_samples]
        results[dev.name] = pooled
    engine.train()
    return results
