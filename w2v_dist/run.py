"""Assembling a run from the config: world, processor, model, shard sets, loaders and engine."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import Wav2Vec2Processor, set_seed

from w2v_dist import dist, hub
from w2v_dist.checkpoint.commit import Checkpointer
from w2v_dist.config import Config, DataConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import ShardSet, is_remote, load_shard_set, mix_shard_sets, read_vocab
from w2v_dist.data.loader import TrainStream, make_loader, make_preprocess
from w2v_dist.data.plan import BatchPolicy, StreamLayout
from w2v_dist.data.shapes import ShapeGrid
from w2v_dist.data.shard_reader import RetryPolicy
from w2v_dist.data.text import TextPolicy
from w2v_dist.engine import DTYPES, Engine
from w2v_dist.inputs import InputError, check_inputs
from w2v_dist.lock import OutputDirLock
from w2v_dist.logging import setup_console
from w2v_dist.model import load_model, load_processor, model_identity, parameter_counts
from w2v_dist.preflight import preflight, worst_case
from w2v_dist.process import accelerator_name, check_accelerator, init_distributed
from w2v_dist.redact import redact
from w2v_dist.scoring import scoring_batch_size, scoring_loader

log = logging.getLogger("w2v_dist.run")
RANKS_DIR = ".ranks"
"""Under output_dir: each rank's record (host, pid, launch) and heartbeat."""


@dataclass(frozen=True, kw_only=True)
class Run:
    world: dist.World
    engine: Engine
    processor: Wav2Vec2Processor
    train_stream: TrainStream
    train_loader: Any
    grad_accum: int
    """Micro-batches per update on each rank: the layout's data streams over this world size."""
    checkpointer: Checkpointer
    resume_tag: str | None
    """The checkpoint this run resumes from (``None``: a fresh start)."""
    dev_sets: list[DevSet]
    train_utterances: int


@dataclass(frozen=True)
class DevSet:
    name: str
    indexed: int
    """Utterances in its index: each is scored or reported unscored."""
    sample_rate: int
    text_policy: TextPolicy
    loader: Any


def check_output_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"output_dir {path} is not writable")


def start_process(timeout_minutes: float, local_rank: int | None = None, lock: OutputDirLock | None = None
                  ) -> tuple[dist.World, torch.device]:
    """Every entry point that runs on ranks starts here: the world from the launcher's environment (or one
    process), the console, and the process group and device (:func:`~w2v_dist.process.init_distributed`). With
    ``lock`` (training), rank 0 claims the output_dir before anything else (:meth:`OutputDirLock.claim`), and every
    rank stops with its refusal as soon as the process group exists: a run that may not write there writes
    nothing."""
    world = dist.world_from_env(local_rank)
    setup_console(world.rank)
    refusal = lock.claim(world) if lock is not None else None
    device = init_distributed(timeout_minutes, world.local_rank)
    if lock is not None:
        lock.agree(refusal)
    return world, device


def build_engine(cfg: Config, local_rank: int | None = None) -> tuple[dist.World, Engine, Wav2Vec2Processor]:
    """A started process with ``cfg.model`` loaded into a ready engine: what benchmarks and tests train with."""
    world, device = start_process(cfg.trainer.collective_timeout_minutes, local_rank)
    model_cfg = replace(cfg.model, name_or_path=hub.resolve(cfg.model.name_or_path, world.local_rank, world.is_main))
    processor = load_processor(model_cfg, None)
    return world, Engine(cfg, load_model(model_cfg, processor), device), processor


def batch_policy(data: DataConfig, geometry: EncoderGeometry, sample_rate: int) -> BatchPolicy:
    """How training batches are made from ``data``'s settings (:class:`~w2v_dist.data.plan.BatchPolicy`)."""
    budget = int(data.max_batch_seconds * sample_rate)
    grid = (ShapeGrid.for_encoder(data.shape_quantum_frames, geometry, budget, data.max_batch_size)
            if data.shape_quantum_frames else None)
    return BatchPolicy(budget, data.max_batch_size, data.bucket_window, data.shuffle_buffer,
                       tuple(data.speed_perturb), grid)


