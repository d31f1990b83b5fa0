"""``w2v-dist report RUN_DIR``: PNG plots and a markdown summary from a run's ``metrics.jsonl``.

Record shapes (see :mod:`w2v_dist.trainer`): train lines carry ``loss`` (``null`` for a skipped update, whose
``skipped_cause`` says why: plotted as a mark, never as a loss value); eval lines ``dev/<set>/wer``;
rollback lines ``rollback_from``; the last line of a finished run is ``{"final": {...}}``. Non-finite numbers
were written as ``null``. After a rollback the same steps are logged again: the later record of a step wins,
which is the trajectory the final weights actually followed.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = tuple[list[int], list[float]]


@dataclass
class RunMetrics:
    train: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    """(bad step, step rolled back to)."""
    final: dict[str, Any] | None = None

    def series(self, key: str, records: str = "train") -> Series:
        rows = getattr(self, records)
        points = [(s, r[key]) for s, r in sorted(rows.items()) if isinstance(r.get(key), int | float)]
        return [s for s, _ in points], [float(v) for _, v in points]

    @property
    def skipped(self) -> list[tuple[int, str]]:
        """(step, cause) of each logged update that was skipped."""
        return [(s, r["skipped_cause"]) for s, r in sorted(self.train.items()) if r.get("skipped_cause")]

    @property
    def dev_sets(self) -> list[str]:
        names = {k.split("/")[1] for r in self.evals.values() for k in r if k.startswith("dev/")
                 and k.endswith("/wer")}
        return sorted(names)


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse ``metrics.jsonl``; a torn last line (a run killed mid-write) is ignored."""
    metrics = RunMetrics()
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "final" in record:
            metrics.final = record["final"]
        elif "rollback_from" in record:
            metrics.rollbacks.append((record["rollback_from"], record["step"]))
        elif "loss" in record:
            metrics.train[record["step"]] = record
        elif any(k.startswith("dev/") for k in record):
            metrics.evals[record["step"]] = record
    return metrics


