"""Building the processor and ``Wav2Vec2ForCTC``, the fine-tuning knobs, and the seed script's sanity checks."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

from w2v_dist.config import ModelConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.text import WORD_DELIMITER, librispeech_vocab, write_vocab

log = logging.getLogger("w2v_dist.model")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            conv_dim=(64, 64, 64, 64, 64, 64, 64), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            feat_extract_norm="group", do_stable_layer_norm=False)
"""A randomly initialised model small enough to train on two CPU cores in minutes (same conv geometry)."""


class ModelCheckError(RuntimeError):
    """The model and its processor disagree in a way that would make CTC training fail or produce garbage."""


def processor_from_vocab(vocab: dict[str, int], return_attention_mask: bool = False) -> Wav2Vec2Processor:
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab(vocab, Path(tmp) / "vocab.json")
        tokenizer = Wav2Vec2CTCTokenizer(str(Path(tmp) / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                         word_delimiter_token=WORD_DELIMITER)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=return_attention_mask)
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def init_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save a randomly initialised ``Wav2Vec2ForCTC`` + processor (LibriSpeech characters) in ``out_dir``."""
    torch.manual_seed(seed)
    processor = processor_from_vocab(librispeech_vocab())
    geometry = TINY if size == "tiny" else {}
    config = Wav2Vec2Config(vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id,
                            ctc_loss_reduction="sum", **geometry)  # type: ignore[arg-type]
    model = Wav2Vec2ForCTC(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def load_processor(cfg: ModelConfig, shard_vocab: dict[str, int] | None) -> Wav2Vec2Processor:
    """The model's own processor, or a new one from the shards' ``vocab.json`` for a pre-trained-only model."""
    try:
        return Wav2Vec2Processor.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError, TypeError) as err:
        if shard_vocab is None:
            raise ModelCheckError(f"{cfg.name_or_path} has no processor and the shards have no vocab.json") from err
        log.info("no processor at %s; building one from the shards' vocab.json (%d tokens)",
                 cfg.name_or_path, len(shard_vocab))
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(cfg.name_or_path) \
            if Path(cfg.name_or_path, "preprocessor_config.json").is_file() else None
        processor = processor_from_vocab(shard_vocab)
        if extractor is not None:
            processor.feature_extractor = extractor
        return processor


def load_model(cfg: ModelConfig, processor: Wav2Vec2Processor) -> Wav2Vec2ForCTC:
    """Load the model with the recipe's overrides; a CTC head of the wrong size is re-initialised."""
    tokenizer = processor.tokenizer
    torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)  # process-wide; see ModelConfig.cudnn_attention
    loaded: tuple[Wav2Vec2ForCTC, dict[str, Any]] = Wav2Vec2ForCTC.from_pretrained(  # type: ignore[assignment]
        cfg.name_or_path, output_loading_info=True, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        ctc_loss_reduction="sum", ctc_zero_infinity=cfg.ctc_zero_infinity, mask_time_prob=cfg.mask_time_prob,
        mask_time_length=cfg.mask_time_length, mask_feature_prob=cfg.mask_feature_prob,
        mask_feature_length=cfg.mask_feature_length, layerdrop=cfg.layerdrop, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        final_dropout=cfg.final_dropout, attn_implementation=cfg.attention, ignore_mismatched_sizes=True)
    model, loading = loaded  # output_loading_info=True: (model, what was missing, unexpected, resized)
    check_loaded_weights(cfg.name_or_path, loading)
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.compile:
        for layer in model.wav2vec2.encoder.layers:
            layer.compile(dynamic=True)  # in place: parameter names (checkpoints, exports) stay unchanged
    check_model(model, processor)
    return model


EXPECTED_MISSING = ("lm_head.", "wav2vec2.masked_spec_embed")
"""Weights a fine-tuning start may lack: the new CTC head, and the mask embedding when masking is turned on."""
EXPECTED_UNEXPECTED = ("quantizer.", "project_q.", "project_hid.", "wav2vec2.masked_spec_embed")
"""Weights a fine-tuning start may carry unused: the pre-training heads, and the mask embedding when masking is
off."""


def check_loaded_weights(source: str, loading: dict[str, Any]) -> None:
    """Stop, naming them, when weights other than those above were missing (they would train from random values)
    or unexpected (the checkpoint's own weights were dropped): a checkpoint of another model family, or renamed
    keys. transformers only reports these and goes on; the run would fine-tune a randomly initialised encoder."""
    missing = sorted(k for k in loading["missing_keys"] if not k.startswith(EXPECTED_MISSING))
    unexpected = sorted(k for k in loading["unexpected_keys"] if not k.startswith(EXPECTED_UNEXPECTED))
    resized = sorted(name for name, *_ in loading["mismatched_keys"] if not name.startswith("lm_head."))
    if missing or unexpected or resized:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"

        raise ModelCheckError(
            f"{source} does not hold this model's weights: missing {show(missing)}, unexpected {show(unexpected)}, "
            f"wrong shape {show(resized)}. Training would start from random values where these are missing; "
            "model.name_or_path must be a wav2vec2 checkpoint (pre-trained or fine-tuned) with its own key names")


def check_model(model: Wav2Vec2ForCTC, processor: Wav2Vec2Processor) -> None:
    """The seed script's checks, as errors rather than warnings."""
    tokenizer = processor.tokenizer
    if model.config.pad_token_id != tokenizer.pad_token_id:
        raise ModelCheckError(f"model pad_token_id {model.config.pad_token_id} != tokenizer pad_token_id "
                              f"{tokenizer.pad_token_id}: CTC blank and padding would disagree")
    if model.config.vocab_size != len(tokenizer):
        raise ModelCheckError(f"model vocab_size {model.config.vocab_size} != tokenizer size {len(tokenizer)}")
    geometry = EncoderGeometry.from_model_config(model.config)
    if geometry.inputs_to_logits_ratio != model.config.inputs_to_logits_ratio:
        raise ModelCheckError("inputs_to_logits_ratio does not match the conv strides")
    log.info("pad_token_id %d agrees; inputs_to_logits_ratio %d; receptive field %d samples",
             tokenizer.pad_token_id, geometry.inputs_to_logits_ratio, geometry.receptive_field)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}

