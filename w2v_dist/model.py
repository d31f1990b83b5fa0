"""Building the processor and the CTC model (``Wav2Vec2ForCTC`` and its kin: HuBERT, WavLM, data2vec-audio,
wav2vec2-conformer, UniSpeech, SEW), the fine-tuning knobs, and the seed script's sanity checks."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCTC,
    PreTrainedModel,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

from w2v_dist.config import ModelConfig
from w2v_dist.data.audio import EncoderGeometry
from w2v_dist.data.text import WORD_DELIMITER, librispeech_vocab, write_vocab
from w2v_dist.layerdrop import FIRST_DROPPABLE, SharedLayerDrop
from w2v_dist.pos_conv import use_pos_conv
from w2v_dist.spec_augment import use_sync_free_masking

log = logging.getLogger("w2v_dist.model")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            conv_dim=(64, 64, 64, 64, 64, 64, 64), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False)
"""A randomly initialised model small enough to train on two CPU cores in minutes (same conv geometry)."""


FAMILIES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer", "unispeech",
            "unispeech-sat", "sew", "sew-d")
"""``model_type``s of the ``AutoModelForCTC`` encoders that read raw 16 kHz waveforms through a
``Wav2Vec2FeatureExtractor`` and decode with a ``Wav2Vec2CTCTokenizer``: the loader, the checks and the
export hold for each (``tests/e2e/test_families.py`` trains every one). Others (wav2vec2-bert, Parakeet...)
take filter-bank features."""


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


def init_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, family: str = "wav2vec2",
               large_style: bool = False) -> Path:
    """Save a randomly initialised CTC model of ``family`` + processor (LibriSpeech characters) in
    ``out_dir``; ``large_style``: layer-normed feature encoder, stable layer norm and attention masks, as
    wav2vec2-large, XLS-R and MMS have."""
    torch.manual_seed(seed)
    processor = processor_from_vocab(librispeech_vocab(), return_attention_mask=large_style)
    geometry: dict[str, Any] = dict(TINY) if size == "tiny" else {}
    if large_style:
        geometry |= {"feat_extract_norm": "layer", "do_stable_layer_norm": True}
    if family == "data2vec-audio":  # there: the number of positional conv layers, not a kernel size
        geometry.pop("num_conv_pos_embeddings", None)
    if geometry:  # as many conv layers as the family has (SEW: 13)
        geometry["conv_dim"] = (64,) * len(AutoConfig.for_model(family).conv_stride)
    config = AutoConfig.for_model(family, vocab_size=len(processor.tokenizer),
                                  pad_token_id=processor.tokenizer.pad_token_id, ctc_loss_reduction="sum",
                                  **geometry)
    AutoModelForCTC.from_config(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def load_processor(cfg: ModelConfig, shard_vocab: dict[str, int] | None) -> Wav2Vec2Processor:
    """The model's own processor, or a new one from the shards' ``vocab.json`` for a pre-trained-only
    model."""
    try:
        return Wav2Vec2Processor.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError, TypeError) as err:
        if shard_vocab is None:
            raise ModelCheckError(f"{cfg.name_or_path} has no processor and the shards have no "
                                  f"vocab.json") from err
        log.info("no processor at %s; building one from the shards' vocab.json (%d tokens)",
                 cfg.name_or_path, len(shard_vocab))
        processor = processor_from_vocab(shard_vocab)
        if Path(cfg.name_or_path, "preprocessor_config.json").is_file():
            processor.feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(cfg.name_or_path)
        return processor


def load_model(cfg: ModelConfig, processor: Wav2Vec2Processor) -> PreTrainedModel:
    """Load the model with the recipe's overrides; a CTC head of the wrong size is re-initialised."""
    config = AutoConfig.from_pretrained(cfg.name_or_path)
    family = config.model_type
    if family not in FAMILIES:
        raise ModelCheckError(f"{cfg.name_or_path} is a {family!r} model; w2v-dist fine-tunes CTC encoders "
                              f"of raw waveforms: {', '.join(FAMILIES)}")
    attention = cfg.attention
    if attention == "sdpa" and not getattr(transformers, MODEL_FOR_CTC_MAPPING_NAMES[family])._supports_sdpa:
        log.info("%s has no SDPA attention; using eager attention", family)
        attention = "eager"
    recipe: dict[str, Any] = dict(
        mask_time_prob=cfg.mask_time_prob, mask_time_length=cfg.mask_time_length,
        mask_feature_prob=cfg.mask_feature_prob, mask_feature_length=cfg.mask_feature_length,
        layerdrop=cfg.layerdrop, hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, final_dropout=cfg.final_dropout)
    unused = [f"model.{k}" for k, v in recipe.items() if not hasattr(config, k) and v]
    if hasattr(config, "layerdrop"):
        recipe["layerdrop"] = 0.0  # drawn by w2v_dist.layerdrop instead, the same on every rank
    if unused:
        log.warning("%s has no %s: ignored", family, ", ".join(unused))
    # process-wide; see ModelConfig.cudnn_attention
    torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)
    tokenizer = processor.tokenizer
    loaded: tuple[PreTrainedModel,
                  dict[str, Any]] = AutoModelForCTC.from_pretrained(  # type: ignore[assignment]
        cfg.name_or_path, output_loading_info=True, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, ctc_loss_reduction="sum",
        ctc_zero_infinity=cfg.ctc_zero_infinity, attn_implementation=attention, ignore_mismatched_sizes=True,
        **{k: v for k, v in recipe.items() if hasattr(config, k)})
    model, loading = loaded  # output_loading_info=True: (model, what was missing, unexpected, resized)
    check_loaded_weights(cfg.name_or_path, loading, model.base_model_prefix)
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()  # type: ignore[operator]
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    use_pos_conv(model, cfg.pos_conv)
    use_sync_free_masking(model)
    layers = getattr(getattr(model, model.base_model_prefix).encoder, "layers", None)
    if cfg.layerdrop and hasattr(config, "layerdrop"):
        if not isinstance(layers, torch.nn.ModuleList):
            raise ModelCheckError(f"model.layerdrop: {family}'s encoder has no layer list to drop from; set "
                                  f"it 0")
        layer_drop = SharedLayerDrop(layers, cfg.layerdrop, FIRST_DROPPABLE.get(family, 0))
        model.layer_drop = layer_drop  # type: ignore[assignment]
    if cfg.compile:
        if not isinstance(layers, torch.nn.ModuleList):
            raise ModelCheckError(f"model.compile: {family}'s encoder has no layer list to compile; set it "
                                  f"false")
        for layer in layers:
            layer.compile(dynamic=True)  # in place: parameter names (checkpoints, exports) stay unchanged
    check_model(model, processor)
    return model


