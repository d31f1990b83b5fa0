"""``w2v-dist report`` on a synthetic metrics.jsonl with every record shape the trainer writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from w2v_dist.report import plot_all, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_line(step: int, skipped: dict[str, int], grad_norm: float | None = 1.0,
               cause: str | None = None) -> dict:
    """A train record; ``cause``: the update was skipped, so it has no loss."""
    return {"step": step, "loss": None if cause else 10.0 / step, "lr": 1e-4 * min(step, 5) / 5,
            "grad_norm": grad_norm, "epoch": step / 10, "audio_seconds_per_second": 100.0 + step,
            "data_wait_fraction": 0.05, "skipped": skipped,
            "loader_skips": {"too_long": 2} if step >= 4 else {},
            **({"skipped_cause": cause} if cause else {})}


def eval_line(step: int, wer_clean: float, wer_other: float | None) -> dict:
    return {"step": step, "dev/dev-clean/wer": wer_clean, "dev/dev-clean/cer": wer_clean / 3,
            "dev/dev-clean/utterances": 50, "dev/dev-other/wer": wer_other, "dev/dev-other/cer": 0.2,
            "dev/dev-other/utterances": 40}


def write_run(run: Path) -> None:
    records = [train_line(s, {}) for s in range(1, 5)]
    records += [eval_line(4, 0.5, 0.7)]
    records += [train_line(5, {"loss_nonfinite": 1}, None, "loss_nonfinite"),
                train_line(6, {"loss_nonfinite": 2}, None, "loss_nonfinite")]
    records += [{"step": 4, "rollback_from": 6, "rollbacks": 1}]
    # steps 5-6 again, after the rollback
    records += [train_line(s, {"loss_nonfinite": 2}) for s in range(5, 7)]
    records += [train_line(7, {"loss_nonfinite": 2, "grad_nonfinite": 1}, None, "grad_nonfinite"),
                train_line(8, {"loss_nonfinite": 2, "grad_nonfinite": 1})]
    records += [eval_line(8, 0.3, None),
                {"final": {"step": 8, "exported": True, "skipped": {"loss_nonfinite": 2}}}]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')


def test_read_metrics_keeps_the_last_record_of_each_step_and_ignores_a_torn_line(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(metrics.train) == list(range(1, 9))
    assert metrics.train[6]["grad_norm"] == 1.0, "the replayed step 6 (after the rollback) wins"
    assert metrics.rollbacks == [(6, 4)] and metrics.final is not None
    assert metrics.dev_sets == ["dev-clean", "dev-other"]
    assert metrics.series("dev/dev-other/wer", "evals") == ([4], [0.7]), "null (NaN) values are not plotted"
    assert metrics.skipped == [(7, "grad_nonfinite")] and 7 not in metrics.series("loss")[0]


def test_report_writes_pngs_and_markdown(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    report = write_report(tmp_path / "run")
    assert report == tmp_path / "run" / "report" / "report.md"
    pngs = sorted(report.parent.glob("*.png"))
    assert {p.stem for p in pngs} == {"loss", "lr", "grad_norm", "dev_error_rates", "throughput", "skipped"}
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png.name
    text = report.read_text()
    assert "last step 8; finished" in text and "final export written: True" in text
    assert "| dev-clean | 0.3000 | 0.3000 (8) | 0.1000 | 50 |" in text
    # the last evaluation's WER was null (NaN)
    assert "| dev-other | nan | 0.7000 (4) | 0.2000 | 40 |" in text
    assert "{'loss_nonfinite': 2, 'grad_nonfinite': 1}" in text and "{'too_long': 2}" in text
    assert "rollbacks: 1 (step 6 → 4)" in text and "loss: first 10.0000, last 1.2500, min 1.2500" in text
    assert "updates logged as skipped (no loss): 1, the last at step 7 (grad_nonfinite)" in text
    assert all(f"]({p.name})" in text for p in pngs)


def test_the_loss_plot_marks_skipped_updates_instead_of_plotting_a_loss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to be read
    write_run(tmp_path / "run")
    plot_all(read_metrics(tmp_path / "run" / "metrics.jsonl"), tmp_path)
    ax = next(f.axes[0] for f in figures if f.axes[0].get_title().startswith("Training loss"))
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert lines.pop("rollback") == [6, 6] and lines.pop("skipped update (no loss)") == [7]
    assert list(lines.values()) == [[1, 2, 3, 4, 5, 6, 8]], "the loss curve has no point at the skipped step"
    for figure in figures:
        close(figure)


def test_report_of_a_run_without_evaluations_or_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(train_line(1, {})) + "\n")
    report = write_report(run, tmp_path / "out")
    assert ("not finished" in report.read_text()
            and (tmp_path / "out" / "dev_error_rates.png").stat().st_size > 5_000)
    try:
        write_report(tmp_path / "missing")
    except FileNotFoundError as err:
        assert "metrics.jsonl" in str(err)
    else:
        raise AssertionError("a directory without metrics.jsonl must be refused")


def test_a_plot_without_values_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose grad_norm is null on every line (ZeRO-0 before the engine computed it) gets a grad-norm
    plot that says it has no values, not a blank one; the plots with values carry no such note."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # kept open to be read
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(train_line(s, {}, None)) + "\n" for s in (1, 2)))
    plot_all(read_metrics(run / "metrics.jsonl"), tmp_path)
    notes = {f.axes[0].get_title(): [t.get_text() for t in f.axes[0].texts] for f in figures}
    assert notes["Global gradient norm"] == ["no grad_norm values in metrics.jsonl"]
    assert notes["Training loss (CTC per target token)"] == [] and notes["Learning rate"] == []
    assert notes["dev WER (greedy, during training)"] == ["no dev evaluation in metrics.jsonl"]
    for figure in figures:
        close(figure)
