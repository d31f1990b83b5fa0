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
from w2v_dist.checkpoint.resume import data_layout, world_change
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.config import Config, DataConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.index import ShardSet, is_remote, load_shard_set
from w2v_dist.data.loader import TrainStream, make_loader
from w2v_dist.data.mix import epoch_samples, mix_shard_sets
from w2v_dist.data.plan import BatchPolicy, StreamLayout
from w2v_dist.data.preprocess import make_preprocess
from w2v_dist.data.shard_reader import RetryPolicy
from w2v_dist.data.text import TextPolicy
from w2v_dist.engine import DTYPES, Engine
from w2v_dist.inputs import InputError, check_inputs, train_vocabulary
from w2v_dist.lock import OutputDirLock
from w2v_dist.model import load_model, load_processor, model_identity, parameter_counts
from w2v_dist.preflight import preflight, worst_case
from w2v_dist.process import accelerator_name, check_accelerator, start_process, world_from_env
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


def build_engine(cfg: Config, local_rank: int | None = None
                 ) -> tuple[dist.World, Engine, Wav2Vec2Processor]:
    """A started process (:func:`~w2v_dist.process.start_process`) with ``cfg.model`` loaded into a ready
    engine: what benchmarks and tests train with."""
    world, device = start_process(cfg.trainer.collective_timeout_minutes, local_rank)
    model_path = hub.resolve(cfg.model.name_or_path, world.local_rank, world.is_main)
    model_cfg = replace(cfg.model, name_or_path=model_path)
    processor = load_processor(model_cfg, None)
    return world, Engine(cfg, load_model(model_cfg, processor), device), processor


def load_train_set(data: DataConfig) -> tuple[ShardSet, dict[str, int] | None]:
    """The training shard set, or the mix of ``data.train_mix`` (whose sets must share one vocabulary), and
    its vocabulary (:func:`~w2v_dist.inputs.train_vocabulary`)."""
    if not data.train_mix:
        if not data.train_shards:
            raise ValueError("data.train_shards is not set: point it at a directory written by 'w2v-dist "
                             "shard'")
        return (load_shard_set(data.train_shards, data.shard_command, data.max_train_samples),
                train_vocabulary(data))
    sets = {location: load_shard_set(location,
                                     max_samples=data.max_train_samples) for location in data.train_mix}
    return mix_shard_sets(sets, dict(data.train_mix)), train_vocabulary(data)


