"""Typed run configuration: defaults ⊕ YAML file ⊕ ``key=value`` overrides, checked at load time.

Every field carries an attribute docstring (the string literal under it); :func:`field_docs` reads them
so that ``docs/configuration.md`` and error messages come from one place.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key and its source."""


@dataclass
class DataConfig:
    train_shards: str = ""
    """Training shard directory or URL prefix holding ``index.json`` (written by ``w2v-dist shard``)."""
    train_mix: dict[str, float] = field(default_factory=dict)
    """Instead of ``train_shards``, several shard sets mixed: location → fraction of that set read per
    epoch (0 < f ≤ 1; each epoch the next slice of each shard in a random order: a fresh subset every
    epoch, all of it every 1/f epochs, never an utterance twice in one). To
    read a small corpus 4× as often as a large one, give the large one 0.25. Same vocabulary, sample rate
    and text policy."""
    dev_shards: dict[str, str] = field(default_factory=dict)
    """Dev sets to evaluate: name → shard directory or URL prefix, e.g.
    ``{dev-clean: /data/shards/dev-clean}``."""
    shard_command: str = ""
    """Optional ``pipe:`` template used to open shards, e.g. ``pipe:aws s3 cp s3://b/{shard} -``; ``{shard}``
    is replaced by the checked shard file name from the index, never by free text."""
    max_batch_seconds: float = 200.0
    """Micro-batch budget (one data stream's batch, see ``trainer.update_seconds``): padded length × batch
    size, in seconds of audio."""
    max_batch_size: int = 64
    """Upper bound on utterances per micro-batch, whatever the seconds budget allows."""
    bucket_window: int = 512
    """Evaluation: utterances sorted by duration together before packing batches; larger pads less. (Training
    batches are cut from each shard's utterances sorted by duration: :mod:`w2v_dist.data.epoch`.)"""
    shuffle_buffer: int = 2000
    """Not used since training batches come from the global epoch (:mod:`w2v_dist.data.epoch`: shards in a
    new order each epoch, batches in a new order in each slot); accepted so that older configs still load."""
    shape_quantum_frames: int = 0
    """Pad every training batch to one of a few shapes: lengths whose frame count is a multiple of this (32
    frames = 0.64 s for wav2vec2), each with one row count (``w2v_dist/data/shapes.py``). Otherwise nearly
    every step has a new shape, and a GPU plans its kernels (and ``torch.compile`` specialises) anew. 0: each
    batch padded to its longest utterance."""
    min_seconds: float = 0.5
    """Utterances shorter than this are skipped at load time (counted)."""
    max_seconds: float = 35.0
    """Utterances longer than this are skipped at load time (counted)."""
    num_workers: int = -1
    """DataLoader worker processes per rank (0 decodes in the main process); -1: one per CPU core this rank
    may use, less one for the rank itself, at most 8 (cores are split between the ranks of a node)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead of the train step."""
    remote_attempts: int = 5
    """Opens of a remote shard (``http(s)://``, ``pipe:``) whose transfer fails mid-read, the first included;
    each retry resumes after the samples already read, and is counted in ``loader_skips.shard_retries``."""
    remote_backoff_seconds: float = 1.0
    """Wait before the first retry of a remote shard, doubled for each further one (at most 30 s)."""
    speed_perturb: list[float] = field(default_factory=list)
    """Speed perturbation in training, e.g. ``[0.9, 1.0, 1.1]`` (ESPnet, icefall): each utterance plays at a
    factor drawn per epoch from this list (resampled in the loader workers with torchaudio: tempo and pitch
    change, as Kaldi's ``speed``); the plan knows the new lengths, so batches keep their seconds budget and
    resume stays exact. Empty: off (fairseq's recipes do not use it). Dev sets are never perturbed."""
    stream_readers: int = 0
    """Slots each data stream reads in turn, one loader worker each
    (:class:`~w2v_dist.data.plan.StreamLayout`); fixed for the run by its first launch (checkpoints record
    it). 0: the first launch's loader workers per rank. Ranks then use the most workers up to ``num_workers``
    that divide their slots evenly."""
    max_train_samples: int = 0
    """Use only the first N utterances of the training index (0 = all); the seed script used 300."""


