"""Streaming loader: reads tar shards through webdataset, decodes in workers, yields collated batches.

Training streams are endless (epochs roll over), so no rank can run out of batches while another waits in a
collective: every rank takes the same number of micro-batches per update. The position is one number, the
update; everything else is replayed from the plan, see :mod:`w2v_dist.data.slots`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any, cast

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from w2v_dist.data.audio import decode_error
from w2v_dist.data.buffers import BufferPool
from w2v_dist.data.collate import CTCBatch
from w2v_dist.data.index import ShardSet
from w2v_dist.data.mix import mix_setting, part_name
from w2v_dist.data.plan import Batch, BatchPolicy, Piece, StreamLayout, plan_batches
from w2v_dist.data.preprocess import Preprocess
from w2v_dist.data.ranges import RangesUnsupported, read_ranges
from w2v_dist.data.shard_reader import RetryPolicy, read_members
from w2v_dist.data.slots import TrainPlan
from w2v_dist.preemption import leave_stop_signals_to_the_rank

log = logging.getLogger("w2v_dist.data")
PLAN_VERSION = "global epoch, shards sorted by length (1)"
"""Which data plan made a checkpoint's batches: a resume under another one says its batches differ."""


class _Stream(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *,
                 retry: RetryPolicy) -> None:
        self.shards, self.policy, self.prep, self.retry = shards, policy, prep, retry
        self.pool: BufferPool | None = None
        """This worker's batch buffers (made in the worker, on first use)."""

    def _batches(self, batches: list[Batch], pieces: list[Piece], skips: Counter[str]) -> Iterator[CTCBatch]:
        """Stream ``pieces`` in order and yield the planned ``batches``, decoding only what they contain."""
        needed = {(u.shard, u.key) for batch in batches for u in batch}
        samples = self._read(pieces, needed, skips)
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

    def _read(self, pieces: list[Piece], needed: set[tuple[int, str]], skips: Counter[str]
              ) -> Iterator[tuple[tuple[int, str], dict[str, bytes]]]:
        """``((shard, key), members)`` of the needed samples, piece by piece; a piece with none is not
        opened."""
        for piece in pieces:
            wanted = {key for shard, key in needed if shard == piece.shard}
            if wanted:
                for key, members in read_members(self.shards.urls[piece.shard], wanted, skips, self.retry):
                    yield (piece.shard, key), members

    def _decode_batch(self, batch: Batch, held: dict[tuple[int, str], dict[str, bytes]], skips: Counter[str]
                      ) -> CTCBatch:
        """Decode a planned batch into one zero-padded buffer; a missing or bad sample is skipped (counted,
        and named in the batch's ``dropped``)."""
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
                log.warning("shard %s: sample %s is missing or incomplete; skipped",
                            self.shards.urls[utt.shard], utt.key)
                skips["missing_member"] += 1
                dropped.append((utt.key, "missing_member"))
                continue
            row = values[len(keys), :utt.num_samples]
            try:
                label, text = self.prep.decode_into(members, row, self.shards.sample_rate, utt)
            except (sf.LibsndfileError, ValueError, KeyError, RuntimeError) as err:
                log.warning("shard %s: sample %s cannot be decoded (%s); skipped",
                            self.shards.urls[utt.shard], utt.key, decode_error(err))
                skips["bad_audio"] += 1
                dropped.append((utt.key, f"bad_audio: {decode_error(err)}"))
                continue
            lengths.append(utt.num_samples)
            labels.append(label)
            keys.append(utt.key)
            texts.append(text)
        # A reused buffer (or a skipped sample) left data in the padding.
        for index, length in enumerate(lengths):
            values[index, length:] = 0.0
        values[len(keys):] = 0.0  # a grid shape's empty rows (and a skipped sample's)
        # Rare: drop unused rows, and padding only a skipped sample needed.
        if len(keys) < len(batch) and not grid:
            buffer = buffer[:len(keys), :max(lengths, default=0)].clone()
            if self.pool:
                self.pool.release(slot)
            slot = -1
        kept = set(keys)
        sources = (Counter(part_name(self.shards, u.shard) for u in batch if u.key in kept)
                   if self.shards.parts else Counter())
        out = self.prep.collator.assemble(buffer, lengths, labels, keys, texts, skips=dict(skips),
                                          sources=dict(sources), dropped=tuple(dropped))
        # Shared memory all the way to the main process, no copy; the slot returns when it is done. The
        # shipped buffer unpickles as one tensor.
        if self.pool:
            out = replace(out, input_values=cast(torch.Tensor, self.pool.shipped(buffer, slot)))
        return out


