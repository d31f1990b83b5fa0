"""Model knobs from the GPU benchmark: attention kernel, cuDNN attention switch, compiled layers."""

from __future__ import annotations

from pathlib import Path

import torch

from w2v_dist.config import load_config
from w2v_dist.model import init_model, load_model, load_processor


def test_attention_and_compile_options_keep_parameter_names(tmp_path: Path) -> None:
    init_model(tmp_path, "tiny")
    plain = load_config(None, [f"model.name_or_path={tmp_path}"])
    tuned = load_config(None, [f"model.name_or_path={tmp_path}", "model.attention=eager",
                               "model.compile=true", "model.cudnn_attention=true"])
    reference = load_model(plain.model, load_processor(plain.model, None))
    assert reference.config._attn_implementation == "sdpa"
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the default: flash/efficient kernels only
    model = load_model(tuned.model, load_processor(tuned.model, None))
    assert model.config._attn_implementation == "eager" and torch.backends.cuda.cudnn_sdp_enabled()
    # Compiled layers are wrapped in place: checkpoints and exports keep the plain parameter names.
    assert list(model.state_dict()) == list(reference.state_dict())
    assert (all(getattr(layer, "_compiled_call_impl", None) is not None
                for layer in model.wav2vec2.encoder.layers))
    torch.backends.cuda.enable_cudnn_sdp(False)



def test_a_model_family_that_reads_features_is_refused(tmp_path: Path) -> None:
    import pytest
    from transformers import Wav2Vec2BertConfig

    from w2v_dist.model import ModelCheckError

    Wav2Vec2BertConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelCheckError,
                       match="is a 'wav2vec2-bert' model; w2v-dist fine-tunes CTC encoders of raw"):
        load_model(load_config(None, [f"model.name_or_path={tmp_path}"]).model,
                   None)  # type: ignore[arg-type]


def test_weights_that_do_not_load_stop_the_run_naming_them(tmp_path: Path) -> None:
    """transformers only reports a checkpoint whose weights it dropped; training would start from random
    values."""
    import pytest
    from safetensors.torch import load_file, save_file
    from transformers import HubertConfig, HubertForCTC

    from w2v_dist.model import TINY, ModelCheckError

    good = init_model(tmp_path / "wav2vec2", "tiny")
    for masking in ("0.0", "0.05"):  # the mask embedding, unused without masking, is no reason to stop
        cfg = load_config(None, [f"model.name_or_path={good}", f"model.mask_time_prob={masking}"])
        load_model(cfg.model, load_processor(cfg.model, None))

    processor = load_processor(load_config(None, [f"model.name_or_path={good}"]).model, None)
    # a HuBERT checkpoint whose config.json says wav2vec2
    mislabelled = tmp_path / "hubert-weights-wav2vec2-config"
    HubertForCTC(HubertConfig(vocab_size=32, **TINY)).save_pretrained(mislabelled)
    processor.save_pretrained(mislabelled)
    (mislabelled / "config.json").write_text((good / "config.json").read_text())
    cfg = load_config(None, [f"model.name_or_path={mislabelled}"])
    with pytest.raises(ModelCheckError, match=r"does not hold this model's weights: missing \d+ "
                                              r"\(wav2vec2\..*unexpected \d+ \(hubert\."):
        load_model(cfg.model, processor)

    renamed = tmp_path / "renamed"
    init_model(renamed, "tiny")
    weights = load_file(renamed / "model.safetensors")
    key = "wav2vec2.encoder.layers.0.attention.k_proj.weight"
    weights["wav2vec2.encoder.layers.0.attention.key.weight"] = weights.pop(key)
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(None, [f"model.name_or_path={renamed}"])
    with pytest.raises(ModelCheckError, match=rf"missing 1 \({key}\), unexpected 1 "
                                              rf"\(wav2vec2\.encoder\.layers\.0"
                                              r"\.attention\.key\.weight\)"):
        load_model(cfg.model, processor)


def test_weights_of_another_shape_stop_the_run_naming_them(tmp_path: Path) -> None:
    """A checkpoint whose config.json says one size and whose weights have another: transformers
    re-initialises the resized weights (``ignore_mismatched_sizes``, needed for a new CTC head) and only
    reports them."""
    import dataclasses

    import pytest
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from w2v_dist.model import TINY, ModelCheckError

    good = init_model(tmp_path / "wav2vec2", "tiny")
    cfg = load_config(None, [f"model.name_or_path={good}"])
    processor = load_processor(cfg.model, None)
    for name, size in (("hidden", {"hidden_size": 32, "intermediate_size": 64}),
                       ("conv", {"conv_dim": (32,) * 7})):
        other = tmp_path / name
        Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(processor.tokenizer),
                                      **(TINY | size))).save_pretrained(other)
        (other / "config.json").write_text((good / "config.json").read_text())
        with pytest.raises(ModelCheckError,
                           match=r"missing 0 \(\), unexpected 0 \(\), wrong shape \d+ \(wav2vec2\."):
            load_model(dataclasses.replace(cfg.model, name_or_path=str(other)), processor)
