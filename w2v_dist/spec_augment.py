"""SpecAugment as transformers draws it, applied without a host sync.

transformers draws the time and channel masks on the host (numpy, ``_compute_mask_indices``), copies them to
the device and applies them with boolean indexing (``hidden_states[mask] = embed``), an operator whose work
depends on how many positions are masked: on a GPU the host waits for the device there, once per forward and
again in the backward. Here the same masks, from the same draws in the same order, are applied with
``torch.where`` and ``masked_fill``, whose shapes do not depend on the data. Installed on the encoder of
every family that has transformers' ``_mask_hidden_states`` (:func:`use_sync_free_masking`);
``tests/unit/test_sync_free.py`` checks that the masks, the loss and the gradients equal transformers'.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices


def mask_hidden_states(self: nn.Module, hidden_states: torch.Tensor,
                       mask_time_indices: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ``_mask_hidden_states``, line for line, but for how the masks are applied."""
    config: Any = self.config
    if not getattr(config, "apply_spec_augment", True):
        return hidden_states
    batch_size, sequence_length, hidden_size = hidden_states.size()
    if mask_time_indices is None and config.mask_time_prob > 0 and self.training:
        drawn = _compute_mask_indices((batch_size, sequence_length), mask_prob=config.mask_time_prob,
                                      mask_length=config.mask_time_length,
                                      attention_mask=attention_mask,  # type: ignore[arg-type]
                                      min_masks=config.mask_time_min_masks)
        mask_time_indices = torch.tensor(drawn, device=hidden_states.device, dtype=torch.bool)
    if mask_time_indices is not None:
        embed: torch.Tensor = self.masked_spec_embed.to(  # type: ignore[operator,assignment]
            hidden_states.dtype)
        hidden_states = torch.where(mask_time_indices[..., None], embed, hidden_states)
    if config.mask_feature_prob > 0 and self.training:
        drawn = _compute_mask_indices((batch_size, hidden_size), mask_prob=config.mask_feature_prob,
                                      mask_length=config.mask_feature_length,
                                      min_masks=config.mask_feature_min_masks)
        features = torch.tensor(drawn, device=hidden_states.device, dtype=torch.bool)
        hidden_states = hidden_states.masked_fill(features[:, None, :], 0.0)
    return hidden_states


def use_sync_free_masking(model: nn.Module) -> bool:
    """Apply SpecAugment with :func:`mask_hidden_states` in ``model``'s encoder; ``False`` (nothing changed)
    for a family without transformers' masking method."""
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if base is None or not hasattr(base, "_mask_hidden_states") or not hasattr(base, "masked_spec_embed"):
        return False
    base._mask_hidden_states = types.MethodType(mask_hidden_states, base)
    return True
