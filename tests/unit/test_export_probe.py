"""No export has non-finite outputs: finite weights whose logits overflow on a probe batch are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCTC, Wav2Vec2Processor

from w2v_dist.export import write_export


def test_finite_weights_whose_logits_are_not_finite_are_not_exported(
        tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = AutoModelForCTC.from_pretrained(tiny_model)
    processor = Wav2Vec2Processor.from_pretrained(tiny_model)
    assert write_export(model, processor, tmp_path / "good")
    with torch.no_grad():
        # finite (float32 ends at 3.4e38), but a sum of 64 such products is not
        model.lm_head.weight.fill_(3e38)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not write_export(model, processor, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    assert "not exporting" in caplog.text and "of its logits on a probe batch" in caplog.text
