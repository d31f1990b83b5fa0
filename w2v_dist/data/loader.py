"""Streaming loader: reads tar shards through webdataset, decodes in workers, yields collated batches.

Training streams are endless (epochs roll over), so no rank can run out of batches while another waits in a
collective: every rank takes the same number of micro-batches per update. The position is one number, the update;
everything else is replayed from the plan, see :mod:`w2v_dist.data.plan`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar, cast

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from w2v_dist.data.audio import EncoderGeometry, decode_error, speed_perturb
from w2v_dist.data.buffers import BufferPool
from w2v_dist.data.collate import CTCBatch, CTCCollator
from w2v_dist.data.index import ShardSet, Utterance
from w2v_dist.data.plan import (
    Batch,
    BatchPolicy,
    Piece,
    StreamLayout,
    assign_pieces,
    epoch_rng,
    epoch_sample,
    plan_batches,
    speed_perturbation,
)
from w2v_dist.data.shard_reader import RetryPolicy, read_members
from w2v_dist.data.text import CharLabeler
from w2v_dist.preemption import STOP_SIGNALS
from w2v_dist.redact import redact

log = logging.getLogger("w2v_dist.data")
MAX_EMPTY_EPOCHS = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Preprocess:
    """Everything a worker needs to turn tar members into model inputs (picklable)."""

    labels: CharLabeler
    collator: CTCCollator
    geometry: EncoderGeometry
    min_samples: int
    max_samples: int
    filtered: bool = True
    """False when scoring: every utterance is planned (:mod:`w2v_dist.scoring`), none is filtered."""

    def skip_reason(self, utt: Utterance) -> str | None:
        if not self.filtered:
            return None
        if utt.label_length == 0:
            return "empty_label"
        if utt.num_samples < max(self.min_samples, self.geometry.receptive_field):
            return "too_short"
        if utt.num_samples > self.max_samples:
            return "too_long"
        if self.geometry.frames(utt.num_samples) < utt.label_length:
            return "ctc_infeasible"
        return None

    def kept(self, num_samples: np.ndarray, label_length: np.ndarray) -> np.ndarray:
        """Whether :meth:`skip_reason` keeps each utterance, for arrays of lengths at once."""
        if not self.filtered:
            return np.ones(len(num_samples), dtype=bool)
        return ((label_length > 0) & (num_samples >= max(self.min_samples, self.geometry.receptive_field))
                & (num_samples <= self.max_samples) & (self.geometry.frames_of(num_samples) >= label_length))

    def decode_into(self, members: dict[str, bytes], row: np.ndarray, sample_rate: int, utt: Utterance
                    ) -> tuple[list[int], str]:
        """Decode one sample straight into its batch row (already zero-padded to the batch width); return its
        labels and transcript. The row's length is the sample count the plan promised (the index's, or after
        ``utt.speed``'s perturbation). Normalisation happens later, on the training device
        (:meth:`~w2v_dist.data.collate.CTCBatch.model_inputs`)."""
        text = json.loads(members["json"])["text"]
        stored = utt.source_samples or len(row)
        with sf.SoundFile(io.BytesIO(members["flac"])) as audio:
            if audio.samplerate != sample_rate or audio.channels != 1:
                raise ValueError(f"expected {sample_rate} Hz mono, got {audio.samplerate} Hz with "
                                 f"{audio.channels} channels")
            if audio.frames != stored:
                raise ValueError(f"the index says {stored} samples, the audio has {audio.frames}")
            target = row if utt.speed == 1.0 else np.empty(stored, dtype=np.float32)
            if len(audio.read(stored, dtype="float32", out=target)) != stored:
                raise ValueError("the audio ends early (truncated FLAC)")
        if utt.speed != 1.0:
            row[:] = speed_perturb(target, utt.speed, sample_rate)  # the plan computed this length exactly
        return self.labels(text), text


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *, retry: RetryPolicy) -> None:
        self.shards, self.policy, self.prep, self.retry = shards, policy, prep, retry
        self.pool: BufferPool | None = None
        """This worker's batch buffers (made in the worker, on first use)."""

    def _batches(self, batches: list[Batch], pieces: list[Piece], skips: Counter[str],
                 utterances: tuple[tuple[Utterance, ...], ...] | None = None) -> Iterator[CTCBatch]:
        """Read ``pieces`` (of ``utterances``, by default the whole set) in order and yield the planned
        ``batches``, decoding only what they contain."""
        needed = {(u.shard, u.key) for batch in batches for u in batch}
        samples = self._read(pieces, utterances or self.shards.utterances, needed, skips)
        held: dict[tuple[int, str], dict[str, bytes]] = {}
        for batch in batches:
            while any((u.shard, u.key) not in held for u in batch):
                sample = next(samples, None)
                if sample is None:
                    break
                held[sample[0]] = sample[1]
            out = self._decode_batch(batch, held, skips)
            skips.clear()
            yield out

    def _read(self, pieces: list[Piece], utterances: tuple[tuple[Utterance, ...], ...], needed: set[tuple[int, str]],
              skips: Counter[str]) -> Iterator[tuple[tuple[int, str], dict[str, bytes]]]:
        """``((shard, key), members)`` of the needed samples, piece by piece; a piece with none is not opened."""
        for piece in pieces:
            wanted = {u.key for u in piece.select(utterances[piece.shard]) if (piece.shard, u.key) in needed}
            if wanted:
                for key, members in read_members(self.shards.urls[piece.shard], wanted, skips, self.retry):
                    yield (piece.shard, key), members

    def _decode_batch(self, batch: Batch, held: dict[tuple[int, str], dict[str, bytes]], skips: Counter[str]
                      ) -> CTCBatch:
        """Decode a planned batch into one zero-padded buffer; a missing or bad sample is skipped (counted, and
        named in the batch's ``dropped``)."""
        grid = self.policy.grid
        longest = max((u.num_samples for u in batch), default=0)
        rows, width = grid.shape(batch) if grid and batch else (len(batch), longest)
        if get_worker_info() is None:
            buffer, slot = torch.from_numpy(np.zeros((rows, width), dtype=np.float32)), -1
        else:
            self.pool = self.pool or BufferPool(self.policy.max_batch_samples)
            buffer, slot = self.pool.take(rows, width)
        values: np.ndarray = buffer.numpy()
        lengths: list[int] = []
        labels: list[list[int]] = []
        keys: list[str] = []
        texts: list[str] = []
        dropped: list[tuple[str, str]] = []
        for utt in batch:
            members = held.pop((utt.shard, utt.key), None)
            if members is None or "flac" not in members or "json" not in members:
                log.warning("shard %s: sample %s is missing or incomplete; skipped", self.shards.urls[utt.shard],
                            utt.key)
                skips["missing_member"] += 1
                dropped.append((utt.key, "missing_member"))
                continue
            row = values[len(keys), :utt.num_samples]
            try:
                label, text = self.prep.decode_into(members, row, self.shards.sample_rate, utt)
            except (sf.LibsndfileError, ValueError, KeyError, RuntimeError) as err:
                log.warning("shard %s: sample %s cannot be decoded (%s); skipped", self.shards.urls[utt.shard],
                            utt.key, decode_error(err))
                skips["bad_audio"] += 1
                dropped.append((utt.key, f"bad_audio: {decode_error(err)}"))
                continue
            lengths.append(utt.num_samples)
            labels.append(label)
            keys.append(utt.key)
            texts.append(text)
        for index, length in enumerate(lengths):  # a reused buffer (or a skipped sample) left data in the padding
            values[index, length:] = 0.0
        values[len(keys):] = 0.0  # a grid shape's empty rows (and a skipped sample's)
        if len(keys) < len(batch) and not grid:  # rare: drop unused rows and padding only a skipped sample needed
            buffer = buffer[:len(keys), :max(lengths, default=0)].clone()
            if self.pool:
                self.pool.release(slot)
            slot = -1
        kept = set(keys)
        sources = Counter(self.shards.part_name(u.shard) for u in batch if u.key in kept) if self.shards.parts \
            else Counter()
        out = self.prep.collator.assemble(buffer, lengths, labels, keys, texts, skips=dict(skips),
                                          sources=dict(sources), dropped=tuple(dropped))
        if self.pool:  # shared memory all the way to the main process, no copy; the slot returns when it is done
            out = replace(out, input_values=cast(torch.Tensor, self.pool.shipped(buffer, slot)))  # unpickles as one
        return out


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def recent_epochs(cache: dict[int, T], epoch: int, make: Callable[[], T]) -> T:
    """``cache[epoch]``, made on first use; the 4 most recent epochs are kept (a worker's slots are at most an
    epoch apart)."""
    if epoch not in cache:
        if len(cache) >= 4:
            cache.pop(min(cache))
        cache[epoch] = make()
    return cache[epoch]