@dataclass
class ModelConfig:
    name_or_path: str = "facebook/wav2vec2-base"
    """Model directory or hub id passed to ``from_pretrained``; a processor is read from the same place, else
    from the training shards' ``vocab.json`` (new CTC head)."""
    freeze_feature_encoder: bool = True
    """Freeze the convolutional feature encoder (always done when fine-tuning wav2vec 2.0)."""
    freeze_finetune_updates: int = 0
    """Keep the whole encoder frozen (only the CTC head trains) for this many updates (fairseq)."""
    mask_time_prob: float = 0.05
    """SpecAugment-style time masking probability (fairseq ``mask_prob``)."""
    mask_time_length: int = 10
    """Length of each time mask in frames."""
    mask_feature_prob: float = 0.0
    """Channel masking probability (fairseq ``mask_channel_prob``)."""
    mask_feature_length: int = 64
    """Length of each channel mask."""
    layerdrop: float = 0.1
    """Probability of dropping a whole transformer layer during training."""
    hidden_dropout: float = 0.0
    """Dropout inside the transformer (fairseq ``dropout``)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.1
    """Dropout after the feed-forward activation."""
    final_dropout: float = 0.0
    """Dropout before the CTC head."""
    ctc_zero_infinity: bool = True
    """Zero infinite CTC losses (infeasible alignments) instead of poisoning the step."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in backward to save memory."""
    attention: str = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch's fused scaled-dot-product attention: flash / memory-efficient
    kernels on GPUs) or ``eager`` (the reference implementation; materialises the T×T attention matrix)."""
    cudnn_attention: bool = False
    """Let ``sdpa`` use cuDNN's attention kernels. cuDNN builds a graph for every new batch shape, and
    batches by seconds have a new shape at nearly every step, which made steps slower than PyTorch's flash
    kernels (measured in docs/performance.md). Worth trying only with fixed-shape batches."""
    pos_conv: str = "hf"
    """How the positional convolution is computed (``w2v_dist/pos_conv.py``; the same function and
    parameters): ``hf`` (Hugging Face's module), ``fp32`` (in fp32 inside a bf16 model), ``channels_last``
    (NHWC conv2d, no transposes) or ``fft`` (FFT convolution in fp32). On GPUs the grouped kernel is ~30 % of
    a step; see docs/performance.md for which is fastest where."""
    compile: bool = False
    """Compile the transformer layers with ``torch.compile(dynamic=True)`` (one graph for every batch shape);
    see docs/performance.md for when it pays off."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and norm weights."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""


@dataclass
class ScheduleConfig:
    name: str = "tri_stage"
    """Learning-rate schedule: ``tri_stage`` (fairseq), ``linear`` or ``cosine`` (warmup then decay),
    ``constant``."""
    warmup_steps: int = 0
    """Warmup updates for ``linear``/``cosine`` (``tri_stage`` uses ``phase_ratio``)."""
    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)
    """``tri_stage``: fractions of ``trainer.max_steps`` spent warming up, holding and decaying."""
    init_lr_scale: float = 0.01
    """``tri_stage``: learning rate at step 0 as a fraction of the peak."""
    final_lr_scale: float = 0.05
    """Learning rate at the last step as a fraction of the peak (all decaying schedules)."""
    steps: int = 0
    """Updates the schedule spans (0: ``trainer.max_steps``). Set it to stop a run early (``max_steps`` below
    it) or to extend ``max_steps`` on resume without stretching the schedule under the updates already
    taken."""