def load_train_set(data: DataConfig) -> tuple[ShardSet, dict[str, int] | None]:
    """The training shard set, or the mix of ``data.train_mix`` (whose sets must share one vocabulary), and its
    vocabulary (:func:`~w2v_dist.data.index.read_vocab`)."""
    if not data.train_mix:
        if not data.train_shards:
            raise ValueError("data.train_shards is not set: point it at a directory written by 'w2v-dist shard'")
        return (load_shard_set(data.train_shards, data.shard_command, data.max_train_samples),
                read_vocab(data.train_shards))
    sets = {location: load_shard_set(location, max_samples=data.max_train_samples) for location in data.train_mix}
    vocabularies = {location: read_vocab(location) for location in sets}
    first = next(iter(vocabularies))
    for location, vocabulary in vocabularies.items():
        if vocabulary != vocabularies[first]:
            raise ValueError(f"data.train_mix: {redact(location)} has another vocabulary than {redact(first)}: "
                             "shard the corpora of one mix with the same --alphabet (or vocab.json)")
    return mix_shard_sets(sets, dict(data.train_mix)), vocabularies[first]


def build_run(cfg: Config, local_rank: int | None = None) -> Run:
    check_accelerator(cfg.deepspeed.precision)
    check_inputs(cfg)  # every rank, before the process group: one line per missing or unusable input
    hub.prefetch(cfg.model.name_or_path, dist.world_from_env(local_rank).local_rank)
    lock = OutputDirLock(Path(cfg.output_dir), cfg.trainer.lock_stale_minutes * 60)  # held until the process exits
    world, device = start_process(cfg.trainer.collective_timeout_minutes, local_rank, lock)
    model_cfg = replace(cfg.model, name_or_path=hub.resolve(cfg.model.name_or_path, world.local_rank, world.is_main))
    check_output_dir(Path(cfg.output_dir))
    dist.register_ranks(Path(cfg.output_dir) / RANKS_DIR, world)  # output_dir shared by every node, or stop here
    set_seed(cfg.trainer.seed)
    train_set, vocabulary = load_train_set(cfg.data)
    check_shards_readable(train_set)
    processor = load_processor(model_cfg, vocabulary)
    model = load_model(model_cfg, processor)
    sample_rate = train_set.sample_rate
    geometry = EncoderGeometry.from_model_config(model.config)
    prep = make_preprocess(processor, geometry, sample_rate, cfg.data.min_seconds, cfg.data.max_seconds)
    policy = batch_policy(cfg.data, geometry, sample_rate)
    checkpointer = Checkpointer(Path(cfg.output_dir), world, keep_last=cfg.checkpoint.keep_last,
                                keep_best=cfg.checkpoint.keep_best,
                                model=model_identity(cfg.model.name_or_path, model, processor))
    resume_tag = checkpointer.resume_tag() if cfg.checkpoint.resume else None  # refused before config.yaml is written
    saved = checkpointer.saved_world(resume_tag) if resume_tag else None
    max_workers = dist.loader_workers(cfg.data.num_workers)
    layout = data_layout(cfg, world.size, max_workers, saved)
    workers = layout.workers(world.size, max_workers)
    retry = RetryPolicy(cfg.data.remote_attempts, cfg.data.remote_backoff_seconds)
    stream = TrainStream(train_set, policy, prep, rank=world.rank, world_size=world.size, layout=layout, retry=retry)
    if problem := stream.layout_problem():  # the same on every rank: all stop with it
        raise InputError([problem])
    train_loader = make_loader(stream, workers, cfg.data.prefetch_factor)
    dev_sets = []
    batch_size = scoring_batch_size(model.config, bool(processor.feature_extractor.return_attention_mask),
                                    cfg.data.max_batch_size)
    for name, location in cfg.data.dev_shards.items():
        dev_set = load_shard_set(location, cfg.data.shard_command)
        check_shards_readable(dev_set)
        # Decoded in the rank itself: a DataLoader forks its workers at every iteration, and a fork while one of
        # the rank's Python threads exits (a finished loader's queue feeder) can deadlock the child in fork().
        # The training loader forks once, at the start, when no thread comes or goes.
        dev_sets.append(DevSet(name, dev_set.total_samples, dev_set.sample_rate, dev_set.text_policy, scoring_loader(
            dev_set, prep, cfg.data.max_batch_seconds, batch_size, world, workers=0, retry=retry)))
    if cfg.trainer.preflight:
        preflight(model, device, DTYPES[cfg.deepspeed.precision], worst_case(train_set, policy, prep))
    engine = Engine(cfg, model, device, grad_accum=stream.per_rank)
    if world.is_main:
        _announce(cfg, world, train_set, model, layout, workers, max_workers, saved)
    return Run(world=world, engine=engine, processor=processor, train_stream=stream, train_loader=train_loader,
               grad_accum=stream.per_rank, checkpointer=checkpointer, resume_tag=resume_tag, dev_sets=dev_sets,
               train_utterances=train_set.epoch_samples)