EXPECTED_MISSING = ("lm_head.", "masked_spec_embed")
"""Weights a fine-tuning start may lack: the new CTC head, and the mask embedding when masking is turned
on."""
EXPECTED_UNEXPECTED = ("quantizer.", "project_q.", "project_hid.", "final_proj.", "label_embs_concat",
                       "masked_spec_embed")
"""Weights a fine-tuning start may carry unused: the pre-training heads (wav2vec2's quantizer and
projections, HuBERT's cluster projections), and the mask embedding when masking is off. Under the model's
base prefix."""


def check_loaded_weights(source: str, loading: dict[str, Any], prefix: str) -> None:
    """Stop, naming them, when weights other than those above were missing (they would train from random
    values) or unexpected (the checkpoint's own weights were dropped): weights of another model family than
    its config says, or renamed keys. transformers only reports these and goes on; the run would fine-tune a
    randomly initialised encoder."""
    def expected(key: str, allowed: tuple[str, ...]) -> bool:
        return key.removeprefix(f"{prefix}.").startswith(allowed)

    missing = sorted(k for k in loading["missing_keys"] if not expected(k, EXPECTED_MISSING))
    unexpected = sorted(k for k in loading["unexpected_keys"] if not expected(k, EXPECTED_UNEXPECTED))
    resized = sorted(name for name, *_ in loading["mismatched_keys"] if not name.startswith("lm_head."))
    if missing or unexpected or resized:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"

        raise ModelCheckError(
            f"{source} does not hold this model's weights: missing {show(missing)}, unexpected "
            f"{show(unexpected)}, wrong shape {show(resized)}. Training would start from random values "
            f"where these are missing; model.name_or_path must be a {prefix} checkpoint (pre-trained or "
            f"fine-tuned) with its own key names")
    new_head = any(k.startswith("lm_head.")
                   for k in [*loading["missing_keys"], *(n for n, *_ in loading["mismatched_keys"])])
    unused = sorted({k.removeprefix(f"{prefix}.").split(".")[0] for k in loading["unexpected_keys"]})
    log.info("loaded %s%s%s", source, "; new CTC head" if new_head else "",
             f"; not used for fine-tuning: {', '.join(unused)}" if unused else "")


def check_model(model: PreTrainedModel, processor: Wav2Vec2Processor) -> None:
    """The seed script's checks, as errors rather than warnings."""
    tokenizer = processor.tokenizer
    if model.config.pad_token_id != tokenizer.pad_token_id:
        raise ModelCheckError(f"model pad_token_id {model.config.pad_token_id} != tokenizer pad_token_id "
                              f"{tokenizer.pad_token_id}: CTC blank and padding would disagree")
    if model.config.vocab_size != len(tokenizer):
        raise ModelCheckError(f"model vocab_size {model.config.vocab_size} != tokenizer size "
                              f"{len(tokenizer)}")
    geometry = EncoderGeometry.from_model_config(model.config)
    if geometry.inputs_to_logits_ratio != model.config.inputs_to_logits_ratio:
        raise ModelCheckError("inputs_to_logits_ratio does not match the conv strides")
    log.info("pad_token_id %d agrees; inputs_to_logits_ratio %d; receptive field %d samples",
             tokenizer.pad_token_id, geometry.inputs_to_logits_ratio, geometry.receptive_field)


ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "hidden_act", "conv_dim", "conv_stride", "conv_kernel",
                       "conv_bias", "feat_extract_norm", "feat_extract_activation",
                       "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm",
                       "position_embeddings_type", "add_adapter", "vocab_size")
"""The config fields that shape the weights or the computation: two models that differ in one cannot share a
checkpoint. A field a family lacks counts as absent; the recipe's knobs (dropout, masks, LayerDrop) may
change."""


def model_identity(name_or_path: str | Path, model: PreTrainedModel,
                   processor: Wav2Vec2Processor) -> dict[str, str]:
    """What a checkpoint records of the model it trains (``world.json``): ``model.name_or_path`` as
    configured, the family, and short hashes of the :data:`ARCHITECTURE_FIELDS` and of the vocabulary."""
    config = model.config
    return {"name_or_path": str(name_or_path), "family": config.model_type,
            "architecture": _digest({key: getattr(config, key, None) for key in ARCHITECTURE_FIELDS}),
            "vocabulary": _digest(processor.tokenizer.get_vocab())}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def identity_mismatch(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The parts of two :func:`model_identity` records that differ (empty: the same model)."""
    return [key for key in ("name_or_path", "family", "architecture", "vocabulary")
            if saved.get(key) != current[key]]


def describe_identity(identity: dict[str, str]) -> str:
    return (f"{identity.get('name_or_path')} ({identity.get('family')}, architecture "
            f"{identity.get('architecture')}, vocabulary {identity.get('vocabulary')})")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}