@dataclass
class InjectConfig:
    nan_loss_at_steps: list[int] = field(default_factory=list)
    """Fault injection: make the loss NaN at these steps (on rank ``rank`` only)."""
    inf_grad_at_steps: list[int] = field(default_factory=list)
    """Fault injection: make the gradients infinite at these steps (on rank ``rank`` only)."""
    rank: int = 0
    """The rank that receives the injected faults."""


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    """Optimizer updates to run; the data stream is endless, epochs are reported, not counted."""
    update_seconds: float = 0.0
    """The global batch: audio seconds per optimizer update over all ranks (fairseq's base_100h: 1,600). Each
    update takes one micro-batch of up to ``data.max_batch_seconds`` from each of
    ``update_seconds / max_batch_seconds`` data streams, which the ranks share, so gradient accumulation
    follows from the world size and a run resumes on any world size dividing the stream count, with the same
    batches in every update. 0: ``data.max_batch_seconds x grad_accum x`` the first launch's ranks. Fixed for
    the run by its first launch."""
    grad_accum: int = 1
    """Micro-batches per optimizer update on every rank at the first launch, when ``update_seconds`` is 0; a
    resume on another world size derives it from the run's data streams."""
    eval_every: int = 1000
    """Evaluate the dev sets every N updates (and always at the end); 0 evaluates only at the end."""
    save_every: int = 1000
    """Save a checkpoint every N updates (and always at the end); 0 saves only at the end."""
    log_every: int = 10
    """Write a metrics line every N updates."""
    seed: int = 1
    """Seed for model-side randomness and the data order."""
    preflight: bool = True
    """Before step 1, run the worst-case micro-batch forward and backward once, so an OOM shows in
    seconds."""
    max_consecutive_bad_steps: int = 10
    """Stop the run after this many skipped (non-finite) updates in a row."""
    on_divergence: str = "stop"
    """What to do after ``max_consecutive_bad_steps``: ``stop`` the run, or ``rollback`` to the latest
    checkpoint's weights and optimizer state and go on with the data that follows (the bad batches are not
    replayed)."""
    collective_timeout_minutes: float = 30.0
    """How long a collective waits for a rank that stopped answering before the run fails with an error."""
    lock_stale_minutes: float = 5.0
    """The lock that keeps a second run out of ``output_dir`` (``<output_dir>/.lock``, renewed every 30 s
    while the run lives) is stale, and another run takes it over, this long after its last renewal: above NFS
    attribute caching and clock skew between nodes. A holder that crashed on the same host, or an earlier run
    of the same SLURM job (a requeue), is taken over at once."""
    max_rollbacks: int = 3
    """With ``on_divergence=rollback``: stop anyway after this many rollbacks."""
    inject: InjectConfig = field(default_factory=InjectConfig)
    """Fault injection for tests and demonstrations of the NaN/Inf guard."""


