"""Every supported CTC encoder family trains on 2 DeepSpeed ranks, exports, and transcribes through
``transformers.pipeline`` from the export alone: the export loads as the same family with every weight in
place, holds the engine's weights (the frozen feature encoder as it started, every other weight moved), fits
training utterances better than the initial model did, and the pipeline writes what the model's own best path
spells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.support.launch import run_deepspeed
from tests.support.runs import check, metrics, overrides
from w2v_dist.model import FAMILIES, init_model
from w2v_dist.prep.sources import librispeech_sources

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("family", "large_style"), [(f, False) for f in FAMILIES] + [("wav2vec2", True)])
def test_family_trains_on_two_ranks_exports_and_transcribes(family: str, large_style: bool, corpus: Path,
                                                            shard_dirs: dict, tmp_path: Path) -> None:
    """``large_style``: stable layer norm and attention masks, as wav2vec2-large, XLS-R and MMS."""
    from transformers import AutoModelForCTC, Wav2Vec2Processor, pipeline
    from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

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

    trained, loading = AutoModelForCTC.from_pretrained(out / "final", output_loading_info=True)
    assert type(trained).__name__ == MODEL_FOR_CTC_MAPPING_NAMES[family]
    assert not (loading["missing_keys"] or loading["unexpected_keys"] or loading["mismatched_keys"]), loading
    weights = trained.state_dict()
    engine = torch.load(out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                        weights_only=True)
    assert weights.keys() == engine["module"].keys()
    assert all(torch.equal(weights[name], engine["module"][name]) for name in weights)

    processor = Wav2Vec2Processor.from_pretrained(out / "final")
    utterances = [sf.read(source.audio, dtype="float32") + (source.text,)
                  for source in librispeech_sources(corpus, ["train-clean-100"])[:4]]

    def loss(network: torch.nn.Module) -> torch.Tensor:
        return sum(network.eval()(**processor(audio, sampling_rate=rate, return_tensors="pt"),
                                  labels=processor.tokenizer(text, return_tensors="pt").input_ids).loss
                   for audio, rate, text in utterances)

    initial = AutoModelForCTC.from_pretrained(model)
    initial.freeze_feature_encoder()  # as the recipe does (model.freeze_feature_encoder)
    initial_loss = loss(initial)
    # which weights the loss reaches (not all: the conformer never uses its pos_conv_embed)
    initial_loss.backward()
    reached = {name for name, p in initial.named_parameters() if p.grad is not None and bool(p.grad.any())}
    frozen = {name for name, p in initial.named_parameters() if not p.requires_grad}
    moved = {name for name, w in initial.state_dict().items() if not torch.equal(w, weights[name])}
    assert frozen and not frozen & moved and reached and reached <= moved, (frozen & moved, reached - moved)
    with torch.no_grad():
        assert loss(trained) < initial_loss.item()

    audio, rate = sf.read(next((corpus / "dev-clean").rglob("*.flac")), dtype="float32")
    result = pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")(
        {"raw": audio, "sampling_rate": rate})
    with torch.no_grad():
        best_path = trained(**processor(audio, sampling_rate=rate, return_tensors="pt")).logits.argmax(-1)[0]
    assert result["text"] == processor.decode(best_path)
