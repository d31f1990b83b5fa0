"""The one dev-set scorer: in-training evaluation and ``w2v-dist evaluate`` both score through
:class:`Scorer`.

Every indexed utterance is scored. Training's filters (length, CTC feasibility, empty labels) do not apply:
an utterance too long for a batch is scored alone, one too short for a single encoder frame scores as the
model transcribes it (nothing), an empty reference counts the way jiwer counts it (its insertions, no words).
What cannot be scored at all (audio that does not decode, a sample missing from its shard) is reported by key
and reason. Hypotheses are normalised like the shards' transcripts; counts are summed over utterances and
ranks before any division.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from w2v_dist import dist
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch
from w2v_dist.data.index import ShardSet
from w2v_dist.data.loader import EvalStream, make_loader
from w2v_dist.data.plan import BatchPolicy
from w2v_dist.data.preprocess import Preprocess
from w2v_dist.data.shard_reader import RetryPolicy
from w2v_dist.data.text import LIBRISPEECH, TextPolicy, TranscriptError
from w2v_dist.decoding import CTCDecoder
from w2v_dist.logging import Progress, finite_or_none
from w2v_dist.metrics import ErrorCounts

log = logging.getLogger("w2v_dist.scoring")

LogitsOf = Callable[[CTCBatch], torch.Tensor]
"""A batch → ``[batch, frames, vocab]`` logits (the engine's forward in training, the plain model
offline)."""


@dataclass
class SetScore:
    """One dev set's result, identical on every rank."""

    name: str
    counts: ErrorCounts
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One line per scored utterance, sorted by key: whatever the number of ranks, the same list."""
    unscored: list[tuple[str, str]] = field(default_factory=list)
    """(key, reason) of the utterances that could not be scored."""

    def summary(self) -> dict[str, Any]:
        counts = self.counts
        return {"wer": finite_or_none(counts.wer), "cer": finite_or_none(counts.cer),
                "utterances": counts.utterances, "words": counts.words, "word_errors": counts.word_edits,
                "chars": counts.chars, "char_errors": counts.char_edits, "unscored": len(self.unscored)}


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-utterance results as JSON lines (``w2v-dist evaluate --out``, and the trainer's ``eval/``
    files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def normalized(text: str, policy: TextPolicy = LIBRISPEECH) -> str:
    """The shards' transcript policy applied to a hypothesis; what the policy rejects scores as empty."""
    try:
        return policy.normalize(text)
    except TranscriptError:
        return ""


PADDING_FREE = ("wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat")
"""Families whose logits do not depend on padding when their feature encoder is layer-normed and they get an
attention mask. The others leak padding into real frames even then (data2vec-audio's stacked positional
convs, the conformer's depthwise convs, SEW's pooling); ``tests/unit/test_padding.py`` measures every
family."""


def scoring_batch_size(config: PretrainedConfig, return_attention_mask: bool, requested: int) -> int:
    """Padding must not change an utterance's logits, or the WER would depend on batch composition (on the
    number of ranks, on training vs ``evaluate``). It does unless the model masks it everywhere: a group-norm
    feature encoder (wav2vec2-base) normalises over the padding even with a mask, and without a mask the
    transformer attends to it. Models that do not mask it everywhere are scored one utterance at a time."""
    free = (config.model_type in PADDING_FREE and getattr(config, "feat_extract_norm", "layer") == "layer"
            and return_attention_mask)
    return requested if free else 1


def scoring_loader(shards: ShardSet, prep: Preprocess, batch_seconds: float, max_batch_size: int,
                   world: dist.World, *, workers: int, retry: RetryPolicy) -> Any:
    """This rank's stripe of a dev set (each utterance on exactly one rank), every utterance planned."""
    prep = replace(prep, filtered=False)
    policy = BatchPolicy.from_seconds(max_batch_seconds=batch_seconds, sample_rate=shards.sample_rate,
                                      max_batch_size=max_batch_size, bucket_window=512, shuffle_buffer=1)
    stream = EvalStream(shards, policy, prep, rank=world.rank, world_size=world.size, retry=retry)
    return make_loader(stream, workers, prefetch_factor=2)


