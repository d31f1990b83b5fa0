"""Where metrics go: ``metrics.jsonl`` always, a tqdm bar and wandb on rank 0. Other ranks get no-op
loggers. Also the console every rank logs to (:func:`setup_console`, called when a process starts)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from w2v_dist.config import WandbConfig
from w2v_dist.redact import redact, redact_values

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
console = logging.getLogger("w2v_dist.progress")


def setup_console(rank: int) -> None:
    """Rank-tagged console logging; non-zero ranks only report warnings.

    Also turns off tqdm's monitor thread (every progress bar, transformers' included, would otherwise start
    one that exits on its own schedule): a process that forks its DataLoader workers while another Python
    thread is exiting can leave the child deadlocked inside ``fork()`` (CPython's thread-state lock is copied
    held).
    """
    tqdm.monitor_interval = 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"[%(asctime)s rank{rank} %(name)s] %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if rank != 0:  # the hub's warnings (unauthenticated requests, a retry) once per run, not once per node
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(BarSafeStderr())  # type: ignore[arg-type]
    quiet_expected_noise()


def on_terminal() -> bool:
    """Whether the console is a terminal: progress bars there, plain lines in files and pipes (SLURM,
    ``| tee``), where a bar's ``\r`` redraws pile up on one line and log lines were glued onto it."""
    return sys.stderr.isatty()


class BarSafeStderr:
    """The console handler's stream: while a progress bar is shown, a log line goes out through
    ``tqdm.write``, which lifts the bar off the line first and redraws it below, so a line is never glued
    onto a bar. Without tqdm's lock (``nolock``): that is a multiprocessing lock, shared with forked loader
    workers, which one killed while writing would leave held. Looks ``sys.stderr`` up at each write (pytest
    and ``command_stdout`` swap it)."""

    def write(self, text: str) -> None:
        if getattr(tqdm, "_instances", None):
            tqdm.write(text, file=sys.stderr, end="", nolock=True)
        else:
            sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class Progress:
    """A long loop's progress on rank 0: a bar on a terminal, else a plain line at the start and every
    ``every_s`` seconds. Other ranks show nothing."""

    def __init__(self, what: str, total: int, unit: str, *, show: bool, every_s: float = 30.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done, self.start, self.said = 0, time.monotonic(), time.monotonic()
        self.bar = tqdm(total=total, desc=what, unit=unit, leave=False, dynamic_ncols=True) \
            if show and on_terminal() else None
        self.lines = show and self.bar is None
        if self.lines:
            console.info("%s: %s %s", what, f"{total:,}", unit)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.said >= self.every_s:
            self.said = time.monotonic()
            console.info("%s: %s of %s %s, %.0f s", self.what, f"{self.done:,}", f"{self.total:,}",
                         self.unit, self.said - self.start)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def step_line(record: dict[str, Any], eta_s: float) -> str:
    """The plain line a train step is logged with where there is no bar: what a bar would show, and more."""
    loss = f"{record['loss']:.4f}" if isinstance(record.get("loss"), float) \
        else f"skipped ({record.get('skipped_cause')})"
    norm = record.get("grad_norm")
    return (f"step {record['step']:,}: loss {loss}, lr {record['lr']:.3e}, grad norm "
            f"{'-' if norm is None else f'{norm:.3g}'}, "
            f"{record['audio_seconds_per_second']:,.0f} audio-s/s, ETA {format_seconds(eta_s)}")


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


EXPECTED_NOISE = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),  # a CPU machine building DeepSpeed's CPU op
    "transformers.modeling_utils": ("LOAD REPORT",),  # w2v_dist.model.check_loaded_weights judges each load
    "DeepSpeed": ("untested optimizer",),  # ours: AdamW with the NaN/Inf guard's veto
}
"""Library warnings about what w2v-dist does on purpose, by logger: dropped, so that the warnings that remain
need action."""


class DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in str(record.msg) for fragment in self.fragments)


def quiet_expected_noise() -> None:
    """Drop :data:`EXPECTED_NOISE` and transformers' per-rank progress bars (loading, writing shards)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for name, fragments in EXPECTED_NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in target.filters):
            target.addFilter(DropMessages(fragments))


class RedactingFilter(logging.Filter):
    """Log lines carry URLs and commands (a failing shard, a config value): their secrets become ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def scrub(values: dict[str, Any]) -> dict[str, Any]:
    """Drop anything that looks like a secret (``WANDB_API_KEY`` and friends never leave the environment)."""
    return {k: scrub(v) if isinstance(v, dict) else v for k, v in values.items()
            if not any(marker in k.upper() for marker in SECRET_MARKERS)}


def finite_or_none(value: Any) -> Any:
    """NaN and Inf (an empty dev set's WER, a diverged loss) are not valid JSON: they are written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLogger:
    """No-op base: what every rank but 0 gets."""

    def log(self, record: dict[str, Any]) -> None: ...

    def progress(self, step: int, postfix: dict[str, Any], line: str) -> None:
        """Step ``step`` was logged: ``postfix`` for a progress bar, ``line`` where there is none."""

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...

    def saved(self, kind: str, directory: Path, step: int, aliases: list[str], dev_wer: float | None
              ) -> None:
        """A checkpoint (``kind="checkpoint"``) or an export (``"model"``) is complete in ``directory``."""

    def close(self) -> None: ...


class MainLogger(RunLogger):
    """Rank 0: appends JSON lines to ``metrics.jsonl``, drives the bar, mirrors to wandb when enabled."""

    def __init__(self, output_dir: Path, *, config: dict[str, Any], wandb_cfg: WandbConfig, total_steps: int,
                 start_step: int, progress_bar: bool) -> None:
        self.file = (output_dir / "metrics.jsonl").open("a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (progress_bar and on_terminal()))
        self.wandb: Any = None
        self.log_checkpoints = wandb_cfg.log_checkpoints
        if wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            id_file = output_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.run_name or output_dir.name,
                                    id=run_id, resume="allow", dir=str(output_dir),
                                    mode=wandb_cfg.mode,  # type: ignore[arg-type]  # checked at config load
                                    config=scrub(config))  # type: ignore[arg-type]

    def log(self, record: dict[str, Any]) -> None:
        clean = redact_values({k: finite_or_none(v) for k, v in record.items()})
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            numbers = {k: v for k, v in clean.items() if isinstance(v, int | float)}
            self.wandb.log(numbers, step=record.get("step"))

    def progress(self, step: int, postfix: dict[str, Any], line: str) -> None:
        if self.bar.disable:
            console.info("%s", line)
            return
        self.bar.n = step
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=list[str | int](columns), data=redact_values(rows))
            self.wandb.log({name: table}, step=step)

    def saved(self, kind: str, directory: Path, step: int, aliases: list[str], dev_wer: float | None
              ) -> None:
        if self.wandb is None or not self.log_checkpoints:
            return
        import wandb

        metadata = {"step": step, "dev_wer": finite_or_none(dev_wer), "path": str(directory)}
        artifact = wandb.Artifact(f"{kind}-{self.wandb.id}", type=kind, metadata=metadata)
        try:  # a checkpoint is gigabytes on a shared file system: name it, don't read it
            artifact.add_reference(directory.resolve().as_uri(), checksum=False)
            self.wandb.log_artifact(artifact, aliases=aliases)
        except Exception as err:  # the checkpoint is committed: a bookkeeping failure must not stop the run
            logging.getLogger("w2v_dist.logging").warning("wandb could not record %s as an artifact: %s",
                                                          directory, err)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
