"""One scorer: the dev WER a 2-rank training run logs is, to the last digit, what ``w2v-dist evaluate``
reports on its final/ export, on a dev set that holds utterances outside the training filters; both equal
jiwer. For a group-norm model without attention mask (wav2vec2-base) both sides score one utterance at a
time; for a layer-norm model with attention masks (wav2vec2-large, XLS-R) both batch, each its own way, so a
path that padded or masked differently would transcribe differently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.support.launch import run_deepspeed
from tests.support.runs import check, metrics, overrides
from w2v_dist.data.index import load_shard_set
from w2v_dist.model import init_model
from w2v_dist.prep.shards import ShardOptions, shard_corpus
from w2v_dist.prep.sources import librispeech_sources, manifest_sources

BIN = Path(sys.executable).parent
SHORT_SECONDS = 0.15
"""Below the run's data.min_seconds (0.2): training would skip it as too_short."""


def mixed_dev_set(corpus: Path, out: Path) -> Path:
    """The corpus' dev utterances, a clip too short for training, and one as long as three utterances."""
    sources = librispeech_sources(corpus, ["dev-clean"])
    lines = [{"path": str(s.audio), "text": s.text, "key": s.key} for s in sources]
    audio = [sf.read(s.audio, dtype="float32")[0] for s in sources[:3]]
    sf.write(out / "short.flac", audio[0][:int(SHORT_SECONDS * 16_000)], 16_000)
    sf.write(out / "long.flac", np.concatenate(audio), 16_000)
    lines += [{"path": str(out / "short.flac"), "text": "A", "key": "mixed-short"},
              {"path": str(out / "long.flac"), "text": " ".join(str(s.text) for s in sources[:3]),
               "key": "mixed-long"}]
    manifest = out / "dev.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    shards = out / "mixed" / "dev-clean"  # the demo config's dev set name: this replaces it
    shard_corpus(manifest_sources(manifest), shards, ShardOptions(shard_size_mb=0.1, workers=1), {})
    return shards


@pytest.mark.slow
@pytest.mark.parametrize("large_style", [False, True], ids=["group-norm", "layer-norm"])
def test_training_dev_wer_is_the_wer_evaluate_reports(large_style: bool, corpus: Path, shard_dirs: dict,
                                                      tiny_model: Path, tmp_path: Path) -> None:
    model = init_model(tmp_path / "init", "tiny", large_style=True) if large_style else tiny_model
    dev = mixed_dev_set(corpus, tmp_path)
    seconds = sorted(u.num_samples / 16_000 for shard in load_shard_set(str(dev)).utterances for u in shard)
    indexed = len(seconds)
    max_seconds = seconds[len(seconds) // 2]  # half of the dev set is longer than training accepts
    out = tmp_path / "run"
    steps = 4
    # At the usual 1e-3 the layer-norm model falls silent (blank everywhere) within 4 updates, and a model
    # that transcribes nothing would hide any padding difference: a smaller step keeps it talking.
    check(run_deepspeed(["--config", "configs/demo.yaml", *overrides(
        shard_dirs, model, out, **{"data.dev_shards": f"{{dev-clean: {dev}}}",
                                   "data.max_seconds": max_seconds, "trainer.max_steps": steps,
                                   "trainer.eval_every": 0, "trainer.save_every": steps,
                                   **({"optim.lr": 1e-5} if large_style else {})})]))
    logged = [r for r in metrics(out) if "dev/dev-clean/wer" in r][-1]
    assert logged["step"] == steps
    assert logged["dev/dev-clean/utterances"] == indexed and logged["dev/dev-clean/unscored"] == 0

    rows_file = tmp_path / "evaluate.jsonl"
    proc = subprocess.run([str(BIN / "w2v-dist"), "evaluate", "--model", str(out / "final"), "--shards",
                           str(dev), "--out", str(rows_file)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    check(proc)
    reported = json.loads(proc.stdout)["sets"]["dev-clean"]
    assert reported["wer"] == logged["dev/dev-clean/wer"] and reported["cer"] == logged["dev/dev-clean/cer"]
    assert reported["utterances"] == indexed and reported["unscored"] == 0
    assert json.loads(proc.stdout)["max_batch_size"] == (64 if large_style else 1)

    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    trained_rows = [json.loads(line) for line in
                    (out / "eval" / f"step_{steps:08d}" / "dev-clean.jsonl").read_text().splitlines()]
    assert [(r["key"], r["hypothesis"]) for r in rows] == [(r["key"], r["hypothesis"]) for r in trained_rows]
    assert {"mixed-short", "mixed-long"} <= {r["key"] for r in rows}
    assert reported["wer"] == jiwer.wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
    assert any(r["hypothesis"] for r in rows), "the model should emit something for the comparison to bite"

    card = (out / "final" / "README.md").read_text()  # the model card carries the same figure
    metadata = yaml.safe_load(card.split("---\n")[1])
    result = metadata["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "LibriSpeech (dev-clean)", "type": "librispeech_asr",
                                 "config": "clean", "split": "validation"}
    assert (result["metrics"][0] == {"type": "wer", "name": "WER (%)",
                                     "value": round(100 * reported["wer"], 2)})
    assert f"for {steps} updates" in card and f"max_steps: {steps}" in card
