"""The training loop: when to step, evaluate, log, save and export. The train step itself is one function."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from w2v_dist import dist
from w2v_dist.checkpoint.saved import SavedRun
from w2v_dist.config import Config, save_config, to_written, to_yaml
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.collate import CTCBatch
from w2v_dist.decoding import GreedyDecoder
from w2v_dist.engine import Engine, UpdateOutcome
from w2v_dist.export import ExportWriteError, export_hf
from w2v_dist.faults import injected_faults, pause_point
from w2v_dist.flops import COUNTED_FAMILIES, peak_tflops, step_flops
from w2v_dist.layerdrop import SharedLayerDrop
from w2v_dist.logging import MainLogger, RunLogger, step_line
from w2v_dist.metrics import ErrorCounts
from w2v_dist.model_card import model_card
from w2v_dist.preemption import REQUEUE_FILE, StopSignal, request_requeue, start_workers
from w2v_dist.process import mark_collective_failure
from w2v_dist.run import RANKS_DIR, Run, build_run
from w2v_dist.schedule import length_change, lr_at
from w2v_dist.scoring import Scorer, SetScore, write_rows

log = logging.getLogger("w2v_dist.trainer")


class DivergenceError(RuntimeError):
    """Too many consecutive updates were skipped for non-finite losses or gradients, or the final model's
    weights or outputs are not finite."""


@dataclass(frozen=True, kw_only=True)
class StepResult:
    loss_per_target: float
    targets: int
    utterances: int
    seconds: float
    stop: bool
    """Some rank was asked to stop (SIGUSR1/SIGTERM): all ranks stop after this step."""
    cause: str | None
    """Why the update was skipped (``loss_nonfinite``, ``grad_nonfinite``, ``fp16_overflow``,
    ``deepspeed_skipped``), or ``None`` when it was applied."""
    outcome: UpdateOutcome


def train_step(engine: Engine, micro_batches: list[CTCBatch], world_size: int, stop_requested: bool = False
               ) -> StepResult:
    """One optimizer update. Every rank runs the same collectives whatever its data, so none can hang."""
    local = [sum(b.targets for b in micro_batches), sum(len(b) for b in micro_batches),
             sum(b.seconds for b in micro_batches)]
    counts = dist.all_reduce_sum_async(local, engine.device)  # read with the flags below
    # DeepSpeed averages ranks, micro-batches
    scale = world_size * len(micro_batches) / counts[0].clamp(min=1.0)
    loss_sum = torch.zeros((), device=engine.device)
    for index, batch in enumerate(micro_batches):
        seed_randomness(engine.cfg.trainer.seed, batch, engine.module)
        loss, _ = engine.forward(batch)
        engine.backward(loss * scale.float())
        loss_sum += loss.detach()
        if index < len(micro_batches) - 1:
            engine.micro_step()
    flags = torch.stack([loss_sum.double(), (~torch.isfinite(loss_sum)).double(),
                         engine.grad_nonfinite().double(),
                         torch.tensor(float(stop_requested), dtype=torch.float64, device=engine.device)])
    reduced = torch.cat([dist.all_reduce_tensor(flags.nan_to_num(0.0)), counts])
    # the step's one host read
    total, loss_bad, grad_bad, stop, targets, utterances, seconds = reduced.tolist()
    cause = "loss_nonfinite" if loss_bad else "grad_nonfinite" if grad_bad else None
    outcome = engine.update(skip=cause is not None)
    if cause is None and outcome.engine_skipped:
        cause = "fp16_overflow" if engine.cfg.deepspeed.precision == "fp16" else "deepspeed_skipped"
    return StepResult(loss_per_target=total / max(targets, 1.0), targets=int(targets),
                      utterances=int(utterances),
                      seconds=seconds, stop=stop > 0, cause=cause, outcome=outcome)


def seed_randomness(seed: int, batch: CTCBatch, model: torch.nn.Module) -> None:
    """Dropout and SpecAugment masks (numpy, in transformers) are drawn from ``(seed, update, stream)``: a
    micro-batch gets the same ones whichever rank of whichever world size computes it, so a run resumed on
    another world size follows the uninterrupted run. LayerDrop is drawn from ``(seed, update)``: every
    rank skips the same layers (:mod:`w2v_dist.layerdrop`). Batches from outside a training stream keep
    the RNG as is."""
    if batch.stream < 0:
        return
    derived = hash((seed, batch.update, batch.stream)) & 0x7FFFFFFF
    torch.manual_seed(derived)
    np.random.seed(derived)
    if isinstance(layer_drop := getattr(model, "layer_drop", None), SharedLayerDrop):
        layer_drop.draw(seed, batch.update)


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: all of it resumes exactly."""

    step: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    consecutive_bad: int = 0
    loader_skips: Counter[str] = field(default_factory=Counter)
    """Skipped utterances by reason, summed over all ranks (see ``Trainer._pool_loader_skips``)."""
    seconds_seen: float = 0.0
    utterances_seen: int = 0
    utterances_by_set: Counter[str] = field(default_factory=Counter)
    """Training on a mix (``data.train_mix``): utterances trained on per shard set, summed over all ranks."""
    best_wer: float | None = None
    rollbacks: int = 0
    last_eval_step: int = 0
    last_eval_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """The error counts of each dev set at the last evaluation (at ``last_eval_step``): a relaunch that
    finds the run at ``max_steps`` evaluates nothing, and its model card shows these."""

    def state_dict(self) -> dict[str, Any]:
        return {key: dict(value) if isinstance(value, Counter) else value
                for key, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, Counter(value) if isinstance(getattr(self, key), Counter) else value)


