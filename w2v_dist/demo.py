"""The main job on the demo config: synthetic corpus → shards → tiny model → 2-rank DeepSpeed → WER
→ export.

Every preparation step is skipped when its output already exists, so a second ``make demo`` only trains.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from w2v_dist.config import load_config


def prepare(work_dir: Path, utterances: int, dev_utterances: int) -> None:
    """Corpus, shards and initial model under ``work_dir`` (idempotent)."""
    from w2v_dist.model import init_model
    from w2v_dist.prep.shards import ShardOptions, shard_corpus
    from w2v_dist.prep.sources import librispeech_sources
    from w2v_dist.prep.synth import synthesize

    corpus = work_dir / "corpus"
    if not (corpus / "COMPLETE").exists():
        print(f"[demo] synthesising {utterances} + {dev_utterances} utterances with espeak-ng into {corpus}")
        synthesize(corpus, utterances, dev_utterances, workers=os.cpu_count() or 1)
        (corpus / "COMPLETE").write_text("ok\n")
    for subset in ("train-clean-100", "dev-clean"):
        out = work_dir / "shards" / subset
        if not (out / "index.json").exists():
            index = shard_corpus(librispeech_sources(corpus, [subset]), out,
                                 ShardOptions(shard_size_mb=2.0, workers=os.cpu_count() or 1,
                                              overwrite=True),
                                 {"subsets": [subset]})
            totals = index["totals"]
            print(f"[demo] {subset}: {totals['written']} written + {totals['rejected']} rejected in "
                  f"{totals['shards']} shards -> {out}")
    model_dir = work_dir / "model-init"
    if not (model_dir / "config.json").exists():
        init_model(model_dir, "tiny")
        print(f"[demo] tiny randomly initialised model -> {model_dir}")


def launch_command(config: str, overrides: list[str], ranks: int = 2) -> tuple[list[str], dict[str, str]]:
    """``deepspeed --num_gpus N train.py ...``; on a machine without a GPU, DeepSpeed's CPU accelerator."""
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
    from w2v_dist.dist import free_port  # torch, only once a run is launched

    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "train.py",
           "--config", config, *overrides]
    return cmd, env


def run_demo(work_dir: Path, config: str, overrides: list[str], utterances: int, dev_utterances: int) -> int:
    prepare(work_dir, utterances, dev_utterances)
    cfg = load_config(config, overrides)
    if Path(cfg.output_dir).exists():  # the data and model are reused; the training run is the demo itself
        print(f"[demo] starting a fresh run: removing the previous {cfg.output_dir}")
        shutil.rmtree(cfg.output_dir)
    cmd, env = launch_command(config, overrides)
    print("[demo] training:", " ".join(cmd))
    if subprocess.run(cmd, env=env).returncode != 0:
        print("[demo] training failed; see the log above", file=sys.stderr)
        return 1
    output = Path(cfg.output_dir)
    final = output / "final"
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    wers = [(m["step"], m[k]) for m in metrics for k in m if k.endswith("/wer") and k.startswith("dev/")]
    print(f"[demo] loss {losses[0]:.3f} -> {losses[-1]:.3f} over {cfg.trainer.max_steps} updates")
    print("[demo] dev WER by step: " + ", ".join(f"{s}: {w:.3f}" for s, w in wers))
    if not final.is_dir():
        print("[demo] no export was written (non-finite weights?)", file=sys.stderr)
        return 1
    from w2v_dist.inference import transcribe

    dev = next(iter(cfg.data.dev_shards.values()))
    audio = sorted((work_dir / "corpus" / "LibriSpeech" / "dev-clean").glob("*/*/*.flac"))[0]
    trans = audio.parent / f"{'-'.join(audio.stem.split('-')[:2])}.trans.txt"
    reference = dict(line.split(" ", 1) for line in trans.read_text().splitlines())[audio.stem]
    hypothesis = next(transcribe(final, [str(audio)])).text
    print(f"[demo] {audio.name}\n  reference:  {reference}\n  hypothesis: {hypothesis}")
    print(f"[demo] corpus {work_dir / 'corpus'} | shards {Path(cfg.data.train_shards).parent} (dev: {dev}) "
          f"| run {output}: config.yaml, metrics.jsonl, checkpoints/, final/ (Hugging Face export)")
    return 0