def data_layout(cfg: Config, world_size: int, workers: int, saved: dict[str, Any] | None) -> StreamLayout:
    """The run's data layout: the checkpoint's when resuming (whatever the world size now), else the config's."""
    streams = round(cfg.trainer.update_seconds / cfg.data.max_batch_seconds) if cfg.trainer.update_seconds \
        else cfg.trainer.grad_accum * world_size
    fresh = StreamLayout(streams, cfg.data.stream_readers or max(1, workers), cfg.trainer.seed)
    if not saved or not saved.get("data"):
        return fresh
    data = saved["data"]
    layout = StreamLayout(int(data["streams"]), int(data["readers"]), int(data["seed"]))
    checked = (("trainer.seed", layout.seed, fresh.seed, True),
               ("data streams per update", layout.streams, fresh.streams, bool(cfg.trainer.update_seconds)),
               ("data.stream_readers", layout.readers, fresh.readers, bool(cfg.data.stream_readers)))
    conflicts = [f"{key} {old} (checkpoint) vs {new} (config)" for key, old, new, explicit in checked
                 if explicit and old != new]
    if conflicts:
        raise ValueError(f"cannot resume this run's data order: {'; '.join(conflicts)}. Keep the values the run "
                         "started with, or use a new output_dir")
    return layout


def check_shards_readable(shards: ShardSet) -> None:
    """Fail at startup, naming the shard, when this node cannot see a local shard (remote ones fail on open)."""
    for url in shards.urls:
        if not is_remote(url) and not Path(url).is_file():
            raise FileNotFoundError(f"shard {url} listed in {shards.location}/index.json is not readable here")


def _announce(cfg: Config, world: dist.World, train_set: ShardSet, model: torch.nn.Module, layout: StreamLayout,
              workers: int, wanted: int, saved: dict[str, Any] | None) -> None:
    counts = parameter_counts(model)
    update_seconds = cfg.data.max_batch_seconds * layout.streams
    log.info("world: %d rank(s) on %s; precision %s; ZeRO stage %d", world.size, accelerator_name(),
             cfg.deepspeed.precision, cfg.deepspeed.zero_stage)
    log.info("train: %d utterances, %.2f h in %d shards; %s s of audio per update at most (%s data streams of "
             "%g s: grad_accum %d x %d ranks); ~%.1f updates per epoch; %d loader workers per rank",
             train_set.total_samples, train_set.total_seconds / 3600, len(train_set.urls), f"{update_seconds:,.0f}",
             layout.streams, cfg.data.max_batch_seconds, layout.streams // world.size, world.size,
             train_set.total_seconds / update_seconds, workers)
    log.info("parameters: %s trainable, %s frozen", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    if workers < wanted:
        log.warning("%d loader workers per rank instead of %d: each rank reads %d data slots per %d updates "
                    "(%d streams x %d readers over %d ranks) and a slot belongs to one worker; set "
                    "data.stream_readers (a multiple of the workers) when a run starts", workers, wanted,
                    layout.streams // world.size * layout.readers, layout.readers, layout.streams, layout.readers,
                    world.size)
    if saved and (before := int(saved["world_size"])) != world.size:
        log.warning("resuming step %s from %d rank(s) on %d: grad_accum %d -> %d, %s s per update (%d data streams)",
                    f"{saved['step']:,}", before, world.size, layout.streams // before, layout.streams // world.size,
                    f"{update_seconds:,.0f}", layout.streams)
