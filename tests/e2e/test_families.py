"""Every supported CTC encoder family trains on 2 DeepSpeed ranks, exports, and transcribes through
``transformers.pipeline`` from the export alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from helpers import check, metrics, overrides, run_deepspeed

from w2v_dist.model import FAMILIES, init_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("family", "large_style"), [(f, False) for f in FAMILIES] + [("wav2vec2", True)])
def test_family_trains_on_two_ranks_exports_and_transcribes(family: str, large_style: bool, corpus: Path,
                                                            shard_dirs: dict, tmp_path: Path) -> None:
    """``large_style``: stable layer norm and attention masks, as wav2vec2-large, XLS-R and MMS."""
    from transformers import pipeline

    model = init_model(tmp_path / "init", "tiny", family=family, large_style=large_style)
    out = tmp_path / "run"
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, model, out, **{"trainer.max_steps": 2, "trainer.eval_every": 0, "trainer.save_every": 0,
                                   "model.mask_time_prob": 0.2, "model.mask_time_length": 2})]))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]
    assert [r for r in metrics(out) if "final" in r][-1]["final"]["exported"]
    exported = json.loads((out / "final" / "config.json").read_text())
    assert exported["model_type"] == family
    extractor = json.loads((out / "final" / "processor_config.json").read_text())["feature_extractor"]
    assert extractor["return_attention_mask"] == large_style == exported.get("do_stable_layer_norm", False)
    audio, rate = sf.read(next((corpus / "dev-clean").rglob("*.flac")), dtype="float32")
    result = pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")(
        {"raw": audio, "sampling_rate": rate})
    assert isinstance(result["text"], str)
