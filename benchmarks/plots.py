"""Plot ``w2v-dist bench gpu`` results: ``python -m benchmarks.plots RESULTS.jsonl OUT.png``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def plot_gpu(records: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r for r in records if r.get("measure") == "gpu_variant" and "error" not in r]
    device = next((r["device"] for r in records if r.get("measure") == "gpu_device"), "GPU")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in variants:
        by_name.setdefault(r["variant"], []).append(r)
    sweeps = {name: sorted(runs, key=lambda r: r["batch_seconds"]) for name, runs in by_name.items()
              if len(runs) > 1}
    if sweeps:
        fig, (sweep_ax, bar_ax) = plt.subplots(1, 2, figsize=(13, 4.8),
                                               gridspec_kw={"width_ratios": [1, 1.6]})
        for name, runs in sweeps.items():
            sweep_ax.plot([r["batch_seconds"] for r in runs], [r["audio_seconds_per_second"] for r in runs],
                          "o-", label=name)
        sweep_ax.set(xlabel="padded audio seconds per batch", ylabel="audio seconds / second",
                     title="throughput vs batch size")
        sweep_ax.legend()
        sweep_ax.grid(alpha=0.3)
    else:
        fig, bar_ax = plt.subplots(figsize=(9, 3.6))
    largest = max(r["batch_seconds"] for r in variants)
    at_largest = [r for r in variants if abs(r["batch_seconds"] - largest) / largest < 0.25]
    names = [r["variant"] for r in at_largest]
    rates = [r["audio_seconds_per_second"] for r in at_largest]
    bars = bar_ax.barh(names, rates,
                       color=["tab:gray" if "static" in n or "bare" in n else "tab:blue" for n in names])
    for bar, r in zip(bars, at_largest):
        bar_ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" MFU {r.get('mfu_datasheet', 0):.1%}, busy {r['gpu_busy_fraction']:.0%}", va="center",
                    fontsize=8)
    bar_ax.invert_yaxis()
    bar_ax.set(xlabel="audio seconds / second",
               title=f"variants, ~{largest:.0f} s of padded audio per batch (grey: references)")
    bar_ax.set_xlim(0, max(rates) * 1.45)
    fig.suptitle(f"w2v-dist bench gpu: wav2vec2-base, bf16, ZeRO-2, {device}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot_gpu([json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()],
             Path(sys.argv[2]))
