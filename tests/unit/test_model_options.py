"""Model knobs from the GPU benchmark: attention kernel, cuDNN attention switch, compiled layers."""

from __future__ import annotations

from pathlib import Path

import torch

from w2v_dist.config import load_config
from w2v_dist.model import init_model, load_model, load_processor


def test_attention_and_compile_options_keep_parameter_names(tmp_path: Path) -> None:
    init_model(tmp_path, "tiny")
    plain = load_config(None, [f"model.name_or_path={tmp_path}"])
    tuned = load_config(None, [f"model.name_or_path={tmp_path}", "model.attention=eager", "model.compile=true",
                               "model.cudnn_attention=true"])
    reference = load_model(plain.model, load_processor(plain.model, None))
    assert reference.config._attn_implementation == "sdpa"
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default: flash/efficient kernels only
    model = load_model(tuned.model, load_processor(tuned.model, None))
    assert model.config._attn_implementation == "eager" and torch.backends.cuda.cudnn_sdp_enabled()
    # Compiled layers are wrapped in place: checkpoints and exports keep the plain parameter names.
    assert list(model.state_dict()) == list(reference.state_dict())
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.wav2vec2.encoder.layers)
    torch.backends.cuda.enable_cudnn_sdp(False)