class Trainer:
    def __init__(self, cfg: Config, run: Run, stop_signal: StopSignal | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.world = run.world
        self.output = Path(cfg.output_dir)
        self.state = RunState()
        self.stop_signal = stop_signal or StopSignal()
        if self.world.is_main:
            (self.output / REQUEUE_FILE).unlink(missing_ok=True)
        self.checkpointer = run.checkpointer
        self.unpooled_skips: Counter[str] = Counter()  # this rank's loader skips since the last pooling
        self.unpooled_sources: Counter[str] = Counter()  # and its utterances per mixed shard set
        self.last_eval: tuple[int, float] | None = None  # (step, WER on checkpoint.best_metric)
        # a save was deferred by skipped updates: it is made after the next applied one
        self.save_pending = False
        # this rank's micro-batch shapes, by epoch of their plan
        self.shapes: dict[int, set[tuple[int, ...]]] = {}
        if run.resume_tag:
            saved = self.checkpointer.resume(run.engine, run.resume_tag)
            if saved is not None:
                assert saved.loader is not None, "every checkpoint w2v-dist writes records its data position"
                self.state.load_state_dict(saved.run)
                run.train_stream.load_state_dict(saved.loader)
                self._check_schedule(saved)
        self.logged_step = self.state.step  # the last step logged: the ETA's pace is measured since then
        self.logger = (MainLogger(self.output, config=to_written(cfg), wandb_cfg=cfg.logging.wandb,
                                  total_steps=cfg.trainer.max_steps, start_step=self.state.step,
                                  progress_bar=cfg.logging.progress_bar) if self.world.is_main
                       else RunLogger())

    def _check_schedule(self, saved: SavedRun) -> None:
        """Warn (rank 0) when the resumed run's schedule length differs from the checkpoint's."""
        saved_config = yaml.safe_load(saved.config or "{}") or {}
        change = length_change(saved_config, self.cfg.trainer.max_steps, self.cfg.schedule, self.state.step,
                               self.cfg.optim.lr)
        if change and self.world.is_main:
            log.warning("resuming at step %d: %s", self.state.step, change)

    def fit(self) -> dict[str, SetScore]:
        cfg, state, run = self.cfg, self.state, self.run
        batches = start_workers(run.train_loader)
        pause_point("started", self.world.rank)
        window_start, wait, window_seconds, self.window_flops = time.perf_counter(), 0.0, 0.0, 0.0
        results: dict[str, SetScore] = {}
        while state.step < cfg.trainer.max_steps:
            fetch_start = time.perf_counter()
            micro = [next(batches) for _ in range(run.grad_accum)]
            wait += time.perf_counter() - fetch_start
            run.train_stream.took(micro)
            step = state.step + 1
            lr = lr_at(state.step, cfg.optim.lr, cfg.schedule.steps or cfg.trainer.max_steps, cfg.schedule)
            run.engine.set_lr(lr, encoder_frozen=state.step < cfg.model.freeze_finetune_updates)
            inject, mine = cfg.trainer.inject, self.world.rank == cfg.trainer.inject.rank
            with injected_faults(run.engine.module, nan_loss=mine and step in inject.nan_loss_at_steps,
                                 inf_grad=mine and step in inject.inf_grad_at_steps):
                result = train_step(run.engine, micro, self.world.size, self.stop_signal.requested)
            state.step = step
            dist.heartbeat(step)
            pause_point("step", self.world.rank)
            self._account(result, micro)
            if cfg.logging.key_log:
                self._log_keys(micro)
            window_seconds += result.seconds
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_train(result, lr, elapsed, window_seconds / max(elapsed, 1e-9),
                                wait / max(elapsed, 1e-9))
                window_start, wait, window_seconds, self.window_flops = time.perf_counter(), 0.0, 0.0, 0.0
            if result.stop and step < cfg.trainer.max_steps:
                self._preempted(saved=False)
                return {}
            last = step == cfg.trainer.max_steps
            evaluating = last or bool(cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0)
            saving = last or bool(cfg.trainer.save_every and step % cfg.trainer.save_every == 0) or \
                (self.save_pending and not state.consecutive_bad)
            if evaluating:
                results = self._evaluate()
            if saving:
                self._save()
            # A signal that came during the evaluation or the save is honoured now, not one step later:
            # SLURM's grace period may not cover another step.
            if (evaluating or saving) and not last and self._stop_requested_anywhere():
                self._preempted(saved=saving)
                return {}
        try:
            self._export(results)
        finally:
            self.logger.close()
        return results

    def _stop_requested_anywhere(self) -> bool:
        """Collective: whether any rank has received a stop signal."""
        return dist.all_reduce_sum([float(self.stop_signal.requested)], self.run.engine.device)[0] > 0

    def _preempted(self, saved: bool) -> None:
        if not saved:
            self._save()
        if self.world.is_main:
            reason = self.stop_signal.received or "a signal on another rank"
            path = request_requeue(self.output, self.state.step, reason)
            saving = "checkpoint saved" if not self.save_pending else (
                f"no checkpoint saved (updates skipped), the next launch resumes "
                f"{self.checkpointer.latest_tag()}")
            log.warning("stopped at step %d (%s): %s, %s written", self.state.step, reason, saving, path)
        self.logger.close()

    def _account(self, result: StepResult, micro: list[CTCBatch]) -> None:
        state = self.state
        for batch in micro:
            self.unpooled_skips.update(batch.skips)
            self.unpooled_sources.update(batch.sources)
            self.shapes.setdefault(batch.epoch, set()).add(tuple(batch.input_values.shape))
        state.seconds_seen += result.seconds
        state.utterances_seen += result.utterances
        flops = step_flops(self.run.engine.module.config, [n for b in micro for n in b.sample_lengths if n],
                           self.cfg.model.freeze_feature_encoder, self.cfg.model.layerdrop)
        self.window_flops += flops or 0.0
        if result.cause is None:
            state.consecutive_bad = 0
            return
        state.skipped[result.cause] += 1
        state.consecutive_bad += 1
        keys = dist.all_gather_objects([k for b in micro for k in b.keys])
        if self.world.is_main:
            record = {"step": state.step, "cause": result.cause, "keys_by_rank": keys}
            with open(self.output / "bad_batches.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.warning("step %d skipped on all ranks (%s); batch keys in bad_batches.jsonl", state.step,
                        result.cause)
        if state.consecutive_bad < self.cfg.trainer.max_consecutive_bad_steps:
            return
        if (self.cfg.trainer.on_divergence == "rollback" and state.rollbacks < self.cfg.trainer.max_rollbacks
                and self.checkpointer.resumable_tag() is not None):
            self._rollback()
        else:
            raise DivergenceError(f"{state.consecutive_bad} consecutive updates had non-finite losses or "
                                  f"gradients (last: {result.cause}); see "
                                  f"{self.output / 'bad_batches.jsonl'}. Lower optim.lr, check the data, or "
                                  f"use bf16 instead of fp16")

    def _rollback(self) -> None:
        """Back to the latest checkpoint's weights, optimizer and step; the data stream moves on past the
        bad batches instead of replaying them. Saves wait while updates are skipped (:meth:`_save`), so
        the latest checkpoint is the last one saved before the streak began."""
        saved = self.checkpointer.resume(self.run.engine)
        assert saved is not None  # the caller checked that a resumable checkpoint exists
        bad_at, self.state.step = self.state.step, saved.step
        self.state.consecutive_bad, self.save_pending = 0, False
        self.state.rollbacks += 1
        log.warning("rolled back from step %d to the checkpoint at step %d (rollback %d of %d)", bad_at,
                    self.state.step, self.state.rollbacks, self.cfg.trainer.max_rollbacks)
        self.logger.log({"step": self.state.step, "rollback_from": bad_at,
                         "rollbacks": self.state.rollbacks})

    def _log_keys(self, micro: list[CTCBatch]) -> None:
        lines = "".join(json.dumps({"step": self.state.step, "update": b.update, "stream": b.stream,
                                    "epoch": b.epoch, "keys": list(b.keys)}) + "\n" for b in micro)
        (self.output / "keys").mkdir(exist_ok=True)
        with open(self.output / "keys" / f"rank{self.world.rank}.jsonl", "a") as handle:
            handle.write(lines)

    def _pool_loader_skips(self) -> None:
        """Collective: add every rank's new loader skips (and utterances per mixed set) to the run totals
        (identical on all ranks)."""
        for skips, sources in dist.all_gather_objects((dict(self.unpooled_skips),
                                                       dict(self.unpooled_sources))):
            self.state.loader_skips.update(skips)
            self.state.utterances_by_set.update(sources)
        self.unpooled_skips.clear()
        self.unpooled_sources.clear()

    def _log_train(self, result: StepResult, lr: float, elapsed: float, audio_rate: float,
                   wait_fraction: float
                   ) -> None:
        self._pool_loader_skips()
        state = self.state
        tflops = (dist.all_reduce_sum([self.window_flops], self.run.engine.device)[0]
                  / max(elapsed, 1e-9) / 1e12)
        # A skipped update is logged without a loss (skipped_cause says why): the step's sum zeroes a rank's
        # non-finite loss, and the 0.0 it gave drew a loss curve that fell as the run diverged.
        record: dict[str, Any] = {
            "step": state.step, "loss": None if result.cause else result.loss_per_target, "lr": lr,
            "grad_norm": result.outcome.grad_norm,
            "epoch": state.utterances_seen / self.run.train_utterances,
            "audio_seconds_per_second": audio_rate, "data_wait_fraction": wait_fraction,
            "skipped": dict(state.skipped), "loader_skips": dict(state.loader_skips),
            "batch_shapes": len(set().union(*self.shapes.values())),
            "epoch_batch_shapes": len(self.shapes[max(self.shapes)]) if self.shapes else 0}
        if result.cause:
            record["skipped_cause"] = result.cause
        if state.utterances_by_set:
            record["utterances_by_set"] = dict(state.utterances_by_set)
        if self.run.engine.module.config.model_type in COUNTED_FAMILIES:
            record["tflops_per_second"] = tflops
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        if peak and "tflops_per_second" in record:
            record["mfu"] = tflops / (peak * self.world.size)
        if torch.cuda.is_available():
            record["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.logger.log(record)
        loss = f"{result.loss_per_target:.3f}" if not result.cause else "skipped"
        steps, self.logged_step = max(state.step - self.logged_step, 1), state.step
        # at this window's pace, evaluations aside
        eta = (self.cfg.trainer.max_steps - state.step) * elapsed / steps
        self.logger.progress(state.step, {"loss": loss, "lr": f"{lr:.2e}",
                                          "aud_s/s": f"{record['audio_seconds_per_second']:.0f}",
                                          **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})},
                             step_line(record, eta))

    def _evaluate(self) -> dict[str, SetScore]:
        """Collective: score every dev set (:mod:`w2v_dist.scoring`, as ``w2v-dist evaluate`` does), log
        it, and export best/ when the WER on ``checkpoint.best_metric`` improved."""
        engine, rank = self.run.engine, self.world.rank
        decoder = GreedyDecoder(self.run.processor.tokenizer)
        geometry = EncoderGeometry.from_model_config(engine.module.config)
        engine.eval()
        results = {}
        for dev in self.run.dev_sets:
            scorer = Scorer(lambda batch: engine.forward(batch, with_labels=False)[1], decoder, geometry,
                            device=engine.device, sample_rate=dev.sample_rate, text_policy=dev.text_policy,
                            pad_forward=engine.dummy_forward, after_batch=lambda: pause_point("eval", rank))
            results[dev.name] = scorer.score(dev.name, dev.loader, dev.indexed)
        engine.train()
        self.state.last_eval_step = self.state.step
        self.state.last_eval_counts = {name: asdict(score.counts) for name, score in results.items()}
        record: dict[str, Any] = {"step": self.state.step}
        for name, score in results.items():
            counts = score.counts
            record |= {f"dev/{name}/wer": counts.wer, f"dev/{name}/cer": counts.cer,
                       f"dev/{name}/utterances": counts.utterances,
                       f"dev/{name}/unscored": len(score.unscored)}
            samples = score.rows[:self.cfg.logging.sample_transcripts]
            self.logger.table(f"dev/{name}/samples", ["key", "reference", "hypothesis"],
                              [[r["key"], r["reference"], r["hypothesis"]] for r in samples],
                              self.state.step)
            for r in samples:
                log.info("%s %s\n  REF: %s\n  HYP: %s", name, r["key"], r["reference"], r["hypothesis"])
            log.info("step %d %s: WER %.4f CER %.4f over %d utterances (%d unscored)", self.state.step, name,
                     counts.wer, counts.cer, counts.utterances, len(score.unscored))
            if self.world.is_main:
                write_rows(self.output / "eval" / f"step_{self.state.step:08d}" / f"{name}.jsonl",
                           score.rows)
        self.logger.log(record)
        wer = self._wer(results)
        if wer is not None:
            self.last_eval = (self.state.step, wer)
            if math.isfinite(wer) and (self.state.best_wer is None or wer < self.state.best_wer):
                self.state.best_wer = wer
                if export_hf(self.run.engine, self.run.processor, self.output / "best", self.world.is_main,
                             self._card("best", results)):
                    self.logger.saved("model", self.output / "best", self.state.step, ["best"], wer)
        return results

    def _wer(self, results: dict[str, SetScore]) -> float | None:
        """The WER that ranks checkpoints and best/: on ``checkpoint.best_metric``, else the first dev
        set."""
        return (results[self.cfg.checkpoint.best_metric or next(iter(results))].counts.wer
                if results else None)

    def _save(self) -> None:
        """Commit a checkpoint, unless the last update was skipped (``consecutive_bad``): a checkpoint
        taken during a streak of non-finite updates would be what a relaunch, or a rollback, resumes. The
        save then waits for the next applied update (a streak ends) and is made right after it; ``latest``
        keeps naming the last checkpoint from before the streak."""
        if self.state.consecutive_bad:
            self.save_pending = True
            if self.world.is_main:
                log.warning("step %d: checkpoint not saved: the last %d update(s) were skipped; latest "
                            "still names %s, saving after the next applied update", self.state.step,
                            self.state.consecutive_bad, self.checkpointer.latest_tag())
            return
        self.save_pending = False
        self._pool_loader_skips()
        stream = self.run.train_stream
        saved = SavedRun(world_size=self.world.size, step=self.state.step, layout=stream.layout,
                         run=self.state.state_dict(), loader=stream.state_dict(), config=to_yaml(self.cfg))
        score = self.last_eval[1] if self.last_eval and self.last_eval[0] == self.state.step else None
        directory = self.checkpointer.save(self.run.engine, saved, score)
        self.logger.saved("checkpoint", directory, self.state.step, ["latest", f"step-{self.state.step}"],
                          score)

    def _card(self, export: str, results: dict[str, SetScore]) -> str:
        counts = {name: score.counts for name, score in results.items()}
        if not counts and self.state.last_eval_step == self.state.step:
            # nothing evaluated since the checkpoint
            counts = {name: ErrorCounts(**saved) for name, saved in self.state.last_eval_counts.items()}
        return model_card(name=f"{self.output.name}-{export}", base_model=self.cfg.model.name_or_path,
                          step=self.state.step, config_yaml=to_yaml(self.cfg), results=counts)

    def _export(self, results: dict[str, SetScore]) -> None:
        try:
            finite = export_hf(self.run.engine, self.run.processor, self.output / "final",
                               self.world.is_main, self._card("final", results))
        except ExportWriteError as err:
            raise ExportWriteError(f"{err}; checkpoints/latest still names "
                                   f"{self.checkpointer.latest_tag()}: free space and relaunch the same "
                                   f"command to export it") from err
        if finite:
            self.logger.saved("model", self.output / "final", self.state.step, ["final"], self._wer(results))
        if self.world.is_main:
            summary = {"step": self.state.step, "exported": finite, "skipped": dict(self.state.skipped),
                       "loader_skips": dict(self.state.loader_skips),
                       **{f"dev/{n}/wer": r.counts.wer for n, r in results.items()}}
            self.logger.log({"final": summary})
        if not finite:
            raise DivergenceError(f"{self.output / 'final'} was not exported: the model's weights, or its "
                                  f"logits on a probe batch, are NaN or Inf (skipped updates: "
                                  f"{dict(self.state.skipped)}). checkpoints/latest names "
                                  f"{self.checkpointer.latest_tag()}; lower optim.lr, or check the data, "
                                  f"and train again")


def train(cfg: Config, local_rank: int | None = None) -> dict[str, SetScore]:
    """Build everything from ``cfg`` and run to ``trainer.max_steps`` (resuming when a checkpoint exists)."""
    stop_signal = StopSignal()  # first: a signal while the run is being built is honoured after step 1
    run = build_run(cfg, local_rank)
    if run.world.is_main:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    try:
        return Trainer(cfg, run, stop_signal).fit()
    except RuntimeError as err:
        if not dist.is_collective_failure(err):
            raise
        mark_collective_failure()  # SystemExit leaves no trace the exit handler could see
        latest = run.checkpointer.resumable_tag()
        lost = dist.lost_ranks(Path(cfg.output_dir) / RANKS_DIR, run.world)
        raise SystemExit(f"rank {run.world.rank}: {err}. Another rank has most likely died or stalled "
                         f"({lost}; exit codes are in the launcher's log). Relaunch the same command to "
                         f"resume from {latest or 'the beginning (no checkpoint yet)'}.") from err