@dataclass
class CheckpointConfig:
    keep_last: int = 2
    """Number of most recent checkpoints kept on disk."""
    keep_best: int = 1
    """Also keep this many checkpoints with the lowest WER on ``best_metric`` (0 keeps none for that
    reason)."""
    best_metric: str = ""
    """Dev set whose WER picks the best checkpoint and the ``<output_dir>/best/`` export (empty: the first
    dev set)."""
    resume: bool = True
    """Continue from ``<output_dir>/checkpoints/latest`` when it exists."""


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """``online``, ``offline`` or ``disabled`` (needs no login)."""
    project: str = "w2v-dist"
    """wandb project name."""
    run_name: str = ""
    """wandb run name (empty: the output directory name)."""
    log_checkpoints: bool = False
    """Record every committed checkpoint (``checkpoint-<run id>``, aliases ``latest`` and ``step-<n>``) and
    each best/ and final/ export (``model-<run id>``, alias ``best`` or ``final``) as a wandb artifact that
    references it where it lies (``file://``, nothing uploaded, files identified by path, not hashed), with
    its step and dev WER."""


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings; only rank 0 ever initialises wandb."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0 when the console is a terminal. Outside one (a log file, a pipe), or with
    this false, rank 0 logs one plain line per ``trainer.log_every`` steps instead: step, loss, lr, grad
    norm, audio-s/s, ETA."""
    sample_transcripts: int = 3
    """Number of (reference, hypothesis) pairs logged per dev set at each evaluation."""
    key_log: bool = False
    """Write each micro-batch's update, data stream, epoch and utterance keys to ``keys/rank<r>.jsonl``: what
    every update read, for audits of the data order (exactly once per epoch, across resumes)."""


@dataclass
class DeepSpeedConfig:
    precision: str = "fp32"
    """``bf16``, ``fp16`` (dynamic loss scale) or ``fp32``."""
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Escape hatch merged into the generated DeepSpeed JSON (may not redefine what this config owns)."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    """Where checkpoints, exports, metrics and the resolved ``config.yaml`` go."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching and loader workers."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model to fine-tune and the fine-tuning recipe knobs."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and gradient clipping."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule, stepped per optimizer update."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop length, evaluation, checkpoint cadence and the NaN/Inf guard."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint retention and auto-resume."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """metrics.jsonl, progress bar and wandb."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Precision and ZeRO; the DeepSpeed JSON is derived from the whole config."""
    written_as: ClassVar[dict[str, str]] = {}
    """Not a setting: the values given as interpolations (``${oc.env:TOKEN}``), by dotted key, written as
    given (set per instance by :func:`load_config`)."""