def build_run(cfg: Config, local_rank: int | None = None) -> Run:
    check_accelerator(cfg.deepspeed.precision)
    check_inputs(cfg)  # every rank, before the process group: one line per missing or unusable input
    hub.prefetch(cfg.model.name_or_path, world_from_env(local_rank).local_rank)
    # held until the process exits
    lock = OutputDirLock(Path(cfg.output_dir), cfg.trainer.lock_stale_minutes * 60)
    world, device = start_process(cfg.trainer.collective_timeout_minutes, local_rank, lock)
    model_cfg = replace(cfg.model, name_or_path=hub.resolve(cfg.model.name_or_path, world.local_rank,
                                                            world.is_main))
    check_output_dir(Path(cfg.output_dir))
    # output_dir shared by every node, or stop here
    dist.register_ranks(Path(cfg.output_dir) / RANKS_DIR, world)
    set_seed(cfg.trainer.seed)
    train_set, vocabulary = load_train_set(cfg.data)
    check_shards_readable(train_set)
    processor = load_processor(model_cfg, vocabulary)
    model = load_model(model_cfg, processor)
    sample_rate = train_set.sample_rate
    geometry = EncoderGeometry.from_model_config(model.config)
    prep = make_preprocess(processor, geometry, sample_rate, cfg.data.min_seconds, cfg.data.max_seconds)
    policy = BatchPolicy.from_seconds(
        max_batch_seconds=cfg.data.max_batch_seconds, sample_rate=sample_rate,
        max_batch_size=cfg.data.max_batch_size, bucket_window=cfg.data.bucket_window,
        shuffle_buffer=cfg.data.shuffle_buffer, speed_perturb=cfg.data.speed_perturb,
        shape_quantum_frames=cfg.data.shape_quantum_frames, geometry=geometry)
    checkpointer = Checkpointer(Path(cfg.output_dir), world, keep_last=cfg.checkpoint.keep_last,
                                keep_best=cfg.checkpoint.keep_best,
                                model=model_identity(cfg.model.name_or_path, model, processor))
    # refused before config.yaml is written
    resume_tag = checkpointer.resume_tag() if cfg.checkpoint.resume else None
    saved = checkpointer.saved_run(resume_tag) if resume_tag else None  # world.json: before the engine
    max_workers = dist.loader_workers(cfg.data.num_workers)
    layout = data_layout(cfg, world.size, max_workers, saved)
    workers = layout.workers(world.size, max_workers)
    retry = RetryPolicy(cfg.data.remote_attempts, cfg.data.remote_backoff_seconds)
    stream = TrainStream(train_set, policy, prep, rank=world.rank, world_size=world.size, layout=layout,
                         retry=retry)
    if problem := stream.plan.layout_problem():  # the same on every rank: all stop with it
        raise InputError([problem])
    train_loader = make_loader(stream, workers, cfg.data.prefetch_factor)
    dev_sets = []
    batch_size = scoring_batch_size(model.config, bool(processor.feature_extractor.return_attention_mask),
                                    cfg.data.max_batch_size)
    for name, location in cfg.data.dev_shards.items():
        dev_set = load_shard_set(location, cfg.data.shard_command)
        check_shards_readable(dev_set)
        # Decoded in the rank itself: a DataLoader forks its workers at every iteration, and a fork while one
        # of the rank's Python threads exits (a finished loader's queue feeder) can deadlock the child in
        # fork(). The training loader forks once, at the start, when no thread comes or goes.
        dev_sets.append(DevSet(name, dev_set.total_samples, dev_set.sample_rate, dev_set.text_policy,
                               scoring_loader(
dev_set, prep, cfg.data.max_batch_seconds, batch_size, world, workers=0, retry=retry)))
    if cfg.trainer.preflight:
        preflight(model, device, DTYPES[cfg.deepspeed.precision], worst_case(train_set, policy, prep))
    engine = Engine(cfg, model, device, grad_accum=stream.per_rank)
    if world.is_main:
        _announce(cfg, world, train_set, model, layout, workers, max_workers, saved)
    return Run(world=world, engine=engine, processor=processor, train_stream=stream,
               train_loader=train_loader,
               grad_accum=stream.per_rank, checkpointer=checkpointer, resume_tag=resume_tag,
               dev_sets=dev_sets, train_utterances=epoch_samples(train_set))


def check_shards_readable(shards: ShardSet) -> None:
    """Fail at startup, naming the shard, when this node cannot see a local shard (remote ones fail on
    open)."""
    for url in shards.urls:
        if not is_remote(url) and not Path(url).is_file():
            raise FileNotFoundError(f"shard {url} listed in {shards.location}/index.json is not readable "
                                    f"here")


def _announce(cfg: Config, world: dist.World, train_set: ShardSet, model: torch.nn.Module,
              layout: StreamLayout, workers: int, wanted: int, saved: SavedRun | None) -> None:
    counts = parameter_counts(model)
    update_seconds = cfg.data.max_batch_seconds * layout.streams
    log.info("world: %d rank(s) on %s; precision %s; ZeRO stage %d", world.size, accelerator_name(),
             cfg.deepspeed.precision, cfg.deepspeed.zero_stage)
    log.info("train: %d utterances, %.2f h in %d shards; %s s of audio per update at most (%s data streams "
             "of %g s: grad_accum %d x %d ranks); ~%.1f updates per epoch; %d loader workers per rank",
             train_set.total_samples, train_set.total_seconds / 3600, len(train_set.urls),
             f"{update_seconds:,.0f}",
             layout.streams, cfg.data.max_batch_seconds, layout.streams // world.size, world.size,
             train_set.total_seconds / update_seconds, workers)
    log.info("parameters: %s trainable, %s frozen", f"{counts['trainable']:,}", f"{counts['frozen']:,}")
    if workers < wanted:
        log.warning("%d loader workers per rank instead of %d: each rank reads %d data slots per %d updates "
                    "(%d streams x %d readers over %d ranks) and a slot belongs to one worker; set "
                    "data.stream_readers (a multiple of the workers) when a run starts", workers, wanted,
                    layout.streams // world.size * layout.readers, layout.readers, layout.streams,
                    layout.readers, world.size)
    if change := world_change(saved, world.size, layout, cfg.data.max_batch_seconds):
        log.warning("%s", change)