class TrainStream(_Stream):
    """Endless, deterministic, resumable training batches for one rank: the micro-batches of update after update
    (:class:`StreamLayout`), from update ``self.update`` on."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *, rank: int, world_size: int,
                 layout: StreamLayout, retry: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(shards, policy, prep, retry=retry)
        self.rank, self.world_size, self.layout = rank, world_size, layout
        self.per_rank = layout.streams_per_rank(world_size)
        self.update = 0
        """Updates already taken: where the stream starts (the trainer keeps it at its step)."""
        self._sampled: dict[int, tuple[tuple[Utterance, ...], ...]] = {}
        self._assigned: dict[int, list[list[Piece]]] = {}

    def plan(self, slot: int, epoch: int) -> tuple[list[Batch], list[Piece], Counter[str]]:
        layout = self.layout
        utterances = self.epoch_utterances(epoch)
        pieces = self.epoch_pieces(epoch)[slot]
        batches, skips = plan_batches(pieces, utterances, self.policy, self.prep.skip_reason,
                                      epoch_rng(layout.seed, epoch, slot), speed_perturbation(
                                          self.policy.speeds, layout.seed, epoch, self.shards.sample_rate))
        return batches, pieces, skips

    def epoch_pieces(self, epoch: int) -> list[list[Piece]]:
        """Every slot's pieces of ``epoch``: planned once per epoch for all the slots a worker reads, not once per
        slot (:func:`assign_pieces`)."""
        return recent_epochs(self._assigned, epoch, lambda: assign_pieces(
            self.shards.epoch_seconds, [len(u) for u in self.epoch_utterances(epoch)], self.layout.slots,
            self.layout.seed, epoch))

    def layout_problem(self) -> str | None:
        """Why this layout cannot train, said at startup: slots that an epoch gives nothing to read (more slots than
        utterances per epoch), which would otherwise stop the run after :data:`MAX_EMPTY_EPOCHS` empty epochs."""
        starved = sum(not pieces for pieces in self.epoch_pieces(0))
        if not starved:
            return None
        layout, slots = self.layout, "slot" if starved == 1 else "slots"
        return (f"data: {layout.slots:,} data slots ({layout.streams:,} streams x {layout.readers:,} readers) but "
                f"{sum(map(len, self.epoch_utterances(0))):,} training utterances per epoch, so {starved:,} {slots} "
                "would read nothing: use fewer slots (trainer.update_seconds or trainer.grad_accum, "
                "data.stream_readers or data.num_workers, fewer ranks) or more data")

    def epoch_utterances(self, epoch: int) -> tuple[tuple[Utterance, ...], ...]:
        """Per shard, what ``epoch`` reads: every utterance, or for a mix its fraction of each part."""
        if not self.shards.parts:
            return self.shards.utterances
        return recent_epochs(self._sampled, epoch, lambda: tuple(
            epoch_sample(u, self.shards.shard_fraction(s), self.layout.seed, epoch, s)
            for s, u in enumerate(self.shards.utterances)))

    def schedule(self, worker: int, workers: int) -> Iterator[tuple[int, int, int]]:
        """``(update, stream, slot)`` of each micro-batch this worker makes, in the order the rank takes them:
        the DataLoader hands the rank item ``i`` from worker ``i % workers``."""
        if (self.per_rank * self.layout.readers) % max(workers, 1):
            raise ValueError(f"{workers} loader workers cannot each keep slots of their own "
                             f"({self.per_rank * self.layout.readers} per rank): see StreamLayout.workers")
        start = self.update  # decoding in the rank (no workers), the trainer moves self.update as it goes
        for item in itertools.count(worker, max(workers, 1)):
            update, index = start + item // self.per_rank, item % self.per_rank
            stream = self.rank + index * self.world_size
            yield update, stream, self.layout.slot(stream, update)

    def slot_epochs(self, slot: int, first: int) -> Iterator[tuple[int, list[Batch], list[Piece], Counter[str]]]:
        """A slot's endless plan from its batch number ``first`` on, epoch by epoch: ``(epoch, batches, pieces,
        load-time skips)`` (skips only with an epoch's first batch)."""
        skip, empty_epochs = first, 0
        for epoch in itertools.count():
            batches, pieces, skips = self.plan(slot, epoch)
            if skip >= len(batches):
                skip -= len(batches)
                empty_epochs = empty_epochs + 1 if not batches else 0
                if empty_epochs >= MAX_EMPTY_EPOCHS:
                    raise RuntimeError(f"data slot {slot} received no usable samples in {empty_epochs} epochs: too "
                                       "few utterances for this many slots (data streams x readers), or all were "
                                       "filtered")
                continue
            yield epoch, batches[skip:], pieces, skips if skip == 0 else Counter()
            skip = 0

    def planned(self, slot: int, first: int) -> Iterator[tuple[int, Batch]]:
        """``(epoch, batch)`` of a slot from its batch number ``first`` on, at plan speed (no audio)."""
        for epoch, batches, _, _ in self.slot_epochs(slot, first):
            for batch in batches:
                yield epoch, batch

    def items(self, worker: int, workers: int, source: Callable[[int, int], Iterator[T]]
              ) -> Iterator[tuple[int, int, T]]:
        """``(update, stream, item)`` for :meth:`schedule`, each item the next of its slot's ``source(slot, first
        batch number)``: decoded batches when iterating, :meth:`planned` ones to audit the order at plan speed."""
        sources: dict[int, Iterator[T]] = {}
        for update, stream, slot in self.schedule(worker, workers):
            if slot not in sources:  # a slot gives one batch each time its stream comes back to it
                sources[slot] = source(slot, update // self.layout.readers)
            yield update, stream, next(sources[slot])

    def __iter__(self) -> Iterator[CTCBatch]:
        for update, stream, batch in self.items(*_worker(), self._slot_batches):
            yield replace(batch, update=update, stream=stream)

    def _slot_batches(self, slot: int, first: int) -> Iterator[CTCBatch]:
        for epoch, batches, pieces, skips in self.slot_epochs(slot, first):
            for batch in self._batches(batches, pieces, skips, self.epoch_utterances(epoch)):
                yield replace(batch, epoch=epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "streams": self.layout.streams, "readers": self.layout.readers,
                "seed": self.layout.seed, "plan_inputs": self.plan_inputs()}

    def plan_inputs(self) -> dict[str, Any]:
        """What the batches of an update depend on besides the layout, by the config keys that set it."""
        mix = {redact(part): fraction for part, fraction in zip(self.shards.parts, self.shards.fractions)}
        return {"data.train_mix": mix,
                "data.max_batch_seconds/max_batch_size/bucket_window/shuffle_buffer/speed_perturb":
                    json.loads(json.dumps({k: v for k, v in asdict(self.policy).items() if k != "grid"})),
                "data.shape_quantum_frames": self.policy.grid.quantum_frames if self.policy.grid else 0,
                "data.min_seconds/max_seconds": [self.prep.min_samples, self.prep.max_samples],
                "the training shards' contents": self.shards.contents_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = StreamLayout(int(state["streams"]), int(state["readers"]), int(state["seed"]))
        if saved != self.layout:
            raise ValueError(f"cannot resume the data position exactly: the checkpoint's {saved} differs from this "
                             f"run's {self.layout}")
        before = state.get("plan_inputs", {"data.train_mix": state.get("mix", {})})
        if "plan_inputs" in state:  # saved before bounded shapes existed: its batches were free-length
            before = {"data.shape_quantum_frames": 0, **before}
        changed = [name for name, value in self.plan_inputs().items() if name in before and before[name] != value]
        if changed:  # a smaller batch after an OOM, a curriculum's new mix: on purpose, so go on, but say so
            log.warning("%s changed since the checkpoint: from here the batches are not those of an uninterrupted "
                        "run (this epoch may read some utterances twice and others not at all)", ", ".join(changed))
        self.update = int(state["update"])


class EvalStream(_Stream):
    """Each dev utterance exactly once over all ranks: rank r takes global positions ≡ r (mod world)."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *, rank: int, world_size: int,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(shards, policy, prep, retry=retry)
        firsts = itertools.accumulate((len(utts) for utts in shards.utterances), initial=0)  # one more than shards
        self.pieces = [Piece(shard, world_size, (rank - first) % world_size)
                       for shard, first in zip(range(len(shards.utterances)), firsts)]

    def __iter__(self) -> Iterator[CTCBatch]:
        worker, workers = _worker()
        mine = self.pieces[worker::workers]
        batches, skips = plan_batches(mine, self.shards.utterances, self.policy, self.prep.skip_reason, None)
        yield from self._batches(batches, mine, skips)


def make_preprocess(processor: Any, geometry: EncoderGeometry, sample_rate: int, min_seconds: float,
                    max_seconds: float) -> Preprocess:
    """The worker-side preprocessing the model's processor implies."""
    extractor = processor.feature_extractor
    return Preprocess(labels=CharLabeler(processor.tokenizer),
                      collator=CTCCollator(bool(extractor.return_attention_mask), sample_rate,
                                           bool(extractor.do_normalize)), geometry=geometry,
                      min_samples=int(min_seconds * sample_rate), max_samples=int(max_seconds * sample_rate))


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGUSR1 unless the DataLoader itself sends SIGTERM to shut them down.

    SLURM (and ``kill -- -PGID``) signals every process of the job, workers included. PyTorch's worker handler
    dies on a SIGTERM that its parent did not send, and the rank then fails at its next batch ("DataLoader
    worker exited unexpectedly") before it can checkpoint. The rank process alone decides when to stop
    (:mod:`w2v_dist.preemption`). A Python handler cannot see the sender, so the signals are blocked and a thread
    takes them with ``sigwaitinfo``, which names it: a worker the DataLoader is terminating still exits.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True, name="stop-signals").start()


def start_workers(loader: DataLoader) -> Iterator[CTCBatch]:  # type: ignore[type-arg]
    """``iter(loader)``, with the stop signals blocked while its workers are forked: each worker starts with them
    blocked, so a SIGTERM to every process of the job (SLURM) cannot kill a worker in the moments before
    :func:`leave_stop_signals_to_the_rank` runs in it. A signal meant for the rank meanwhile waits, and is
    delivered to it as soon as the workers are started."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


def make_loader(stream: _Stream, num_workers: int, prefetch_factor: int) -> DataLoader:  # type: ignore[type-arg]
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor, "multiprocessing_context": "fork",
                             "worker_init_fn": leave_stop_signals_to_the_rank} if num_workers else {}
    # Our streams take no randomness from the DataLoader; its own generator keeps iterator creation (at start,
    # resume and every evaluation) from drawing on the global RNG that dropout and masking use.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0), **extra)