def reads_by_range(shards: ShardSet, retry: RetryPolicy) -> bool:
    """Whether training can read each sample by its byte range: the index records them, the shards can seek
    (not a ``pipe:`` command), and an HTTP server answers a Range request (asked once, for the first sample;
    a server that ignores Range streams whole shards from then on, with a warning)."""
    columns = shards.columns
    if not columns.has_offsets or any(url.startswith("pipe:") for url in shards.urls):
        return False
    url = next((url for url in shards.urls if url.startswith(("http://", "https://"))), None)
    if url is None:
        return True
    shard = shards.urls.index(url)
    row = int(columns.shard_starts[shard])
    try:
        for _ in read_ranges(url, [(columns.key(row), int(columns.byte_offset[row]),
                                    int(columns.byte_size[row]))], Counter(), retry):
            pass
    except RangesUnsupported as err:
        log.warning("%s: streaming whole shards instead, each slot reading every shard it needs in full",
                    err)
        return False
    return True


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class TrainStream(_Stream):
    """Endless, deterministic, resumable training batches for one rank: the micro-batches of update after
    update that its :class:`~w2v_dist.data.slots.TrainPlan` lays out, decoded, from update ``self.update``
    on."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *, rank: int,
                 world_size: int, layout: StreamLayout, retry: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(shards, policy, prep, retry=retry)
        self.layout = layout
        self.plan = TrainPlan(shards, policy, prep, layout, rank=rank, world_size=world_size)
        self.by_range = reads_by_range(shards, retry)
        """Whether batches read their samples by byte range (else each shard a slot needs, whole)."""
        self.update = 0
        """Updates already taken: where the stream starts (the trainer keeps it at its step)."""

    @property
    def per_rank(self) -> int:
        """Micro-batches per update on this rank."""
        return self.plan.per_rank

    def __iter__(self) -> Iterator[CTCBatch]:
        # The start is read once: decoding in the rank (no workers), the trainer moves self.update as it
        # goes.
        for update, stream, batch in self.plan.items(self.update, *_worker(), self._slot_batches):
            yield replace(batch, update=update, stream=stream)

    def _planned(self, batches: list[Batch], skips: Counter[str]) -> Iterator[CTCBatch]:
        """Decode training batches, whose utterances come from anywhere in their shards: each batch's samples
        read by the byte ranges the index records (a seek, or an HTTP Range request), or, for an index
        without them or a ``pipe:`` command, each shard streamed once for all the batches that need it."""
        columns = self.shards.columns
        if not self.by_range:
            needed = dict.fromkeys(u.shard for batch in batches for u in batch)
            yield from self._batches(batches, [Piece(shard) for shard in needed], skips)
            return
        starts = columns.shard_starts
        for batch in batches:
            held: dict[tuple[int, str], dict[str, bytes]] = {}
            for shard in dict.fromkeys(u.shard for u in batch):
                rows = [(u.key, int(starts[shard]) + u.position) for u in batch if u.shard == shard]
                ranges = [(key, int(columns.byte_offset[row]), int(columns.byte_size[row]))
                          for key, row in rows]
                for key, members in read_ranges(self.shards.urls[shard], ranges, skips, self.retry):
                    held[(shard, key)] = members
            out = self._decode_batch(batch, held, skips)
            skips.clear()
            yield out

    def _slot_batches(self, slot: int, first: int) -> Iterator[CTCBatch]:
        for epoch, batches, skips in self.plan.slot_epochs(slot, first):
            for batch in self._planned(batches, skips):
                yield replace(batch, epoch=epoch)

    def took(self, micro_batches: list[CTCBatch]) -> None:
        """The rank took one update's micro-batches: the stream starts after them from now on."""
        for batch in micro_batches:
            self.plan.saw(batch.epoch, batch.update)
        self.update += 1

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "streams": self.layout.streams, "readers": self.layout.readers,
                "seed": self.layout.seed, "plan_inputs": self.plan_inputs(),
                "epoch_batches": self.plan.epoch_batches(self.update // self.layout.readers + 1)}

    def plan_inputs(self) -> dict[str, Any]:
        """What the batches of an update depend on besides the layout, by the config keys that set it."""
        return {"the data plan": PLAN_VERSION, "data.train_mix": mix_setting(self.shards),
                "data.max_batch_seconds/max_batch_size/bucket_window/shuffle_buffer/speed_perturb":
                    json.loads(json.dumps({k: v for k, v in asdict(self.policy).items() if k != "grid"})),
                "data.shape_quantum_frames": self.policy.grid.quantum_frames if self.policy.grid else 0,
                "data.min_seconds/max_seconds": [self.prep.min_samples, self.prep.max_samples],
                "the training shards' contents": self.shards.contents_digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = StreamLayout.of_state(state)
        if saved != self.layout:
            raise ValueError(f"cannot resume the data position exactly: the checkpoint's {saved} differs "
                             f"from this run's {self.layout}")
        before = state.get("plan_inputs", {"data.train_mix": state.get("mix", {})})
        if "plan_inputs" in state:  # saved before bounded shapes existed: its batches were free-length
            before = {"data.shape_quantum_frames": 0, **before}
            before.setdefault("the data plan", "shard pieces per slot (before the global epoch)")
        changed = [name for name, value in self.plan_inputs().items()
                   if name in before and before[name] != value]
        if changed:  # a smaller batch after an OOM, a curriculum's new mix: on purpose, so go on, but say so
            log.warning("%s changed since the checkpoint: from here the batches are not those of an "
                        "uninterrupted run (this epoch may read some utterances twice and others not at "
                        "all)", ", ".join(changed))
        self.update = int(state["update"])
        if state.get("epoch_batches"):  # a mix or speed perturbation: where each epoch began
            self.plan.load_epoch_batches([int(batches) for batches in state["epoch_batches"]])


class EvalStream(_Stream):
    """Each dev utterance exactly once over all ranks: rank r takes global positions ≡ r (mod world)."""

    def __init__(self, shards: ShardSet, policy: BatchPolicy, prep: Preprocess, *, rank: int,
                 world_size: int, retry: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(shards, policy, prep, retry=retry)
        firsts = shards.columns.shard_starts[:-1].tolist()  # each shard's first global position
        self.pieces = [Piece(shard, world_size, (rank - first) % world_size)
                       for shard, first in enumerate(firsts)]

    def __iter__(self) -> Iterator[CTCBatch]:
        worker, workers = _worker()
        mine = self.pieces[worker::workers]
        batches, skips = plan_batches(mine, self.shards.utterances, self.policy, self.prep.skip_reason)
        yield from self._batches(batches, mine, skips)


def make_loader(stream: _Stream, num_workers: int,
                prefetch_factor: int) -> DataLoader:  # type: ignore[type-arg]
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor, "multiprocessing_context": "fork",
                             "worker_init_fn": leave_stop_signals_to_the_rank} if num_workers else {}
    # Our streams take no randomness from the DataLoader; its own generator keeps iterator creation (at
    # start, resume and every evaluation) from drawing on the global RNG that dropout and masking use.
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0), **extra)