def _figure(title: str, ylabel: str, rollbacks: list[tuple[int, int]]) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for index, (bad, _) in enumerate(rollbacks):
        ax.axvline(bad, color="red", linestyle="--", alpha=0.6, label="rollback" if index == 0 else None)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path, empty: str | None) -> Path:
    """``empty``: why nothing was plotted (the figure says so), or ``None``. Judged by each plot from its
    series, not by ``ax.has_data()``: an empty line, or a rollback marker, counts as data there, and an
    all-null series (``grad_norm`` on ZeRO-0 before it was computed there) gave a blank plot that looked like
    a broken one."""
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    if ax.has_data():  # one legend for all axes of the figure (twin axes included), one entry per label
        entries = {label: handle for a in fig.axes for handle, label in zip(*a.get_legend_handles_labels())}
        if entries:
            ax.legend(list(entries.values()), list(entries))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(metrics: RunMetrics, out: Path) -> dict[str, Path]:
    """One PNG per view; returns title → path."""
    plots: dict[str, Path] = {}
    for key, title, ylabel, log_scale in (("loss", "Training loss (CTC per target token)", "loss", True),
                                          ("lr", "Learning rate", "lr", False),
                                          ("grad_norm", "Global gradient norm", "norm", True)):
        fig, ax = _figure(title, ylabel, metrics.rollbacks)
        steps, values = metrics.series(key)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        if log_scale and values and min(values) > 0:
            ax.set_yscale("log")
        if key == "loss" and metrics.skipped:  # at the foot of the axes: a skipped update has no loss
            ax.plot([s for s, _ in metrics.skipped], [0.02] * len(metrics.skipped), "x", color="red",
                    transform=ax.get_xaxis_transform(), label="skipped update (no loss)")
        plots[title] = _save(fig, ax, out / f"{key}.png",
                             None if steps else f"no {key} values in metrics.jsonl")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    evaluated = any(metrics.series(f"dev/{name}/wer", "evals")[0] for name in metrics.dev_sets)
    for ax, metric in zip(axes, ("wer", "cer")):
        ax.set_title(f"dev {metric.upper()} (greedy, during training)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for name in metrics.dev_sets:
            ax.plot(*metrics.series(f"dev/{name}/{metric}", "evals"), marker="o", label=name)
        if ax.has_data():
            ax.legend()
    plots["Dev WER / CER"] = _save(fig, axes[0], out / "dev_error_rates.png",
                                   None if evaluated else "no dev evaluation in metrics.jsonl")

    fig, ax = _figure("Throughput", "audio seconds per second (all ranks)", metrics.rollbacks)
    steps, values = metrics.series("audio_seconds_per_second")
    ax.plot(steps, values, label="audio s/s")
    waits = metrics.series("data_wait_fraction")
    if waits[0]:
        twin = ax.twinx()
        twin.plot(*waits, color="tab:orange", alpha=0.6, label="data-wait fraction")
        twin.set_ylabel("data-wait fraction")
        twin.set_ylim(0, 1)
    plots["Throughput"] = _save(fig, ax, out / "throughput.png",
                                None if steps else "no audio_seconds_per_second values in metrics.jsonl")

    fig, ax = _figure("Skipped updates and loader skips (cumulative)", "count", metrics.rollbacks)
    drawn = False
    steps = sorted(metrics.train)
    for field_name, prefix in (("skipped", "update: "), ("loader_skips", "loader: ")):
        counts = [metrics.train[s].get(field_name) or {} for s in steps]  # cumulative counters as logged
        for cause in sorted({c for row in counts for c in row}):
            ax.step(steps, [row.get(cause, 0) for row in counts], where="post", label=prefix + cause)
            drawn = True
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not drawn and steps:
        ax.step(steps, [0] * len(steps), where="post", label="nothing skipped")
    plots["Skipped updates"] = _save(fig, ax, out / "skipped.png",
                                     None if steps else "no train steps in metrics.jsonl")
    return plots


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def summary_markdown(run_dir: Path, metrics: RunMetrics, plots: dict[str, Path], out: Path) -> str:
    """The short human summary that links the plots."""
    last = metrics.train[max(metrics.train)] if metrics.train else {}
    lines = [f"# Run report: `{run_dir}`", ""]
    status = "finished" if metrics.final else "not finished (no final record)"
    lines += [f"- steps logged: {len(metrics.train)}, last step {max(metrics.train, default=0)}; {status}"]
    if metrics.final is not None:
        lines += [f"- final export written: {metrics.final.get('exported')}"]
    _, losses = metrics.series("loss")
    if losses:
        lines += [f"- loss: first {_fmt(losses[0])}, last {_fmt(losses[-1])}, min {_fmt(min(losses))}"]
    _, rates = metrics.series("audio_seconds_per_second")
    _, waits = metrics.series("data_wait_fraction")
    if rates:
        lines += [f"- throughput: median {statistics.median(rates):.1f} audio s/s; mean data-wait fraction "
                  f"{statistics.fmean(waits) if waits else float('nan'):.3f}"]
    if metrics.skipped:
        step, cause = metrics.skipped[-1]
        lines += [f"- updates logged as skipped (no loss): {len(metrics.skipped)}, the last at step {step} "
                  f"({cause})"]
    lines += [f"- skipped updates: {dict(last.get('skipped') or {}) or 'none'}",
              f"- loader skips: {dict(last.get('loader_skips') or {}) or 'none'}",
              f"- rollbacks: {len(metrics.rollbacks)}" + "".join(f" (step {b} → {a})"
                                                                 for b, a in metrics.rollbacks)]
    if metrics.dev_sets:
        lines += ["", "| dev set | last WER | best WER (step) | last CER | utterances |",
                  "|---|---|---|---|---|"]
        last_eval = metrics.evals[max(metrics.evals)]
        for name in metrics.dev_sets:
            steps, wers = metrics.series(f"dev/{name}/wer", "evals")
            best = min(range(len(wers)), key=lambda i: (wers[i], steps[i])) if wers else None
            final = [last_eval.get(f"dev/{name}/{m}") for m in ("wer", "cer", "utterances")]
            final = ["nan" if v is None else v for v in final]  # null = NaN in metrics.jsonl (e.g. no words)
            lines.append(f"| {name} | {_fmt(final[0])} | "
                         f"{f'{_fmt(wers[best])} ({steps[best]})' if best is not None else '-'} | "
                         f"{_fmt(final[1])} | {final[2]} |")
    lines += ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({path.relative_to(out)})\n" for title, path in plots.items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the PNGs and ``report.md`` (default ``RUN_DIR/report/``); returns the markdown path."""
    run = Path(run_dir)
    source = run / "metrics.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: is {run} a run's output_dir?")
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(source)
    plots = plot_all(metrics, out)
    report = out / "report.md"
    report.write_text(summary_markdown(run, metrics, plots, out))
    return report