class Scorer:
    """Collective: every rank scores its stripe of a set; the rows are gathered, so every rank ends with the
    whole set's :class:`SetScore`."""

    def __init__(self, logits_of: LogitsOf, decoder: CTCDecoder, geometry: EncoderGeometry, *,
                 device: torch.device, sample_rate: int, text_policy: TextPolicy = LIBRISPEECH,
                 pad_forward: Callable[[], None] | None = None,
                 after_batch: Callable[[], None] = lambda: None
                 ) -> None:
        self.logits_of, self.decoder, self.geometry = logits_of, decoder, geometry
        self.text_policy = text_policy
        """The dev set's transcript policy, applied to hypotheses too."""
        self.device, self.sample_rate = device, sample_rate
        self.pad_forward = pad_forward
        """A forward on no data, for ranks with fewer batches (ZeRO-3 gathers parameters in every
        forward)."""
        self.after_batch = after_batch

    @torch.no_grad()
    def score(self, name: str, loader: Iterable[CTCBatch], indexed: int) -> SetScore:
        rows: list[dict[str, Any]] = []
        unscored: list[tuple[str, str]] = []
        forwards = 0
        rank, size = dist.rank_and_size()  # rank 0 shows its stripe's progress, about 1/size of the set
        progress = Progress(f"scoring {name}", -(-indexed // size),
                            "utterances" + (" (rank 0's share)" if size > 1
                                            else ""), show=rank == 0)
        for batch in loader:
            unscored.extend(batch.dropped)
            if len(batch):
                rows.extend(self._rows(name, batch))
            elif self.pad_forward:
                self.pad_forward()
            forwards += 1
            progress.update(len(batch) + len(batch.dropped))
            self.after_batch()
        progress.close()
        if self.pad_forward:
            most = int(dist.all_reduce_max([forwards], self.device)[0])
            for _ in range(most - forwards):
                self.pad_forward()
        all_rows = sorted((r for part in dist.all_gather_objects(rows) for r in part),
                          key=lambda r: r["key"])
        all_unscored = sorted(u for part in dist.all_gather_objects(unscored) for u in part)
        counts = ErrorCounts(word_edits=sum(r["errors"] for r in all_rows),
                             words=sum(r["words"] for r in all_rows),
                             char_edits=sum(r["char_errors"] for r in all_rows),
                             chars=sum(r["chars"] for r in all_rows), utterances=len(all_rows))
        if len(all_rows) + len(all_unscored) != indexed:
            log.error("%s: %d scored + %d unscored != %d indexed utterances", name, len(all_rows),
                      len(all_unscored), indexed)
        for key, reason in all_unscored:
            log.warning("%s: utterance %s not scored (%s)", name, key, reason)
        return SetScore(name, counts, all_rows, all_unscored)

    def _rows(self, name: str, batch: CTCBatch) -> list[dict[str, Any]]:
        batch = self._at_least_one_frame_wide(batch)
        logits = self.logits_of(batch).float()
        frames = torch.tensor([self.geometry.frames(n) for n in batch.input_lengths.tolist()])
        rows = []
        for key, ref, hyp, samples in zip(batch.keys, batch.texts, self.decoder(logits, frames),
                                          batch.input_lengths.tolist()):
            counts = ErrorCounts()
            hyp = normalized(hyp, self.text_policy)
            counts.add([ref], [hyp])
            rows.append({"set": name, "key": key, "reference": ref, "hypothesis": hyp,
                         "errors": counts.word_edits, "words": counts.words,
                         "char_errors": counts.char_edits,
                         "chars": counts.chars, "seconds": samples / self.sample_rate})
        return rows

    def _at_least_one_frame_wide(self, batch: CTCBatch) -> CTCBatch:
        """A batch of utterances shorter than the encoder's receptive field is padded to it (the conv stack
        needs that much input); their real lengths give them zero frames, so they transcribe as nothing."""
        missing = self.geometry.receptive_field - batch.input_values.shape[1]
        if missing <= 0:
            return batch
        mask = None if batch.attention_mask is None else F.pad(batch.attention_mask, (0, missing))
        return replace(batch, input_values=F.pad(batch.input_values, (0, missing)), attention_mask=mask)