_CHOICES: dict[str, tuple[Any, ...]] = {
    "schedule.name": ("tri_stage", "linear", "cosine", "constant"),
    "trainer.on_divergence": ("stop", "rollback"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
    "deepspeed.precision": ("bf16", "fp16", "fp32"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "model.attention": ("sdpa", "eager"),
    "model.pos_conv": ("hf", "fp32", "channels_last", "fft"),
}


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric key's values must lie in; a list's or tuple's elements and a dict's values are
    each checked. Every float must also be finite, whatever its bounds."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    """``low`` itself is excluded."""
    open_high: bool = False
    note: str = ""
    """Added to the message, e.g. what a special value means."""

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (int(x) if math.isfinite(x) and x == int(x) else x for x in (self.low, self.high))
        if high == math.inf:
            text = f"{'>' if self.open_low else '>='} {low}"
        else:
            text = f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        return f"{text} ({self.note})" if self.note else text


_POSITIVE = Bounds(0, open_low=True)
_NON_NEGATIVE = Bounds(0)
_PROBABILITY = Bounds(0, 1, open_high=True)
_FRACTION = Bounds(0, 1)
_BOUNDS: dict[str, Bounds] = {
    "data.train_mix": Bounds(0, 1, open_low=True),
    "data.max_batch_seconds": _POSITIVE,
    "data.max_batch_size": _POSITIVE,
    "data.bucket_window": _POSITIVE,
    "data.shuffle_buffer": _POSITIVE,
    "data.shape_quantum_frames": _NON_NEGATIVE,
    "data.min_seconds": _NON_NEGATIVE,
    "data.max_seconds": _POSITIVE,
    "data.num_workers": Bounds(-1, note="-1: one per core less one"),
    "data.prefetch_factor": _POSITIVE,
    "data.remote_attempts": _POSITIVE,
    "data.remote_backoff_seconds": _NON_NEGATIVE,
    "data.speed_perturb": Bounds(0.5, 2),
    "data.stream_readers": _NON_NEGATIVE,
    "data.max_train_samples": _NON_NEGATIVE,
    "model.freeze_finetune_updates": _NON_NEGATIVE,
    "model.mask_time_prob": _PROBABILITY,
    "model.mask_time_length": _POSITIVE,
    "model.mask_feature_prob": _PROBABILITY,
    "model.mask_feature_length": _POSITIVE,
    "model.layerdrop": _PROBABILITY,
    "model.hidden_dropout": _PROBABILITY,
    "model.attention_dropout": _PROBABILITY,
    "model.activation_dropout": _PROBABILITY,
    "model.final_dropout": _PROBABILITY,
    "optim.lr": _POSITIVE,
    "optim.betas": Bounds(0, 1, open_high=True),
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.grad_clip": _NON_NEGATIVE,
    "schedule.warmup_steps": _NON_NEGATIVE,
    "schedule.phase_ratio": _FRACTION,
    "schedule.init_lr_scale": _FRACTION,
    "schedule.final_lr_scale": _FRACTION,
    "schedule.steps": _NON_NEGATIVE,
    "trainer.inject.nan_loss_at_steps": Bounds(1),
    "trainer.inject.inf_grad_at_steps": Bounds(1),
    "trainer.inject.rank": _NON_NEGATIVE,
    "trainer.max_steps": _POSITIVE,
    "trainer.update_seconds": _NON_NEGATIVE,
    "trainer.grad_accum": _POSITIVE,
    "trainer.eval_every": _NON_NEGATIVE,
    "trainer.save_every": _NON_NEGATIVE,
    "trainer.log_every": _POSITIVE,
    "trainer.seed": Bounds(0, 2**32 - 1, note="numpy's seed range"),
    "trainer.max_consecutive_bad_steps": _POSITIVE,
    "trainer.collective_timeout_minutes": _POSITIVE,
    "trainer.lock_stale_minutes": _POSITIVE,
    "trainer.max_rollbacks": _NON_NEGATIVE,
    "checkpoint.keep_last": _POSITIVE,
    "checkpoint.keep_best": _NON_NEGATIVE,
    "logging.sample_transcripts": _NON_NEGATIVE,
}
"""Every numeric key but those with choices (:data:`_CHOICES`); ``tests/unit/test_config.py`` checks that
none is missing."""
_DEEPSPEED_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                    "optimizer", "scheduler", "train_batch_size", "zero_optimization.stage", "bf16.enabled",
                    "fp16.enabled")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, keyed by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = inspect.cleandoc(str(following.value.value))
    return docs


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys: list[str] = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        section = _SECTIONS.get(f.type) if isinstance(f.type, str) else f.type
        if isinstance(section, type) and is_dataclass(section):
            keys.extend(all_keys(section, key + "."))
    return keys


_SECTIONS: dict[str, type] = {c.__name__: c for c in (
    DataConfig, ModelConfig, OptimConfig, ScheduleConfig, InjectConfig, TrainerConfig, CheckpointConfig,
    WandbConfig, LoggingConfig, DeepSpeedConfig)}


def _unknown_key_message(key: str, origin: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}' {origin}{hint}"


@dataclass(frozen=True)
class Sources:
    """Where the values came from, named in every message about one: the command line, the YAML file, or the
    defaults. A key counts as given where it, a section holding it or a part of it was given."""

    file: str | None = None
    file_keys: frozenset[str] = frozenset()
    command_line: frozenset[str] = frozenset()

    def of(self, key: str) -> str:
        key = key.split("[", 1)[0]  # OmegaConf names a list element data.speed_perturb[0]

        def given(keys: frozenset[str]) -> bool:
            return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys)

        if given(self.command_line):
            return "from the command line"
        if self.file is not None and given(self.file_keys):
            return f"from {self.file}"
        return "(its default)"


def _paths(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """The leaves of nested dicts, each with its path of keys."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _paths(value, (*path, str(key)))
    else:
        yield path, node


def _schema_key(key: str) -> str:
    """The config key that ``key`` (a dict entry ``data.train_mix./d/a``, a list element ``...[0]``) belongs
    to."""
    key = key.split("[", 1)[0]
    while key and key not in all_keys():
        key = key.rpartition(".")[0]
    return key


def _field(key: str) -> tuple[type, str]:
    """The section class holding ``key`` (a schema key) and the key's declared type, as written."""
    cls: type = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = _SECTIONS[next(f.type for f in fields(cls) if f.name == section)]  # type: ignore[index]
    return cls, str(next(f.type for f in fields(cls) if f.name == name))


def dict_keys() -> list[str]:
    """The keys whose value is a dict of the user's own entries (not a section of fixed keys): a command-line
    value replaces such a dict whole, and ``~key.entry`` deletes one of its entries."""
    return [key for key in all_keys() if _field(key)[1].startswith("dict[")]


def _expected(key: str) -> str:
    """What a key takes: its type, and the first sentence of its docstring."""
    cls, kind = _field(key)
    name = key.rpartition(".")[2]
    doc = re.split(r"(?<!e\.g)(?<!i\.e)\.(?:\s|$)", field_docs(cls).get(name, "").replace("\n", " "))[0]
    doc = doc.replace("``", "")
    return f"expected {kind}" + (f" ({doc if len(doc) <= 100 else doc[:99] + '…'})" if doc else "")


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        if "not in struct" in str(err) or "Key '" in str(err):
            raise ConfigError(_unknown_key_message(str(err.full_key), origin)) from None
        raise ConfigError(f"{origin}: {err.msg}") from None
    except OmegaConfBaseException as err:
        key = _schema_key(err.full_key or _culprit(base, other))
        reason = str(err.msg or err).splitlines()[0]
        raise ConfigError(f"bad value for '{key}' {origin}: {reason}; {_expected(key)}") from None


def _culprit(base: DictConfig, other: DictConfig) -> str:
    """The key of ``other`` that cannot be merged into ``base``, for OmegaConf errors that name none (a tuple
    of another length)."""
    for path, value in _paths(OmegaConf.to_container(other, resolve=False)):
        single: Any = value
        for key in reversed(path):
            single = {key: single}
        try:
            OmegaConf.merge(base, OmegaConf.create(single))
        except OmegaConfBaseException:
            return ".".join(path)
    return ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    if not isinstance(err, yaml.MarkedYAMLError):
        return str(err).splitlines()[0]
    mark = err.context_mark
    where = f" that starts at {mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return f"{err.problem} ({err.context}{where})" if err.context else str(err.problem)


def _load_yaml(path: Path) -> DictConfig:
    """The file as a config; a syntax error is one line naming ``file:line:column``."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def _delete(merged: DictConfig, key: str) -> None:
    """``~key.entry``: remove one entry of a dict-valued key; ``~key``: all of them."""
    owner = _schema_key(key)
    if owner not in dict_keys():
        raise ConfigError(f"cannot delete '{key}' from the command line: only the entries of {dict_keys()} "
                          f"can be deleted (~data.dev_shards.dev-other); set other keys with key=value")
    node = OmegaConf.select(merged, owner)
    entry = key[len(owner) + 1:]
    if entry and entry not in node:
        raise ConfigError(f"cannot delete '{key}' from the command line: '{owner}' has no entry '{entry}' "
                          f"(it has {sorted(node)})")
    for name in [entry] if entry else list(node):
        del node[name]  # entry by entry: replacing the node would drop its declared element type


def _apply_overrides(merged: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Apply ``key=value`` and ``~key`` overrides in order. A value merges into a section, but replaces a
    dict-valued key (``dict_keys``) whole: ``data.dev_shards={a: x}`` means exactly that set, not the file's
    sets and ``a``."""
    bad = [item for item in overrides if ("=" in item) == item.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (or ~key to delete an entry), got {bad}")
    origin = "from the command line"
    for item in overrides:
        if item.startswith("~"):
            _delete(merged, item[1:])
            continue
        key, _, value = item.partition("=")
        try:
            single = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse the value of '{key}' {origin} ({value!r}): "
                              f"{_yaml_problem(err)}") from None
        owner = _schema_key(key)
        if owner in dict_keys() and owner != key and OmegaConf.select(single, key) is None:
            raise ConfigError(f"bad value for '{key}' {origin}: an entry cannot be null; to delete it write "
                              f"~{key}")
        if key in dict_keys() and isinstance(OmegaConf.select(single, key), DictConfig):
            _delete(merged, key)
        merged = _merge(merged, single, origin)
    return merged


def _elements(value: Any) -> list[Any]:
    """The scalars in a value: itself, or a list's, tuple's or dict's elements, at any depth."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _elements(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _elements(v)]
    return [value]


def validate(cfg: Config, sources: Sources | None = None) -> None:
    """Check values that the types alone cannot; raise :class:`ConfigError` naming the key and where its
    value came from (and the other keys a check involves)."""
    sources = sources or Sources()

    def fail(key: str, why: str, *involved: str) -> None:
        others = "".join(f" and '{other}' {sources.of(other)}" for other in involved)
        raise ConfigError(f"bad value for '{key}' {sources.of(key)}{others}: {why}")

    for key in all_keys():
        value = attrgetter(key)(cfg)
        if not is_dataclass(value) and any(isinstance(x, float) and not math.isfinite(x)
                                           for x in _elements(value)):
            fail(key, f"every number must be finite, got {value}")
    for key, choices in _CHOICES.items():
        if (value := attrgetter(key)(cfg)) not in choices:
            fail(key, f"{value!r} is not one of {list(choices)}")
    for key, bounds in _BOUNDS.items():
        value = attrgetter(key)(cfg)
        if not all(bounds.holds(x) for x in _elements(value)):
            scalar = not isinstance(value, (list, tuple, dict))
            fail(key, f"{'must be' if scalar else 'every value must be'} {bounds}, got "
                      f"{value if scalar else value if isinstance(value, dict) else list(value)}")
    if cfg.data.train_mix and cfg.data.train_shards:
        fail("data.train_mix", "set data.train_shards or data.train_mix, not both", "data.train_shards")
    if cfg.data.train_mix and cfg.data.shard_command:
        fail("data.train_mix",
             "data.shard_command names shards of one set; a mix opens each set at its location",
             "data.shard_command")
    streams = cfg.trainer.update_seconds / cfg.data.max_batch_seconds
    if cfg.trainer.update_seconds and (streams < 1 or abs(streams - round(streams)) > 1e-6):
        fail("trainer.update_seconds", f"must be a whole multiple of data.max_batch_seconds "
                                       f"({cfg.data.max_batch_seconds:g}), got "
                                       f"{cfg.trainer.update_seconds:g}",
             "data.max_batch_seconds")
    if cfg.trainer.update_seconds and cfg.trainer.grad_accum != 1:
        fail("trainer.grad_accum", "give the global batch once: trainer.update_seconds (the grad_accum "
                                   "follows from it) or trainer.grad_accum, not both",
                                   "trainer.update_seconds")
    if not cfg.data.min_seconds < cfg.data.max_seconds:
        fail("data.min_seconds", f"need min_seconds < max_seconds, got {cfg.data.min_seconds}, "
                                 f"{cfg.data.max_seconds}", "data.max_seconds")
    if abs(sum(cfg.schedule.phase_ratio) - 1.0) > 1e-6:
        fail("schedule.phase_ratio", f"must sum to 1, got {list(cfg.schedule.phase_ratio)}")
    if cfg.data.shard_command and not cfg.data.shard_command.startswith("pipe:"):
        fail("data.shard_command", "must start with 'pipe:'")
    if cfg.data.shard_command and "{shard}" not in cfg.data.shard_command:
        fail("data.shard_command", "must contain the '{shard}' placeholder")
    extra_keys = {f"{k}.{sub}" for k, v in cfg.deepspeed.extra.items() if isinstance(v, dict) for sub in v}
    owned = sorted((set(cfg.deepspeed.extra) | extra_keys) & set(_DEEPSPEED_OWNED))
    if owned:
        fail("deepspeed.extra", f"{owned} are derived from this config; set them through its own keys")
    if cfg.checkpoint.best_metric and cfg.checkpoint.best_metric not in cfg.data.dev_shards:
        fail("checkpoint.best_metric", f"'{cfg.checkpoint.best_metric}' is not a key of data.dev_shards "
                                       f"{sorted(cfg.data.dev_shards)}", "data.dev_shards")


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the run config: defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    merged: DictConfig = OmegaConf.structured(Config)
    file_keys: frozenset[str] = frozenset()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _load_yaml(Path(path))
        file_keys = frozenset(".".join(p) for p, _ in _paths(OmegaConf.to_container(loaded, resolve=False)))
        merged = _merge(merged, loaded, f"from {path}")
    merged = _apply_overrides(merged, overrides)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:  # e.g. ${oc.env:VAR} with VAR unset
        raise ConfigError(f"cannot resolve '{err.full_key}': {err.msg}") from None
    setattr(cfg, "written_as",  # noqa: B010 (ClassVar)
            _interpolations(OmegaConf.to_container(merged, resolve=False)))
    validate(cfg, Sources(None if path is None else str(path), file_keys,
                          frozenset(item.partition("=")[0].lstrip("~") for item in overrides)))
    return cfg


def _interpolations(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items()
                for k, v in _interpolations(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node} if isinstance(node, str) and "${" in node else {}


def to_written(cfg: Config) -> dict[str, Any]:
    """The config as w2v-dist writes it anywhere (config.yaml, checkpoints, wandb): values given as
    ``${oc.env:VAR}`` stay interpolations, and secrets in the rest are redacted (:mod:`w2v_dist.redact`)."""
    from w2v_dist.redact import redact_values

    node = OmegaConf.structured(cfg)
    for key, given in cfg.written_as.items():
        OmegaConf.update(node, key, given, merge=False)
    return redact_values(OmegaConf.to_container(node, resolve=False))  # type: ignore[no-any-return]


def to_yaml(cfg: Config) -> str:
    """:func:`to_written` as YAML, loadable with :func:`load_config` (given the same environment)."""
    return OmegaConf.to_yaml(to_written(cfg))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the config as :func:`to_yaml` does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))


def config_reference() -> str:
    """Markdown reference of every key with its default and docstring (``docs/configuration.md``)."""
    lines = ["# Configuration reference", "",
             "Generated from the docstrings in `w2v_dist/config.py` (`w2v-dist config-docs > "
             "docs/configuration.md`).",
             "A YAML file holds only changes from these defaults; `key=value` arguments override both, in "
             "order.",
             "A value merges into a section (`trainer={max_steps: 10}` changes one key) but replaces a "
             "dict-valued key",
             f"whole ({', '.join(f'`{k}`' for k in dict_keys())}): `data.dev_shards={{mine: /x/dev}}` "
             f"evaluates",
             "only `mine`. `data.dev_shards.mine=/x/dev` adds one entry, `~data.dev_shards.dev-other` "
             "deletes one",
             "and `~data.dev_shards` deletes them all.", ""]

    def section(cls: type, prefix: str, default: Any) -> None:
        docs = field_docs(cls)
        nested = []
        rows = ["| key | default | meaning |", "|---|---|---|"]
        for f in fields(cls):
            value = getattr(default, f.name)
            if is_dataclass(value):
                nested.append((f.name, value))
                continue
            text = docs.get(f.name, "").replace("\n", " ").replace("|", "\\|")
            shown = OmegaConf.to_yaml({"v": value}).strip()[3:].replace("\n", " ") if isinstance(
                value, (dict, list, tuple)) else repr(value)
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {text} |")
        if len(rows) > 2:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", *rows, ""])
        for name, value in nested:
            section(type(value), f"{prefix}{name}.", value)

    section(Config, "", Config())
    return "\n".join(lines)
