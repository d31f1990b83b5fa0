"""Batched scoring only where padding cannot change an utterance's logits: measured on every family, every
kind of feature encoder, with and without an attention mask."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCTC

from w2v_dist.model import FAMILIES, TINY
from w2v_dist.scoring import scoring_batch_size

ENCODERS = {"group": dict(feat_extract_norm="group", do_stable_layer_norm=False),
            "layer": dict(feat_extract_norm="layer", do_stable_layer_norm=False),
            "layer-stable": dict(feat_extract_norm="layer", do_stable_layer_norm=True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scoring_only_where_padding_changes_no_logit(family: str) -> None:
    torch.manual_seed(0)
    longest, lengths = 8_000, (4_000, 6_400)  # SEW's pooling leaks padding at some lengths only
    waves = torch.randn(len(lengths) + 1, longest)
    for row, length in enumerate(lengths, start=1):
        waves[row, length:] = 0.0  # the collator's padding: zeros after normalisation
    mask = (torch.arange(longest)[None, :] < torch.tensor([longest, *lengths])[:, None]).long()
    for encoder, settings in ENCODERS.items():
        geometry = TINY | settings | {"conv_dim": (64,) * len(AutoConfig.for_model(family).conv_stride)}
        if family == "data2vec-audio":  # there: the number of positional conv layers, not a kernel size
            geometry.pop("num_conv_pos_embeddings")
        config = AutoConfig.for_model(family, vocab_size=32, **geometry)
        model = AutoModelForCTC.from_config(config).eval()
        with torch.no_grad():
            alone = [model(waves[row:row + 1, :length]).logits[0]
                     for row, length in enumerate(lengths, start=1)]
            for masked in (False, True):
                logits = model(waves, attention_mask=mask if masked else None).logits
                change = max((logits[row, :len(own)] - own).abs().max().item()
                             for row, own in enumerate(alone, 1))
                batches = scoring_batch_size(config, masked, 8) > 1
                assert batches == (change < 1e-5), (
                    f"{family}, {encoder} feature encoder, {'with' if masked else 'no'} attention mask: "
                    f"padding changes the logits by up to {change:.1e}, but scoring_batch_size "
                    f"{'batches' if batches else 'takes one utterance at a time'}")
